"""The model commands end to end through the CLI: help, info, predict, and one-line errors."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import FIXTURES
from qvggt_export.cli import main


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_file(load_file(FIXTURES / "vggt_tiny/model.safetensors"), folder / "model.safetensors")
    cfg = json.loads((FIXTURES / "vggt_tiny/config.json").read_text())["config"]
    (folder / "config.json").write_text(json.dumps({"config": dict(cfg, carry_track_head=False)}))
    return folder


@pytest.fixture
def views(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"view{i}.png"
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _assert_one_line_error(result, fragment):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert len([l for l in lines if l.startswith("error:")]) == 1


def test_help_lists_commands():
    result = _invoke(["--help"])
    assert result.exit_code == 0
    for command in ("info", "predict"):
        assert command in result.output


def test_info_reports_parameters_and_config(tiny_ckpt):
    result = _invoke(["info", str(tiny_ckpt), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    state = load_file(tiny_ckpt / "model.safetensors")
    assert summary["parameters"] == sum(v.numel() for v in state.values())
    assert summary["config"]["embed_dim"] == 64
    assert summary["parameters_by_part"]["camera_head"] > 0


def test_predict_writes_all_outputs(tiny_ckpt, views, tmp_path):
    out = tmp_path / "preds.npz"
    result = _invoke(["predict", *views, "--checkpoint", str(tiny_ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    preds = np.load(out)
    # 80x60 images are resized to width 518 and height round(60*518/80/14)*14 = 392.
    assert preds["pose_enc"].shape == (2, 9)
    assert preds["extrinsic"].shape == (2, 3, 4) and preds["intrinsic"].shape == (2, 3, 3)
    assert preds["depth"].shape == (2, 392, 518, 1) and preds["depth_conf"].shape == (2, 392, 518)
    assert preds["world_points"].shape == (2, 392, 518, 3)
    assert preds["world_points_conf"].shape == (2, 392, 518)
    # The first camera is the world frame: its decoded extrinsic is close to identity.
    assert np.isfinite(preds["extrinsic"]).all()


def test_predict_missing_image(tiny_ckpt, tmp_path):
    result = _invoke(["predict", str(tmp_path / "nope.png"), "-c", str(tiny_ckpt), "-o", str(tmp_path / "p.npz")])
    _assert_one_line_error(result, "nope.png")
    assert not (tmp_path / "p.npz").exists()


def test_predict_non_image_file(tiny_ckpt, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("this is text")
    result = _invoke(["predict", str(bogus), "-c", str(tiny_ckpt), "-o", str(tmp_path / "p.npz")])
    _assert_one_line_error(result, "notes.png")


def test_predict_zero_images(tiny_ckpt):
    result = _invoke(["predict", "-c", str(tiny_ckpt)])
    assert result.exit_code == 2 and "no images given" in result.output


def test_predict_checkpoint_with_missing_keys(tmp_path, views):
    state = load_file(FIXTURES / "vggt_tiny/model.safetensors")
    state.pop("depth_head.norm.weight")
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((FIXTURES / "vggt_tiny/config.json").read_text())
    result = _invoke(["predict", *views, "-c", str(tmp_path), "-o", str(tmp_path / "p.npz")])
    _assert_one_line_error(result, "depth_head.norm.weight")


def test_predict_not_a_checkpoint(tmp_path, views):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    result = _invoke(["predict", *views, "-c", str(tmp_path), "-o", str(tmp_path / "p.npz")])
    _assert_one_line_error(result, "not a readable safetensors checkpoint")


def test_predict_on_synthetic_scene_reports_errors_and_saves_ground_truth(tiny_ckpt, tmp_path):
    out = tmp_path / "scene.npz"
    result = _invoke(["predict", "--scene", "synthetic:5", "--views", "2", "--image-size", "28x42",
                      "-c", str(tiny_ckpt), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "auc@30" in result.output and "abs_rel" in result.output
    saved = np.load(out)
    assert saved["depth"].shape == (2, 28, 42, 1) and saved["gt_depth"].shape == (2, 28, 42)
    # Ground truth is in the first camera's frame, the model's convention.
    assert np.allclose(saved["gt_extrinsic"][0], np.eye(3, 4), atol=1e-5)


def test_predict_bad_scene_spec(tiny_ckpt):
    result = _invoke(["predict", "--scene", "co3d:1", "-c", str(tiny_ckpt)])
    _assert_one_line_error(result, "synthetic:SEED")
