"""Metrics against perfect predictions and hand-computed values."""

import numpy as np
import pytest
import torch

from qvggt_export.data.synthetic import render_scene
from qvggt_export.geometry import quat_to_mat
from qvggt_export.metrics import (
    accuracy_completion,
    align_point_maps,
    camera_pose_auc,
    camera_pose_metrics,
    depth_metrics,
    estimate_normals,
    icp_point_to_point,
    pointmap_metrics,
    relative_pose_errors,
)


def random_cameras(count, seed=0):
    rng = np.random.default_rng(seed)
    rotations = quat_to_mat(torch.from_numpy(rng.normal(size=(count, 4)))).numpy()
    return np.concatenate([rotations, rng.normal(size=(count, 3, 1))], -1)


def rotation_about_z(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])


def test_perfect_predictions_score_100_in_any_world_frame_and_scale():
    gt = random_cameras(6)
    # A different world frame and scale (what the model outputs: world at its first camera).
    world_change = np.eye(4)
    world_change[:3, :3] = rotation_about_z(40)
    world_change[:3, 3] = [1.0, -2.0, 0.5]
    pred = gt @ world_change
    pred[:, :, 3] *= 0.3
    assert camera_pose_auc(pred, gt) == {30: 100.0, 15: 100.0, 5: 100.0, 3: 100.0}
    padded = np.concatenate([gt, np.tile([[[0, 0, 0, 1.0]]], (6, 1, 1))], 1)
    assert camera_pose_auc(torch.from_numpy(padded), gt)[30] == 100.0


@pytest.fixture
def rotated_last_camera():
    """Camera 2 of 3 turned 10.5 degrees about its own centre: pairs (0,2), (1,2) err 10.5, (0,1) 0."""
    gt = random_cameras(3, seed=1)
    pred = gt.copy()
    pred[2] = rotation_about_z(10.5) @ gt[2]  # rotates R and t together: same camera centre
    return pred, gt


def test_hand_computed_rotation_case(rotated_last_camera):
    rotation, translation = relative_pose_errors(*rotated_last_camera)
    np.testing.assert_allclose(rotation, [0, 10.5, 10.5], atol=1e-4)
    np.testing.assert_allclose(translation, 0, atol=1e-4)
    auc = camera_pose_auc(*rotated_last_camera)
    # Bins 0..9 hold 1/3 of the pairs, bins >= 10 all: AUC@30 = (10/3 + 20) / 30, AUC@15 = (10/3 + 5) / 15.
    assert auc[30] == pytest.approx(100 * (10 / 3 + 20) / 30)
    assert auc[15] == pytest.approx(100 * (10 / 3 + 5) / 15)
    assert auc[5] == pytest.approx(100 / 3) and auc[3] == pytest.approx(100 / 3)
    metrics = camera_pose_metrics(*rotated_last_camera)
    assert metrics["rra@30"] == 100.0 and metrics["rotation_error_deg"] == pytest.approx(7.0, abs=1e-4)
    assert metrics["pairs"] == 3


def translated_pair(direction):
    gt = np.tile(np.eye(3, 4), (2, 1, 1))
    gt[1, :, 3] = [1.0, 0, 0]
    pred = gt.copy()
    pred[1, :, 3] = direction
    return pred, gt


def test_hand_computed_translation_case_and_sign_ambiguity():
    pred, gt = translated_pair([1.0, np.tan(np.radians(20)), 0])
    rotation, translation = relative_pose_errors(pred, gt)
    assert translation[0] == pytest.approx(20.0, abs=1e-6) and rotation[0] < 1e-4
    assert camera_pose_auc(pred, gt) == pytest.approx({30: 100 * 10 / 30, 15: 0.0, 5: 0.0, 3: 0.0})
    # The translation direction is compared without its sign (min(e, 180 - e)).
    assert relative_pose_errors(*translated_pair([-3.0, 0, 0]))[1][0] < 1e-4


def test_sequences_in_a_list_pool_their_pairs(rotated_last_camera):
    translated = translated_pair([1.0, np.tan(np.radians(20)), 0])
    preds, gts = [rotated_last_camera[0], translated[0]], [rotated_last_camera[1], translated[1]]
    # max errors 0, 10.5, 10.5, 20: cumulative 1/4 (bins 0-9), 3/4 (10-19), 1 (20-29).
    assert camera_pose_auc(preds, gts)[30] == pytest.approx(100 * (2.5 + 7.5 + 10) / 30)


