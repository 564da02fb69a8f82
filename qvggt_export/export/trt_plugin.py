"""TensorRT plugin for the qvggt::W4A16MatMul ONNX node, written against the Python IPluginV3 API.

Works with standard TensorRT (`tensorrt`) and TensorRT for RTX (`tensorrt_rtx`): pass the module to
`register_plugin`, then TensorRT's ONNX parser maps every W4A16MatMul node (attributes
plugin_namespace="qvggt", plugin_version="1") onto this plugin. Building an engine needs no GPU;
running it calls the CUDA kernel through the PyTorch binding (qvggt_export.kernels.binding).
A serialized engine stores the plugin's fields, not its code: register the plugin again in the
process that deserializes it. The C++ plugin in plugins/ is the same contract without Python.

Node contract: inputs X fp16 [..., K], weight int8 kernel_v1 [N/8, K/128, 512], scales fp16
[K/128, N], optional bias fp16 [N]; output Y fp16 [..., N]; attributes K, N, group_size (128),
bits (4), layout ("kernel_v1"); other attributes are ignored.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np

from qvggt_export.errors import QVGGTError
from qvggt_export.export.custom_op import OP_TYPE as PLUGIN_NAME
from qvggt_export.export.custom_op import PLUGIN_NAMESPACE, PLUGIN_VERSION
from qvggt_export.kernels.layout import KERNEL_LAYOUT, check_kernel_shape, kernel_weight_shape
from qvggt_export.log import logger
from qvggt_export.quant.pack import GROUP_SIZE

INT_FIELDS = ("K", "N", "group_size", "bits")
STRING_FIELDS = ("layout",)

# One creator per TensorRT module; the registry keeps only a raw pointer, so they must stay alive here.
_creators: dict[str, object] = {}


def register_plugin(trt: ModuleType):
    """Register the W4A16MatMul creator with `trt`'s plugin registry (idempotent); returns the creator."""
    if trt.__name__ in _creators:
        return _creators[trt.__name__]
    if trt.__name__ == "tensorrt_rtx":
        ensure_rtx_parser_can_load_runtime()
    creator = _plugin_classes(trt)[1]()
    if not trt.get_plugin_registry().register_creator(creator, PLUGIN_NAMESPACE):
        raise QVGGTError(f"{trt.__name__} refused to register the {PLUGIN_NAMESPACE}::{PLUGIN_NAME} plugin creator")
    _creators[trt.__name__] = creator
    return creator


