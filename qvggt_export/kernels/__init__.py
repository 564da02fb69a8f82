"""The W4A16 GEMM kernel: its packed layout (CPU, always importable) and its CUDA binding (`binding`,
built on first use where CUDA is available)."""

from qvggt_export.kernels.layout import (
    KERNEL_LAYOUT,
    dequantize_kernel_layout,
    from_kernel_layout,
    to_kernel_layout,
)

__all__ = ["KERNEL_LAYOUT", "dequantize_kernel_layout", "from_kernel_layout", "to_kernel_layout"]