def test_nan_predictions_count_as_failures():
    gt = random_cameras(3, seed=2)
    pred = gt.copy()
    pred[1, 0, 3] = np.nan  # pairs (0,1) and (1,2) fail, (0,2) is perfect
    rotation, translation = relative_pose_errors(pred, gt)
    assert np.maximum(rotation, translation)[[0, 2]].min() >= 1e6
    assert camera_pose_auc(pred, gt) == pytest.approx({t: 100 / 3 for t in (30, 15, 5, 3)})


def test_depth_metrics_hand_computed():
    gt = np.ones((1, 2, 2))
    pred = np.array([[[1.0, 1.0], [1.0, 2.0]]])
    valid = np.ones((1, 2, 2), bool)
    assert depth_metrics(pred, gt, valid) == pytest.approx({"abs_rel": 0.25, "delta<1.25": 75.0})
    valid[0, 1, 1] = False
    assert depth_metrics(pred, gt, valid) == pytest.approx({"abs_rel": 0.0, "delta<1.25": 100.0})
    # Median scaling removes a global scale per frame.
    assert depth_metrics(3.5 * pred, gt, np.ones((1, 2, 2), bool))["abs_rel"] == pytest.approx(0.25)


def plane(offset=0.0, spacing=0.02, size=40):
    x, y = np.meshgrid(np.arange(size) * spacing, np.arange(size) * spacing)
    return np.stack([x.ravel(), y.ravel(), np.full(x.size, offset)], -1)


def test_acc_comp_zero_for_identical_clouds_and_equal_to_shift_of_a_plane():
    gt = plane()
    normals = estimate_normals(gt)
    same = accuracy_completion(gt, gt, normals, normals)
    assert same == pytest.approx({"acc_mean": 0, "acc_median": 0, "comp_mean": 0, "comp_median": 0,
                                  "nc_mean": 1, "nc_median": 1})
    shifted = plane(offset=0.05)
    metrics = accuracy_completion(shifted, gt, estimate_normals(shifted), normals)
    for key in ("acc_mean", "acc_median", "comp_mean", "comp_median"):
        assert metrics[key] == pytest.approx(0.05, abs=1e-12)
    assert metrics["nc_mean"] == pytest.approx(1.0, abs=1e-9)


def test_normals_of_a_sphere_are_radial():
    rng = np.random.default_rng(3)
    points = rng.normal(size=(4000, 3))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    normals = estimate_normals(points)
    assert np.abs((normals * points).sum(1)).min() > 0.98


def test_icp_recovers_a_small_rigid_motion():
    # Points filling a cube (spacing ~7 cm); the motion moves each point < 3 cm, within the threshold.
    target = np.random.default_rng(4).uniform(-0.5, 0.5, size=(3000, 3))
    source = target @ rotation_about_z(1.5).T + [0.01, -0.01, 0.005]
    transform, fitness, rmse = icp_point_to_point(source, target, max_distance=0.1)
    moved = source @ transform[:3, :3].T + transform[:3, 3]
    assert fitness == 1.0 and rmse < 1e-9
    assert np.abs(moved - target).max() < 1e-9


def test_pointmap_metrics_undo_scale_and_shift_and_report_noise():
    scene = render_scene(4, 2, (56, 70)).in_first_camera_frame()
    gt, valid = scene.world_points, scene.valid
    aligned_pred, aligned_gt = align_point_maps(3.0 * gt + [0, 0, 2.0], gt, valid)
    np.testing.assert_allclose(aligned_pred, aligned_gt, atol=1e-5)
    # A lateral shift is not removed by the alignment (only z medians are); ICP takes it out.
    metrics = pointmap_metrics(2.0 * gt + [0.05, -0.03, 1.0], gt, valid)
    assert metrics["acc_mean"] < 1e-5 and metrics["comp_mean"] < 1e-5
    assert metrics["nc_mean"] > 0.999 and metrics["icp_fitness"] == 1.0
    noisy = gt + np.random.default_rng(5).normal(scale=0.01, size=gt.shape)
    noisy_metrics = pointmap_metrics(noisy, gt, valid)
    assert 0.003 < noisy_metrics["acc_median"] < 0.02
