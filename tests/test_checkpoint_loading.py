"""load_vggt / load_model on every kind of source, and one-line errors for bad checkpoints."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from qvggt_export.errors import CheckpointError
from qvggt_export.model import VGGT, VGGTConfig, load_model, load_vggt, save_vggt

TINY_CONFIG = json.loads((FIXTURES / "vggt_tiny/config.json").read_text())["config"]


@pytest.fixture(scope="module")
def tiny_state():
    return load_file(FIXTURES / "vggt_tiny/model.safetensors")


@pytest.fixture
def tiny_dir(tmp_path, tiny_state):
    save_file(tiny_state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"config": TINY_CONFIG}))
    return tmp_path


def _pose(model):
    images = torch.from_numpy(np.load(FIXTURES / "vggt_tiny/inputs.npz")["images"])
    with torch.no_grad():
        return model(images)["pose_enc"]


def test_directory_file_and_pt_sources_give_the_same_model(tiny_dir, tiny_state):
    from_dir = load_vggt(str(tiny_dir))
    from_file = load_vggt(str(tiny_dir / "model.safetensors"))
    torch.save(tiny_state, tiny_dir / "model.pt")
    from_pt = load_vggt(str(tiny_dir / "model.pt"))
    expected = torch.from_numpy(np.load(FIXTURES / "vggt_tiny/outputs.npz")["pose_enc"])
    for model in (from_dir, from_file, from_pt):
        assert torch.allclose(_pose(model), expected, atol=1e-4)


def test_saved_checkpoint_embeds_its_config(tmp_path, tiny_state):
    model = VGGT(VGGTConfig(**TINY_CONFIG, carry_track_head=False))
    model.load_state_dict(tiny_state)
    path = save_vggt(model, tmp_path / "out" / "tiny.safetensors")
    reloaded = load_model(path)
    assert reloaded.config == model.config
    assert torch.equal(_pose(reloaded), _pose(model))
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_track_head_weights_are_accepted(tiny_dir, tiny_state):
    # A checkpoint with released track-head tensors loads into a model that does not carry them.
    extra = dict(tiny_state, **{"track_head.tracker.query_ref_token": torch.zeros(1, 2, 388)})
    save_file(extra, tiny_dir / "model.safetensors")
    model = load_vggt(str(tiny_dir), config=VGGTConfig(**TINY_CONFIG, carry_track_head=False))
    assert model.track_head is None


def test_missing_key_is_named(tiny_dir, tiny_state):
    broken = {k: v for k, v in tiny_state.items() if k != "camera_head.embed_pose.weight"}
    save_file(broken, tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing keys: camera_head.embed_pose.weight"):
        load_vggt(str(tiny_dir))


def test_unexpected_key_is_named(tiny_dir, tiny_state):
    save_file(dict(tiny_state, **{"aggregator.bogus": torch.zeros(2)}), tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys: aggregator.bogus"):
        load_vggt(str(tiny_dir))


def test_shape_mismatch_is_reported(tiny_dir, tiny_state):
    save_file(dict(tiny_state, **{"camera_head.embed_pose.bias": torch.zeros(3)}), tiny_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match="size mismatch"):
        load_vggt(str(tiny_dir))


@pytest.mark.parametrize("name,content", [("model.safetensors", b"not a checkpoint"), ("model.pt", b"\x00garbage")])
def test_not_a_checkpoint(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match="not a"):
        load_vggt(str(tmp_path / name))


def test_pickled_object_is_refused_by_weights_only(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "fn": print}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_vggt(str(tmp_path / "model.pt"))


def test_missing_source(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_vggt(str(tmp_path / "nope.safetensors"))
    with pytest.raises(CheckpointError, match="holds none of"):
        load_vggt(str(tmp_path))


def test_config_ignores_unknown_keys():
    cfg = VGGTConfig(**TINY_CONFIG, some_future_key=3)
    assert cfg.embed_dim == 64 and cfg.ignored_keys == ["some_future_key"]
    assert VGGTConfig().embed_dim == 1024 and VGGTConfig().patch_embed == "dinov2_vitl14_reg"
