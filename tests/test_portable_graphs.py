"""Every graph the exporter emits (each precision, activation dtype and lowering) holds no float64 and
runs in the oldest onnxruntime the package accepts.

float64 is absent from TensorRT and from older ONNX Runtime kernels (e.g. no Cos(7) for double). The
minimum-version check needs a separate venv holding exactly that onnxruntime (.ci/run makes it in
build/venv-ort-floor; QVGGT_ORT_FLOOR_PYTHON points to another interpreter).
"""

import os
import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

import numpy as np
import onnx
import pytest

from export_helpers import IMAGE_SIZE, exported_tiny, tiny_float_model, tiny_quantized_model
from qvggt_export.export.lower import lower
from qvggt_export.export.onnx_export import export_onnx
from qvggt_export.export.onnx_io import load_onnx
from qvggt_export.export.runtime import ort_session
from qvggt_export.export.spec import ExportConfig, INPUT_NAME, OUTPUT_NAMES

ROOT = Path(__file__).parents[1]
FLOOR_PYTHON = Path(os.environ.get("QVGGT_ORT_FLOOR_PYTHON", ROOT / "build" / "venv-ort-floor" / "bin" / "python"))
DOUBLE = onnx.TensorProto.DOUBLE

pytestmark = pytest.mark.slow  # three exports (~25 s each on 2 busy cores) besides the shared one


@pytest.fixture(scope="module")
def graphs(tmp_path_factory) -> dict[str, Path]:
    """name -> path of every graph kind: fp32; W4A16 with fp32 and fp16 activations; W8A16; each
    quantized one as exported (custom nodes) and lowered for every target that accepts it."""
    out = tmp_path_factory.mktemp("portable")
    _, w4a16_fp32 = exported_tiny(tmp_path_factory)
    sources = {"w4a16-fp32act": w4a16_fp32}
    for name, model, config in (
            ("fp32", tiny_float_model(), ExportConfig(precision="fp32")),
            ("w4a16", tiny_quantized_model(), ExportConfig(precision="w4a16")),
            ("w8a16", tiny_quantized_model(precision="w8a16"), ExportConfig(precision="w8a16"))):
        sources[name] = export_onnx(model, out / f"{name}.onnx", ExportConfig(
            precision=config.precision, image_size=IMAGE_SIZE, min_frames=1, opt_frames=2, max_frames=4,
            validate=False))
    paths = dict(sources)
    for name, path in sources.items():
        targets = ("ort",) if name == "fp32" else ("ort", "qdq", "plugin") if name == "w4a16" else ("ort", "qdq")
        for target in targets:
            paths[f"{name}.{target}"] = out / f"{name}.{target}.onnx"
            onnx.save(lower(load_onnx(path), target), paths[f"{name}.{target}"])
    return paths


def float64_uses(model: onnx.ModelProto) -> list[str]:
    """Every float64 tensor, Cast to float64 and float64 tensor attribute in the graph."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    found = [f"initializer {t.name}" for t in graph.initializer if t.data_type == DOUBLE]
    found += [f"tensor {v.name}" for v in [*graph.input, *graph.output, *graph.value_info]
              if v.type.tensor_type.elem_type == DOUBLE]
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == DOUBLE:
                found.append(f"Cast {node.name}")
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == DOUBLE:
                found.append(f"attribute {node.name}.{attr.name}")
    return found


def test_no_graph_holds_float64(graphs):
    assert len(graphs) == 12
    for name, path in graphs.items():
        assert float64_uses(load_onnx(path)) == [], name


def test_the_float64_check_sees_a_cast_to_double(graphs):
    model = load_onnx(graphs["fp32"])
    first_output = model.graph.node[0].output[0]
    model.graph.node.append(onnx.helper.make_node("Cast", [first_output], ["as_double"], name="to_double", to=DOUBLE))
    assert "Cast to_double" in float64_uses(model)


def onnxruntime_floor() -> str:
    """The minimum in the package's own `onnxruntime>=X` requirement."""
    for requirement in requires("qvggt-export") or []:
        match = re.fullmatch(r"onnxruntime>=([0-9.]+)", requirement.replace(" ", ""))
        if match:
            return match.group(1)
    raise AssertionError("qvggt-export declares no onnxruntime>=X requirement")


@pytest.mark.skipif(not FLOOR_PYTHON.is_file(), reason=f"no minimum-onnxruntime venv at {FLOOR_PYTHON} "
                    "(.ci/run makes it; or set QVGGT_ORT_FLOOR_PYTHON)")
