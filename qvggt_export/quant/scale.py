"""AWQ-style per-input-channel scales (AutoAWQ's "duo" form), the weight-clipping search, and exact folding.

A scale s [K] multiplies the columns of the linear's weight (W' = W diag(s)), and its inverse is
applied to the linear's input by the op before it, so that the float model is unchanged:
  "norm"       LayerNorm weight and bias divided by s,
  "last_rows"  the last K output rows (weight and bias) of the preceding linear divided by s,
  "input"      an explicit input multiply (PrescaledLinear.input_scale) by 1/s.
Which op precedes which linear comes from arch.SCALE_GROUPS; nothing here knows VGGT.

Candidates s = mean|x|^alpha / mean|w~|^(1 - alpha), with w~ the weight normalised by its quantization
group's max (both statistics per input channel), on a grid of alphas; a candidate is scored by the error
of the module the scaled linears feed, computed with the weights Q(W diag(s)) diag(s)^-1 on the module's
own inputs (so no input needs rescaling). Then the clipping search shrinks each quantization group's range
(max|w| -> r max|w|, r in [0.5, 1]) to the r minimising that group's partial output error on sampled
input rows. The format stays symmetric int4 with one fp16 scale per group of 128.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .linear import PrescaledLinear
from .modules import replace_module
from .pack import GROUP_SIZE, QMAX, QMIN, dequantize, group_scales, quantize

MIN_SCALE = 1e-4
CLIP_STEPS = 20  # ratios 1, 0.95, ..., 0.55: AutoAWQ's grid, down to half the range
CLIP_MIN_RATIO = 0.5


def weight_channel_mean(weights: list[Tensor], group_size: int = GROUP_SIZE) -> Tensor:
    """Mean over output rows of |w| / max|w| of its quantization group, per input channel [K]."""
    w = torch.cat([x.detach().float() for x in weights], dim=0)
    n, k = w.shape
    g = w.abs().reshape(n, k // group_size, group_size)
    g = g / g.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return g.reshape(n, k).mean(dim=0)


def candidate_scales(x_absmean: Tensor, alpha: float, w_mean: Tensor | None = None) -> Tensor:
    """s = mean|x|^alpha / mean|w~|^(1 - alpha) (mean|x|^alpha without w_mean), normalised so that
    max(s) * min(s) = 1 (as AutoAWQ), kept away from 0."""
    s = x_absmean.float().clamp_min(MIN_SCALE).pow(alpha)
    if w_mean is not None:
        s = s / (w_mean.to(s.device).float().pow(1 - alpha) + MIN_SCALE)
    s = s.clamp_min(MIN_SCALE)
    s = s / (s.max() * s.min()).sqrt()
    return s.clamp_min(MIN_SCALE)


def fake_quantize_with_scales(weight: Tensor, bits: int, group_size: int = GROUP_SIZE,
                              scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """RTN round trip against `scales` (default max|w| / qmax per group): dequantized weight in weight's
    dtype, fp16 group scales."""
    q, scales = quantize(weight, bits, group_size, scales)
    return dequantize(q, scales, group_size, weight.dtype), scales


@torch.no_grad()
def scaled_round_trip(weight: Tensor, s: Tensor, bits: int, group_size: int = GROUP_SIZE) -> Tensor:
    """Q(W diag(s)) diag(s)^-1: what a scaled, quantized linear computes, expressed on the original input."""
    wq, _ = fake_quantize_with_scales(weight.float() * s[None, :], bits, group_size)
    return (wq / s[None, :]).to(weight.dtype)


@torch.no_grad()
def clip_search(weight: Tensor, x: Tensor, bits: int, group_size: int = GROUP_SIZE, steps: int = CLIP_STEPS,
                min_ratio: float = CLIP_MIN_RATIO, rows_per_chunk: int = 256) -> Tensor:
    """Group scales [N, K // group_size] (fp32) with each group's range shrunk to the ratio that minimises
    the group's partial output error sum_m (x_mg . (q(w_ng) - w_ng))^2 over input rows x [M, K]."""
    n, k = weight.shape
    groups = k // group_size
    w = weight.detach().float()
    xg = x.float().reshape(-1, groups, group_size)
    base = group_scales(w, bits, group_size)
    best_err = torch.full((n, groups), float("inf"), device=w.device)
    best = base.clone()
    ratios = [1 - i / steps for i in range(round((1 - min_ratio) * steps))]
    for r0 in range(0, n, rows_per_chunk):
        wc = w[r0:r0 + rows_per_chunk].reshape(-1, groups, group_size)
        ref = torch.einsum("mgk,ngk->mng", xg, wc)
        for ratio in ratios:
            scale = (base[r0:r0 + rows_per_chunk] * ratio).to(torch.float16).float()
            wq = (wc / scale[..., None]).round().clamp(QMIN[bits], QMAX[bits]) * scale[..., None]
            err = (torch.einsum("mgk,ngk->mng", xg, wq) - ref).pow(2).sum(dim=0)
            better = err < best_err[r0:r0 + rows_per_chunk]
            best_err[r0:r0 + rows_per_chunk] = torch.where(better, err, best_err[r0:r0 + rows_per_chunk])
            best[r0:r0 + rows_per_chunk] = torch.where(better, scale, best[r0:r0 + rows_per_chunk])
    return best


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
