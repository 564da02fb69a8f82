"""The Python and the C++ TensorRT plugins against a real TensorRT builder: TensorRT for RTX builds on a CPU."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qvggt_export.errors import QVGGTError
from qvggt_export.export.trt_plugin import PLUGIN_NAME, PLUGIN_NAMESPACE, plugin_attributes, register_plugin
from qvggt_export.kernels.layout import KERNEL_LAYOUT, to_kernel_layout
from qvggt_export.quant.pack import pack_weight

trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx is not installed (pip install tensorrt-rtx)")

# (K, N, bias) of the nodes in the test graph: an MLP of VGGT's width on [frames, tokens, channels]
LAYERS = [(1024, 4096, True), (4096, 1024, False), (1024, 3072, True)]


def w4a16_node(name, x, y, k, n, bias, layout=KERNEL_LAYOUT):
    torch.manual_seed(len(name) + k + n)
    packed, scales = pack_weight(torch.randn(n, k) * 0.02)
    weight, scales = to_kernel_layout(packed, scales)
    initializers = [numpy_helper.from_array(weight.numpy(), f"{name}.weight"),
                    numpy_helper.from_array(scales.numpy(), f"{name}.scales")]
    inputs = [x, f"{name}.weight", f"{name}.scales"]
    if bias:
        initializers.append(numpy_helper.from_array(np.linspace(-1, 1, n).astype(np.float16), f"{name}.bias"))
        inputs.append(f"{name}.bias")
    node = helper.make_node(PLUGIN_NAME, inputs, [y], name=name, domain=PLUGIN_NAMESPACE, K=k, N=n, group_size=128,
                            bits=4, layout=layout, plugin_namespace=PLUGIN_NAMESPACE, plugin_version="1",
                            qvggt_block=f"frame.{len(name)}", qvggt_precision="w4a16")
    return node, initializers


def mlp_model(layers=LAYERS, layout=KERNEL_LAYOUT) -> onnx.ModelProto:
    nodes, initializers, current = [], [], "x"
    for index, (k, n, bias) in enumerate(layers):
        output = "y" if index == len(layers) - 1 else f"h{index}"
        node, weights = w4a16_node(f"layer{index}", current, output, k, n, bias, layout)
        nodes.append(node)
        initializers += weights
        current = output
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["frames", "tokens", layers[0][0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["frames", "tokens", layers[-1][1]])
    graph = helper.make_graph(nodes, "w4a16_mlp", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(PLUGIN_NAMESPACE, 1)])


def parse(model: onnx.ModelProto, python_plugin: bool = True):
    if python_plugin:
        register_plugin(trt)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(model.SerializeToString())
    errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
    return builder, network, ok, errors


def plugin_layers(network):
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    return [layer for layer in layers if layer.type == trt.LayerType.PLUGIN_V3]


def parse_and_build(python_plugin: bool = True) -> dict:
    """The MLP's plugin layers (input types, output type and shape) and its engine size."""
    builder, network, ok, errors = parse(mlp_model(), python_plugin)
    assert ok and not errors, errors
    layers = [{"inputs": [str(layer.get_input(i).dtype) for i in range(layer.num_inputs)],
               "output": str(layer.get_output(0).dtype), "shape": list(layer.get_output(0).shape)}
              for layer in plugin_layers(network)]
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, 1024), (2, 1374, 1024), (4, 1374, 1024))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    return {"layers": layers, "engine_bytes": 0 if engine is None else engine.nbytes}


