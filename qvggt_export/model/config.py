"""Model configuration. `VGGTConfig()` is the released VGGT-1B."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# DINOv2 patch-embed presets of the released code: name -> (depth, num_heads); width = embed_dim.
DINOV2_PRESETS = {
    "dinov2_vitl14_reg": (24, 16),
    "dinov2_vitb14_reg": (12, 12),
    "dinov2_vits14_reg": (12, 6),
    "dinov2_vitg2_reg": (40, 24),
}


@dataclass
class VGGTConfig:
    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    # "conv", a DINOv2 preset name, or "dinov2" (then dinov2_depth / dinov2_num_heads apply).
    patch_embed: str = "dinov2_vitl14_reg"
    dinov2_depth: int = 24
    dinov2_num_heads: int = 16
    qk_norm: bool = True
    rope_freq: int = 100
    init_values: float = 0.01
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    dpt_features: int = 256
    dpt_out_channels: tuple[int, ...] = (256, 512, 1024, 1024)
    intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23)
    # Released checkpoints carry track-head weights; they are loaded and saved, never exported (training runs them).
    carry_track_head: bool = True
    # (H, W) the model is meant to run at (trained at / exported at); empty: square img_size.
    image_size: tuple[int, ...] = ()

    def __init__(self, **kwargs):
        # Accept config dicts that carry keys we do not use (e.g. a fixture's notes).
        known = {f.name for f in dataclasses.fields(VGGTConfig)}
        for f in dataclasses.fields(VGGTConfig):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            setattr(self, f.name, kwargs.get(f.name, default))
        self.dpt_out_channels = tuple(self.dpt_out_channels)
        self.intermediate_layer_idx = tuple(self.intermediate_layer_idx)
        self.image_size = tuple(self.image_size)
        self.ignored_keys = sorted(set(kwargs) - known)
        self.validate()

    def validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("head_dim must be a multiple of 4 for 2D RoPE")
        if len(self.intermediate_layer_idx) != 4 or len(self.dpt_out_channels) != 4:
            raise ValueError("the DPT heads read exactly 4 intermediate layers")
        if max(self.intermediate_layer_idx) >= self.depth:
            raise ValueError(f"intermediate_layer_idx {self.intermediate_layer_idx} out of range for depth {self.depth}")
        if self.image_size and (len(self.image_size) != 2 or any(v % self.patch_size for v in self.image_size)):
            raise ValueError(f"image_size must be (H, W) in multiples of {self.patch_size}, got {self.image_size}")
        if self.patch_embed != "conv" and self.patch_embed != "dinov2" and self.patch_embed not in DINOV2_PRESETS:
            raise ValueError(f"unknown patch_embed {self.patch_embed!r}")

    @property
    def dinov2_shape(self) -> tuple[int, int]:
        return DINOV2_PRESETS.get(self.patch_embed, (self.dinov2_depth, self.dinov2_num_heads))

    @property
    def default_image_size(self) -> tuple[int, int]:
        """(H, W) every command uses when none is given: the model's native input size."""
        return tuple(self.image_size) if self.image_size else (self.img_size, self.img_size)

    @property
    def kept_layers(self) -> tuple[int, ...]:
        """Aggregator block outputs the heads read: the DPT layers plus the last (camera head)."""
        return tuple(sorted(set(self.intermediate_layer_idx) | {self.depth - 1}))

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(VGGTConfig)}

    def __repr__(self) -> str:
        return f"VGGTConfig({self.to_dict()})"

    def __eq__(self, other) -> bool:
        return isinstance(other, VGGTConfig) and self.to_dict() == other.to_dict()
