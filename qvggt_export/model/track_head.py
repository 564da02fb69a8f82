"""VGGT's track head: a DPT feature extractor and an iterative point tracker, released names and sizes.

Released checkpoints carry it, so VGGT-1B loads strictly and round-trips unchanged. It is never exported
(arch.NOT_DEPLOYED); it runs for training: VGGT's tracking loss supervises correspondences between views,
the signal the embedded model's pose lacks (weights/vggt_tiny.md). The tracker follows the released one:
features of the query points in the first view, a correlation pyramid sampled around each track's
current position in every view, and a transformer over time (each track's views) and space (all tracks,
through a few learned virtual tracks) that moves the positions and updates the track features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import DPTHead, sincos_embed
from .layers import Mlp


@dataclass(frozen=True)
class TrackerShape:
    """Sizes of the tracker; the defaults are the released VGGT-1B's."""

    latent_dim: int = 128  # track-feature channels = the feature extractor's output channels
    hidden: int = 384  # transformer width
    depth: int = 6  # time blocks (each followed by one space round)
    heads: int = 8
    corr_levels: int = 7  # correlation pyramid levels (each half the previous resolution)
    corr_radius: int = 4  # (2r + 1)^2 correlation samples per level
    virtual_tracks: int = 64
    stride: int = 2  # image pixels per feature-map pixel (the feature extractor's down ratio)
    max_scale: float = 518.0  # flows are also fed divided by this

    @property
    def input_dim(self) -> int:  # flow embedding (latent + 4), correlation (latent), track features (latent)
        return 3 * self.latent_dim + 4


def sample_bilinear(maps: Tensor, grid: Tensor, padding_mode: str = "border") -> Tensor:
    """maps [N, C, H, W] at pixel positions grid [N, h, w, 2] ((x, y), 0 = the first pixel's centre) ->
    [N, C, h, w]. Gradients reach the maps, not the positions (as released: the update moves the tracks)."""
    H, W = maps.shape[-2:]
    scale = grid.new_tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)])
    return F.grid_sample(maps, grid.detach() * scale - 1, mode="bilinear", padding_mode=padding_mode,
                         align_corners=True)


def sample_points(maps: Tensor, points: Tensor) -> Tensor:
    """maps [B, C, H, W] at points [B, N, 2] (pixel x, y) -> [B, N, C]."""
    return sample_bilinear(maps, points[:, :, None]).squeeze(-1).transpose(1, 2)


def grid_embedding(dim: int, height: int, width: int, device: torch.device) -> Tensor:
    """[1, dim, H, W] sin-cos embedding of the feature-map grid: x in the first half, y in the second."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                          torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    emb = torch.cat([sincos_embed(x, dim // 2, 10000.0), sincos_embed(y, dim // 2, 10000.0)], dim=1)
    return emb.T.reshape(1, dim, height, width)


def flow_embedding(flows: Tensor, channels: int) -> Tensor:
    """[..., 2] -> [..., 2 * channels]: per axis, sin and cos interleaved at frequencies k * 1000 / channels."""
    freq = torch.arange(0, channels, 2, dtype=torch.float32, device=flows.device) * (1000.0 / channels)
    axes = []
    for axis in range(2):
        angle = flows[..., axis:axis + 1].float() * freq
        axes.append(torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(-2))
    return torch.cat(axes, dim=-1)


class CorrelationPyramid:
    """Feature maps [B, S, C, H, W] at `levels` resolutions; `sample` correlates track features with each
    level and reads a (2r + 1)^2 window around each track's position."""

    def __init__(self, fmaps: Tensor, levels: int, radius: int) -> None:
        self.maps = [fmaps]
        for _ in range(levels - 1):
            B, S = fmaps.shape[:2]
            fmaps = F.avg_pool2d(fmaps.flatten(0, 1), 2, stride=2).unflatten(0, (B, S))
            self.maps.append(fmaps)
        offsets = torch.arange(-radius, radius + 1, dtype=fmaps.dtype, device=fmaps.device)
        # Window offset [i, j] is (x, y) = (offsets[i], offsets[j]): the released order of the samples.
        self.window = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1)

    def sample(self, features: Tensor, coords: Tensor) -> Tensor:
        """features [B, S, N, C] and positions [B, S, N, 2] (level-0 pixels) -> [B, S, N, levels * (2r + 1)^2]."""
        B, S, N, C = features.shape
        out = []
        for level, fmap in enumerate(self.maps):
            H, W = fmap.shape[-2:]
            corr = features @ fmap.reshape(B, S, C, H * W) / math.sqrt(C)  # [B, S, N, H * W]
            grid = coords.reshape(B * S * N, 1, 1, 2) / 2 ** level + self.window
            out.append(sample_bilinear(corr.reshape(B * S * N, 1, H, W), grid, "zeros").reshape(B, S, N, -1))
        return torch.cat(out, dim=-1)


