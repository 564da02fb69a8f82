"""`qvggt-export bench`: every case runs each frame count in its own process and the ratios come from those
runs; the ONNX Runtime W4A16 graph runs its attention fused, the `w4a16-unfused` one as MatMul -> Softmax ->
MatMul. A benchmark, not a timed test: nothing here asserts a speed."""

from __future__ import annotations

import onnx
import pytest

from qvggt_export.bench import CASES, BenchConfig, bench, format_table

pytestmark = pytest.mark.slow  # two exports of the default model and 12 spawned processes (~90 s on 2 cores)


def test_bench_measures_every_case_at_every_frame_count(tmp_path):
    report = bench(BenchConfig(frames=(1, 2), runs=1, threads=1, workdir=str(tmp_path)))
    assert list(report["results"]) == [f"{runtime}/{form}" for runtime, form in CASES]
    for case, per_s in report["results"].items():
        assert set(per_s) == {1, 2}, case
        for s, result in per_s.items():
            assert result["latency_s"] > 0 and result["peak_rss_mb"] >= result["loaded_rss_mb"] > 0, (case, s)
    ops = {form: [n.op_type for n in onnx.load(str(tmp_path / f"{form}.ort.onnx"), load_external_data=False)
                  .graph.node] for form in ("fp32", "w4a16", "w4a16-unfused")}
    assert "Softmax" not in ops["w4a16"] and "Softmax" not in ops["fp32"]
    assert ops["w4a16"].count("MultiHeadAttention") == ops["w4a16-unfused"].count("Softmax") > 0
    growth = report["ratios"]["memory_above_weights_per_doubling"]["onnxruntime/w4a16"]["1->2"]
    results = report["results"]["onnxruntime/w4a16"]
    assert growth == pytest.approx((results[2]["peak_rss_mb"] - results[2]["loaded_rss_mb"])
                                   / (results[1]["peak_rss_mb"] - results[1]["loaded_rss_mb"]))
    table = "\n".join(format_table(report))
    assert "fused / unfused attention" in table and "onnxruntime/w4a16-unfused" in table