# Run in a fresh process: one registry cannot hold the Python and the C++ creator of the same name.
CPP_PLUGIN_BUILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
import tensorrt_rtx
from qvggt_export.export.engine import register_plugins
from test_trt_plugin import parse_and_build
register_plugins(tensorrt_rtx, sys.argv[1])
print(json.dumps(parse_and_build(python_plugin=False)))
"""


@pytest.mark.slow  # builds the C++ plugin (~15 s on 2 busy cores)
def test_cpp_plugin_library_builds_the_same_engine_as_the_python_plugin(tmp_path):
    from plugin_build import build_plugin, missing_tools

    version = "10.13"  # TensorRT-RTX 1.x has the TensorRT 10 plugin API
    reason = missing_tools(version)
    if reason:
        pytest.skip(reason=reason)
    library = build_plugin(version, tmp_path / "plugin")
    # register_plugins makes the parser's libtensorrt_rtx.so link: without it both plugins abort the
    # process ("terminate called without an active exception") once a plugin node is imported.
    result = subprocess.run([sys.executable, "-c", CPP_PLUGIN_BUILD, str(library), str(Path(__file__).parent)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cpp = json.loads(result.stdout.strip().splitlines()[-1])
    python = parse_and_build(python_plugin=True)
    assert cpp["layers"] == python["layers"] and len(cpp["layers"]) == len(LAYERS)
    assert cpp["engine_bytes"] > 0 and abs(cpp["engine_bytes"] - python["engine_bytes"]) <= 0.01 * python["engine_bytes"]


def test_w4a16_nodes_parse_into_plugin_layers_and_build_an_engine_on_cpu():
    builder, network, ok, errors = parse(mlp_model())
    assert ok and not errors

    layers = plugin_layers(network)
    assert len(layers) == len(LAYERS)
    for layer, (k, n, bias) in zip(layers, LAYERS):
        inputs = [layer.get_input(i) for i in range(layer.num_inputs)]
        assert [t.dtype for t in inputs] == [trt.DataType.HALF, trt.DataType.INT8, trt.DataType.HALF] + \
            [trt.DataType.HALF] * bias
        assert tuple(inputs[1].shape) == (n // 8, k // 128, 512)
        assert tuple(inputs[2].shape) == (k // 128, n)
        output = layer.get_output(0)
        assert output.dtype == trt.DataType.HALF
        assert tuple(output.shape) == (-1, -1, n)

    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, 1024), (2, 1374, 1024), (4, 1374, 1024))
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    assert engine is not None and engine.nbytes > 0


def test_a_node_in_the_canonical_layout_is_refused_with_a_parser_error():
    _, network, ok, errors = parse(mlp_model(layers=[(1024, 1024, False)], layout="canonical"))
    assert not ok and errors
    assert not plugin_layers(network)


def test_serialized_fields_recreate_the_same_plugin():
    creator = register_plugin(trt)
    fields = trt.PluginFieldCollection([
        trt.PluginField("K", np.array([2048], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("N", np.array([8192], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("group_size", np.array([128], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("bits", np.array([4], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("layout", np.frombuffer(b"kernel_v1\0", np.int8), trt.PluginFieldType.CHAR),
    ])
    plugin = creator.create_plugin("fc1", fields, trt.TensorRTPhase.BUILD)
    restored = creator.create_plugin("fc1", plugin.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert restored.attributes == plugin.attributes == {"K": 2048, "N": 8192, "group_size": 128, "bits": 4,
                                                        "layout": "kernel_v1"}
    assert restored.get_workspace_size([], []) == 8192 * 2048 * 2


def test_plugin_attributes_reject_what_the_kernel_cannot_run():
    def fields(**overrides):
        values = {"K": 1024, "N": 1024, "group_size": 128, "bits": 4, "layout": KERNEL_LAYOUT, **overrides}
        return [trt.PluginField(name, np.frombuffer(value.encode() + b"\0", np.int8), trt.PluginFieldType.CHAR)
                if isinstance(value, str) else
                trt.PluginField(name, np.array([value], np.int32), trt.PluginFieldType.INT32)
                for name, value in values.items()]

    assert plugin_attributes(fields())["N"] == 1024
    for bad in ({"bits": 8}, {"group_size": 64}, {"K": 1000}, {"N": 1020}, {"layout": "canonical"}):
        with pytest.raises(QVGGTError):
            plugin_attributes(fields(**bad))
