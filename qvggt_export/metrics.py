"""Evaluation metrics, exactly as the released protocols (docs/evaluation.md).

- Camera pose: relative poses of all pairs i < j, Rel = E_i inverse(E_j) (camera-from-world, OpenCV),
  no similarity alignment, float64. Rotation error from quaternions, translation error as the angle
  between unit translation directions (sign-free), AUC@tau over max(e_R, e_T) with 1-degree bins.
- Depth: AbsRel and delta < 1.25 after per-frame median scaling.
- Point maps: Acc / Comp / NC (mean and median) after the CUT3R alignment: median-z shift, median
  scale, central 224x224 crop, point-to-point ICP (threshold 0.1, identity init), normals after ICP.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.spatial import cKDTree

from .geometry import closed_form_inverse_se3, mat_to_quat

POSE_THRESHOLDS = (30, 15, 5, 3)
FAILED_POSE_ERROR = 1e6  # degrees given to a pair whose error is NaN or infinite
_EPS = 1e-15


# ---------------------------------------------------------------------------------------------
# Camera pose


def _as_sequences(extrinsics) -> list[np.ndarray]:
    """One array [S, 3|4, 4] or a list of them -> list of float64 [S, 4, 4]."""
    if isinstance(extrinsics, torch.Tensor) or (isinstance(extrinsics, np.ndarray) and extrinsics.ndim == 3):
        extrinsics = [extrinsics]
    sequences = []
    for item in extrinsics:
        array = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
        if array.ndim != 3 or array.shape[1:] not in ((3, 4), (4, 4)):
            raise ValueError(f"expected extrinsics [S, 3, 4] or [S, 4, 4], got {array.shape}")
        padded = np.tile(np.eye(4), (len(array), 1, 1))
        padded[:, :3, :] = array[:, :3, :]
        sequences.append(padded)
    return sequences


def _relative_poses(se3: np.ndarray) -> np.ndarray:
    first, second = np.triu_indices(len(se3), 1)  # all pairs i < j, in torch.combinations order
    return se3[first] @ closed_form_inverse_se3(se3[second])


def _rotation_errors(rotation_pred: np.ndarray, rotation_gt: np.ndarray) -> np.ndarray:
    q_pred = mat_to_quat(torch.from_numpy(rotation_pred)).numpy()
    q_gt = mat_to_quat(torch.from_numpy(rotation_gt)).numpy()
    # Rotations stored in float32 are orthonormal to ~1e-8 only, so their quaternions are not quite
    # unit; near-zero errors go through a square root below and 1e-8 would read as ~0.02 degrees.
    q_pred /= np.linalg.norm(q_pred, axis=-1, keepdims=True)
    q_gt /= np.linalg.norm(q_gt, axis=-1, keepdims=True)
    loss = np.clip(1 - (q_pred * q_gt).sum(-1) ** 2, _EPS, None)
    return np.degrees(np.arccos(1 - 2 * loss))


def _translation_errors(t_pred: np.ndarray, t_gt: np.ndarray) -> np.ndarray:
    t_pred = t_pred / (np.linalg.norm(t_pred, axis=-1, keepdims=True) + _EPS)
    t_gt = t_gt / (np.linalg.norm(t_gt, axis=-1, keepdims=True) + _EPS)
    loss = np.clip(1.0 - (t_pred * t_gt).sum(-1) ** 2, _EPS, None)
    with np.errstate(invalid="ignore"):
        error = np.arccos(np.sqrt(1 - loss))
    error[~np.isfinite(error)] = FAILED_POSE_ERROR
    error = np.degrees(error)
    return np.minimum(error, np.abs(180 - error))


def relative_pose_errors(pred_extrinsics, gt_extrinsics) -> tuple[np.ndarray, np.ndarray]:
    """Rotation and translation errors in degrees for every pair i < j, pooled over sequences."""
    preds, gts = _as_sequences(pred_extrinsics), _as_sequences(gt_extrinsics)
    if len(preds) != len(gts) or any(p.shape != g.shape for p, g in zip(preds, gts)):
        raise ValueError("predicted and ground-truth extrinsics differ in number or shape")
    rotation_errors, translation_errors = [], []
    for pred, gt in zip(preds, gts):
        relative_pred, relative_gt = _relative_poses(pred), _relative_poses(gt)
        rotation_errors.append(_rotation_errors(relative_pred[:, :3, :3], relative_gt[:, :3, :3]))
        translation_errors.append(_translation_errors(relative_pred[:, :3, 3], relative_gt[:, :3, 3]))
    rotation, translation = np.concatenate(rotation_errors), np.concatenate(translation_errors)
    rotation[~np.isfinite(rotation)] = FAILED_POSE_ERROR
    return rotation, translation


def pose_auc(rotation_errors: np.ndarray, translation_errors: np.ndarray, threshold: float) -> float:
    """AUC in percent: mean of the cumulative histogram of max(e_R, e_T) over 1-degree bins up to tau."""
    if len(rotation_errors) == 0:
        return float("nan")
    max_errors = np.maximum(rotation_errors, translation_errors)
    histogram, _ = np.histogram(max_errors, bins=np.arange(threshold + 1))
    return float(np.mean(np.cumsum(histogram / len(max_errors))) * 100)


def camera_pose_auc(pred_extrinsics, gt_extrinsics, thresholds=POSE_THRESHOLDS) -> dict[int, float]:
    """{threshold: AUC in percent} for one sequence [S, 3|4, 4] or a list of sequences (pairs pooled)."""
    rotation, translation = relative_pose_errors(pred_extrinsics, gt_extrinsics)
    return {threshold: pose_auc(rotation, translation, threshold) for threshold in thresholds}


def pose_metrics_from_errors(rotation_errors: np.ndarray, translation_errors: np.ndarray) -> dict[str, float]:
    """AUC@30/15/5/3, RRA@30 / RTA@30 (percent of pairs under 30 degrees) and mean errors (NaN without pairs)."""
    metrics = {f"auc@{t}": pose_auc(rotation_errors, translation_errors, t) for t in POSE_THRESHOLDS}
    has_pairs = len(rotation_errors) > 0

    def mean(values):
        return float(np.mean(values)) if has_pairs else float("nan")

    metrics["rra@30"] = mean(rotation_errors < 30) * 100
    metrics["rta@30"] = mean(translation_errors < 30) * 100
    metrics["rotation_error_deg"] = mean(rotation_errors)
    metrics["translation_error_deg"] = mean(translation_errors)
    metrics["pairs"] = len(rotation_errors)
    return metrics


def camera_pose_metrics(pred_extrinsics, gt_extrinsics) -> dict[str, float]:
    return pose_metrics_from_errors(*relative_pose_errors(pred_extrinsics, gt_extrinsics))


# ---------------------------------------------------------------------------------------------
# Depth


def depth_metrics(pred_depth: np.ndarray, gt_depth: np.ndarray, valid: np.ndarray) -> dict[str, float]:
    """AbsRel and delta<1.25 of depth [S, H, W] after per-frame median scaling, averaged over frames."""
    abs_rel, delta = [], []
    for pred, gt, mask in zip(np.asarray(pred_depth, np.float64), np.asarray(gt_depth, np.float64), valid):
        mask = mask & (gt > 0) & np.isfinite(pred)
        if not mask.any():
            continue
        pred, gt = pred[mask], gt[mask]
        pred = pred * (np.median(gt) / np.median(pred))
        abs_rel.append(np.mean(np.abs(pred - gt) / gt))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.maximum(pred / gt, gt / pred)
        delta.append(np.mean((pred > 0) & (ratio < 1.25)))
    if not abs_rel:
        return {"abs_rel": float("nan"), "delta<1.25": float("nan")}
    return {"abs_rel": float(np.mean(abs_rel)), "delta<1.25": float(np.mean(delta) * 100)}


# ---------------------------------------------------------------------------------------------
# Point maps


def align_point_maps(pred_points: np.ndarray, gt_points: np.ndarray, valid: np.ndarray):
    """CUT3R alignment of point maps [S, H, W, 3] (same frame, e.g. camera 0) over valid pixels.

    Each cloud's median z is subtracted; the scale of a cloud is the median distance to its per-axis
    median; the prediction is rescaled to the ground truth's scale. Returns (pred, gt) aligned.
    """
    pred = np.array(pred_points, dtype=np.float64)
    gt = np.array(gt_points, dtype=np.float64)
    pred_valid = valid & np.isfinite(pred).all(-1)
    for cloud, mask in ((pred, pred_valid), (gt, valid)):
        cloud[..., 2] -= np.median(cloud[mask][:, 2])

    def scale(cloud, mask):
        points = cloud[mask]
        return np.median(np.linalg.norm(points - np.median(points, axis=0), axis=-1))

    pred *= scale(gt, valid) / np.clip(scale(pred, pred_valid), 1e-3, 1e3)
    return pred, gt


def central_crop(array: np.ndarray, size: int = 224) -> np.ndarray:
    """The central size x size pixels of [S, H, W, ...] (all of an axis shorter than size)."""
    height, width = array.shape[1:3]
    top, left = max(height // 2 - size // 2, 0), max(width // 2 - size // 2, 0)
    return array[:, top : top + size, left : left + size]


def _rigid_fit(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation and translation (no scale) taking source onto target: 4x4."""
    source_mean, target_mean = source.mean(0), target.mean(0)
    covariance = (target - target_mean).T @ (source - source_mean)
    u, _, vt = np.linalg.svd(covariance)
    correction = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt))])  # no reflections
    rotation = u @ correction @ vt
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = target_mean - rotation @ source_mean
    return transform