class _TrackerBlock(nn.Module):
    """Self-attention block, or with `cross` the cross-attention block (extra context norm)."""

    def __init__(self, hidden: int, heads: int, cross: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        if cross:
            self.norm_context = nn.LayerNorm(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        setattr(self, "cross_attn" if cross else "attn", nn.MultiheadAttention(hidden, heads, batch_first=True))
        self.mlp = Mlp(hidden, hidden * 4)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        x = self.norm1(x)  # released: the residual starts from the normalised input
        if context is None:
            x = x + self.attn(x, x, x, need_weights=False)[0]
        else:
            context = self.norm_context(context)
            x = x + self.cross_attn(x, context, context, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _UpdateFormer(nn.Module):
    def __init__(self, shape: TrackerShape) -> None:
        super().__init__()
        hidden, heads = shape.hidden, shape.heads
        self.virual_tracks = nn.Parameter(torch.randn(1, shape.virtual_tracks, 1, hidden))  # sic: released name
        self.input_norm = nn.LayerNorm(shape.input_dim)
        self.input_transform = nn.Linear(shape.input_dim, hidden)
        self.output_norm = nn.LayerNorm(hidden)
        self.flow_head = nn.Linear(hidden, shape.latent_dim + 2)
        self.time_blocks = nn.ModuleList([_TrackerBlock(hidden, heads) for _ in range(shape.depth)])
        self.space_virtual_blocks = nn.ModuleList([_TrackerBlock(hidden, heads) for _ in range(shape.depth)])
        self.space_point2virtual_blocks = nn.ModuleList(
            [_TrackerBlock(hidden, heads, cross=True) for _ in range(shape.depth)])
        self.space_virtual2point_blocks = nn.ModuleList(
            [_TrackerBlock(hidden, heads, cross=True) for _ in range(shape.depth)])
        for module in self.modules():  # the released initialisation
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, S, input_dim] -> [B, N, S, latent_dim + 2] (position deltas first)."""
        tokens = self.input_transform(self.input_norm(x))
        start = tokens
        B, N, S, D = tokens.shape
        tokens = torch.cat([tokens, self.virual_tracks.expand(B, -1, S, -1)], dim=1)
        blocks = zip(self.time_blocks, self.space_virtual2point_blocks, self.space_virtual_blocks,
                     self.space_point2virtual_blocks)
        for time_block, gather, virtual_block, scatter in blocks:
            tokens = time_block(tokens.reshape(-1, S, D)).reshape(B, -1, S, D)
            space = tokens.transpose(1, 2).reshape(B * S, -1, D)
            points, virtual = space[:, :N], space[:, N:]
            virtual = virtual_block(gather(virtual, points))
            points = scatter(points, virtual)
            tokens = torch.cat([points, virtual], dim=1).reshape(B, S, -1, D).transpose(1, 2)
        return self.flow_head(self.output_norm(tokens[:, :N] + start))


class Tracker(nn.Module):
    def __init__(self, shape: TrackerShape) -> None:
        super().__init__()
        self.shape = shape
        window = (2 * shape.corr_radius + 1) ** 2
        self.query_ref_token = nn.Parameter(torch.randn(1, 2, shape.input_dim))
        self.corr_mlp = Mlp(shape.corr_levels * window, shape.hidden, shape.latent_dim)
        self.updateformer = _UpdateFormer(shape)
        self.fmap_norm = nn.LayerNorm(shape.latent_dim)
        self.ffeat_norm = nn.LayerNorm(shape.latent_dim)  # released GroupNorm(1, C) on [*, C]: the same
        self.ffeat_updater = nn.Sequential(nn.Linear(shape.latent_dim, shape.latent_dim), nn.GELU())
        self.vis_predictor = nn.Sequential(nn.Linear(shape.latent_dim, 1))
        self.conf_predictor = nn.Sequential(nn.Linear(shape.latent_dim, 1))

    def forward(self, query_points: Tensor, fmaps: Tensor, iters: int) -> tuple[list[Tensor], Tensor, Tensor]:
        """query_points [B, N, 2] (image pixels in view 0), fmaps [B, S, C, h, w] -> (positions [B, S, N, 2] in
        image pixels after each iteration, visibility logits [B, S, N], confidence logits [B, S, N])."""
        shape = self.shape
        B, S = fmaps.shape[:2]
        N = query_points.shape[1]
        fmaps = self.fmap_norm(fmaps.permute(0, 1, 3, 4, 2)).permute(0, 1, 4, 2, 3)
        queries = query_points / shape.stride
        coords = queries[:, None].expand(B, S, N, 2)
        features = sample_points(fmaps[:, 0], queries)[:, None].expand(B, S, N, shape.latent_dim)
        pyramid = CorrelationPyramid(fmaps, shape.corr_levels, shape.corr_radius)
        position = sample_points(grid_embedding(shape.input_dim, *fmaps.shape[-2:], fmaps.device).expand(B, -1, -1, -1),
                                 queries)[:, :, None]  # [B, N, 1, input_dim]
        view_token = torch.cat([self.query_ref_token[:, :1], self.query_ref_token[:, 1:].expand(-1, S - 1, -1)], 1)
        predictions = []
        for _ in range(iters):
            coords = coords.detach()
            corr = self.corr_mlp(pyramid.sample(features, coords))
            flows = coords - coords[:, :1]
            flow_features = torch.cat([flow_embedding(flows, shape.latent_dim // 2), flows / shape.max_scale,
                                       flows / shape.max_scale], dim=-1)
            x = torch.cat([flow_features, corr, features], dim=-1).transpose(1, 2) + position + view_token
            delta = self.updateformer(x).transpose(1, 2)  # [B, S, N, 2 + latent]
            features = features + self.ffeat_updater(self.ffeat_norm(delta[..., 2:]))
            coords = torch.cat([queries[:, None], (coords + delta[..., :2])[:, 1:]], dim=1)  # view 0 stays put
            predictions.append(coords * shape.stride)
        return predictions, self.vis_predictor(features).squeeze(-1), self.conf_predictor(features).squeeze(-1)


class TrackHead(nn.Module):
    """Point tracks of query points of view 0 through every view, from the aggregator's layers."""

    def __init__(self, dim_in: int, patch_size: int, out_channels: tuple[int, ...],
                 intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23), shape: TrackerShape | None = None,
                 iters: int = 4) -> None:
        super().__init__()
        self.shape = shape or TrackerShape()
        self.iters = iters
        self.feature_extractor = DPTHead(dim_in, patch_size, features=self.shape.latent_dim,
                                         out_channels=out_channels, intermediate_layer_idx=intermediate_layer_idx,
                                         feature_only=True, down_ratio=self.shape.stride)
        self.tracker = Tracker(self.shape)

    def forward(self, layers: dict[int, Tensor], H: int, W: int, patch_start_idx: int, query_points: Tensor,
                iters: int | None = None) -> tuple[list[Tensor], Tensor, Tensor]:
        """layers: the aggregator's {block: [B, S, P, C]}, query_points [B, N, 2] pixels of view 0 -> Tracker's."""
        fmaps = self.feature_extractor(layers, H, W, patch_start_idx)
        return self.tracker(query_points, fmaps, self.iters if iters is None else iters)
