"""ONNX export of a quantized VGGT: custom nodes, metadata, lowerings vs the PyTorch quantized model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from qvggt_export.errors import CheckpointError, InputError
from qvggt_export.export import custom_op, spec
from qvggt_export.export.lower import count_ops, lower
from qvggt_export.export.onnx_export import check_plan, export_onnx, random_images, relative_errors, torch_outputs
from qvggt_export.export.onnx_io import load_onnx
from qvggt_export.export.runtime import ort_session
from qvggt_export.export.spec import ExportConfig
from qvggt_export.quant.linear import QuantLinear
from qvggt_export.quant.plan import quantized_layers

from export_helpers import IMAGE_SIZE, exported_tiny


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    return exported_tiny(tmp_path_factory)[0]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return exported_tiny(tmp_path_factory)[1]


def _calls_per_layer(model) -> dict[str, int]:
    """How often each QuantLinear runs in one forward (the camera trunk runs once per iteration)."""
    calls = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
             for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        model(torch.rand(1, 2, 3, *IMAGE_SIZE))
    for h in hooks:
        h.remove()
    return calls


def test_custom_nodes_annotations_and_metadata(quantized, exported):
    model = load_onnx(exported)
    onnx.checker.check_model(model, full_check=True)
    nodes = [n for n in model.graph.node if n.domain == custom_op.DOMAIN]
    calls = _calls_per_layer(quantized)
    assert len(nodes) == sum(calls.values())
    inits = {t.name: t for t in model.graph.initializer}
    plan_layers = quantized_layers(quantized.quant_plan)
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        layer = attrs["qvggt_layer"].decode()
        module = quantized.get_submodule(layer)
        assert node.op_type == "W4A16MatMul"
        assert (attrs["K"], attrs["N"], attrs["bits"], attrs["group_size"]) == (
            module.in_features, module.out_features, plan_layers[layer], 128)
        assert attrs["layout"] == b"canonical" and attrs["plugin_namespace"] == b"qvggt"
        assert attrs["qvggt_precision"] == b"w4a16" and layer.startswith(attrs["qvggt_block"].decode())
        weight, scales = inits[node.input[1]], inits[node.input[2]]
        assert weight.data_type == onnx.TensorProto.INT8 and scales.data_type == onnx.TensorProto.FLOAT16
        # The initializer holds exactly the checkpoint's canonical bytes.
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(weight).view(np.uint8), module.qweight.numpy())
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta[spec.META_PLAN]) == quantized.quant_plan
    assert json.loads(meta[spec.META_PROVENANCE]) == quantized.quant_info
    # The CIC token is a constant of the graph, not an input.
    assert [i.name for i in model.graph.input] == [spec.INPUT_NAME]
    assert [o.name for o in model.graph.output] == list(spec.OUTPUT_NAMES)


@pytest.mark.parametrize("target,op", [("ort", "com.microsoft::MatMulNBits"), ("qdq", "DequantizeLinear")])
def test_lowering_matches_pytorch_quantized_model(quantized, exported, target, op):
    lowered = lower(load_onnx(exported), target)
    counts = count_ops(lowered)
    assert counts.get(op) == sum(_calls_per_layer(quantized).values())
    assert "qvggt::W4A16MatMul" not in counts
    assert all(o.domain != custom_op.DOMAIN for o in lowered.opset_import)
    # One weight initializer per quantized linear of the plan, shared by the calls of that linear.
    weight_input = 1 if target == "ort" else 0
    weights = {n.input[weight_input] for n in lowered.graph.node if f"{n.domain}::{n.op_type}".endswith(op)}
    assert len(weights) == len(quantized_layers(quantized.quant_plan))
    session = ort_session(lowered)
    for frames in (1, 4):  # one file, two frame counts
        images = random_images(frames, IMAGE_SIZE, seed=10 + frames)
        got = dict(zip(spec.OUTPUT_NAMES, session.run(None, {spec.INPUT_NAME: images})))
        assert got["depth"].shape == (1, frames, *IMAGE_SIZE, 1)
        errors = relative_errors(got, torch_outputs(quantized, images))
        assert max(errors.values()) <= 1e-3, errors


def test_custom_node_graph_runs_on_numpy_reference(quantized, exported):
    """The custom-node graph itself, executed by onnx's reference evaluator with our op reference."""
    from onnx.reference import ReferenceEvaluator

    evaluator = ReferenceEvaluator(load_onnx(exported), new_ops=[custom_op.reference_op()])
    images = random_images(2, IMAGE_SIZE, seed=3)
    got = dict(zip(spec.OUTPUT_NAMES, evaluator.run(None, {spec.INPUT_NAME: images})))
    errors = relative_errors(got, torch_outputs(quantized, images))
    assert max(errors.values()) <= 1e-3, errors


