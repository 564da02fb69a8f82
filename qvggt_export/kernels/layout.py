"""The W4A16 kernel's packed layout ("kernel_v1") and its exact CPU references.

Canonical (quant/pack.py): codes uint8 [N, K/2], (q + 8) two per byte, even k in the low nibble;
scales fp16 [N, K/128].

kernel_v1 (what plugins/w4a16_gemm.cu reads):
  weight int8 [N/8, K/128, 512]: one 512-byte chunk per (tile t of 8 output columns, group g of 128
  input channels). Lane L = 4*r + c of a warp loads bytes [16*L, 16*L + 16) of the chunk as four
  little-endian uint32 words j = 0..3, all for output column n = 8*t + r. Nibble i of word j holds
  (q + 8) of input channel
      k = 128*g + 16*(2*j + ((i >> 1) & 1)) + 8*(i & 1) + 2*c + (i >> 2)
  so the kernel turns a word into the B fragments of two m16n8k16 MMA steps with two masks and a
  shift: nibbles (0, 4), (1, 5), (2, 6), (3, 7) become the fp16 pairs b0 and b1 of step 2j, then
  b0 and b1 of step 2j + 1.
  scales fp16 [K/128, N]: the 8 scales a warp needs for one (tile, group) are contiguous.

`to_kernel_layout` builds the layout by reshaping and permuting; `from_kernel_layout` and
`dequantize_kernel_layout` decode it the way the kernel does (word masks and MMA fragment
positions), so testing one against the other checks the kernel's index arithmetic on the CPU.
"""

from __future__ import annotations

import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.quant.pack import GROUP_SIZE, pack_nibbles, unpack_nibbles

KERNEL_LAYOUT = "kernel_v1"
TILE_N = 8
CHUNK_BYTES = 512
LANES = 32
WORDS_PER_LANE = 4

# fp16 bit patterns of the kernel's dequantization constants
_FP16_1024 = 0x6400
_FP16_1032 = 0x6408


def check_kernel_shape(n: int, k: int, group_size: int = GROUP_SIZE) -> None:
    """Raise a one-line error unless the kernel can run an [N, K] weight."""
    if group_size != GROUP_SIZE:
        raise QVGGTError(f"the W4A16 kernel supports group_size {GROUP_SIZE} only, got {group_size}")
    if n < TILE_N or n % TILE_N:
        raise QVGGTError(f"the W4A16 kernel needs N to be a positive multiple of {TILE_N}, got N={n}")
    if k < GROUP_SIZE or k % GROUP_SIZE:
        raise QVGGTError(f"the W4A16 kernel needs K to be a positive multiple of {GROUP_SIZE}, got K={k}")


