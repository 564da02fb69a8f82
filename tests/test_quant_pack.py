"""Packed W4/W8 weights: round trip, the canonical formula, and the QuantLinear reference matmul."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import quant_helpers  # noqa: F401  (thread setting)
from qvggt_export.quant.linear import PrescaledLinear, QuantLinear
from qvggt_export.quant.pack import pack_int4, pack_nibbles, unpack_int4, unpack_nibbles, unpack_weight


def test_int4_codes_survive_pack_unpack_and_use_the_canonical_nibble_order():
    codes = torch.randint(-8, 8, (5, 256), dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 128)
    assert torch.equal(unpack_int4(packed), codes)
    # Even k in the low nibble, stored as q + 8.
    assert int(packed[0, 0]) == (int(codes[0, 0]) + 8) | ((int(codes[0, 1]) + 8) << 4)


@pytest.mark.parametrize("bits,qmax,qmin", [(4, 7, -8), (8, 127, -128)])
def test_dequantized_weight_equals_the_formula(bits, qmax, qmin):
    torch.manual_seed(bits)
    linear = torch.nn.Linear(256, 6)
    with torch.no_grad():
        linear.weight[2, :128] = 0  # an all-zero group must decode to zeros
    q = QuantLinear.from_linear(linear, bits=bits)
    # The formula written out independently in numpy: scale = max|w_group| / qmax (fp16),
    # code = clamp(round(w / scale), qmin, qmax), weight = code * scale.
    w = linear.weight.detach().numpy().astype(np.float64).reshape(6, 2, 128)
    amax = np.abs(w).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float16).astype(np.float64)
    expected = (np.clip(np.round(w / scale), qmin, qmax) * scale).reshape(6, 256)
    np.testing.assert_array_equal(q.dequantized_weight().numpy().astype(np.float64), expected.astype(np.float32))
    assert q.scales.dtype == torch.float16 and q.scales.shape == (6, 2)
    assert q.qweight.shape == ((6, 128) if bits == 4 else (6, 256))
    assert torch.equal(unpack_weight(q.qweight, q.scales, bits), q.dequantized_weight())


def test_quant_linear_forward_is_dequantize_then_matmul_with_the_input_scale():
    torch.manual_seed(0)
    linear = PrescaledLinear.from_linear(torch.nn.Linear(128, 16))
    with torch.no_grad():
        linear.input_scale.copy_(torch.rand(128) + 0.5)
    q = QuantLinear.from_linear(linear, bits=4, name="x.fc2")
    x = torch.randn(3, 7, 128)
    expected = F.linear(x * linear.input_scale, q.dequantized_weight(), linear.bias)
    assert torch.allclose(q(x), expected, rtol=0, atol=1e-6)
    assert q.input_scale is not None and q.precision == "w4a16" and q.name == "x.fc2"
    assert q.weight_bytes() == 16 * 64 + 16 * 1 * 2


def test_quant_linear_rejects_k_not_multiple_of_group():
    with pytest.raises(ValueError, match="multiple of group_size"):
        QuantLinear(100, 8)


def test_nibble_codec_puts_element_2i_in_the_low_nibble_and_inverts_exactly():
    nibbles = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = pack_nibbles(nibbles)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xA9]]
    assert torch.equal(unpack_nibbles(packed), nibbles)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(2, 3, dtype=torch.uint8))
