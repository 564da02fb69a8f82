"""Alternating frame/global attention over the tokens of all views (released VGGT Aggregator)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import VGGTConfig
from .dinov2 import DINOv2
from .layers import Block, PatchEmbed, RotaryTables

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def first_and_rest(token: Tensor, batch: int, frames: int) -> Tensor:
    """[1, 2, X, C] -> [B*S, X, C]: entry 0 for the first frame of each batch item, entry 1 for the rest."""
    # An index rather than expand(frames - 1) of a size-1 dim: the latter makes torch.export
    # specialise the frame count, so the ONNX graph would lose its dynamic S.
    index = (torch.arange(frames, device=token.device) > 0).long()
    return token.index_select(1, index).expand(batch, -1, *token.shape[2:]).reshape(batch * frames, *token.shape[2:])


def _check_images(images: Tensor) -> None:
    if images.dim() != 5 or images.shape[2] != 3:
        raise ValueError(f"expected images [B, S, 3, H, W], got {tuple(images.shape)}")


class Aggregator(nn.Module):
    def __init__(self, cfg: VGGTConfig) -> None:
        super().__init__()
        c = cfg.embed_dim
        if cfg.patch_embed == "conv":
            self.patch_embed = PatchEmbed(cfg.patch_size, c)
        else:
            depth, heads = cfg.dinov2_shape
            self.patch_embed = DINOv2(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=c, depth=depth,
                                      num_heads=heads, num_register_tokens=cfg.num_register_tokens)

        def make_block() -> Block:
            return Block(c, cfg.num_heads, cfg.mlp_ratio, init_values=cfg.init_values, qk_norm=cfg.qk_norm)

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(cfg.depth)])
        self.camera_token = nn.Parameter(torch.randn(1, 2, 1, c) * 1e-6)
        self.register_token = nn.Parameter(torch.randn(1, 2, cfg.num_register_tokens, c) * 1e-6)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        self.patch_size = cfg.patch_size
        self.head_dim = c // cfg.num_heads
        self.rope_freq = cfg.rope_freq
        self.patch_start_idx = 1 + cfg.num_register_tokens
        self.kept_layers = cfg.kept_layers

    def normalized(self, images: Tensor) -> Tensor:
        """[B, S, 3, H, W] in [0, 1] -> [B*S, 3, H, W] normalized as the patch embed expects."""
        B, S, _, H, W = images.shape
        return ((images - self.image_mean) / self.image_std).reshape(B * S, 3, H, W)

    def with_special_tokens(self, patches: Tensor, batch: int, frames: int) -> Tensor:
        """Patch tokens [B*S, P', C] -> [B*S, P, C]: camera, registers, patches."""
        special = [first_and_rest(self.camera_token, batch, frames), first_and_rest(self.register_token, batch, frames)]
        return torch.cat([t.to(patches.dtype) for t in special] + [patches], dim=1)

    def embed(self, images: Tensor) -> Tensor:
        """[B, S, 3, H, W] in [0, 1] -> tokens [B*S, P, C]: camera, registers, patches."""
        patches = self.patch_embed(self.normalized(images))
        if isinstance(patches, dict):
            patches = patches["x_norm_patchtokens"]
        return self.with_special_tokens(patches, images.shape[0], images.shape[1])

    def rope_tables(self, H: int, W: int, device: torch.device, dtype: torch.dtype) -> RotaryTables | None:
        if self.rope_freq <= 0:
            return None
        return RotaryTables.for_frame(H // self.patch_size, W // self.patch_size, self.patch_start_idx,
                                      self.head_dim, self.rope_freq, device, dtype)

    def begin(self, images: Tensor) -> "AggregatorState":
        """The state entering block 0: embedded tokens plus what every block needs (RoPE tables, shape)."""
        _check_images(images)
        B, S, _, H, W = images.shape
        return self._aggregator_state(self.embed(images), B, S, (H, W))

    def _aggregator_state(self, tokens: Tensor, batch: int, frames: int,
                          image_hw: tuple[int, int]) -> "AggregatorState":
        frame_rope = self.rope_tables(*image_hw, tokens.device, tokens.dtype)
        global_rope = frame_rope.repeat(frames) if frame_rope is not None else None
        return AggregatorState(tokens, None, {}, batch, frames, frame_rope, global_rope)

    # The DINOv2 patch embed one block at a time (the quantizer's block cache): begin_encoder, then
    # run_encoder_block for each of its blocks, then end_encoder compute exactly what begin() does.

    def begin_encoder(self, images: Tensor) -> "EncoderState":
        if not isinstance(self.patch_embed, DINOv2):
            raise ValueError("the patch embed has no transformer blocks (patch_embed 'conv')")
        _check_images(images)
        B, S, _, H, W = images.shape
        return EncoderState(self.patch_embed.begin(self.normalized(images)), B, S, (H, W))

    def run_encoder_block(self, index: int, state: "EncoderState") -> "EncoderState":
        return EncoderState(self.patch_embed.run_block(index, state.tokens), state.batch, state.frames, state.image_hw)

    def end_encoder(self, state: "EncoderState") -> "AggregatorState":
        """The last encoder block's state -> the state entering aggregator block 0."""
        patches = self.patch_embed.finish(state.tokens)["x_norm_patchtokens"]
        return self._aggregator_state(self.with_special_tokens(patches, state.batch, state.frames), state.batch,
                                      state.frames, state.image_hw)

    def run_frame_block(self, index: int, state: "AggregatorState") -> "AggregatorState":
        _, P, C = state.tokens.shape
        tokens = self.frame_blocks[index](state.tokens.reshape(state.batch * state.frames, P, C), rope=state.frame_rope)
        return AggregatorState(tokens, tokens, state.kept, state.batch, state.frames, state.frame_rope,
                               state.global_rope)

    def run_global_block(self, index: int, state: "AggregatorState") -> "AggregatorState":
        B, S = state.batch, state.frames
        _, P, C = state.frame_out.shape
        tokens = self.global_blocks[index](state.tokens.reshape(B, S * P, C), rope=state.global_rope)
        kept = dict(state.kept)
        if index in self.kept_layers:
            kept[index] = torch.cat([state.frame_out.reshape(B, S, P, C), tokens.reshape(B, S, P, C)], dim=-1)
        return AggregatorState(tokens.reshape(B * S, P, C), None, kept, B, S, state.frame_rope, state.global_rope)

    def forward(self, images: Tensor) -> dict[int, Tensor]:
        """Returns {block index: frame||global tokens [B, S, P, 2C]} for the blocks the heads read."""
        state = self.begin(images)
        for i in range(len(self.frame_blocks)):
            state = self.run_global_block(i, self.run_frame_block(i, state))
        return state.kept


@dataclass
class AggregatorState:
    """What flows between aggregator blocks: the tokens entering the next block [B*S, P, C], the last
    frame block's output (a global block concatenates it with its own into a kept layer), the kept
    layers so far, and the per-forward constants. The quantizer's block cache holds one per scene."""

    tokens: Tensor
    frame_out: Tensor | None
    kept: dict[int, Tensor]
    batch: int
    frames: int
    frame_rope: RotaryTables | None
    global_rope: RotaryTables | None


@dataclass
class EncoderState:
    """What flows between the DINOv2 patch embed's blocks: its tokens [B*S, 1 + registers + patches, C]
    and the shape the aggregator state is built from once the last block has run."""

    tokens: Tensor
    batch: int
    frames: int
    image_hw: tuple[int, int]
