"""The W4A16 GEMM kernel: its packed layout (CPU references, always importable), its CUDA binding
(built on first use where CUDA is available) and a linear layer that runs it."""

from qvggt_export.kernels.binding import is_available, w4a16_matmul
from qvggt_export.kernels.layout import (
    KERNEL_LAYOUT,
    dequantize_kernel_layout,
    from_kernel_layout,
    to_kernel_layout,
)

__all__ = ["KERNEL_LAYOUT", "dequantize_kernel_layout", "from_kernel_layout", "is_available", "to_kernel_layout",
           "w4a16_matmul"]
