"""Bad option values are one `error:` line and exit code 2 before any work starts; third-party warning
noise shows only under --verbose."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qvggt_export.cli import main


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["bench", "--frames", "a,b"], "like 1,2,8; got 'a,b'"),
        (["bench", "--frames", "1,0"], "like 1,2,8; got '1,0'"),
        (["bench", "--runs", "0"], "'--runs': 0 is not in the range x>=1"),
        (["bench", "--threads", "x"], "'--threads'"),
        (["bench", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["bench", "--image-size", "50"], "must be positive multiples of 14"),
        (["export", "--max-frames", "0"], "'--max-frames'"),
        (["export", "--image-size", "axb"], "image size must look like"),
        (["export", "--min-frames", "4", "--max-frames", "2"], "min_frames <= opt_frames <= max_frames"),
        (["compare", "model.onnx", "--scenes", "0"], "'--scenes'"),
        (["compare", "model.onnx", "--rel-tol", "-1"], "'--rel-tol'"),
        (["compare", "model.onnx", "--min-auc30", "101"], "'--min-auc30'"),
        (["engine", "model.onnx", "--min-frames", "0"], "'--min-frames'"),
        (["build", "--calib-scenes", "0"], "'--calib-scenes'"),
        (["infer", "model.onnx", "view.png", "--image-size", "0x0"], "must be positive multiples of 14"),
        (["predict", "view.png", "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
        (["predict", "view.png", "--image-size", "50x50"], "must be positive multiples of 14"),
        (["eval", "--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_bad_option_value_is_one_error_line(tmp_path, monkeypatch, args, fragment):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48)).save(tmp_path / "view.png")
    (tmp_path / "model.onnx").write_bytes(b"")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "view.png"]  # nothing written


EXPORT_SNIPPET = """
from qvggt_export.log import setup_logging
setup_logging({verbose})
import torch
torch.onnx.export(torch.nn.Linear(2, 2).eval(), (torch.rand(1, 2),), dynamo=True, verbose=False)
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_third_party_export_noise_only_under_verbose(verbose):
    # A fresh interpreter: the point is what torch's loggers do when torch is imported after the setup.
    env = {k: v for k, v in os.environ.items() if k != "TORCH_LOGS"}  # CLI runs in this process may have set it
    result = subprocess.run([sys.executable, "-c", EXPORT_SNIPPET.format(verbose=verbose)], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    noise = [line for line in result.stderr.splitlines() if "torchvision is not installed" in line or "Warning" in line]
    if verbose:
        assert any("torchvision is not installed" in line for line in noise), result.stderr
    else:
        assert noise == [], result.stderr


def test_plugin_target_with_a_w8a16_checkpoint_fails_before_exporting(tmp_path):
    from export_helpers import tiny_quantized_model
    from qvggt_export.model import save_quantized

    checkpoint = save_quantized(tiny_quantized_model(precision="w8a16"), tmp_path / "w8.safetensors")
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(checkpoint), "--target", "plugin",
                                       "--out", str(tmp_path / "model.onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "w8a16 layer(s)" in errors[0] and "--target qdq" in errors[0], result.output
    assert not (tmp_path / "model.onnx").exists()
