"""The block cache, device/dtype handling, resume and data parallelism of the quantizer, each held to the
plain reference (the whole model per trial; one process; one uninterrupted run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qvggt_export import arch
from qvggt_export.model import load_model, save_quantized, save_vggt
from qvggt_export.quant.calibration_run import calibrate, local_scenes
from qvggt_export.quant.distributed import Shard
from qvggt_export.quant.forward import BlockCache, FullModelForward
from qvggt_export.quant.progress import QuantizeProgress
from qvggt_export.quant.quantizer import METHODS, QuantConfig, quantize_model

from quant_helpers import small_calibration, small_model, trial_matches_plain_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny():
    """The default model, at its native size, on a small synthetic calibration set."""
    from qvggt_export.quant.calibration_set import synthetic_calibration

    model = load_model(None)
    return model, synthetic_calibration(2, 2, model.config.default_image_size)


def _quantized_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_cache_predictions_equal_full_model_bitwise():
    model = small_model()
    scenes = local_scenes(small_calibration(), Shard())
    plain, cached = FullModelForward(model, scenes, torch.float32), BlockCache(model, scenes, torch.float32)
    ref = [model(s.scene.images[None]) for s in scenes]
    for a, b, r in zip(plain.predict(), cached.predict(), ref):
        for key in a:
            assert torch.equal(a[key], b[key]), key
            # The unchunked released forward agrees to float rounding (the dense heads run in chunks here).
            torch.testing.assert_close(a[key], r[key][0], rtol=1e-5, atol=1e-6)
    # After the cache advances through an edited block, it still equals the plain path on the edited model.
    first = arch.quant_blocks(model)[0]
    cached.advance(first)
    cached.predict()  # runs the advance (lazily deferred until needed)
    plain_cost, cached_cost = trial_matches_plain_path(model, plain, cached, arch.quant_blocks(model)[1])
    # The cached trial skipped the finished first block on each of the 2 scenes.
    assert plain_cost - cached_cost == 2


@pytest.mark.parametrize("method", ["awq", "qvggt", "gptq"])
def test_block_cache_chooses_exactly_what_the_full_model_path_chooses(tiny, method):
    model, calib = tiny
    calibration = calibrate(model, calib, sensitivity=True)
    results = {}
    for cached in (True, False):
        config = QuantConfig(method=method, task_topk=2, grid=6, block_cache=cached)
        reports = []
        q = quantize_model(model, calib, config, calibration=calibration, report_out=reports)
        results[cached] = (q.quant_info["layers"], _quantized_state(q), reports[0])
    (layers_c, state_c, rep_c), (layers_p, state_p, rep_p) = results[True], results[False]
    assert layers_c == layers_p  # same alphas, same reconstruction and task scores
    assert state_c.keys() == state_p.keys()
    assert all(torch.equal(state_c[k], state_p[k]) for k in state_c)
    # awq has no trials to save (both paths run one final forward); the others pay for fewer blocks.
    assert rep_c.block_forwards["quantize"] < rep_p.block_forwards["quantize"] or method == "awq"
    assert rep_c.block_forwards["quantize"] <= rep_p.block_forwards["quantize"]
    if method == "qvggt":
        # The task loss did decide: a top-2 choice that differs from reconstruction alone somewhere.
        assert any(e["alpha"] != e["alpha_recon"] for e in layers_c.values() if "alpha" in e)


def test_sensitivity_scores_equal_with_and_without_cache(tiny):
    model, calib = tiny
    reports = [calibrate(model, calib, sensitivity=True, cached=c).sensitivity for c in (True, False)]
    for section in ("blocks", "linear_types"):
        assert reports[0][section].keys() == reports[1][section].keys()
        for key, entry in reports[0][section].items():
            other = reports[1][section][key]
            assert entry["score"] == pytest.approx(other["score"], rel=1e-5, abs=1e-12), key
            for metric, value in entry["fidelity"].items():
                assert value == pytest.approx(other["fidelity"][metric], rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_forward_runs_every_method_on_cpu(method):
    model = small_model()
    q = quantize_model(model, small_calibration(), QuantConfig(method=method, dtype="bf16", task_topk=2, grid=4,
                                                               plan="uniform"))
    assert q.quant_info["config"]["dtype"] == "bf16"
    out = q(small_calibration().scenes[0].images[None])
    assert torch.isfinite(out["pose_enc"]).all() and torch.isfinite(out["depth"]).all()
    # Weights were quantized from the fp32 masters: the packed model stays fp32 outside the QuantLinears.
    assert q.camera_head.token_norm.weight.dtype == torch.float32


class _Killed(RuntimeError):
    pass


def test_interrupted_quantize_resumes_to_a_byte_identical_checkpoint(tmp_path, monkeypatch):
    model, calib = small_model(), small_calibration()
    config = QuantConfig(method="qvggt", task_topk=2, grid=4)
    reference = tmp_path / "reference.safetensors"
    save_quantized(quantize_model(model, calib, config, calib_dir=tmp_path / "ref_calib"), reference)

    original = QuantizeProgress.save_block
    saved_blocks = []

    def save_then_die(self, model, block, scales, entries):
        original(self, model, block, scales, entries)
        saved_blocks.append(block)
        if len(saved_blocks) == 3:
            raise _Killed(f"killed after {block}")

    monkeypatch.setattr(QuantizeProgress, "save_block", save_then_die)
    with pytest.raises(_Killed):
        quantize_model(model, calib, config, calib_dir=tmp_path / "calib")
    monkeypatch.setattr(QuantizeProgress, "save_block", original)
    reports = []
    resumed = quantize_model(model, calib, config, calib_dir=tmp_path / "calib", report_out=reports)
    assert reports[0].resumed_blocks == 3
    out = tmp_path / "resumed.safetensors"
    save_quantized(resumed, out)
    assert out.read_bytes() == reference.read_bytes()
    reports[0].progress.clear()
    assert not any(p.name.startswith("quantize-") for p in (tmp_path / "calib").iterdir())


def test_changed_setting_does_not_resume_foreign_progress(tmp_path):
    model, calib = small_model(), small_calibration()
    quantize_model(model, calib, QuantConfig(method="awq", grid=4), calib_dir=tmp_path)
    reports = []
    quantize_model(model, calib, QuantConfig(method="awq", grid=5), calib_dir=tmp_path, report_out=reports)
    assert reports[0].resumed_blocks == 0


@pytest.mark.slow
def test_torchrun_two_processes_give_a_byte_identical_checkpoint(tmp_path):
    """`torchrun --nproc-per-node 2` (gloo on the CPU) through the real CLI vs one process, every process at one
    intra-op thread: the bytes are equal at equal thread counts only (README, "Same bytes means")."""
    checkpoint = tmp_path / "small.safetensors"
    save_vggt(small_model(), checkpoint)
    args = ["quantize", "--checkpoint", str(checkpoint), "--calib-scenes", "3", "--calib-frames", "2",
            "--calib-size", "28x42", "--method", "qvggt", "--task-topk", "2", "--grid", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "qvggt_export.cli"]
    single = tmp_path / "single.safetensors"
    subprocess.run(cli + args + ["--out", str(single)], check=True, env=env, capture_output=True, timeout=600)
    double = tmp_path / "double.safetensors"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", "29517", "-m", "qvggt_export.cli"] + args + ["--out", str(double)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert double.read_bytes() == single.read_bytes()
    for out in (single, double):  # the pin, as each run recorded it
        assert json.loads(out.with_suffix(".json").read_text())["run"]["intra_op_threads"] == 1
