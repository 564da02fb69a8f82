"""AWQ-style per-input-channel scales: candidates, the layer reconstruction error, and exact folding.

A scale s [K] multiplies the columns of the linear's weight (W' = W diag(s)), and its inverse is
applied to the linear's input by the op before it, so that the float model is unchanged:
  "norm"       LayerNorm weight and bias divided by s,
  "last_rows"  the last K output rows (weight and bias) of the preceding linear divided by s,
  "input"      an explicit input multiply (PrescaledLinear.input_scale) by 1/s.
Which op precedes which linear comes from arch.SCALE_GROUPS; nothing here knows VGGT.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import PrescaledLinear
from .modules import replace_module
from .objective import relative_error
from .pack import GROUP_SIZE, dequantize, quantize

MIN_SCALE = 1e-4


def candidate_scales(absmean: Tensor, alpha: float) -> Tensor:
    """s = mean|x|^alpha, normalised so that max(s) * min(s) = 1 (as AutoAWQ), kept away from 0."""
    s = absmean.float().clamp_min(MIN_SCALE).pow(alpha)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp_min(MIN_SCALE)


def fake_quantize_with_scales(weight: Tensor, bits: int, group_size: int = GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """RTN round trip (dequantized weight in weight's dtype, fp16 group scales)."""
    q, scales = quantize(weight, bits, group_size)
    return dequantize(q, scales, group_size, weight.dtype), scales


@torch.no_grad()
def reconstruction_error(weight: Tensor, x: Tensor, s: Tensor, bits: int, group_size: int = GROUP_SIZE) -> float:
    """Relative output error of quantize(W diag(s)) applied to x / s against W x on sample rows x."""
    ref = x @ weight.float().t()
    wq, _ = fake_quantize_with_scales(weight.float() * s[None, :], bits, group_size)
    return relative_error((x / s[None, :]) @ wq.t(), ref)


@torch.no_grad()
def apply_scale(model: nn.Module, prev_op: str, layers: list[str], fold: str, s: Tensor) -> None:
    """Folds scale s into `layers` (columns times s) and its inverse into `prev_op` (exactly)."""
    s = s.to(next(model.parameters()).device)
    if fold == "norm":
        norm = model.get_submodule(prev_op)
        norm.weight.div_(s.to(norm.weight.dtype))
        if norm.bias is not None:
            norm.bias.div_(s.to(norm.bias.dtype))
    elif fold == "last_rows":
        prev = model.get_submodule(prev_op)
        k = s.shape[0]
        prev.weight[-k:].div_(s[:, None].to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias[-k:].div_(s.to(prev.bias.dtype))
    elif fold != "input":
        raise ValueError(f"unknown fold kind {fold!r}")
    for name in layers:
        linear = model.get_submodule(name)
        if fold == "input":
            linear = PrescaledLinear.from_linear(linear)
            replace_module(model, name, linear)
            linear.input_scale.div_(s.to(linear.input_scale.dtype))
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))
