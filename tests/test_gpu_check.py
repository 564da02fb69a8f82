"""scripts/gpu_check.py, the one script for a lent GPU: its forced dry run walks every section on the CPU,
writes each section's rows as it finishes, and its exit code separates a mismatch (1) from a section that
could not run (2)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # the importlib recipe for a source file (dataclasses look the module up)
    spec.loader.exec_module(module)
    return module


def read_results(out: Path) -> dict[str, dict]:
    return {line["section"]: line for line in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def test_dry_run_walks_every_section(tmp_path, gpu_check):
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    results = read_results(tmp_path)
    assert list(results) == list(gpu_check.SECTIONS)
    assert all(r["status"] == "ok" for r in results.values()), {k: r["summary"] for k, r in results.items()}
    assert len((tmp_path / "summary.txt").read_text().splitlines()) == len(gpu_check.SECTIONS)
    assert "DRY RUN" in (tmp_path / "gpu_check.log").read_text()
    # Real rows: every kernel case within tolerance, the quantizer's checkpoint reloaded with kernel linears.
    correctness = results["kernel_correctness"]["rows"]
    assert correctness and all(r["error_fused"] <= gpu_check.KERNEL_TOLERANCE for r in correctness)
    assert {r["M"] for r in correctness} >= {1, 17, 65}
    assert results["quantizer"]["data"]["block_forwards"]
    assert results["reload"]["rows"][0]["kernel_linears"] > 0
    assert results["end_to_end"]["rows"][0]["swapped_linears"] > 0
    environment = results["environment"]["data"]
    if environment["nvcc"]:  # the library built for an H100 dispatches as the source says
        source = (SCRIPT.parents[1] / "plugins" / "w4a16_gemm.cu").read_text()
        assert environment["fused_max_m_in_library"] == int(re.search(r"kFusedMaxM = (\d+);", source).group(1))


def test_a_mismatch_exits_1_and_a_broken_section_exits_2(tmp_path, gpu_check, monkeypatch):
    sections = "kernel_correctness,plugin_cublas"
    monkeypatch.setattr(gpu_check, "KERNEL_TOLERANCE", 0.0)  # every kernel output now "disagrees"
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "a"), "--sections", sections]) == 1
    assert read_results(tmp_path / "a")["kernel_correctness"]["status"] == "mismatch"
    monkeypatch.undo()

    def broken(ctx):
        raise RuntimeError("simulated crash")

    monkeypatch.setitem(gpu_check.SECTIONS, "kernel_correctness", broken)
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "b"), "--sections", sections]) == 2
    results = read_results(tmp_path / "b")
    assert results["kernel_correctness"]["status"] == "could not run"
    assert "simulated crash" in results["kernel_correctness"]["summary"]
    assert results["plugin_cublas"]["status"] == "ok"  # the next section still ran and was recorded
    assert "simulated crash" in (tmp_path / "b" / "gpu_check.log").read_text()


def test_plugin_gemm_emulation_catches_wrong_arguments(gpu_check):
    """The column-major emulation of the plugin's call gives X W^T + b, and a transposed operand or a wrong
    leading dimension does not."""
    rng = np.random.default_rng(0)
    m, n, k = 5, 24, 128
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (n, k), (n,)))
    expected = x @ w.T + b

    def call(transa, lda):
        y = np.tile(b, m)
        gpu_check.column_major_gemm(transa, gpu_check.CUBLAS_OP_N, n, m, k, 1.0, w.ravel(), lda, x.ravel(), k, 1.0,
                                    y, n)
        return y.reshape(m, n)

    np.testing.assert_allclose(call(gpu_check.CUBLAS_OP_T, k), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises((AssertionError, ValueError)):
        np.testing.assert_allclose(call(gpu_check.CUBLAS_OP_N, k), expected, rtol=1e-3)
    assert gpu_check.plugin_gemm_arguments() == gpu_check.PLUGIN_GEMM_CALL


def test_time_boxes_fit_five_minutes(gpu_check):
    assert sum(gpu_check.BOXES.values()) <= 300
