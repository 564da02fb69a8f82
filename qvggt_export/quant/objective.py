"""Task losses of the heads (QVGGT's search objective) and fidelity errors against the FP model.

L = w_cam L_cam + w_depth L_depth + w_point L_point + w_geo L_geo, all weights 1 by default as in the
paper ("we assign equal weights"; docs/method.md), configurable through QuantConfig.loss_weights. L_cam is a Huber loss on the pose
encoding, L_depth / L_point are confidence-weighted errors, L_geo compares the point map with the depth
unprojected through the predicted cameras. L_geo is measured against the target's own residual (zero
for exact ground truth; the FP model's inconsistency for pseudo ground truth), so that every part of L
is zero when the prediction equals the target. Scenes have no common metric scale (ground truth is in
metres, the model predicts in its own normalised units), so every length is divided by its scene's mean
point distance first - the normalisation VGGT trains with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import QVGGTError
from ..geometry import extri_intri_to_pose_encoding, mat_to_quat, pose_encoding_to_extri_intri
from ..geometry import unproject_depth_map_to_point_map
from .calibration_set import CalibScene
from .distributed import Shard, gather_in_order

LOSS_WEIGHTS = {"cam": 1.0, "depth": 1.0, "point": 1.0, "geo": 1.0}
HUBER_DELTA = 0.1


@dataclass
class Targets:
    pose_enc: Tensor  # [S, 9]
    depth: Tensor  # [S, H, W]
    world_points: Tensor  # [S, H, W, 3]
    valid: Tensor  # [S, H, W] bool
    weight: Tensor  # [S, H, W]: FP depth confidence, normalised to mean 1 over valid pixels
    geo_residual: Tensor  # [S, H, W, 3]: (unprojected depth - point map) / scene scale of the target


def check_finite(preds: list[dict[str, Tensor]], what: str) -> None:
    for key in ("pose_enc", "depth", "world_points"):
        if not all(torch.isfinite(p[key]).all() for p in preds):
            raise QVGGTError(f"{what} produced NaN/Inf in {key}; the checkpoint or calibration data is broken")


def make_targets(scenes: list[CalibScene], fp_preds: list[dict[str, Tensor]], use_gt: bool = True) -> list[Targets]:
    """Ground truth where the scene has it (and use_gt), else the FP model's outputs (pseudo ground truth)."""
    targets = []
    for scene, fp in zip(scenes, fp_preds):
        hw = tuple(scene.images.shape[-2:])
        weight = fp["depth_conf"]
        if use_gt and scene.gt is not None:
            gt = scene.gt
            pose = extri_intri_to_pose_encoding(gt["extrinsics"].double(), gt["intrinsics"].double(), hw)
            depth, points, valid = gt["depth"].float(), gt["world_points"].float(), gt["valid"].bool()
        else:
            pose, depth, points = fp["pose_enc"], fp["depth"][..., 0], fp["world_points"]
            valid = torch.ones_like(depth, dtype=torch.bool)
        weight = weight / weight[valid].mean().clamp_min(1e-12)
        residual = _geo_residual(pose.float(), depth, points, _scene_scale(points, valid))
        targets.append(Targets(pose.float(), depth, points, valid, weight, residual))
    return targets


def _scene_scale(points: Tensor, valid: Tensor) -> Tensor:
    return points[valid].norm(dim=-1).mean().clamp_min(1e-8)


def _geo_residual(pose_enc: Tensor, depth: Tensor, points: Tensor, scale: Tensor) -> Tensor:
    hw = tuple(depth.shape[1:3])
    extrinsics, intrinsics = pose_encoding_to_extri_intri(pose_enc.double(), hw)
    unprojected = torch.from_numpy(unproject_depth_map_to_point_map(depth, extrinsics, intrinsics)).float()
    return (unprojected - points) / scale


def _normalised_pose(pose_enc: Tensor, scale: Tensor) -> Tensor:
    return torch.cat([pose_enc[..., :3] / scale, pose_enc[..., 3:]], dim=-1)


