"""Linear layers of a quantized model.

`QuantLinear` holds weights in the canonical packed format (pack.py) and computes with a plain
dequantize-then-matmul reference; the ONNX exporter and the CUDA kernel are tested against it. On a GPU
`load_model(..., device="cuda")` swaps the 4-bit ones for kernels.linear.KernelLinear (the W4A16 kernel).
`PrescaledLinear` is the float stage of the same idea used during scale search: a linear whose input
is multiplied by a per-channel vector first (the explicit inverse scale AWQ needs before fc2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pack import GROUP_SIZE, pack_weight, unpack_weight

PRECISION_OF_BITS = {4: "w4a16", 8: "w8a16"}


class PrescaledLinear(nn.Linear):
    """y = W (x * input_scale) + b, keeping nn.Linear's parameter names (so module paths don't change)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("input_scale", torch.ones(in_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "PrescaledLinear":
        if isinstance(linear, PrescaledLinear):
            return linear
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(linear.weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x * self.input_scale.to(x.dtype), self.weight, self.bias)


class PackedFormatModule(nn.Module):
    """A module whose `packed_buffers` belong to a packed weight format: casting the model (`.half()`,
    `.to(torch.bfloat16)`, `.float()`) moves them to the new device but never changes their dtype, so
    fp16 scales are not re-rounded to bf16 and kernels get the dtypes they read."""

    packed_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        kept = {name: self._buffers[name] for name in self.packed_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, buffer in kept.items():
            # fn moves integer tensors without casting them: it tells the target device.
            device = fn(torch.empty(0, dtype=torch.uint8, device=buffer.device)).device
            self._buffers[name] = buffer.to(device)
        return self


class QuantLinear(PackedFormatModule):
    """Weight-only quantized linear (W4A16 / W8A16, symmetric, groups along the input dimension).

    Buffers: qweight (bits 4: uint8 [N, K // 2], bits 8: int8 [N, K]), scales fp16 [N, K // group_size],
    bias fp32 [N] or None, input_scale fp32 [K] or None (multiplied into the input before the matmul).
    """

    packed_buffers = ("scales",)

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = GROUP_SIZE,
                 bias: bool = True, has_input_scale: bool = False, name: str = "") -> None:
        super().__init__()
        if bits not in PRECISION_OF_BITS:
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} is not a multiple of group_size={group_size}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.name = bits, group_size, name
        self.precision = PRECISION_OF_BITS[bits]
        packed_shape = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        self.register_buffer("qweight", torch.zeros(packed_shape, dtype=torch.uint8 if bits == 4 else torch.int8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features) if has_input_scale else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = GROUP_SIZE, name: str = "",
                    scales: Tensor | None = None) -> "QuantLinear":
        """Quantizes `linear` (round to nearest against `scales`, default max|w|/qmax per group).

        A PrescaledLinear's input scale is carried over (identity scales are dropped)."""
        input_scale = getattr(linear, "input_scale", None)
        if input_scale is not None and torch.all(input_scale == 1):
            input_scale = None
        q = cls(linear.in_features, linear.out_features, bits, group_size, bias=linear.bias is not None,
                has_input_scale=input_scale is not None, name=name)
        packed, s = pack_weight(linear.weight.detach().float().cpu(), bits, group_size,
                                None if scales is None else scales.cpu())
        q.qweight.copy_(packed)
        q.scales.copy_(s)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach().float())
        if input_scale is not None:
            q.input_scale.copy_(input_scale.detach().float())
        return q.to(linear.weight.device)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return unpack_weight(self.qweight, self.scales, self.bits, self.group_size, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def weight_bytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * 2

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.precision}, "
                f"group_size={self.group_size}, input_scale={self.input_scale is not None}")
