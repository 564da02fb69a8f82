"""A linear layer that keeps its weight 4-bit in the kernel layout and runs the W4A16 kernel on CUDA.

The GPU runtime path of a W4A16 model: `install_kernel_linears` swaps nn.Linear / QuantLinear modules
for `KernelLinear`. On the CPU it computes with the exact emulation of the kernel's dequantization
(layout.dequantize_kernel_layout), so the same module is testable without a GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qvggt_export.kernels import binding
from qvggt_export.kernels.layout import dequantize_kernel_layout, kernel_weight_shape, to_kernel_layout
from qvggt_export.quant.linear import PackedFormatModule
from qvggt_export.quant.pack import GROUP_SIZE, pack_weight


class KernelLinear(PackedFormatModule):
    """y = (x * input_scale) · dequant(W)ᵀ + bias with W in kernel_v1 (int8 [N/8, K/128, 512]).

    Buffers: weight, scales fp16 [K/128, N], bias fp16 [N] or None, input_scale [K] or None."""

    packed_buffers = ("scales", "bias")  # the fp16 the kernel reads, whatever the model is cast to

    def __init__(self, in_features: int, out_features: int, bias: bool = True, has_input_scale: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(kernel_weight_shape(out_features, in_features), dtype=torch.int8))
        self.register_buffer("scales", torch.ones(in_features // GROUP_SIZE, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self.register_buffer("input_scale", torch.ones(in_features) if has_input_scale else None)

    @classmethod
    def from_packed(cls, packed: Tensor, scales: Tensor, bias: Tensor | None = None,
                    input_scale: Tensor | None = None) -> "KernelLinear":
        """From the canonical format (uint8 [N, K/2], fp16 [N, K/128])."""
        n, k = packed.shape[0], packed.shape[1] * 2
        layer = cls(k, n, bias=bias is not None, has_input_scale=input_scale is not None)
        weight, kernel_scales = to_kernel_layout(packed, scales)
        layer.weight.copy_(weight)
        layer.scales.copy_(kernel_scales)
        if bias is not None:
            layer.bias.copy_(bias.detach().to(torch.float16))
        if input_scale is not None:
            layer.input_scale.copy_(input_scale.detach().float())
        return layer.to(packed.device)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "KernelLinear":
        """Round-to-nearest W4 g128 of an nn.Linear, or the packed weight of a 4-bit QuantLinear."""
        if hasattr(linear, "qweight"):
            if linear.bits != 4 or linear.group_size != GROUP_SIZE:
                raise ValueError(f"KernelLinear runs 4-bit, group-{GROUP_SIZE} weights; got {linear.bits}-bit "
                                 f"group {linear.group_size}")
            return cls.from_packed(linear.qweight, linear.scales, linear.bias, linear.input_scale)
        packed, scales = pack_weight(linear.weight.detach().float())
        return cls.from_packed(packed, scales, linear.bias, getattr(linear, "input_scale", None))

    def forward(self, x: Tensor) -> Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        if not x.is_cuda:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x, dequantize_kernel_layout(self.weight.cpu(), self.scales.cpu()).to(x.dtype), bias)
        leading = x.shape[:-1]
        y = binding.w4a16_matmul(x.reshape(-1, self.in_features).to(torch.float16).contiguous(), self.weight,
                                 self.scales, self.bias)
        return y.reshape(*leading, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, w4a16 kernel_v1, "
                f"input_scale={self.input_scale is not None}")


def install_kernel_linears(model: nn.Module, names: list[str]) -> nn.Module:
    """Replace the named linear modules (dotted paths) by KernelLinear, in place."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, KernelLinear.from_linear(getattr(parent, child)))
    return model