def scene_losses(pred: dict[str, Tensor], target: Targets) -> dict[str, float]:
    valid, w = target.valid, target.weight
    s_pred = _scene_scale(pred["world_points"], valid)
    s_tgt = _scene_scale(target.world_points, valid)
    l_cam = F.huber_loss(_normalised_pose(pred["pose_enc"], s_pred), _normalised_pose(target.pose_enc, s_tgt),
                         delta=HUBER_DELTA)
    depth_err = (pred["depth"][..., 0] / s_pred - target.depth / s_tgt).abs()
    point_err = (pred["world_points"] / s_pred - target.world_points / s_tgt).norm(dim=-1)
    residual = _geo_residual(pred["pose_enc"], pred["depth"][..., 0], pred["world_points"], s_pred)
    geo_err = (residual - target.geo_residual).norm(dim=-1)
    weighted = lambda err: float((w * err)[valid].sum() / w[valid].sum())
    return {"cam": float(l_cam), "depth": weighted(depth_err), "point": weighted(point_err),
            "geo": float(geo_err[valid].mean())}


def task_loss(scene_parts: list[dict[str, float]], weights: dict[str, float] | None = None
              ) -> tuple[float, dict[str, float]]:
    """Per-scene loss parts (scene_losses, every scene in scene order) -> weighted total and mean parts."""
    weights = LOSS_WEIGHTS if weights is None else weights
    parts = {k: 0.0 for k in LOSS_WEIGHTS}
    for scene in scene_parts:
        for k, v in scene.items():
            parts[k] += v / len(scene_parts)
    return sum(weights[k] * v for k, v in parts.items()), parts


def gathered_task_loss(preds: list[dict[str, Tensor]], targets: list[Targets], shard: Shard, total_scenes: int,
                       weights: dict[str, float] | None = None) -> tuple[float, dict[str, float]]:
    """task_loss over every calibration scene from this rank's predictions (scene order on every rank)."""
    local = [scene_losses(p, t) for p, t in zip(preds, targets)]
    return task_loss(gather_in_order(local, shard, total_scenes), weights)


def _rotation_angle_deg(r_a: Tensor, r_b: Tensor) -> Tensor:
    """Angle of r_a r_b^T per frame, via quaternions (robust near 0 and 180 degrees)."""
    q = mat_to_quat(r_a @ r_b.transpose(-1, -2))
    return torch.rad2deg(2 * torch.atan2(q[..., :3].norm(dim=-1), q[..., 3].abs()))


def scene_fidelity(pred: dict[str, Tensor], ref: dict[str, Tensor]) -> dict[str, float]:
    """Each head's error against reference (FP) predictions on one scene: camera rotation error (deg, per
    frame), camera translation error (relative to the scene scale), depth AbsRel, point error (relative to
    the scene scale)."""
    hw = tuple(pred["depth"].shape[1:3])
    e_pred, _ = pose_encoding_to_extri_intri(pred["pose_enc"].double(), hw)
    e_ref, _ = pose_encoding_to_extri_intri(ref["pose_enc"].double(), hw)
    scale = ref["world_points"].norm(dim=-1).mean().clamp_min(1e-8).double()
    return {"camera_rot_deg": float(_rotation_angle_deg(e_pred[..., :3], e_ref[..., :3]).mean()),
            "camera_trans": float(((e_pred[..., 3] - e_ref[..., 3]).norm(dim=-1) / scale).mean()),
            "depth_absrel": float(((pred["depth"] - ref["depth"]).abs() / ref["depth"].abs().clamp_min(1e-8)).mean()),
            "point_rel": float((pred["world_points"] - ref["world_points"]).norm(dim=-1).mean() / scale)}


def mean_fidelity(per_scene: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(f[k] for f in per_scene) / len(per_scene) for k in per_scene[0]}


def fidelity(preds: list[dict[str, Tensor]], refs: list[dict[str, Tensor]]) -> dict[str, float]:
    """scene_fidelity averaged over scenes."""
    return mean_fidelity([scene_fidelity(p, r) for p, r in zip(preds, refs)])
