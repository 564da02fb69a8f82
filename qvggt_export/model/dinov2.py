"""DINOv2 ViT with register tokens, as used for VGGT-1B's patch embed (released key names)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, PatchEmbed


class DINOv2(nn.Module):
    def __init__(self, img_size: int = 518, patch_size: int = 14, embed_dim: int = 1024, depth: int = 24,
                 num_heads: int = 16, mlp_ratio: float = 4.0, num_register_tokens: int = 4,
                 interpolate_antialias: bool = True, interpolate_offset: float = 0.0,
                 init_values: float = 1.0, ffn_layer: str = "mlp", **unused) -> None:
        super().__init__()
        if ffn_layer != "mlp":
            raise ValueError(f"only ffn_layer='mlp' is supported (VGGT's DINOv2), got {ffn_layer!r}")
        if interpolate_offset:
            raise ValueError("interpolate_offset must be 0 (VGGT's DINOv2 interpolates to an exact size)")
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        # Unused at inference; kept so released checkpoints load strictly.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, init_values=init_values, norm_layer=norm) for _ in range(depth)]
        )
        self.norm = norm(embed_dim)

    def interpolate_pos_encoding(self, grid_h: int, grid_w: int, dtype: torch.dtype) -> Tensor:
        n_stored = self.pos_embed.shape[1] - 1
        side = int(round(n_stored ** 0.5))
        if grid_h * grid_w == n_stored and grid_h == grid_w:
            return self.pos_embed.to(dtype)
        pos = self.pos_embed.float()
        patch_pos = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(grid_h, grid_w), mode="bicubic",
                                  antialias=self.interpolate_antialias)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(dtype)

    def begin(self, x: Tensor) -> Tensor:
        """[N, 3, H, W] (normalized) -> the tokens entering block 0 [N, 1 + registers + patches, C]."""
        n, _, h, w = x.shape
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size, tokens.dtype)
        return torch.cat([tokens[:, :1], self.register_tokens.expand(n, -1, -1).to(tokens.dtype), tokens[:, 1:]],
                         dim=1)

    def run_block(self, index: int, tokens: Tensor) -> Tensor:
        return self.blocks[index](tokens)

    def finish(self, tokens: Tensor) -> dict[str, Tensor]:
        """The last block's tokens -> the released output dict."""
        normed = self.norm(tokens)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:r + 1],
            "x_norm_patchtokens": normed[:, r + 1:],
            "x_prenorm": tokens,
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # The same steps the quantizer's block cache runs one block at a time (Aggregator.begin_encoder).
        tokens = self.begin(x)
        for index in range(len(self.blocks)):
            tokens = self.run_block(index, tokens)
        return self.finish(tokens)