def icp_point_to_point(
    source: np.ndarray,
    target: np.ndarray,
    max_distance: float,
    max_iterations: int = 30,
    relative_fitness: float = 1e-6,
    relative_rmse: float = 1e-6,
    target_tree: cKDTree | None = None,
) -> tuple[np.ndarray, float, float]:
    """Point-to-point ICP from the identity, as Open3D's registration_icp with its default criteria.

    Correspondences are nearest target points within max_distance. Returns (4x4 transform taking
    source onto target, fitness = matched fraction, inlier RMSE).
    """
    tree = target_tree or cKDTree(target)
    transform = np.eye(4)
    moved = source

    def evaluate(points):
        distances, indices = tree.query(points, distance_upper_bound=max_distance, workers=-1)
        matched = np.isfinite(distances)
        rmse = float(np.sqrt(np.mean(distances[matched] ** 2))) if matched.any() else 0.0
        return matched, indices, float(matched.mean()), rmse

    matched, indices, fitness, rmse = evaluate(moved)
    for _ in range(max_iterations):
        if matched.sum() < 3:
            break
        update = _rigid_fit(moved[matched], target[indices[matched]])
        transform = update @ transform
        moved = source @ transform[:3, :3].T + transform[:3, 3]
        previous_fitness, previous_rmse = fitness, rmse
        matched, indices, fitness, rmse = evaluate(moved)
        if abs(previous_fitness - fitness) < relative_fitness and abs(previous_rmse - rmse) < relative_rmse:
            break
    return transform, fitness, rmse


