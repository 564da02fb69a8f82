"""Polygraphy compare with the geometry report, and TensorRT-RTX engines built on this CPU."""

from __future__ import annotations

import numpy as np
import pytest

from qvggt_export.compare import CompareConfig, compare, synthetic_inputs
from qvggt_export.export import spec
from qvggt_export.export.lower import write_lowering

from export_helpers import IMAGE_SIZE, exported_tiny, tiny_float_model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_tiny(tmp_path_factory)


def test_compare_passes_against_quantized_torch(exported):
    model, path = exported
    report = compare(path, model, synthetic_inputs(IMAGE_SIZE, scenes=1, frames=3))
    assert report["passed"] and report["polygraphy_passed"] and report["geometry_passed"]
    scene = report["scenes"][0]
    assert scene["geometry"]["rotation_error_deg"] < 0.1 and scene["geometry"]["auc@30"] > 99
    assert max(scene["relative_error"].values()) <= 1e-3


def test_compare_fails_against_a_different_model(exported):
    """A model with other weights must fail both the Polygraphy check and the geometry report."""
    _, path = exported
    report = compare(path, tiny_float_model(seed=1), synthetic_inputs(IMAGE_SIZE, scenes=1, frames=3),
                     CompareConfig(max_depth_abs_rel=0.01))
    assert not report["passed"] and not report["polygraphy_passed"]
    assert report["scenes"][0]["geometry_failures"]


def test_tensorrt_rtx_builds_qdq_engine_on_cpu(exported, tmp_path):
    trt = pytest.importorskip("tensorrt_rtx")
    from qvggt_export.export.engine import EngineConfig, build_engine

    import onnx

    _, path = exported
    qdq = write_lowering(path, "qdq", tmp_path / "model.qdq.onnx")
    info = build_engine(qdq, tmp_path / "model.qdq.engine", EngineConfig(backend="tensorrt-rtx"))
    engine = tmp_path / "model.qdq.engine"
    assert engine.stat().st_size == info["bytes"] > 0
    # build_engine raises unless the parser took every node; the INT4 weights must be in the network.
    assert info["layers_parsed"] > 0
    assert sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(qdq)).graph.node) > 0
    assert info["frames"] == [1, 4, 8] and info["image_size"] == list(IMAGE_SIZE)
    assert info["backend_version"] == trt.__version__


@pytest.mark.slow
def test_plugin_lowering_builds_with_the_w4a16_plugin(tmp_path):
    """fp16 W4A16 graph -> kernel-layout custom nodes -> TensorRT-RTX engine through the Python plugin."""
    pytest.importorskip("tensorrt_rtx")
    import onnx

    from qvggt_export.export.engine import EngineConfig, build_engine
    from qvggt_export.export.onnx_export import export_onnx
    from qvggt_export.export.spec import ExportConfig
    from qvggt_export.kernels.layout import KERNEL_LAYOUT

    from export_helpers import tiny_quantized_model

    path = export_onnx(tiny_quantized_model(), tmp_path / "model.onnx",
                       ExportConfig(precision="w4a16", image_size=IMAGE_SIZE, max_frames=8))
    plugin = write_lowering(path, "plugin")
    nodes = [n for n in onnx.load(str(plugin)).graph.node if n.op_type == "W4A16MatMul"]
    layouts = {onnx.helper.get_attribute_value(a) for n in nodes for a in n.attribute if a.name == "layout"}
    assert nodes and layouts == {KERNEL_LAYOUT.encode()}
    info = build_engine(plugin, tmp_path / "model.plugin.engine", EngineConfig(backend="tensorrt-rtx"))
    assert info["plugin"] and info["bytes"] == (tmp_path / "model.plugin.engine").stat().st_size > 0
