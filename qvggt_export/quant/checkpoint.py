"""Quantized checkpoints: one safetensors file with the packed weights, scales, the CIC token, the
plan, the model config and the method / calibration provenance (metadata `qvggt_format` = "quantized").

`qvggt_export.model.loading.load_model` dispatches such files here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .. import arch
from ..errors import CheckpointError
from ..io import atomic_output
from ..model.config import VGGTConfig
from ..model.loading import METADATA_CONFIG, METADATA_FORMAT, read_checkpoint
from ..model.vggt import VGGT
from .linear import QuantLinear
from .scale import replace_module

METADATA_PLAN = "qvggt_quant_plan"
METADATA_INFO = "qvggt_quant_info"
METADATA_LAYERS = "qvggt_quant_layers"


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    layers = {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                     "out_features": m.out_features, "bias": m.bias is not None,
                     "input_scale": m.input_scale is not None}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    metadata = {METADATA_FORMAT: "quantized", METADATA_CONFIG: json.dumps(model.config.to_dict()),
                METADATA_PLAN: json.dumps(model.quant_plan), METADATA_INFO: json.dumps(model.quant_info, default=str),
                METADATA_LAYERS: json.dumps(layers)}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def load_quantized(path: str | Path) -> nn.Module:
    path = Path(path)
    state, metadata = read_checkpoint(path)
    if metadata.get(METADATA_FORMAT) != "quantized":
        raise CheckpointError(f"{path} is not a quantized qvggt checkpoint")
    try:
        config = VGGTConfig(**json.loads(metadata[METADATA_CONFIG]))
        layers = json.loads(metadata[METADATA_LAYERS])
        plan, info = json.loads(metadata[METADATA_PLAN]), json.loads(metadata[METADATA_INFO])
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: quantized checkpoint metadata is missing or malformed ({exc})") from None
    model = VGGT(config)
    for name, spec in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: quantized layer {name} does not exist in the model config") from None
        replace_module(model, name, QuantLinear(spec["in_features"], spec["out_features"], spec["bits"],
                                                spec["group_size"], spec["bias"], spec["input_scale"], name))
    if arch.EXTRA_CAMERA_TOKENS_KEY in state:
        arch.set_extra_camera_tokens(model, torch.zeros_like(state[arch.EXTRA_CAMERA_TOKENS_KEY]))
    try:
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match its own quantization metadata: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    model.quant_plan, model.quant_info = plan, info
    return model.eval()
