"""Weight quantization formulas and the canonical packed format (docs/architecture.md).

Canonical W4: weight [N, K] (out, in), groups of `group_size` along K, symmetric
scale = max|w_group| / 7, q = clamp(round(w / scale), -8, 7), stored as unsigned nibbles (q + 8),
two per byte, even k in the low nibble -> uint8 [N, K // 2]; scales fp16 [N, K // group_size].
W8 uses the same grouping with scale = max|w_group| / 127 and int8 [N, K].

Everything here is the plain reference that packed kernels and ONNX lowerings are tested against.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 128
QMAX = {4: 7, 8: 127}
QMIN = {4: -8, 8: -128}


def _check_shape(weight: torch.Tensor, group_size: int) -> None:
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [N, K], got shape {tuple(weight.shape)}")
    if weight.shape[1] % group_size:
        raise ValueError(f"K={weight.shape[1]} is not a multiple of group_size={group_size}")


def group_scales(weight: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """fp32 scales [N, K // group_size]; an all-zero group gets scale 1 so it decodes to zero."""
    _check_shape(weight, group_size)
    n, k = weight.shape
    amax = weight.detach().float().reshape(n, k // group_size, group_size).abs().amax(dim=-1)
    scale = amax / QMAX[bits]
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize(weight: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE,
             scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer codes int8 [N, K] in [QMIN, QMAX] and fp16 scales [N, K // group_size].

    The codes are computed against the fp16-rounded scales, so that dequantization with the stored
    scales reproduces exactly what was rounded.
    """
    if scales is None:
        scales = group_scales(weight, bits, group_size)
    scales16 = scales.to(torch.float16)
    n, k = weight.shape
    s = scales16.float().repeat_interleave(group_size, dim=1)
    q = torch.clamp(torch.round(weight.detach().float() / s), QMIN[bits], QMAX[bits])
    return q.to(torch.int8).reshape(n, k), scales16


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scales.float().repeat_interleave(group_size, dim=1)).to(dtype)


def pack_nibbles(nibbles: torch.Tensor) -> torch.Tensor:
    """uint8 values in [0, 15], [..., 2m] -> uint8 [..., m]: element 2i in the low nibble of byte i,
    element 2i + 1 in the high nibble. The one nibble codec: the canonical format, the kernel layout
    and ONNX INT4 initializers all pack and unpack through it."""
    if nibbles.shape[-1] % 2:
        raise ValueError("the last dimension must be even to pack nibbles")
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., m] -> uint8 [..., 2m] in [0, 15]; the inverse of pack_nibbles."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> uint8 [N, K // 2], (q + 8), even k in the low nibble."""
    return pack_nibbles((q.to(torch.int16) + 8).to(torch.uint8))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K // 2] -> int8 codes [N, K] in [-8, 7]."""
    return unpack_nibbles(packed).to(torch.int8) - 8


def pack_weight(weight: torch.Tensor, bits: int = 4, group_size: int = GROUP_SIZE,
                scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight [N, K] -> (packed codes, fp16 scales) in the canonical format."""
    q, s = quantize(weight, bits, group_size, scales)
    return (pack_int4(q) if bits == 4 else q), s


def unpack_weight(packed: torch.Tensor, scales: torch.Tensor, bits: int = 4,
                  group_size: int = GROUP_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = unpack_int4(packed) if bits == 4 else packed
    return dequantize(q, scales, group_size, dtype)