def kernel_weight_shape(n: int, k: int) -> tuple[int, int, int]:
    return (n // TILE_N, k // GROUP_SIZE, CHUNK_BYTES)


def to_kernel_layout(packed: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Canonical (uint8 [N, K/2], fp16 [N, K/128]) -> kernel_v1 (int8 [N/8, K/128, 512], fp16 [K/128, N])."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise QVGGTError(f"expected canonical packed weights uint8 [N, K/2], got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    check_kernel_shape(n, k)
    groups = k // GROUP_SIZE
    if tuple(scales.shape) != (n, groups):
        raise QVGGTError(f"expected scales [N, K/128] = [{n}, {groups}], got {tuple(scales.shape)}")

    codes = unpack_nibbles(packed)
    # k = 128 g + 16 (2 j + sub) + 8 half + 2 c + e, n = 8 t + r; nibble i = 4 e + 2 sub + half
    split = codes.reshape(n // TILE_N, TILE_N, groups, WORDS_PER_LANE, 2, 2, 4, 2)
    #                      t           r       g       j               sub half c  e
    nibbles = split.permute(0, 2, 1, 6, 3, 7, 4, 5).reshape(n // TILE_N, groups, LANES, WORDS_PER_LANE, 8)
    weight = pack_nibbles(nibbles).reshape(kernel_weight_shape(n, k))
    return weight.contiguous().view(torch.int8), scales.to(torch.float16).t().contiguous()


def _check_kernel_tensors(weight: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
    if weight.dtype not in (torch.int8, torch.uint8) or weight.dim() != 3 or weight.shape[2] != CHUNK_BYTES:
        raise QVGGTError(f"expected kernel_v1 weights int8 [N/8, K/128, {CHUNK_BYTES}], "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape[0] * TILE_N, weight.shape[1] * GROUP_SIZE
    if tuple(scales.shape) != (k // GROUP_SIZE, n):
        raise QVGGTError(f"expected kernel_v1 scales [K/128, N] = [{k // GROUP_SIZE}, {n}], got {tuple(scales.shape)}")
    return n, k


def _kernel_words(weight: torch.Tensor) -> torch.Tensor:
    """The uint32 words each lane loads, as int32 [N/8, K/128, 32, 4] (little-endian bytes; bit 31 may
    wrap to the sign, which the masks below never keep)."""
    b = weight.contiguous().view(torch.uint8).reshape(*weight.shape[:2], LANES, WORDS_PER_LANE, 4).to(torch.int32)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def _fragment_k(pair: torch.Tensor, element: torch.Tensor) -> torch.Tensor:
    """k within the group of fp16 pair `pair` (0..3) element `element` (0 = low half) of word j,
    lane c, per the m16n8k16 B fragment: register b0 holds k = 2c, 2c+1 of its step, b1 k = 8 + 2c, 9 + 2c.
    Returns a [32 lanes, 4 words, ...] table."""
    lane = torch.arange(LANES).reshape(LANES, 1, 1, 1)
    word = torch.arange(WORDS_PER_LANE).reshape(1, WORDS_PER_LANE, 1, 1)
    step = 2 * word + (pair >> 1)
    register = pair & 1
    return 16 * step + 8 * register + 2 * (lane % 4) + element


def _scatter_to_rows(values: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """values [N/8, K/128, 32, 4, 4 pairs, 2 elements] in fragment order -> [N, K]."""
    tiles, groups = n // TILE_N, k // GROUP_SIZE
    pair = torch.arange(4).reshape(1, 1, 4, 1)
    element = torch.arange(2).reshape(1, 1, 1, 2)
    row = (torch.arange(LANES) // 4).reshape(LANES, 1, 1, 1)  # r: column of the tile the lane serves
    destination = (row * GROUP_SIZE + _fragment_k(pair, element)).flatten()  # into one [8, 128] chunk
    chunk = torch.empty(tiles, groups, TILE_N * GROUP_SIZE, dtype=values.dtype)
    chunk[..., destination] = values.reshape(tiles, groups, -1)
    return chunk.reshape(tiles, groups, TILE_N, GROUP_SIZE).permute(0, 2, 1, 3).reshape(n, k)


def _word_pairs(words: torch.Tensor) -> torch.Tensor:
    """The kernel's four masked fp16 pairs of every word as 16-bit patterns [..., 4 pairs, 2 elements]:
    (w & 0x000f000f) | 0x64006400, (w & 0x00f000f0) | ..., then the same on w >> 8."""
    shifted = words >> 8
    pairs = [(words & 0x000F000F), (words & 0x00F000F0), (shifted & 0x000F000F), (shifted & 0x00F000F0)]
    pairs = torch.stack([p | 0x64006400 for p in pairs], dim=-1)
    return torch.stack([pairs & 0xFFFF, pairs >> 16], dim=-1)


def _bits_to_fp16(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).to(torch.int16).view(torch.float16)


def from_kernel_layout(weight: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kernel_v1 -> canonical (uint8 [N, K/2], fp16 [N, K/128]); the exact inverse of to_kernel_layout."""
    n, k = _check_kernel_tensors(weight, scales)
    pairs = _word_pairs(_kernel_words(weight))
    # low pairs carry the nibble at bits 0-3 of each half, high pairs at bits 4-7
    nibble_shift = torch.tensor([0, 4, 0, 4]).reshape(4, 1)
    codes = _scatter_to_rows(((pairs - _FP16_1024) >> nibble_shift).to(torch.uint8), n, k)
    return pack_nibbles(codes), scales.t().contiguous()


def dequantize_kernel_layout(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp16 [N, K] with the kernel's arithmetic, bit for bit: (bits | 0x6400) - 1032 for low nibbles,
    (bits | 0x6400) * 1/16 - 72 for high nibbles (both exact), then one fp16 rounding of q * scale."""
    n, k = _check_kernel_tensors(weight, scales)
    magic = _bits_to_fp16(_word_pairs(_kernel_words(weight))).float()
    is_high = torch.tensor([False, True, False, True]).reshape(4, 1)
    q = torch.where(is_high, magic * (1 / 16) - 72, magic - _fp16_value(_FP16_1032))
    tiles, groups = n // TILE_N, k // GROUP_SIZE
    # scale of (tile t, group g, lane L) is scales[g, 8 t + L // 4]
    lane_scales = scales.float().reshape(groups, tiles, TILE_N).permute(1, 0, 2).repeat_interleave(4, dim=2)
    products = (q * lane_scales.reshape(tiles, groups, LANES, 1, 1, 1)).to(torch.float16)
    return _scatter_to_rows(products, n, k)


def _fp16_value(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int16).view(torch.float16))
