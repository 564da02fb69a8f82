"""GPTQ (Frantar et al.): column-by-column rounding with error feedback through the inverse Hessian.

Group scales (max|w| / qmax over 128 input channels) are taken from the partly updated weights when
the sweep reaches each group, as the reference implementation does without static groups; the result
is a dequantized weight that lies exactly on its fp16 scales' grid, so packing reproduces it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .pack import GROUP_SIZE, QMAX, QMIN, group_scales

DAMPING = 0.01


def hessian_inverse_factor(hessian: Tensor, damping: float = DAMPING) -> Tensor:
    """Upper Cholesky factor of (H + damping * mean(diag H) * I)^-1, raising damping if H is singular."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = torch.diag(h).mean()
    for factor in (1, 10, 100, 1000):
        try:
            chol = torch.linalg.cholesky(h + factor * damping * mean_diag * eye)
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with strong damping")


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int = 4, group_size: int = GROUP_SIZE,
                  act_order: bool = False) -> tuple[Tensor, Tensor]:
    """weight [N, K], hessian [K, K] (sum of x x^T over calibration inputs) -> (dequantized weight [N, K]
    in fp32, fp16 scales [N, K // group_size]). `act_order` sweeps the columns by decreasing Hessian
    diagonal, with the group scales fixed up front from the weights ("static groups"), so the groups stay
    contiguous runs of 128 input channels as the packed format needs."""
    w = weight.detach().float().clone()
    n, k = w.shape
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    if act_order:
        return _gptq_act_order(w, hessian.to(w.device), bits, group_size)
    hinv = hessian_inverse_factor(hessian.to(w.device))
    scales = torch.empty(n, k // group_size, dtype=torch.float16, device=w.device)
    out = torch.empty_like(w)
    # Sweep one group at a time: the group's scale is fixed from its current (error-updated) weights.
    for g0 in range(0, k, group_size):
        g1 = g0 + group_size
        s16 = group_scales(w[:, g0:g1], bits, group_size).to(torch.float16)
        scales[:, g0 // group_size] = s16[:, 0]
        out[:, g0:g1] = _sweep(w, hinv, g0, g1, s16.float().expand(n, group_size), bits)
    return out, scales


def _sweep(w: Tensor, hinv: Tensor, c0: int, c1: int, column_scale: Tensor, bits: int) -> Tensor:
    """Rounds columns c0:c1 of w one at a time against their scales [N, c1 - c0], feeding each rounding
    error forward through the inverse-Hessian factor (into the batch now, into later columns of w at the
    end: GPTQ's lazy batch update). Returns the rounded columns."""
    block = w[:, c0:c1].clone()
    rounded = torch.empty_like(block)
    errors = torch.empty_like(block)
    hblock = hinv[c0:c1, c0:c1]
    for i in range(c1 - c0):
        col, s = block[:, i], column_scale[:, i]
        q = torch.clamp(torch.round(col / s), QMIN[bits], QMAX[bits]) * s
        rounded[:, i] = q
        err = (col - q) / hblock[i, i]
        block[:, i:] -= err[:, None] * hblock[i, i:][None, :]
        errors[:, i] = err
    w[:, c1:] -= errors @ hinv[c0:c1, c1:]
    return rounded


def _gptq_act_order(w: Tensor, hessian: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    n, k = w.shape
    scales16 = group_scales(w, bits, group_size).to(torch.float16)
    perm = torch.argsort(torch.diag(hessian), descending=True, stable=True)
    column_scale = scales16.float().repeat_interleave(group_size, dim=1)[:, perm]
    w = w[:, perm]
    hinv = hessian_inverse_factor(hessian[perm][:, perm])
    out = torch.empty_like(w)
    for c0 in range(0, k, group_size):  # lazy batches of columns, as the reference implementation
        c1 = min(c0 + group_size, k)
        out[:, c0:c1] = _sweep(w, hinv, c0, c1, column_scale[:, c0:c1], bits)
    return out[:, torch.argsort(perm)], scales16
