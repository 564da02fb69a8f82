"""kernel_v1: the converter, its inverse and the CPU emulation of the kernel's decoding."""

import pytest
import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.kernels.layout import (
    dequantize_kernel_layout,
    from_kernel_layout,
    kernel_weight_shape,
    to_kernel_layout,
)
from qvggt_export.quant.pack import pack_weight, unpack_weight

# (K, N) of every linear layer the kernel serves in VGGT-1B (aggregator and camera head)
VGGT_SHAPES = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
               (2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)]


def random_canonical(k, n, seed=0):
    """Arbitrary canonical codes and positive fp16 scales (every nibble value occurs)."""
    generator = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=generator)
    scales = (torch.rand(n, k // 128, generator=generator) * 0.1 + 1e-3).to(torch.float16)
    return packed, scales


@pytest.mark.parametrize("k,n", VGGT_SHAPES)
def test_round_trip_and_kernel_decoding_match_the_canonical_format(k, n):
    packed, scales = random_canonical(k, n, seed=k + n)
    weight, kernel_scales = to_kernel_layout(packed, scales)
    assert weight.dtype == torch.int8 and tuple(weight.shape) == kernel_weight_shape(n, k) == (n // 8, k // 128, 512)
    assert kernel_scales.dtype == torch.float16 and tuple(kernel_scales.shape) == (k // 128, n)

    restored, restored_scales = from_kernel_layout(weight, kernel_scales)
    assert torch.equal(restored, packed) and torch.equal(restored_scales, scales)
    # what the kernel's registers hold: bit-identical to the canonical fp16 dequantization
    assert torch.equal(dequantize_kernel_layout(weight, kernel_scales), unpack_weight(packed, scales, dtype=torch.float16))


def test_a_single_code_lands_where_the_header_documents_it():
    # n = 8 t + r with t = 1, r = 1; k = 128 g + 16 (2 j + sub) + 8 half + 2 c + e with
    # g = 1, j = 1, sub = 1, half = 1, c = 2, e = 1: nibble i = 4 e + 2 sub + half = 7 of lane 4 r + c = 6
    k, n = 256, 16
    row, col = 9, 128 + 16 * 3 + 8 + 2 * 2 + 1
    codes = torch.full((n, k), 8, dtype=torch.uint8)  # q = 0 everywhere ...
    codes[row, col] = 8 + 5                           # ... but one q = 5
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    weight, _ = to_kernel_layout(packed, torch.ones(n, k // 128, dtype=torch.float16))

    chunk = weight.view(torch.uint8)[1, 1]            # tile 1, group 1
    lane, word, nibble = 6, 1, 7
    byte = lane * 16 + word * 4 + nibble // 2
    assert chunk[byte] == (8 | (13 << 4))             # the high nibble holds 13, its neighbour q = 0
    others = torch.ones(weight.numel(), dtype=torch.bool)
    others[(1 * (k // 128) + 1) * 512 + byte] = False
    assert torch.all(weight.view(torch.uint8).flatten()[others] == 0x88)


def test_dequantization_is_the_quantized_weight():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    packed, scales = pack_weight(w)
    weight, kernel_scales = to_kernel_layout(packed, scales)
    dequantized = dequantize_kernel_layout(weight, kernel_scales).float()
    assert (dequantized - w).abs().max() <= scales.float().max() / 2 * 1.01  # within half a step of the grid


@pytest.mark.parametrize("packed_shape,scales_shape", [((12, 512), (12, 8)),    # N not a multiple of 8
                                                       ((16, 100), (16, 1)),    # K not a multiple of 128
                                                       ((16, 512), (16, 4))])   # scales do not match K
def test_shapes_the_kernel_cannot_take_are_refused(packed_shape, scales_shape):
    with pytest.raises(QVGGTError):
        to_kernel_layout(torch.zeros(packed_shape, dtype=torch.uint8), torch.ones(scales_shape, dtype=torch.float16))


def test_kernel_linear_on_cpu_matches_the_canonical_reference():
    from torch import nn

    from qvggt_export.kernels.linear import KernelLinear, install_kernel_linears
    from qvggt_export.quant.linear import QuantLinear

    torch.manual_seed(2)
    linear = nn.Linear(256, 64)
    x = torch.randn(3, 5, 256)
    packed, scales = pack_weight(linear.weight.detach())
    reference = torch.nn.functional.linear(x, unpack_weight(packed, scales, dtype=torch.float16).float(),
                                           linear.bias.detach().half().float())
    assert torch.allclose(KernelLinear.from_linear(linear)(x), reference, atol=1e-5)

    quant = QuantLinear.from_linear(linear)
    quant.input_scale = torch.linspace(0.5, 2.0, 256)
    kernel = KernelLinear.from_linear(quant)
    assert torch.allclose(kernel(x), quant(x), atol=1e-3)

    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 8))
    install_kernel_linears(model, ["0", "2"])
    assert isinstance(model[0], KernelLinear) and isinstance(model[2], KernelLinear)
    assert model(torch.randn(2, 128)).shape == (2, 8)
