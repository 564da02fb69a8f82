"""VGGT-1B at full size with random weights: released names/shapes, save, reload, forward."""

import gc
import json

import pytest
import torch

from conftest import FIXTURES
from qvggt_export.model import VGGT, VGGTConfig, load_vggt, save_vggt


@pytest.mark.slow
def test_vggt1b_state_dict_matches_release_and_round_trips(tmp_path):
    manifest = json.loads((FIXTURES / "vggt1b_manifest.json").read_text())
    torch.manual_seed(0)
    model = VGGT(VGGTConfig())
    state = model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == manifest["params"]
    assert len(state) == 1797
    assert model.num_parameters() == manifest["total_params"]
    probe = {k: state[k][:2].clone() for k in ("aggregator.frame_blocks.23.mlp.fc2.weight",
                                                "track_head.tracker.query_ref_token")}
    save_vggt(model, tmp_path / "model.safetensors")
    del model, state
    gc.collect()

    reloaded = load_vggt(str(tmp_path))
    for key, value in probe.items():
        assert torch.equal(reloaded.state_dict()[key][:2], value)
    with torch.no_grad():
        preds = reloaded(torch.rand(1, 2, 3, 28, 42))
    assert preds["pose_enc"].shape == (1, 2, 9)
    assert preds["depth"].shape == (1, 2, 28, 42, 1)
    assert preds["world_points"].shape == (1, 2, 28, 42, 3)
    assert all(torch.isfinite(preds[k]).all() for k in ("pose_enc", "depth", "world_points"))