def test_reference_op_equals_quantlinear():
    torch.manual_seed(1)
    for bits in (4, 8):
        linear = torch.nn.Linear(256, 96)
        q = QuantLinear.from_linear(linear, bits, name="x")
        x = torch.randn(5, 256)
        weight = q.qweight.numpy().view(np.int8)
        y = custom_op.w4a16_matmul_reference(x.numpy(), weight, q.scales.numpy(), q.bias.numpy(), K=256, N=96,
                                             group_size=128, bits=bits)
        np.testing.assert_allclose(y, q(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_plan_checkpoint_mismatch_is_refused(quantized):
    plan = quantized.quant_plan
    layer = next(iter(quantized_layers(plan)))
    quantized.quant_plan = {**plan, "layers": {**plan["layers"], layer: "fp16"}}
    try:
        with pytest.raises(CheckpointError, match="disagree"):
            check_plan(quantized)
    finally:
        quantized.quant_plan = plan


def test_truncated_and_corrupt_onnx_are_refused(exported, tmp_path):
    data = exported.read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 100)
    for path in (truncated, corrupt, tmp_path / "missing.onnx"):
        with pytest.raises(InputError):
            load_onnx(path)


@pytest.mark.slow
def test_two_exports_are_byte_identical(quantized, exported, tmp_path):
    again = tmp_path / "again.onnx"
    export_onnx(quantized, again, ExportConfig(precision="w4a16", activations="fp32", image_size=IMAGE_SIZE,
                                               min_frames=1, opt_frames=4, max_frames=8, validate=False))
    assert again.read_bytes() == exported.read_bytes()


def test_non_square_export_holds_the_position_embedding_as_a_constant(tmp_path):
    """At a size whose patch grid differs from DINOv2's stored square one, the traced resize of the position
    embedding is an antialiased bicubic Resize that TensorRT's parser refuses; the export holds the resized
    embedding as a constant instead (same outputs: the export validates against PyTorch), and TensorRT-RTX
    builds the engine."""
    from qvggt_export.model import VGGT, VGGTConfig

    # A stored grid of 98 x 98 x 128 (> 1 M values, as VGGT-1B's 37 x 37 x 1024): the exporter's optimizer folds
    # the resize of a smaller embedding into a constant by itself, which would hide the Resize this test is about.
    torch.manual_seed(0)
    model = VGGT(VGGTConfig(img_size=1372, embed_dim=128, depth=2, num_heads=2, camera_num_heads=2, camera_trunk_depth=1,
                            dpt_features=16, dpt_out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 0, 1, 1),
                            carry_track_head=False, dinov2_depth=1, dinov2_num_heads=2)).eval()
    path = export_onnx(model, tmp_path / "model.onnx", ExportConfig(precision="fp32", image_size=(28, 42),
                                                                     min_frames=1, opt_frames=2, max_frames=2))
    resizes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
               for n in load_onnx(path).graph.node if n.op_type == "Resize"]
    assert resizes and all(r["mode"] == b"linear" and r["antialias"] == 0 for r in resizes)  # the DPT heads' only
    assert not hasattr(model.aggregator.patch_embed, "onnx_pos_embed")  # the patch is undone
    pytest.importorskip("tensorrt_rtx")
    from qvggt_export.export.engine import EngineConfig, build_engine

    build_engine(path, tmp_path / "model.engine", EngineConfig(backend="tensorrt-rtx"))
    assert (tmp_path / "model.engine").stat().st_size > 0


def test_compare_report_reads_the_plan_from_the_candidate_graph(quantized, exported):
    """A standalone `compare --report` against the full-precision model: the plan on the page is the one
    the candidate ONNX carries in its metadata (the full-precision reference has none)."""
    from export_helpers import tiny_float_model
    from qvggt_export.compare import report_context

    context = report_context(exported, tiny_float_model(), "torch", None)
    assert context["plan"] == json.loads(json.dumps(quantized.quant_plan, sort_keys=True))
    assert context["files"] == {exported.name: exported.stat().st_size}
