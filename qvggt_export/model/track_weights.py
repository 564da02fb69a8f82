"""Holder for the released track head's weights.

Released VGGT-1B checkpoints carry a point-tracking head (a DPT feature extractor and a tracker
transformer). qvggt-export does not run or export tracking, but keeps these weights with their
released names and shapes so that checkpoints load strictly and round-trip unchanged. This module
therefore has parameters and no forward pass.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import DPTHead
from .layers import Mlp

# Released tracker sizes (VGGT-1B): latent features, transformer width, depth, virtual tracks.
LATENT_DIM = 128
HIDDEN = 384
INPUT_DIM = 388
CORR_DIM = 567
FLOW_DIM = 130
DEPTH = 6
VIRTUAL_TRACKS = 64
HEADS = 8


class _TrackerBlock(nn.Module):
    """Self-attention block, or with `cross` the cross-attention block (extra context norm)."""

    def __init__(self, cross: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(HIDDEN)
        if cross:
            self.norm_context = nn.LayerNorm(HIDDEN)
        self.norm2 = nn.LayerNorm(HIDDEN)
        setattr(self, "cross_attn" if cross else "attn", nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True))
        self.mlp = Mlp(HIDDEN, HIDDEN * 4)


class _UpdateFormer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.virual_tracks = nn.Parameter(torch.zeros(1, VIRTUAL_TRACKS, 1, HIDDEN))  # sic: released name
        self.input_norm = nn.LayerNorm(INPUT_DIM)
        self.input_transform = nn.Linear(INPUT_DIM, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN)
        self.flow_head = nn.Linear(HIDDEN, FLOW_DIM)
        self.time_blocks = nn.ModuleList([_TrackerBlock() for _ in range(DEPTH)])
        self.space_virtual_blocks = nn.ModuleList([_TrackerBlock() for _ in range(DEPTH)])
        self.space_point2virtual_blocks = nn.ModuleList([_TrackerBlock(cross=True) for _ in range(DEPTH)])
        self.space_virtual2point_blocks = nn.ModuleList([_TrackerBlock(cross=True) for _ in range(DEPTH)])


class _Tracker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query_ref_token = nn.Parameter(torch.zeros(1, 2, INPUT_DIM))
        self.corr_mlp = Mlp(CORR_DIM, HIDDEN, LATENT_DIM)
        self.updateformer = _UpdateFormer()
        self.fmap_norm = nn.LayerNorm(LATENT_DIM)
        self.ffeat_norm = nn.LayerNorm(LATENT_DIM)
        self.ffeat_updater = nn.Sequential(nn.Linear(LATENT_DIM, LATENT_DIM), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(LATENT_DIM, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(LATENT_DIM, 1))


class TrackHeadWeights(nn.Module):
    def __init__(self, dim_in: int, patch_size: int, out_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.feature_extractor = DPTHead(dim_in, patch_size, features=LATENT_DIM, out_channels=out_channels,
                                         feature_only=True, down_ratio=2)
        self.tracker = _Tracker()