def test_every_runnable_graph_gives_the_same_outputs_in_the_minimum_onnxruntime(graphs, tmp_path):
    # Custom-node graphs are for TensorRT (plugin) or need lowering first: ONNX Runtime cannot run them.
    runnable = {name: path for name, path in graphs.items() if name == "fp32" or name.endswith((".ort", ".qdq"))}
    images = np.random.default_rng(3).random((1, 3, 3, *IMAGE_SIZE), dtype=np.float32)
    np.save(tmp_path / "images.npy", images)
    result = subprocess.run([str(FLOOR_PYTHON), str(Path(__file__).with_name("ort_floor_run.py")),
                             str(tmp_path / "images.npy"), str(tmp_path / "out.npz"),
                             *map(str, runnable.values())], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == onnxruntime_floor()
    floor = np.load(tmp_path / "out.npz")
    for name, path in runnable.items():
        current = ort_session(path).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        for output, value in zip(OUTPUT_NAMES, current):
            old = floor[f"{path.name}/{output}"]
            assert old.shape == value.shape, (name, output)
            span = float(value.max() - value.min()) or 1.0
            # fp16 graphs: kernels of different ORT versions round differently.
            tolerance = 1e-5 if name.startswith("fp32") or "fp32act" in name else 2e-3
            assert float(np.abs(old - value).max()) / span <= tolerance, (name, output)


def softmax_attentions(model: onnx.ModelProto) -> list[dict]:
    """Each Softmax with what feeds and takes it: the two MatMuls, their input dtypes, the scales on Q and K."""
    model = onnx.shape_inference.infer_shapes(model)
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    constants = {t.name for t in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    found = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        first, after = producer.get(softmax.input[0]), consumers.get(softmax.output[0], [])
        operands = [producer.get(i) for i in first.input] if first is not None else []
        found.append({
            "first": first.op_type if first is not None else None,
            "second": [n.op_type for n in after],
            "matmul_dtypes": ([dtypes.get(i) for i in first.input] if first is not None else [])
                             + [dtypes.get(i) for n in after for i in n.input],
            "scaled_operands": sum(op is not None and op.op_type == "Mul" and any(i in constants for i in op.input)
                                   for op in operands)})
    return found


def test_tensorrt_graphs_keep_every_attention_in_the_fusable_form(graphs):
    """TensorRT fuses MatMul -> Softmax -> MatMul into its MHA kernels only with fp16 on both MatMuls, the
    scale already on Q / K, and nothing (no Cast) between them: every fp16 graph for TensorRT keeps that."""
    for name in ("w4a16", "w4a16.qdq", "w4a16.plugin"):
        attentions = softmax_attentions(load_onnx(graphs[name]))
        assert len(attentions) == 2 + 2 + 4, name  # 2 frame, 2 global blocks; the trunk block x 4 iterations
        for attention in attentions:
            assert attention["first"] == "MatMul" and attention["second"] == ["MatMul"], (name, attention)
            assert set(attention["matmul_dtypes"]) == {onnx.TensorProto.FLOAT16}, (name, attention)
            assert attention["scaled_operands"] >= 1, (name, attention)


def test_ort_graphs_run_every_attention_as_multi_head_attention(graphs):
    """No MatMul -> Softmax -> MatMul is left for ONNX Runtime to materialise, and the fused graph gives the
    decomposed one's outputs: fp32 within 1e-5 of each output's range, fp16 within 2e-3."""
    images = np.random.default_rng(5).random((1, 3, 3, *IMAGE_SIZE), dtype=np.float32)
    for name in ("fp32", "w4a16-fp32act", "w4a16", "w8a16"):
        source = load_onnx(graphs[name])
        fused, decomposed = lower(source, "ort"), lower(source, "ort", attention="matmul")
        ops = [n.op_type for n in fused.graph.node]
        assert "Softmax" not in ops, name
        assert ops.count("MultiHeadAttention") == [n.op_type for n in decomposed.graph.node].count("Softmax") > 0
        got = ort_session(fused).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        want = ort_session(decomposed).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
        tolerance = 1e-5 if name in ("fp32", "w4a16-fp32act") else 2e-3
        for output, a, b in zip(OUTPUT_NAMES, got, want):
            span = float(b.max() - b.min()) or 1.0
            assert float(np.abs(a - b).max()) / span <= tolerance, (name, output)


def test_opset23_attention_builds_a_tensorrt_rtx_engine(graphs, tmp_path):
    """`--attention opset23`: every attention of the fp16 qdq graph as one ONNX Attention (opset 23), which
    the TensorRT-RTX parser imports (IAttention) and its builder turns into an engine; ONNX Runtime (1.32
    here) runs it to the decomposed graph's outputs."""
    pytest.importorskip("tensorrt_rtx")
    from qvggt_export.export.engine import EngineConfig, build_engine

    source = load_onnx(graphs["w4a16"])
    lowered = lower(source, "qdq", attention="opset23")
    ops = [n.op_type for n in lowered.graph.node]
    assert "Softmax" not in ops and ops.count("Attention") == 2 + 2 + 4
    assert {o.domain: o.version for o in lowered.opset_import}[""] == 23
    path = tmp_path / "model.qdq.onnx"
    onnx.save(lowered, path)
    info = build_engine(path, tmp_path / "model.qdq.engine", EngineConfig(backend="tensorrt-rtx"))
    assert (tmp_path / "model.qdq.engine").stat().st_size > 0, info
    images = np.random.default_rng(7).random((1, 2, 3, *IMAGE_SIZE), dtype=np.float32)
    got = ort_session(lowered).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    want = ort_session(lower(source, "qdq")).run(list(OUTPUT_NAMES), {INPUT_NAME: images})
    for output, a, b in zip(OUTPUT_NAMES, got, want):
        assert float(np.abs(a - b).max()) / (float(b.max() - b.min()) or 1.0) <= 2e-3, output


def test_plugin_target_refuses_w8a16_layers(graphs):
    from qvggt_export.errors import InputError

    with pytest.raises(InputError, match="w8a16 layer"):
        lower(load_onnx(graphs["w8a16"]), "plugin")
