"""Lowerings of `qvggt::W4A16MatMul` nodes with onnx-graphsurgeon, each checked by onnx.checker and
shape inference.

  ort     com.microsoft MatMulNBits (accuracy_level 0: fp activations, as the node means), and every
          attention as com.microsoft MultiHeadAttention (flash / memory-efficient kernels: memory linear
          in the tokens, where MatMul -> Softmax -> MatMul materialises heads x tokens^2 scores)
  qdq     standard INT4/INT8 DequantizeLinear(axis 0, block_size 128) on a [K, N] weight + MatMul
          (+ Add bias): the pattern TensorRT 10 and ModelOpt use, and that ORT fuses itself
  plugin  the custom nodes as they are, with the weight in the TensorRT plugin's kernel layout
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, QVGGTError
from ..kernels.layout import KERNEL_LAYOUT, to_kernel_layout
from ..log import logger
from ..quant.pack import pack_nibbles, unpack_int4
from . import custom_op
from .onnx_io import load_onnx, save_proto

TARGETS = ("ort", "qdq", "plugin")
META_TARGET = "qvggt.lowering"
META_ATTENTION = "qvggt.attention"
# How a lowering writes each attention: `matmul` as exported (MatMul -> Softmax -> MatMul, fp16 on both
# MatMuls, the scale on Q and K: the form TensorRT 10.x fuses), `mha` as com.microsoft MultiHeadAttention
# (ONNX Runtime's flash / memory-efficient kernels), `opset23` as the ONNX Attention operator (opset 23:
# TensorRT >= 10.14 and TensorRT-RTX import it as IAttention; TensorRT 10.3 / JetPack 6 cannot).
ATTENTION_FORMS = {"ort": ("mha", "matmul"), "qdq": ("matmul", "opset23"), "plugin": ("matmul", "opset23")}
ATTENTION_OPSET = 23


def custom_nodes(graph) -> list:
    return [n for n in graph.nodes if n.op == custom_op.OP_TYPE and n.domain == custom_op.DOMAIN]


def _attrs(node) -> tuple[int, int, int, int]:
    a = node.attrs
    return int(a["K"]), int(a["N"]), int(a["group_size"]), int(a["bits"])


def _codes(node) -> np.ndarray:
    """The node's weight as int8 codes [N, K] (canonical layout)."""
    K, N, _, bits = _attrs(node)
    w = node.inputs[1].values
    if bits == 8:
        return w.reshape(N, K)
    return unpack_int4(torch.tensor(w.view(np.uint8).reshape(N, K // 2))).numpy()


def _act_dtype(node):
    dtype = node.outputs[0].dtype or node.inputs[0].dtype
    return np.dtype(np.float16) if np.dtype(dtype) == np.float16 else np.dtype(np.float32)


def _shared(cache: dict, node, make):
    """One set of lowered constants per source weight: nodes that share a weight keep sharing it."""
    key = node.inputs[1].name
    if key not in cache:
        cache[key] = make(node.attrs["qvggt_layer"] if "qvggt_layer" in node.attrs else key)
    return cache[key]


def _to_ort(graph, node, cache: dict) -> None:
    import onnx_graphsurgeon as gs

    K, N, group, bits = _attrs(node)
    # MatMulNBits stores unsigned codes with the implicit zero point 2^(bits-1): for bits 4 that is
    # the canonical (q + 8) nibble packing, viewed as [N, K/group, group/2].
    if bits == 4:
        packed = node.inputs[1].values.view(np.uint8).reshape(N, K // group, group // 2)
    else:
        packed = (node.inputs[1].values.astype(np.int16) + 128).astype(np.uint8).reshape(N, K // group, group)
    scales = node.inputs[2].values.astype(_act_dtype(node))
    weight, scales = _shared(cache, node, lambda name: (gs.Constant(f"{name}.B", np.ascontiguousarray(packed)),
                                                         gs.Constant(f"{name}.scales", np.ascontiguousarray(scales))))
    inputs = [node.inputs[0], weight, scales]
    if len(node.inputs) > 3 and node.inputs[3].name:
        # MatMulNBits inputs: A, B, scales, zero_points, g_idx, bias.
        inputs += [gs.Variable.empty(), gs.Variable.empty(), node.inputs[3]]
    graph.nodes.append(gs.Node("MatMulNBits", name=node.name, domain="com.microsoft", inputs=inputs,
                               outputs=list(node.outputs),
                               attrs={"K": K, "N": N, "bits": bits, "block_size": group, "accuracy_level": 0}))


def _int4_initializer(name: str, codes_kn: np.ndarray):
    """int8 codes [K, N] in [-8, 7] -> an INT4 TensorProto wrapped for graphsurgeon.

    ONNX packs INT4 as two's-complement nibbles, two per byte in flat order, the first element in the
    low nibble (the canonical nibble order, without the + 8). graphsurgeon cannot build or read INT4
    constants from numpy (docs/extending.md: 'Raw data size does not match'), so the TensorProto is
    made here and passed as LazyValues."""
    import onnx
    from onnx_graphsurgeon.ir.tensor import LazyValues

    flat = torch.tensor(codes_kn.reshape(-1)).to(torch.uint8) & 0x0F
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    raw = pack_nibbles(flat).numpy().tobytes()
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.INT4, dims=list(codes_kn.shape), raw_data=raw)
    return LazyValues(tensor)


def _qdq_constants(node, name: str):
    import onnx_graphsurgeon as gs

    codes = np.ascontiguousarray(_codes(node).T)  # [K, N]: axis-0 blocks are what ORT and TensorRT fuse
    if int(node.attrs["bits"]) == 4:
        weight = gs.Constant(f"{name}.weight_int4", _int4_initializer(f"{name}.weight_int4", codes))
    else:
        weight = gs.Constant(f"{name}.weight_int8", codes)
    scales = gs.Constant(f"{name}.scales", np.ascontiguousarray(node.inputs[2].values.astype(_act_dtype(node)).T))
    return weight, scales


def _to_qdq(graph, node, cache: dict) -> None:
    import onnx_graphsurgeon as gs

    K, N, group, bits = _attrs(node)
    name = node.name
    weight, scales = _shared(cache, node, lambda layer: _qdq_constants(node, layer))
    # Each call dequantizes for itself: TensorRT and ORT fuse a DequantizeLinear only into a single
    # consumer (docs/extending.md).
    dq_out = gs.Variable(f"{name}.weight", dtype=_act_dtype(node), shape=[K, N])
    graph.nodes.append(gs.Node("DequantizeLinear", name=f"{name}.dq", inputs=[weight, scales], outputs=[dq_out],
                               attrs={"axis": 0, "block_size": group}))
    has_bias = len(node.inputs) > 3 and node.inputs[3].name
    y = list(node.outputs)
    mm_out = gs.Variable(f"{name}.matmul", dtype=_act_dtype(node)) if has_bias else y[0]
    graph.nodes.append(gs.Node("MatMul", name=f"{name}.matmul", inputs=[node.inputs[0], dq_out], outputs=[mm_out]))
    if has_bias:
        graph.nodes.append(gs.Node("Add", name=f"{name}.bias", inputs=[mm_out, node.inputs[3]], outputs=y))


def _to_plugin(graph, node, cache: dict) -> None:
    """Weight and scales into the kernel layout of the TensorRT plugin (qvggt_export.kernels.layout)."""
    import onnx_graphsurgeon as gs

    K, N, group, bits = _attrs(node)
    if bits != 4:
        # Neither plugin has an 8-bit kernel: a W8 node would leave a graph no TensorRT can build.
        raise InputError(f"--target plugin: {node.name} is a w8a16 layer and the W4A16 plugin runs 4-bit weights "
                         "only; use --target qdq (INT8 DequantizeLinear, TensorRT's own kernels) for w8a16 layers")
    if _act_dtype(node) != np.float16:
        # TensorRT's parser gives the plugin's fp16 output to fp32 consumers and refuses the graph.
        raise QVGGTError("--target plugin needs an fp16-activation graph (the W4A16 kernel computes in fp16); "
                         "export with --activations fp16")
    packed = torch.from_numpy(node.inputs[1].values.view(np.uint8).reshape(N, K // 2).copy())
    scales = torch.from_numpy(node.inputs[2].values.reshape(N, K // group).copy())

    def make(name):
        weight, kscales = to_kernel_layout(packed, scales)
        return (gs.Constant(f"{name}.weight_kernel", np.ascontiguousarray(weight.cpu().numpy()).view(np.int8)),
                gs.Constant(f"{name}.scales_kernel", np.ascontiguousarray(kscales.cpu().numpy().astype(np.float16))))

    node.inputs[1], node.inputs[2] = _shared(cache, node, make)
    node.attrs["layout"] = KERNEL_LAYOUT


def _scalar_factor(tensor) -> tuple[object, float]:
    """(x, c) when `tensor` is x * c with c a constant scalar, else (tensor, 1.0)."""
    import onnx_graphsurgeon as gs

    producer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == "Mul" and len(tensor.outputs) == 1:
        for x, c in (producer.inputs, producer.inputs[::-1]):
            if isinstance(c, gs.Constant) and c.values.size == 1:
                return x, float(c.values.reshape(-1)[0])
    return tensor, 1.0


def attention_patterns(graph) -> list[tuple]:
    """Every attention the exporter wrote out, MatMul(Q * a, K^T * b) -> Softmax(last axis) -> MatMul(., V) with
    Q, V [B, heads, tokens, head_dim] and K^T [B, heads, head_dim, tokens], as (nodes, q, k_t, v, scale, heads)."""
    found = []
    for softmax in [n for n in graph.nodes if n.op == "Softmax"]:
        scores, probabilities = softmax.inputs[0], softmax.outputs[0]
        if softmax.attrs.get("axis", -1) not in (-1, 3) or len(scores.inputs) != 1 or len(scores.outputs) != 1:
            continue
        first, consumers = scores.inputs[0], probabilities.outputs
        if first.op != "MatMul" or len(consumers) != 1 or consumers[0].op != "MatMul" \
                or consumers[0].inputs[0] is not probabilities:
            continue
        (q, a), (k_t, b), v = _scalar_factor(first.inputs[0]), _scalar_factor(first.inputs[1]), consumers[0].inputs[1]
        if q.shape is None or len(q.shape) != 4 or not isinstance(q.shape[1], int):
            continue
        found.append(((first, softmax, consumers[0]), q, k_t, v, a * b, q.shape[1]))
    return found


def _to_multi_head_attention(graph, pattern) -> None:
    """One attention as com.microsoft MultiHeadAttention on [B, tokens, heads * head_dim] inputs (the layout
    whose CPU and CUDA kernels are flash / memory-efficient), reshaped back to [B, heads, tokens, head_dim]."""
    import onnx_graphsurgeon as gs

    (first, softmax, second), q, k_t, v, scale, heads = pattern
    name, dtype = softmax.name or softmax.outputs[0].name, second.outputs[0].dtype
    flat = gs.Constant(f"{name}.flat_heads", np.array([0, 0, -1], dtype=np.int64))

    def tokens_major(x, perm, tag):
        split = graph.layer(op="Transpose", name=f"{name}.{tag}_bsnh", inputs=[x], attrs={"perm": perm},
                            outputs=[gs.Variable(f"{name}.{tag}_bsnh", dtype=dtype)])[0]
        return split, graph.layer(op="Reshape", name=f"{name}.{tag}_bsd", inputs=[split, flat],
                                  outputs=[gs.Variable(f"{name}.{tag}_bsd", dtype=dtype)])[0]

    q_split, q_flat = tokens_major(q, [0, 2, 1, 3], "q")
    _, k_flat = tokens_major(k_t, [0, 3, 1, 2], "k")  # K^T [B, H, d, N] -> [B, N, H, d]
    _, v_flat = tokens_major(v, [0, 2, 1, 3], "v")
    out = graph.layer(op="MultiHeadAttention", domain="com.microsoft", name=f"{name}.mha",
                      inputs=[q_flat, k_flat, v_flat], attrs={"num_heads": int(heads), "scale": float(scale)},
                      outputs=[gs.Variable(f"{name}.mha", dtype=dtype)])[0]
    shape = graph.layer(op="Shape", name=f"{name}.bsnh_shape", inputs=[q_split],
                        outputs=[gs.Variable(f"{name}.bsnh_shape", dtype=np.int64)])[0]
    split = graph.layer(op="Reshape", name=f"{name}.out_bsnh", inputs=[out, shape],
                        outputs=[gs.Variable(f"{name}.out_bsnh", dtype=dtype)])[0]
    result = list(second.outputs)
    second.outputs.clear()  # the decomposed attention is now dead: cleanup() removes it
    graph.layer(op="Transpose", name=f"{name}.out", inputs=[split], attrs={"perm": [0, 2, 1, 3]}, outputs=result)


def _to_onnx_attention(graph, pattern) -> None:
    """One attention as the ONNX Attention operator (opset 23) on the [B, heads, tokens, head_dim] tensors."""
    import onnx_graphsurgeon as gs

    (first, softmax, second), q, k_t, v, scale, _ = pattern
    name, dtype = softmax.name or softmax.outputs[0].name, second.outputs[0].dtype
    k = graph.layer(op="Transpose", name=f"{name}.k", inputs=[k_t], attrs={"perm": [0, 1, 3, 2]},
                    outputs=[gs.Variable(f"{name}.k", dtype=dtype)])[0]
    result = list(second.outputs)
    second.outputs.clear()
    graph.layer(op="Attention", name=f"{name}.attention", inputs=[q, k, v], attrs={"scale": float(scale)},
                outputs=result)


def attention_form(target: str, attention: str | None) -> str:
    """The attention form the `target` lowering writes: `attention` if that target takes it, else its default."""
    if attention is None:
        return ATTENTION_FORMS[target][0]
    if attention not in ATTENTION_FORMS[target]:
        raise InputError(f"--attention {attention} does not apply to --target {target}; it takes "
                         f"{' or '.join(ATTENTION_FORMS[target])}")
    return attention


def lower(model, target: str, check: bool = True, attention: str | None = None):
    """ModelProto with custom nodes -> ModelProto for `target` (metadata kept, lowering recorded).

    `attention`: one of ATTENTION_FORMS[target] (default: the first, i.e. `mha` for `ort`, `matmul` for the
    TensorRT graphs)."""
    import onnx
    import onnx_graphsurgeon as gs

    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    attention = attention_form(target, attention)
    graph = gs.import_onnx(model)
    nodes = custom_nodes(graph)
    rewrite = {"ort": _to_ort, "qdq": _to_qdq, "plugin": _to_plugin}[target]
    cache: dict = {}
    for node in nodes:
        rewrite(graph, node, cache)
        if target != "plugin":
            node.outputs.clear()  # detached: cleanup() removes it and its now unused initializers
    attentions = attention_patterns(graph) if attention != "matmul" else []
    for pattern in attentions:
        (_to_multi_head_attention if attention == "mha" else _to_onnx_attention)(graph, pattern)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    keep_domain = target == "plugin" and nodes
    # graphsurgeon adds the imports of the domains it sees but keeps stale ones (docs/extending.md).
    imports = {o.domain: o.version for o in out.opset_import
               if o.domain != custom_op.DOMAIN or keep_domain}
    if target == "ort" and (nodes or attentions):
        imports["com.microsoft"] = 1
    if attention == "opset23" and attentions:
        imports[""] = max(imports.get("", 0), ATTENTION_OPSET)
    del out.opset_import[:]
    out.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in sorted(imports.items()))
    out.ir_version = max(model.ir_version, 11) if attention == "opset23" and attentions else model.ir_version
    out.producer_name, out.producer_version = model.producer_name, model.producer_version
    meta = {p.key: p.value for p in model.metadata_props}
    meta[META_TARGET] = target
    meta[META_ATTENTION] = attention
    del out.metadata_props[:]
    for key, value in sorted(meta.items()):
        out.metadata_props.add(key=key, value=value)
    if check:
        check_model(out)
    logger.debug("lowered %d custom nodes to %s, %d attentions as %s", len(nodes), target, len(attentions), attention)
    return out


def check_model(model) -> None:
    """onnx.checker (full) + strict shape inference on graphs that fit in one protobuf."""
    import onnx

    if model.ByteSize() > 2_000_000_000:
        logger.warning("model over 2 GB: checker and shape inference run on the saved file only")
        return
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise QVGGTError(f"lowered graph fails the ONNX checker: {str(exc).splitlines()[0]}") from None


def count_ops(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def lowered_path(path, target: str):
    """engines/model.onnx -> engines/model.<target>.onnx"""
    from pathlib import Path

    path = Path(path)
    return path.with_name(f"{path.stem}.{target}.onnx")


def write_lowering(source, target: str, out=None, attention: str | None = None):
    out = out or lowered_path(source, target)
    save_proto(lower(load_onnx(source), target, attention=attention), out)
    logger.info("wrote %s", out)
    return out