def ensure_rtx_parser_can_load_runtime() -> None:
    """The tensorrt_rtx ONNX parser dlopens "libtensorrt_rtx.so" (unversioned) when it imports a plugin
    node and aborts the whole process if that fails; the pip wheel ships only libtensorrt_rtx.so.1.
    Add the development link next to it (the parser searches its own directory)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import tensorrt_rtx_libs
    except ImportError:  # not the pip wheel: a system install provides its own links
        return
    libs = Path(tensorrt_rtx_libs.__file__).parent
    link = libs / "libtensorrt_rtx.so"
    versioned = sorted(libs.glob("libtensorrt_rtx.so.*"))
    if link.exists() or not versioned:
        return
    try:
        partial = libs / f".{link.name}.{os.getpid()}"
        os.symlink(versioned[0].name, partial)
        os.replace(partial, link)
    except OSError as error:
        raise QVGGTError(f"the TensorRT-RTX ONNX parser needs {link} to import plugin nodes ({error}); "
                         f"create it with: ln -s {versioned[0].name} {link}") from error
    logger.info("added %s -> %s, which the TensorRT-RTX ONNX parser loads for plugin nodes", link, versioned[0].name)


def _plugin_classes(trt: ModuleType) -> tuple[type, type]:
    """Plugin and creator classes deriving from `trt`'s own IPluginV3 bindings."""

    class W4A16MatMulPlugin(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        def __init__(self, attributes: dict):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.num_outputs = 1
            self.attributes = dict(attributes)
            self.k, self.n = attributes["K"], attributes["N"]

        # IPluginV3
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            return W4A16MatMulPlugin(self.attributes)

        # IPluginV3OneBuild
        def get_output_data_types(self, input_types):
            return [trt.DataType.HALF]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            x = inputs[0]
            last = x[len(x) - 1]
            if last.is_constant() and last.get_constant_value() != self.k:
                raise QVGGTError(f"{PLUGIN_NAME}: X has {last.get_constant_value()} input channels, K={self.k}")
            y = trt.DimsExprs(x)
            y[len(y) - 1] = expr_builder.constant(self.n)
            return [y]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            wanted = trt.DataType.INT8 if pos == 1 else trt.DataType.HALF
            return desc.format == trt.TensorFormat.LINEAR and desc.type == wanted

        def configure_plugin(self, inputs, outputs):
            expected = [kernel_weight_shape(self.n, self.k), (self.k // GROUP_SIZE, self.n), (self.n,)]
            for name, desc, shape in zip(("weight", "scales", "bias"), inputs[1:], expected):
                if tuple(desc.desc.dims) != shape:
                    raise QVGGTError(f"{PLUGIN_NAME}: {name} has shape {tuple(desc.desc.dims)}, expected {shape}")

        def get_workspace_size(self, inputs, outputs):
            from qvggt_export.kernels.binding import workspace_bytes

            return workspace_bytes(self.n, self.k)

        # IPluginV3OneRuntime
        def on_shape_change(self, inputs, outputs):
            pass

        def set_tactic(self, tactic):
            pass

        def attach_to_context(self, context):
            return self.clone()

        def get_fields_to_serialize(self):
            # keep the arrays alive as long as the collection that points into them
            self._serialized = [(name, np.array([self.attributes[name]], dtype=np.int32), trt.PluginFieldType.INT32)
                                for name in INT_FIELDS]
            self._serialized += [(name, np.frombuffer(self.attributes[name].encode() + b"\0", dtype=np.int8),
                                  trt.PluginFieldType.CHAR) for name in STRING_FIELDS]
            return trt.PluginFieldCollection([trt.PluginField(*field) for field in self._serialized])

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            from qvggt_export.kernels.binding import w4a16_matmul, workspace_bytes

            rows = math.prod(tuple(input_desc[0].dims)) // self.k
            device = torch.device("cuda", torch.cuda.current_device())
            x = _device_tensor(inputs[0], (rows, self.k), "<f2", device)
            weight = _device_tensor(inputs[1], kernel_weight_shape(self.n, self.k), "|i1", device)
            scales = _device_tensor(inputs[2], (self.k // GROUP_SIZE, self.n), "<f2", device)
            bias = _device_tensor(inputs[3], (self.n,), "<f2", device) if len(inputs) > 3 else None
            y = _device_tensor(outputs[0], (rows, self.n), "<f2", device)
            scratch = _device_tensor(workspace, (workspace_bytes(self.n, self.k),), "|u1", device)
            with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=device)):
                w4a16_matmul(x, weight, scales, bias, out=y, workspace=scratch)

    class W4A16MatMulCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = PLUGIN_NAME
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self.field_names = trt.PluginFieldCollection(
                [trt.PluginField(name, np.array([], dtype=np.int32), trt.PluginFieldType.INT32) for name in INT_FIELDS]
                + [trt.PluginField(name, np.array([], dtype=np.int8), trt.PluginFieldType.CHAR)
                   for name in STRING_FIELDS])

        def create_plugin(self, name, field_collection, phase):
            return W4A16MatMulPlugin(plugin_attributes(field_collection))

    return W4A16MatMulPlugin, W4A16MatMulCreator


def plugin_attributes(field_collection) -> dict:
    """Validated attributes from a PluginFieldCollection (ONNX attributes or serialized fields)."""
    values = {}
    for field in field_collection:
        if field.name in INT_FIELDS:
            values[field.name] = int(np.asarray(field.data).reshape(-1)[0])
        elif field.name in STRING_FIELDS:
            values[field.name] = bytes(np.asarray(field.data, dtype=np.int8)).split(b"\0")[0].decode()
    missing = [name for name in INT_FIELDS + STRING_FIELDS if name not in values]
    if missing:
        raise QVGGTError(f"{PLUGIN_NAME}: missing attributes {missing}")
    if values["bits"] != 4:
        raise QVGGTError(f"{PLUGIN_NAME}: only bits=4 is supported, got {values['bits']}")
    if values["layout"] != KERNEL_LAYOUT:
        raise QVGGTError(f"{PLUGIN_NAME}: the plugin runs layout {KERNEL_LAYOUT!r}, the node has "
                         f"{values['layout']!r}; convert it with qvggt_export.kernels.to_kernel_layout")
    check_kernel_shape(values["N"], values["K"], values["group_size"])
    return values


class _CudaArray:
    """A raw device pointer with a shape, for torch.as_tensor (__cuda_array_interface__ v2)."""

    def __init__(self, pointer: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (pointer, False),
                                         "version": 2}


def _device_tensor(pointer: int, shape: tuple[int, ...], typestr: str, device):
    import torch

    return torch.as_tensor(_CudaArray(pointer, shape, typestr), device=device)
