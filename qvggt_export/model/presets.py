"""Named configs of small VGGT models trained in this project (same code as VGGT-1B, smaller shape).

`vggt-tiny` is the embedded default model (qvggt_export/weights/vggt_tiny.safetensors, trained by
scripts/train_tiny.py; see weights/vggt_tiny.md). Every aggregator linear has its input dimension K
a multiple of 128 (qkv/proj/fc1: K = embed_dim; fc2: K = 4 * embed_dim; camera trunk: K = 2 * embed_dim)
so the model can be group-128 quantized exactly like VGGT-1B.
"""

from __future__ import annotations

from .config import VGGTConfig
from .track_head import TrackerShape

TINY_CONFIG = dict(
    img_size=112,
    patch_size=14,
    patch_embed="conv",
    embed_dim=128,
    depth=8,
    num_heads=4,
    mlp_ratio=4.0,
    num_register_tokens=4,
    camera_trunk_depth=4,
    camera_num_heads=4,
    dpt_features=32,
    dpt_out_channels=(16, 32, 64, 64),
    intermediate_layer_idx=(1, 3, 5, 7),
    carry_track_head=False,
    image_size=(84, 112),  # the only size it was trained at
)

PRESETS = {"vggt-tiny": TINY_CONFIG}

# The track head vggt-tiny trains with (scripts: --track-weight; never shipped, the model carries none): the
# released tracker at the tiny model's scale (features as its DPT heads, 3 pyramid levels fit its 42 x 56 maps).
TINY_TRACKER = TrackerShape(latent_dim=32, hidden=64, depth=2, heads=4, corr_levels=3, corr_radius=3,
                            virtual_tracks=16)


def tiny_config(**overrides) -> VGGTConfig:
    """VGGTConfig of `vggt-tiny`, optionally with fields overridden (for experiments)."""
    return VGGTConfig(**{**TINY_CONFIG, **overrides})


def vggt1b_shallow_config(depth: int) -> VGGTConfig:
    """VGGT-1B's widths (tokens, heads, linears, DPT heads) with `depth` aggregator and DINOv2 blocks: its
    speed and memory per block and per token at a fraction of the build and run time (random weights only).
    The DPT heads read evenly spaced blocks, the last one last."""
    if not 1 <= depth <= VGGTConfig().depth:
        raise ValueError(f"depth must be between 1 and {VGGTConfig().depth}, got {depth}")
    return VGGTConfig(depth=depth, patch_embed="dinov2", dinov2_depth=depth, carry_track_head=False,
                      intermediate_layer_idx=(0, depth // 3, 2 * depth // 3, depth - 1))


def preset_config(name: str, **overrides) -> VGGTConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return VGGTConfig(**{**PRESETS[name], **overrides})
