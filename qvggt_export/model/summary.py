"""What a checkpoint holds, read without building the model where the format allows."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .checkpoint import (METADATA_CONFIG, METADATA_FORMAT, config_for, read_checkpoint, read_checkpoint_metadata,
                         resolve_source)

PARTS = ("aggregator.patch_embed", "aggregator", "camera_head", "depth_head", "point_head", "track_head")


def _part(name: str) -> str:
    return next((p for p in PARTS if name.startswith(p + ".")), "other")


def checkpoint_summary(source: str) -> dict:
    path = resolve_source(source)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        _, metadata = read_checkpoint_metadata(path)
        with safe_open(str(path), framework="pt") as f:
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}
    else:
        state, metadata = read_checkpoint(path)
        shapes = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in state.items()}
    by_part: Counter = Counter()
    dtypes: Counter = Counter()
    for name, (shape, dtype) in shapes.items():
        count = 1
        for dim in shape:
            count *= dim
        by_part[_part(name)] += count
        dtypes[str(dtype)] += 1
    summary = {
        "path": str(path),
        "file_bytes": Path(path).stat().st_size,
        "format": metadata.get(METADATA_FORMAT, "fp"),
        "tensors": len(shapes),
        "dtypes": dict(dtypes),
        "parameters": sum(by_part.values()),
        "parameters_by_part": {p: by_part[p] for p in (*PARTS, "other") if by_part[p]},
        "config": (json.loads(metadata[METADATA_CONFIG]) if METADATA_CONFIG in metadata
                   else config_for(path, metadata).to_dict()),
    }
    quant_keys = {k: v for k, v in metadata.items() if k.startswith("qvggt_") and k not in (METADATA_CONFIG, METADATA_FORMAT)}
    if quant_keys:
        summary["quantization"] = quant_keys
    return summary
