"""The `qvggt::W4A16MatMul` custom node: its ONNX schema, the torch op that stands for a QuantLinear
during export, the onnxscript translation, and the NumPy reference (Polygraphy pluginref style).

Node contract (what every lowering, the TensorRT plugin and the reference agree on):
  inputs   X [..., K] (float or float16), W INT8 (canonical packed bytes reinterpreted: [N, K/2] for
           bits 4, int8 codes [N, K] for bits 8; TensorRT's parser would turn UINT8 into INT32),
           scales FLOAT16 [N, K/group_size], optional bias [N] of X's type
  output   Y [..., N] of X's type
  attrs    K, N, group_size, bits, layout ("canonical" or the kernel layout), plugin_namespace,
           plugin_version, and the annotations qvggt_layer, qvggt_block, qvggt_precision.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..quant.pack import unpack_weight

DOMAIN = "qvggt"
OP_TYPE = "W4A16MatMul"
OPSET_VERSION = 1
PLUGIN_NAMESPACE = "qvggt"
PLUGIN_VERSION = "1"
CANONICAL = "canonical"


def _register_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    attr = OpSchema.Attribute
    AT = OpSchema.AttrType
    schema = OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="Weight-only quantized matmul Y = X @ dequant(W)^T + bias (groups along K).",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("W", "tensor(int8)"),
                OpSchema.FormalParameter("scales", "tensor(float16)"),
                OpSchema.FormalParameter("bias", "T", param_option=OpSchema.FormalParameterOption.Optional)],
        outputs=[OpSchema.FormalParameter("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "activations")],
        attributes=[attr("K", AT.INT), attr("N", AT.INT), attr("group_size", AT.INT), attr("bits", AT.INT),
                    attr("layout", AT.STRING), attr("plugin_namespace", AT.STRING),
                    attr("plugin_version", AT.STRING),
                    # Annotations: optional so that a hand-made node without them still checks.
                    attr("qvggt_layer", AT.STRING, required=False), attr("qvggt_block", AT.STRING, required=False),
                    attr("qvggt_precision", AT.STRING, required=False)],
    )
    onnx.defs.register_schema(schema)


_register_schema()


def dequantize_node_weight(weight: Tensor, scales: Tensor, bits: int, group_size: int,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """The node's W input (INT8: packed canonical bytes for bits 4, codes for bits 8) and scales -> W [N, K]."""
    return unpack_weight(weight.view(torch.uint8) if bits == 4 else weight, scales, bits, group_size, dtype)


@torch.library.custom_op("qvggt::w4a16_matmul", mutates_args=())
def w4a16_matmul(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor], K: int, N: int,
                 group_size: int, bits: int, layer: str, block: str, precision: str) -> Tensor:
    return F.linear(x, dequantize_node_weight(weight, scales, bits, group_size, x.dtype), bias)


@w4a16_matmul.register_fake
def _(x, weight, scales, bias, K, N, group_size, bits, layer, block, precision):
    return x.new_empty((*x.shape[:-1], N))


def translation_table():
    """{torch op: onnxscript function} for torch.onnx.export's custom_translation_table."""
    from onnxscript.values import Opset

    qvggt = Opset(DOMAIN, OPSET_VERSION)

    def translate(x, weight, scales, bias=None, K: int = 0, N: int = 0, group_size: int = 128, bits: int = 4,
                  layer: str = "", block: str = "", precision: str = ""):
        return qvggt.W4A16MatMul(x, weight, scales, bias, K=K, N=N, group_size=group_size, bits=bits,
                                 layout=CANONICAL, plugin_namespace=PLUGIN_NAMESPACE,
                                 plugin_version=PLUGIN_VERSION, qvggt_layer=layer, qvggt_block=block,
                                 qvggt_precision=precision)

    return {torch.ops.qvggt.w4a16_matmul.default: translate}


# --------------------------------------------------------------------------------------------------
# NumPy reference of the node (canonical layout), the ground truth for lowerings and the plugin.


def w4a16_matmul_reference(x: np.ndarray, weight: np.ndarray, scales: np.ndarray, bias: np.ndarray | None,
                           *, K: int, N: int, group_size: int, bits: int, layout: str = CANONICAL,
                           **annotations) -> np.ndarray:
    if layout != CANONICAL:
        raise ValueError(f"the reference reads the canonical layout, not {layout!r}")
    if x.shape[-1] != K:
        raise ValueError(f"X has {x.shape[-1]} features, node says K={K}")
    w = dequantize_node_weight(torch.tensor(weight), torch.tensor(scales), bits, group_size).numpy()
    if w.shape != (N, K):
        raise ValueError(f"weight decodes to {w.shape}, node says N={N}, K={K}")
    y = x.astype(np.float32) @ w.T
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.astype(x.dtype)


def reference_op():
    """An onnx.reference OpRun for the node, so onnx's ReferenceEvaluator runs custom-node graphs."""
    from onnx.reference.op_run import OpRun

    class W4A16MatMul(OpRun):
        op_domain = DOMAIN

        def _run(self, x, weight, scales, bias=None, K=None, N=None, group_size=None, bits=None, layout=None,
                 plugin_namespace=None, plugin_version=None, qvggt_layer=None, qvggt_block=None,
                 qvggt_precision=None):
            return (w4a16_matmul_reference(x, weight, scales, bias, K=K, N=N, group_size=group_size, bits=bits,
                                           layout=layout),)

    return W4A16MatMul
