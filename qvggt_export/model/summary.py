"""What a checkpoint holds, read without building the model where the format allows, and what it weighs
once deployed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from .. import arch
from ..quant.pack import GROUP_SIZE
from ..quant.plan import quantized_layers
from .checkpoint import (METADATA_CONFIG, METADATA_FORMAT, METADATA_LAYERS, config_for, read_checkpoint,
                         read_checkpoint_metadata, resolve_source)

PARTS = ("aggregator.patch_embed", "aggregator", "camera_head", "depth_head", "point_head", "track_head")
# safetensors dtype names -> torch dtypes (the tensor dtypes our checkpoints and released ones hold).
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}
FP16_BYTES = 2
# Tensors only a quantized model holds: the AWQ input scales and the CIC token (absent from its fp16 twin).
QUANT_ONLY_FIELDS = ("input_scale",)


def _part(name: str) -> str:
    return next((p for p in PARTS if name.startswith(p + ".")), "other")


def _numel(shape) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _tensor_shapes(path: Path) -> tuple[dict[str, tuple[list[int], torch.dtype]], dict[str, str]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _, metadata = read_checkpoint_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: (list(f.get_slice(k).get_shape()), SAFETENSORS_DTYPES[f.get_slice(k).get_dtype()])
                      for k in f.keys()}
        return shapes, metadata
    state, metadata = read_checkpoint(path)
    return {k: (list(v.shape), v.dtype) for k, v in state.items()}, metadata


def _by_part(rows) -> dict[str, dict[str, int]]:
    """(tensor name, deployed bytes, fp16 bytes) rows -> {part: {"deployed", "fp16"}} plus "total"; parts
    as arch.DEPLOYED_PARTS, tensors that are not deployed (the track head) left out."""
    parts: dict[str, dict[str, int]] = {}
    for name, deployed, fp16 in rows:
        part = arch.deployed_part(name)
        if part is None:
            continue
        entry = parts.setdefault(part, {"deployed": 0, "fp16": 0})
        entry["deployed"] += deployed
        entry["fp16"] += fp16
    ordered = {p: parts[p] for p in (*arch.DEPLOYED_PARTS, "other") if p in parts}
    ordered["total"] = {k: sum(e[k] for e in parts.values()) for k in ("deployed", "fp16")}
    return ordered


def deployable_bytes(shapes: dict[str, tuple[list[int], torch.dtype]], quant_layers: dict[str, dict]) -> dict:
    """Weight bytes per deployed part of a checkpoint, as deployed (float tensors in fp16, quantized layers
    as packed codes + fp16 scales) and for the same model all in fp16. `quant_layers`: the checkpoint's
    quantized layers (METADATA_LAYERS), empty for a full-precision one."""
    rows = []
    for name, (shape, dtype) in shapes.items():
        owner, _, field = name.rpartition(".")
        n = _numel(shape)
        stored = n * (FP16_BYTES if dtype.is_floating_point else dtype.itemsize)
        if owner in quant_layers and field in ("qweight", "scales"):
            layer = quant_layers[owner]
            fp16 = layer["in_features"] * layer["out_features"] * FP16_BYTES if field == "qweight" else 0
            rows.append((name, stored, fp16))
        elif (owner in quant_layers and field in QUANT_ONLY_FIELDS) or name == arch.EXTRA_CAMERA_TOKENS_KEY:
            rows.append((name, stored, 0))
        else:
            rows.append((name, stored, stored))
    return _by_part(rows)


def planned_deployable_bytes(param_shapes: dict[str, list[int]], plan: dict) -> dict:
    """What `deployable_bytes` will report for the model a plan makes from full-precision parameters of
    these shapes (e.g. ../shared/fixtures/vggt1b_manifest.json), before any quantization runs; AWQ input
    scales and the CIC token (a few KB) are not counted."""
    bits = quantized_layers(plan)
    rows = []
    for name, shape in param_shapes.items():
        owner, _, field = name.rpartition(".")
        fp16 = _numel(shape) * FP16_BYTES
        if field == "weight" and owner in bits:
            n, k = shape
            rows.append((name, n * k * bits[owner] // 8 + n * (k // GROUP_SIZE) * FP16_BYTES, fp16))
        else:
            rows.append((name, fp16, fp16))
    return _by_part(rows)


def checkpoint_summary(source: str) -> dict:
    path = resolve_source(source)
    shapes, metadata = _tensor_shapes(path)
    by_part: Counter = Counter()
    dtypes: Counter = Counter()
    for name, (shape, dtype) in shapes.items():
        by_part[_part(name)] += _numel(shape)
        dtypes[str(dtype).replace("torch.", "")] += 1
    summary = {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "format": metadata.get(METADATA_FORMAT, "fp"),
        "tensors": len(shapes),
        "dtypes": dict(dtypes),
        "parameters": sum(by_part.values()),
        "parameters_by_part": {p: by_part[p] for p in (*PARTS, "other") if by_part[p]},
        "deployable_bytes": deployable_bytes(shapes, json.loads(metadata.get(METADATA_LAYERS, "{}"))),
        "config": (json.loads(metadata[METADATA_CONFIG]) if METADATA_CONFIG in metadata
                   else config_for(path, metadata).to_dict()),
    }
    quant_keys = {k: v for k, v in metadata.items() if k.startswith("qvggt_") and k not in (METADATA_CONFIG, METADATA_FORMAT)}
    if quant_keys:
        summary["quantization"] = quant_keys
    return summary


def format_deployable_bytes(table: dict) -> list[str]:
    """Lines of a deployable-bytes table: part, MB as deployed, MB at fp16, ratio."""
    lines = [f"  {'part':<12}{'deployed MB':>13}{'fp16 MB':>11}{'ratio':>8}"]
    for part, entry in table.items():
        ratio = entry["deployed"] / entry["fp16"] if entry["fp16"] else 1.0
        lines.append(f"  {part:<12}{entry['deployed'] / 1e6:>13.2f}{entry['fp16'] / 1e6:>11.2f}{ratio:>8.3f}")
    return lines
