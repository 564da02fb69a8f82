"""scripts/probe_shift.py: its shifted pairs are what their labels say, and a short probe runs and reports."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from qvggt_export.data import synthetic

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "probe_shift.py"
spec = importlib.util.spec_from_file_location("probe_shift", SCRIPT)
probe_shift = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe_shift)


@pytest.mark.parametrize("shift", [-14, -5, 0, 9])
def test_shifted_view_and_its_yaw_label_agree(shift):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 84, 112), dtype=np.uint8)
    pair, extrinsics, intrinsics = probe_shift.shifted_pair(image, shift, 14)
    # Away from the padded border, column c of the second view is column c + shift of the first.
    cols = np.arange(14, 112 - 14)
    np.testing.assert_array_equal(pair[1][:, :, cols], image[:, :, cols + shift].astype(np.float32) / 255.0)
    np.testing.assert_array_equal(pair[0], image.astype(np.float32) / 255.0)
    # Through the labelled cameras the first view's principal point lands `shift` columns to its left in the
    # second view, as the image content moved: the label is the yaw that makes this shift.
    fx, cx, cy = intrinsics[0, 0, 0], intrinsics[0, 0, 2], intrinsics[0, 1, 2]
    point = np.array([0.0, 0.0, 1.0])  # the principal ray of view 1 (identity extrinsics) at depth 1
    cam = extrinsics[1, :, :3] @ point + extrinsics[1, :, 3]
    assert np.isclose(fx * cam[0] / cam[2] + cx, cx - shift, atol=1e-9)
    assert np.isclose(intrinsics[1, 1, 1] * cam[1] / cam[2] + cy, cy, atol=1e-9)
    np.testing.assert_allclose(extrinsics[0], np.eye(3, 4))


def test_pairs_of_whole_patches_only_use_multiples_of_the_unit(monkeypatch):
    calls = []
    original = probe_shift.shifted_pair

    def spy(image, shift, max_shift):
        calls.append(shift)
        return original(image, shift, max_shift)

    class Cache:
        def get(self, seed):
            return (np.zeros((10, 3, 84, 112), np.uint8),)

    monkeypatch.setattr(probe_shift, "shifted_pair", spy)
    images, pose = probe_shift.make_pairs(Cache(), np.random.default_rng(0), range(3), 40, 28, 14)
    assert set(calls) <= {-28, -14, 0, 14, 28} and len(set(calls)) >= 4
    assert images.shape == (40, 2, 3, 84, 112) and pose.shape == (40, 2, 9)
    # Frame 1's quaternion y is -sin(yaw / 2) of its camera-from-world rotation: the opposite sign of its shift,
    # zero for no shift; frame 0 is the identity.
    yaw = pose[:, 1, probe_shift.YAW].numpy()
    np.testing.assert_array_equal(np.sign(yaw), -np.sign(np.array(calls)))
    np.testing.assert_allclose(yaw, -np.sin(np.arctan(np.array(calls) / probe_shift.FOCAL) / 2), atol=1e-6)
    torch.testing.assert_close(pose[:, 0, 3:7], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(40, 4))


def test_a_short_probe_reports_its_read_out(tmp_path, capsys):
    small = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})
    out = tmp_path / "probed.safetensors"
    probe_shift.main(["--config", small, "--steps", "2", "--batch", "2", "--eval-every", "1",
                      "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert len(lines) == 2 and "rotation L1 / identity's" in lines[-1] and "yaw sign accuracy" in lines[-1]
    # The probed model is a checkpoint a training run can start from (--init): it loads with its config.
    probed = probe_shift.load_model(str(out))
    assert probed.config.depth == 2 and probed.config.camera_trunk_depth == 1


def test_a_list_of_units_alternates_batches_and_reads_each_out(tmp_path, capsys, monkeypatch):
    units = []
    original = probe_shift.make_pairs

    def spy(cache, rng, seeds, n, max_shift, unit=1, track_points=0):
        units.append((n, unit))
        return original(cache, rng, seeds, n, max_shift, unit, track_points)

    monkeypatch.setattr(probe_shift, "make_pairs", spy)
    small = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})
    probe_shift.main(["--config", small, "--steps", "3", "--batch", "2", "--eval-every", "3", "--max-shift", "14",
                      "--shift-unit", "14,1", "--cache-dir", str(tmp_path / "cache")])
    # One held-out set per unit (64 pairs each), then training batches alternating 14, 1, 14.
    assert units == [(64, 14), (64, 1), (2, 14), (2, 1), (2, 14)]
    line, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert "unit 14: rotation L1 / identity's" in line and "; unit 1: rotation L1 / identity's" in line


@pytest.mark.parametrize("degrees", [(10, 0, 0), (10, 5, 3), (-20, 8, -6)])
def test_a_rotated_pair_is_what_the_turned_camera_renders(degrees):
    # The renderer's own view from the same centre turned by R: the warp must match it up to resampling of the
    # textures, and the opposite turn (R^T, a sign or transpose slip) must not.
    size = (84, 112)
    scene = synthetic.render_scene(3, 1, size)
    extrinsic, intrinsic = scene.extrinsics[0].astype(np.float64), scene.intrinsics[0].astype(np.float64)
    image = (scene.images[0] * 255).round().astype(np.uint8)
    rotation = Rotation.from_euler("yxz", degrees, degrees=True).as_matrix()
    turned = synthetic.render_views(3, (rotation @ extrinsic)[None], intrinsic[None], size).images[0]
    pair, extrinsics, intrinsics = probe_shift.rotated_pair(image, intrinsic, rotation)
    wrong, _, _ = probe_shift.rotated_pair(image, intrinsic, rotation.T)
    # Compared where the turned camera sees inside the first view's frame (the rest is reflected padding).
    rays = np.linalg.inv(intrinsic) @ np.array([[u, v, 1.0] for v in range(size[0]) for u in range(size[1])]).T
    seen = intrinsic @ rotation.T @ rays  # where each pixel of the turned view lies in the first view
    seen = seen[:2] / seen[2]
    inside = ((seen[0] >= 1) & (seen[0] <= size[1] - 2) & (seen[1] >= 1) & (seen[1] <= size[0] - 2)).reshape(size)
    error = np.median(np.abs(pair[1] - turned)[:, inside])
    roughness = np.median(np.abs(np.diff(image.astype(np.float32) / 255.0, axis=-1)))  # one pixel's step
    assert inside.mean() > 0.5
    assert error < 0.7 * roughness and error < 0.35 * np.median(np.abs(wrong[1] - turned)[:, inside])
    np.testing.assert_array_equal(pair[0], image.astype(np.float32) / 255.0)
    np.testing.assert_allclose(extrinsics, np.stack([np.eye(3, 4), np.hstack([rotation, np.zeros((3, 1))])]))
    np.testing.assert_array_equal(intrinsics, np.stack([intrinsic, intrinsic]))


def test_no_turn_warps_to_the_same_view():
    image = np.random.default_rng(0).integers(0, 256, (3, 84, 112), dtype=np.uint8)
    intrinsic = np.array([[80.0, 0, 56], [0, 80.0, 42], [0, 0, 1]])
    pair, _, _ = probe_shift.rotated_pair(image, intrinsic, np.eye(3))
    np.testing.assert_allclose(pair[1], pair[0], rtol=1e-7, atol=1e-12)  # float64 resampling, then float32


def test_drawn_turns_stay_within_their_bounds_and_include_small_ones():
    rng = np.random.default_rng(0)
    angles = np.array([Rotation.from_matrix(probe_shift.draw_rotation(rng, (30, 10, 5))).as_euler("yxz", degrees=True)
                       for _ in range(2000)])
    assert np.all(np.abs(angles) <= np.array([30, 10, 5]) + 1e-9)
    magnitude = np.abs(angles[:, 0])
    assert 0.15 < np.mean(magnitude < 3) < 0.4 and np.max(magnitude) > 25  # one shared scale: many small turns


def test_warp_pairs_label_each_view_with_its_camera(monkeypatch):
    turns = []
    original = probe_shift.rotated_pair
    monkeypatch.setattr(probe_shift, "rotated_pair", lambda image, k, r: turns.append((k, r)) or original(image, k, r))
    cache = TurningClip()
    images, pose = probe_shift.warp_pairs(cache, np.random.default_rng(0), range(3), 6, (20, 5, 5))
    assert images.shape == (6, 2, 3, 84, 112) and pose.shape == (6, 2, 9)
    for (intrinsic, rotation), encoding in zip(turns, pose.double()):
        extrinsics, intrinsics = probe_shift.pose_encoding_to_extri_intri(encoding, probe_shift.IMAGE_SIZE)
        np.testing.assert_allclose(extrinsics[1, :, :3].numpy(), rotation, atol=1e-6)
        np.testing.assert_allclose(intrinsics[1].numpy(), intrinsic, rtol=1e-5)


def test_warp_batches_take_turns_and_are_read_out(tmp_path, capsys, monkeypatch):
    calls = []
    original_shift, original_warp = probe_shift.make_pairs, probe_shift.warp_pairs
    monkeypatch.setattr(probe_shift, "make_pairs", lambda *a: calls.append("shift") or original_shift(*a))
    monkeypatch.setattr(probe_shift, "warp_pairs", lambda *a: calls.append("warp") or original_warp(*a))
    small = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})
    probe_shift.main(["--config", small, "--steps", "3", "--batch", "2", "--eval-every", "3", "--max-shift", "14",
                      "--shift-unit", "14", "--rotation-warp", "20,5,5", "--cache-dir", str(tmp_path / "cache")])
    assert calls == ["shift", "warp", "shift", "warp", "shift"]  # held-out pairs of each, then in turn
    line, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert "unit 14: rotation L1" in line and "; warp: rotation L1 / identity's" in line
    calls.clear()
    probe_shift.main(["--config", small, "--steps", "2", "--batch", "2", "--shift-unit", "", "--rotation-warp",
                      "20,5,5", "--cache-dir", str(tmp_path / "cache")])
    assert calls == ["warp", "warp", "warp"]  # no shift batches at all


class TurningClip:
    """A scene cache whose every clip turns 3 deg per frame about y while stepping sideways: the pair
    (k, k + gap) is 3 * gap deg apart."""

    def __init__(self):
        views = probe_shift.train_tiny.SCENE_VIEWS
        extrinsics = np.zeros((views, 3, 4))
        extrinsics[:, :, :3] = Rotation.from_euler("y", 3.0 * np.arange(views)[:, None], degrees=True).as_matrix()
        extrinsics[:, 0, 3] = 0.1 * np.arange(views)
        intrinsics = np.tile(np.array([[probe_shift.FOCAL, 0, 56], [0, probe_shift.FOCAL, 42], [0, 0, 1.0]]),
                             (views, 1, 1))
        self.scene = (np.zeros((views, 3, 84, 112), np.uint8), np.ones((views, 84, 112), np.float32), extrinsics,
                      intrinsics, np.ones((views, 84, 112), bool))

    def get(self, seed):
        return self.scene


def test_clip_pairs_are_frames_at_most_max_gap_apart_labelled_relative_to_the_first():
    images, pose = probe_shift.clip_pairs(TurningClip(), np.random.default_rng(0), [0], 200, 2)
    assert images.shape == (200, 2, 3, 84, 112) and pose.shape == (200, 2, 9)
    # The relative yaw of each pair is 3 deg times its signed frame gap, and the gaps cover -2..2 without 0.
    relative = np.degrees(2 * np.arcsin(pose[:, 1, probe_shift.YAW].numpy().astype(np.float64)))
    gaps = np.round(relative / 3.0)
    np.testing.assert_allclose(np.abs(relative), 3.0 * np.abs(gaps), atol=1e-3)
    assert set(gaps.astype(int).tolist()) == {-2, -1, 1, 2}
    torch.testing.assert_close(pose[:, 0, 3:7], torch.tensor([0.0, 0.0, 0.0, 1.0]).expand(200, 4))


def test_clip_train_batches_take_turns_with_the_shift_batches(tmp_path, capsys, monkeypatch):
    calls = []
    original_shift, original_clip = probe_shift.make_pairs, probe_shift.clip_pairs
    monkeypatch.setattr(probe_shift, "make_pairs", lambda *a: calls.append("shift") or original_shift(*a))
    monkeypatch.setattr(probe_shift, "clip_pairs", lambda *a: calls.append("clip") or original_clip(*a))
    monkeypatch.setattr(probe_shift, "CLIP_TRAIN_SCENES", range(0, 2))
    small = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})
    probe_shift.main(["--config", small, "--steps", "4", "--batch", "2", "--eval-every", "4", "--max-shift", "14",
                      "--shift-unit", "14", "--clip-train", "pan", "--cache-dir", str(tmp_path / "cache")])
    assert calls == ["shift", "shift", "clip", "shift", "clip"]  # held-out pairs, then shift / clip in turn


def test_clip_read_out_pairs_frames_by_gap_in_both_orders(monkeypatch):
    views = probe_shift.train_tiny.SCENE_VIEWS
    # A camera head that always answers the identity: its errors are the identity predictor's, gap by gap.
    seen = []

    def identity_head(model, images):
        seen.append(images.shape[0])
        pose = torch.zeros(images.shape[0], 2, 9)
        pose[..., 6] = 1.0
        pose[..., 7:] = 1.0
        return [pose]

    monkeypatch.setattr(probe_shift, "camera_forward", identity_head)
    by_gap = probe_shift.clip_read_out(torch.nn.Linear(1, 1), TurningClip(), [0, 1])
    assert list(by_gap) == list(probe_shift.CLIP_GAPS)
    for gap, (ours, identity) in by_gap.items():
        assert ours == pytest.approx(3.0 * gap, abs=1e-6) and identity == pytest.approx(3.0 * gap, abs=1e-6)
    assert seen == [2 * (views - gap) for _ in range(2) for gap in probe_shift.CLIP_GAPS]


@pytest.mark.parametrize("argv", [["--init", "/nonexistent/model.safetensors"], ["--shift-unit", "0"],
                                  ["--max-shift", "7", "--shift-unit", "14"], ["--max-shift", "112"],
                                  ["--max-shift", "14", "--shift-unit", "14,28"], ["--clip-kinds", "pan,arc"],
                                  ["--clip-kinds", "pan", "--clip-scenes", "17"], ["--clip-train", "arc"],
                                  ["--clip-train", "pan", "--clip-gap", "10"], ["--rotation-warp", "20,5"],
                                  ["--rotation-warp", "30,10,5"], ["--rotation-warp=-5,0,0"],
                                  ["--rotation-warp", "a,b,c"], ["--shift-unit", ""]])
def test_bad_input_is_a_one_line_error(argv):
    with pytest.raises(SystemExit) as exc:
        probe_shift.main([*argv, "--steps", "1"])
    assert str(exc.value).startswith("error: ") and "\n" not in str(exc.value)


@pytest.mark.parametrize("step", [(0.0, 0.0, 0.3), (0.25, -0.05, 0.0), (-0.1, 0.1, -0.2)])
def test_a_moved_pair_is_labelled_with_the_step_its_camera_took(step):
    # The second view is the renderer's, from the camera moved by `step` in its own frame; the label is [I | t] with
    # t along -step. Through that label, view 1's points (cached depth) reproject onto view 2 with their colours,
    # and through the opposite step (a sign slip) clearly less well.
    size, seed, view = probe_shift.IMAGE_SIZE, 3, 2
    scene = synthetic.render_scene(seed, 3, size)
    cached = ((scene.images * 255).round().astype(np.uint8), scene.depth, scene.extrinsics.astype(np.float64),
              scene.intrinsics.astype(np.float64), scene.valid)
    step = np.array(step)
    images, _, _, _, extrinsics, intrinsics = probe_shift.moved_sample(seed, cached, view, step)
    np.testing.assert_allclose(extrinsics[1, :, :3], np.eye(3), atol=1e-6)
    np.testing.assert_allclose(extrinsics[0], np.eye(3, 4), atol=1e-6)  # float32 cameras
    direction = -extrinsics[1, :, 3] / np.linalg.norm(extrinsics[1, :, 3])
    np.testing.assert_allclose(direction, step / np.linalg.norm(step), atol=1e-5)
    np.testing.assert_array_equal(images[0], cached[0][view].astype(np.float32) / 255.0)
    K = intrinsics[0]
    v, u = np.mgrid[0:size[0], 0:size[1]]
    points = (np.linalg.inv(K) @ np.stack([u.ravel(), v.ravel(), np.ones(u.size)])) * cached[1][view].ravel()

    def colour_error(moved_by):
        seen = K @ (points - moved_by[:, None])
        x, y = np.round(seen[:2] / seen[2]).astype(int)
        inside = (x >= 0) & (x < size[1]) & (y >= 0) & (y < size[0]) & (seen[2] > 0)
        first = images[0].reshape(3, -1)[:, inside]
        return np.median(np.abs(images[1][:, y[inside], x[inside]] - first)), inside.mean()

    labelled_step = direction * np.linalg.norm(step)  # the label's direction at the step's length in metres
    error, overlap = colour_error(labelled_step)
    wrong, _ = colour_error(-labelled_step)
    assert overlap > 0.6 and error < 0.5 * wrong


def test_translation_batches_take_turns_and_are_read_out(tmp_path, capsys, monkeypatch):
    calls = []
    original_shift, original_move = probe_shift.make_pairs, probe_shift.move_pairs
    monkeypatch.setattr(probe_shift, "make_pairs", lambda *a: calls.append("shift") or original_shift(*a))
    monkeypatch.setattr(probe_shift, "move_pairs", lambda *a: calls.append(("move", a[4])) or original_move(*a))
    small = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})
    probe_shift.main(["--config", small, "--steps", "3", "--batch", "2", "--eval-every", "3", "--max-shift", "14",
                      "--shift-unit", "14", "--translation-pairs", "0.2", "--cache-dir", str(tmp_path / "cache")])
    assert calls == ["shift", ("move", 0.2), "shift", ("move", 0.2), "shift"]  # held-out pairs, then in turn
    line, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert "; move: predicted turn " in line and "translation direction error" in line
    with pytest.raises(SystemExit, match="--translation-pairs takes a step in 0..0.35"):
        probe_shift.main(["--translation-pairs", "0.5"])
