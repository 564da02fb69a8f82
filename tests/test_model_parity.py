"""Numerical parity with the released VGGT implementation (fixtures made with the released code)."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, parity_tolerance
from qvggt_export.model import VGGT, VGGTConfig
from qvggt_export.model.dinov2 import DINOv2


@pytest.fixture(scope="module")
def tiny_run():
    cfg = json.loads((FIXTURES / "vggt_tiny/config.json").read_text())["config"]
    model = VGGT(VGGTConfig(**cfg)).eval()
    model.load_state_dict(load_file(FIXTURES / "vggt_tiny/model.safetensors"), strict=True)
    images = torch.from_numpy(np.load(FIXTURES / "vggt_tiny/inputs.npz")["images"])
    with torch.no_grad():
        preds = model(images)
        layers = model.aggregator(images)
    return preds, layers, np.load(FIXTURES / "vggt_tiny/outputs.npz")


@pytest.mark.parametrize("key", ["pose_enc", "depth", "depth_conf", "world_points", "world_points_conf"])
def test_vggt_tiny_outputs_match_released(tiny_run, key):
    preds, _, expected = tiny_run
    got = preds[key].numpy()
    assert got.shape == expected[key].shape
    assert np.abs(got - expected[key]).max() <= parity_tolerance(expected[key])


def test_vggt_tiny_refinement_iterations_match_released(tiny_run):
    preds, _, expected = tiny_run
    got = torch.stack(preds["pose_enc_list"]).numpy()
    assert got.shape == expected["pose_enc_list"].shape == (4, 1, 3, 9)
    assert np.abs(got - expected["pose_enc_list"]).max() <= parity_tolerance(expected["pose_enc_list"])


@pytest.mark.parametrize("layer", [4, 11, 17, 23])
def test_vggt_tiny_aggregated_tokens_match_released(tiny_run, layer):
    _, layers, expected = tiny_run
    ref = expected[f"aggregated_tokens_{layer}"]
    assert np.abs(layers[layer].numpy() - ref).max() <= parity_tolerance(ref)


def test_aggregator_keeps_only_the_layers_heads_read(tiny_run):
    _, layers, _ = tiny_run
    assert sorted(layers) == [4, 11, 17, 23]


def test_batch_dim_is_optional(tiny_run):
    preds, _, _ = tiny_run
    cfg = json.loads((FIXTURES / "vggt_tiny/config.json").read_text())["config"]
    model = VGGT(VGGTConfig(**cfg)).eval()
    model.load_state_dict(load_file(FIXTURES / "vggt_tiny/model.safetensors"))
    images = torch.from_numpy(np.load(FIXTURES / "vggt_tiny/inputs.npz")["images"])
    with torch.no_grad():
        unbatched = model(images[0])
    assert torch.allclose(unbatched["pose_enc"], preds["pose_enc"], atol=1e-6)


def test_dinov2_tiny_matches_released():
    cfg = json.loads((FIXTURES / "dinov2_tiny/config.json").read_text())["config"]
    model = DINOv2(**cfg).eval()
    model.load_state_dict(load_file(FIXTURES / "dinov2_tiny/model.safetensors"), strict=True)
    x = torch.from_numpy(np.load(FIXTURES / "dinov2_tiny/inputs.npz")["x"])
    expected = np.load(FIXTURES / "dinov2_tiny/outputs.npz")
    with torch.no_grad():
        out = model(x)
    assert set(expected.files) <= set(out)
    for key in expected.files:
        assert np.abs(out[key].numpy() - expected[key]).max() <= parity_tolerance(expected[key]), key