def estimate_normals(points: np.ndarray, neighbours: int = 30, tree: cKDTree | None = None,
                     chunk: int = 65536) -> np.ndarray:
    """Unit normals [N, 3]: the least-variance direction of each point's k nearest neighbours (sign arbitrary)."""
    tree = tree or cKDTree(points)
    k = min(neighbours, len(points))
    normals = np.empty_like(points)
    for start in range(0, len(points), chunk):
        _, indices = tree.query(points[start : start + chunk], k=k, workers=-1)
        patches = points[indices.reshape(len(indices), k)]
        patches = patches - patches.mean(1, keepdims=True)
        covariance = np.matmul(patches.transpose(0, 2, 1), patches)
        _, eigenvectors = np.linalg.eigh(covariance)  # ascending eigenvalues
        normals[start : start + chunk] = eigenvectors[:, :, 0]
    return normals


def accuracy_completion(pred_cloud, gt_cloud, pred_normals=None, gt_normals=None,
                        pred_tree=None, gt_tree=None) -> dict[str, float]:
    """Acc (pred -> nearest GT), Comp (GT -> nearest pred), mean and median; NC if normals are given."""
    gt_tree = gt_tree or cKDTree(gt_cloud)
    pred_tree = pred_tree or cKDTree(pred_cloud)
    acc_distances, acc_indices = gt_tree.query(pred_cloud, workers=-1)
    comp_distances, comp_indices = pred_tree.query(gt_cloud, workers=-1)
    metrics = {
        "acc_mean": float(np.mean(acc_distances)), "acc_median": float(np.median(acc_distances)),
        "comp_mean": float(np.mean(comp_distances)), "comp_median": float(np.median(comp_distances)),
    }
    if pred_normals is not None and gt_normals is not None:
        nc_acc = np.abs((gt_normals[acc_indices] * pred_normals).sum(-1))
        nc_comp = np.abs((gt_normals * pred_normals[comp_indices]).sum(-1))
        metrics["nc_mean"] = float((nc_acc.mean() + nc_comp.mean()) / 2)
        metrics["nc_median"] = float((np.median(nc_acc) + np.median(nc_comp)) / 2)
    return metrics


def pointmap_metrics(
    pred_points: np.ndarray,
    gt_points: np.ndarray,
    valid: np.ndarray,
    crop: int = 224,
    icp_threshold: float = 0.1,
    max_points: int = 999_999,
    seed: int = 0,
) -> dict[str, float]:
    """Acc / Comp / NC of a predicted point map [S, H, W, 3] against ground truth in the same frame."""
    pred, gt = align_point_maps(pred_points, gt_points, valid)
    pred, gt, mask = central_crop(pred, crop), central_crop(gt, crop), central_crop(valid, crop)
    mask = mask & np.isfinite(pred).all(-1) & np.isfinite(gt).all(-1)
    pred_cloud, gt_cloud = pred[mask], gt[mask]
    if len(pred_cloud) < 3:
        keys = ("acc_mean", "acc_median", "comp_mean", "comp_median", "nc_mean", "nc_median")
        return {key: float("nan") for key in keys}
    if len(pred_cloud) > max_points:
        keep = np.random.default_rng(seed).choice(len(pred_cloud), max_points, replace=False)
        pred_cloud, gt_cloud = pred_cloud[keep], gt_cloud[keep]
    gt_tree = cKDTree(gt_cloud)
    transform, fitness, _ = icp_point_to_point(pred_cloud, gt_cloud, icp_threshold, target_tree=gt_tree)
    pred_cloud = pred_cloud @ transform[:3, :3].T + transform[:3, 3]
    pred_tree = cKDTree(pred_cloud)
    metrics = accuracy_completion(
        pred_cloud, gt_cloud, estimate_normals(pred_cloud, tree=pred_tree), estimate_normals(gt_cloud, tree=gt_tree),
        pred_tree=pred_tree, gt_tree=gt_tree,
    )
    metrics["icp_fitness"] = fitness
    return metrics
