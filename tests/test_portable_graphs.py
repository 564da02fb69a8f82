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
        if name == "fp32":
            continue
        targets = ("ort", "qdq", "plugin") if name == "w4a16" else ("ort", "qdq")
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
    assert len(graphs) == 11
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


def test_plugin_target_refuses_w8a16_layers(graphs):
    from qvggt_export.errors import InputError

    with pytest.raises(InputError, match="w8a16 layer"):
        lower(load_onnx(graphs["w8a16"]), "plugin")
