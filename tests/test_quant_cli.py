"""`calibrate` / `quantize` through the CLI: a working run, and bad input -> one line, exit 2, no output."""

import json

import pytest
import torch
from click.testing import CliRunner

from quant_helpers import small_model
from qvggt_export.cli import main
from qvggt_export.model import load_model, save_vggt

SMALL_CALIB = ["--calib-scenes", "2", "--calib-frames", "2", "--calib-size", "28x42"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_vggt(small_model(), tmp_path_factory.mktemp("ckpt") / "model.safetensors"))


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip() and not l.startswith(("activation", "sensitivity", "quantize"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_quantize_rtn_writes_a_loadable_checkpoint_and_sidecar(checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    result = CliRunner().invoke(main, ["quantize", "--checkpoint", checkpoint, "--method", "rtn", "--out", str(out),
                                       *SMALL_CALIB])
    assert result.exit_code == 0, result.output
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["quant_info"]["method"] == "rtn"
    assert sidecar["weight_bytes"]["quantized"] < sidecar["weight_bytes"]["fp16"] / 3
    model = load_model(out)
    assert model.quant_plan["source"] == "uniform"
    assert model(torch.rand(1, 2, 3, 28, 42))["pose_enc"].shape == (1, 2, 9)


def test_unknown_method_is_one_line_error_without_output(checkpoint, tmp_path):
    out = tmp_path / "q.safetensors"
    result = CliRunner().invoke(main, ["quantize", "--checkpoint", checkpoint, "--method", "int3", "--out", str(out)])
    assert "unknown method 'int3'" in _one_line_error(result)
    assert list(tmp_path.iterdir()) == []


def test_plan_naming_missing_blocks_is_one_line_error_without_output(checkpoint, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text("protected_blocks: [frame.1, frame.14, global.23]\n")
    out = tmp_path / "out" / "q.safetensors"
    result = CliRunner().invoke(main, ["quantize", "--checkpoint", checkpoint, "--plan", str(plan), "--out", str(out),
                                       *SMALL_CALIB])
    line = _one_line_error(result)
    assert "frame.14" in line and "global.23" in line and "frame.1," not in line
    assert not (tmp_path / "out").exists()


def test_empty_calibration_folder_is_one_line_error_without_output(checkpoint, tmp_path):
    (tmp_path / "images" / "scene0").mkdir(parents=True)
    out = tmp_path / "calib"
    result = CliRunner().invoke(main, ["calibrate", "--checkpoint", checkpoint, "--calib", str(tmp_path / "images"),
                                       "--out", str(out)])
    assert "holds no images" in _one_line_error(result)
    assert not out.exists()


def test_nan_activations_are_one_line_error_without_output(tmp_path):
    model = small_model()
    with torch.no_grad():
        model.aggregator.frame_blocks[1].mlp.fc1.bias[3] = float("nan")
    checkpoint = save_vggt(model, tmp_path / "broken.safetensors")
    out = tmp_path / "calib"
    result = CliRunner().invoke(main, ["calibrate", "--checkpoint", str(checkpoint), "--out", str(out), *SMALL_CALIB])
    assert "NaN/Inf activations" in _one_line_error(result)
    assert not out.exists()
