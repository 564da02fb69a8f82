"""The shipped default model (`vggt-tiny`): it loads, and its synthetic-val metrics match its model card.

The card (qvggt_export/weights/vggt_tiny.md) carries a JSON block `test-subset` with the metrics of the
checkpoint on the first few synthetic-val scenes, measured with qvggt_export.evaluate, and the tolerance
this test allows. The test recomputes them; it also checks that the model beats a random-pose /
constant-depth predictor on the same scenes (rotation error, depth AbsRel).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from qvggt_export.data.readers import SyntheticReader
from qvggt_export.evaluate import evaluate
from qvggt_export.model import VGGT, load_model, load_vggt
from qvggt_export.model.checkpoint import EMBEDDED

CARD = Path(EMBEDDED["vggt-tiny"]).with_suffix(".md")


def card_block(name: str) -> dict:
    text = CARD.read_text()
    match = re.search(r"```json " + re.escape(name) + r"\n(.*?)```", text, re.S)
    assert match, f"{CARD} has no ```json {name} block"
    return json.loads(match.group(1))


@pytest.fixture(scope="module")
def card():
    return card_block("test-subset")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_model(None)


def test_default_checkpoint_is_the_tiny_preset(model):
    from qvggt_export.model.presets import tiny_config

    assert isinstance(model, VGGT)
    assert model.config == tiny_config()
    assert not model.training
    assert EMBEDDED["vggt-tiny"].stat().st_size < 31 * 2**20
    # group-128 quantizable: every aggregator and camera-trunk linear has K % 128 == 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith(("aggregator.", "camera_head.trunk")):
            assert module.in_features % 128 == 0, name
    assert load_vggt("vggt-tiny").config == model.config


def test_synthetic_val_metrics_match_model_card(model, card):
    size = tuple(card["image_size"])
    reader = SyntheticReader(num_views=card["views"], max_scenes=card["scenes"], image_size=size)
    got = evaluate(model, reader, progress=False)["aggregate"]
    tol = card["tolerance"]
    for key, expected in card["metrics"].items():
        allowed = tol["abs"].get(key, 0.0) + tol["rel"] * abs(expected)
        assert abs(got[key] - expected) <= allowed, f"{key}: got {got[key]:.4f}, card {expected:.4f} (+-{allowed:.4f})"

    # And it is a real model: better than a random-pose / constant-depth predictor on the same scenes in
    # rotation error and depth. Relative pose is barely learned (see the card), so no AUC claim. Pose and
    # depth metrics are computed directly: the point-map ICP is the slow part of evaluate.
    from scipy.spatial.transform import Rotation

    from qvggt_export.metrics import camera_pose_metrics, depth_metrics

    rng = np.random.default_rng(0)
    base_pose, base_depth = [], []
    for seq in SyntheticReader(num_views=card["views"], max_scenes=card["scenes"], image_size=size):
        S = len(seq.extrinsics)
        extr = np.tile(np.eye(4)[:3], (S, 1, 1))
        extr[1:, :, :3] = Rotation.random(S - 1, random_state=rng).as_matrix()
        extr[1:, :, 3] = rng.normal(size=(S - 1, 3))
        base_pose.append(camera_pose_metrics(extr, seq.extrinsics))
        base_depth.append(depth_metrics(np.ones_like(seq.depth), seq.depth, seq.valid)["abs_rel"])
    assert got["rotation_error_deg"] < np.mean([m["rotation_error_deg"] for m in base_pose]) - 20
    assert got["abs_rel"] < 0.8 * np.mean(base_depth)


def video_subset_metrics(predict, card_video: dict) -> dict:
    """Pose and depth metrics of `predict` (images [S, 3, H, W] -> (extrinsics, depth)) on the card's
    synthetic-video subset, pooled over its pairs and frames (no point maps: those need the slow ICP)."""
    from qvggt_export.data.synthetic import SYNTHETIC_VIDEO
    from qvggt_export.metrics import depth_metrics, pose_metrics_from_errors, relative_pose_errors

    rot, trans, abs_rel = [], [], []
    reader = SyntheticReader(SYNTHETIC_VIDEO, num_views=card_video["views"], max_scenes=card_video["scenes"],
                             image_size=tuple(card_video["image_size"]))
    for seq in reader:
        extrinsics, depth = predict(seq.images)
        r, t = relative_pose_errors(extrinsics, seq.extrinsics)
        rot.append(r)
        trans.append(t)
        abs_rel.append(depth_metrics(depth, seq.depth, seq.valid)["abs_rel"])
    metrics = pose_metrics_from_errors(np.concatenate(rot), np.concatenate(trans))
    return {**metrics, "abs_rel": float(np.mean(abs_rel))}


def test_synthetic_video_metrics_match_model_card(model):
    """The video-like split, where the card compares the model with the identity-pose predictor."""
    from qvggt_export.inference import run_model

    card_video = card_block("test-subset-video")

    def predict_model(images):
        preds = run_model(model, images, "cpu")
        return preds["extrinsic"], preds["depth"][..., 0]

    def predict_identity(images):
        S, _, H, W = images.shape
        return np.tile(np.eye(3, 4), (S, 1, 1)), np.ones((S, H, W))

    got, identity = video_subset_metrics(predict_model, card_video), video_subset_metrics(predict_identity, card_video)
    tol = card_video["tolerance"]
    for name, measured in (("metrics", got), ("identity", identity)):
        for key, expected in card_video[name].items():
            allowed = tol["abs"].get(key, 0.0) + tol["rel"] * abs(expected)
            assert abs(measured[key] - expected) <= allowed, f"{name} {key}: got {measured[key]:.4f}, card {expected:.4f}"
