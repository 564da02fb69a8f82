"""Transformer building blocks with the released VGGT module names.

A block runs norm1 -> attn.qkv -> (q/k norm, 2D RoPE) -> attention -> attn.proj -> ls1, then
norm2 -> mlp.fc1 -> GELU -> mlp.fc2 -> ls2. RoPE tables are computed from the patch-grid shape,
never from tensor values, so the graph exports to ONNX with a static structure per image size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping conv patchify: [N, 3, H, W] -> [N, (H/p)*(W/p), C]."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class RotaryTables:
    """Per-token cos/sin tables of the released 2D RoPE for a sequence layout.

    Special tokens get position 0 (identity rotation); patch (y, x) gets (y + 1, x + 1).
    `cos`/`sin` are [tokens, head_dim] with the vertical half first, then the horizontal half.
    """

    def __init__(self, cos: Tensor, sin: Tensor) -> None:
        self.cos = cos
        self.sin = sin

    @classmethod
    def for_frame(cls, grid_h: int, grid_w: int, num_special: int, head_dim: int, frequency: float,
                  device: torch.device, dtype: torch.dtype) -> "RotaryTables":
        half = head_dim // 2
        inv_freq = 1.0 / (frequency ** (torch.arange(0, half, 2, device=device).float() / half))
        ys = torch.arange(grid_h, device=device).repeat_interleave(grid_w) + 1
        xs = torch.arange(grid_w, device=device).repeat(grid_h) + 1
        zeros = torch.zeros(num_special, dtype=ys.dtype, device=device)
        tables = []
        for pos in (torch.cat([zeros, ys]), torch.cat([zeros, xs])):
            angles = pos.float()[:, None] * inv_freq[None, :]
            angles = torch.cat([angles, angles], dim=-1).to(dtype)
            tables.append((angles.cos(), angles.sin()))
        cos = torch.cat([tables[0][0], tables[1][0]], dim=-1)
        sin = torch.cat([tables[0][1], tables[1][1]], dim=-1)
        return cls(cos, sin)

    def repeat(self, times: int) -> "RotaryTables":
        return RotaryTables(self.cos.repeat(times, 1), self.sin.repeat(times, 1))


def _rotate_halves(x: Tensor) -> Tensor:
    quarter = x.shape[-1] // 4
    # Rotation acts inside each of the two (vertical, horizontal) halves separately.
    v1, v2, h1, h2 = x.split(quarter, dim=-1)
    return torch.cat([-v2, v1, -h2, h1], dim=-1)


def apply_rope(x: Tensor, rope: RotaryTables) -> Tensor:
    """x: [B, heads, tokens, head_dim]."""
    return x * rope.cos + _rotate_halves(x) * rope.sin


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False, norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: RotaryTables | None = None) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, init_values: float | None = None,
                 qk_norm: bool = False, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 qkv_bias: bool = True, proj_bias: bool = True, ffn_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, rope: RotaryTables | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
