"""VGGT: aggregator + camera, depth and point heads (released module names and outputs)."""

from __future__ import annotations

from torch import Tensor, nn

from ..log import logger
from .aggregator import Aggregator
from .config import VGGTConfig
from .heads import CameraHead, DPTHead
from .track_head import TrackHead

TRACK_PREFIX = "track_head."


class VGGT(nn.Module):
    def __init__(self, cfg: VGGTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or VGGTConfig()
        self.config = cfg
        dim = 2 * cfg.embed_dim
        self.aggregator = Aggregator(cfg)
        self.camera_head = CameraHead(dim, cfg.camera_trunk_depth, cfg.camera_num_heads)
        dpt = dict(patch_size=cfg.patch_size, features=cfg.dpt_features, out_channels=cfg.dpt_out_channels,
                   intermediate_layer_idx=cfg.intermediate_layer_idx)
        self.point_head = DPTHead(dim, output_dim=4, activation="inv_log", **dpt)
        self.depth_head = DPTHead(dim, output_dim=2, activation="exp", **dpt)
        self.track_head = (TrackHead(dim, cfg.patch_size, cfg.dpt_out_channels, cfg.intermediate_layer_idx)
                           if cfg.carry_track_head else None)

    def forward(self, images: Tensor) -> dict[str, Tensor | list[Tensor]]:
        """images [B, S, 3, H, W] or [S, 3, H, W] in [0, 1] -> dict of predictions (batched)."""
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images [B, S, 3, H, W] or [S, 3, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        layers = self.aggregator(images)
        return {**self.predict_camera(layers), **self.predict_dense(layers, H, W)}

    def predict_camera(self, layers: dict[int, Tensor]) -> dict[str, Tensor | list[Tensor]]:
        """The camera head on the aggregator's kept layers."""
        pose_enc_list = self.camera_head(layers[self.config.depth - 1])
        return {"pose_enc": pose_enc_list[-1], "pose_enc_list": pose_enc_list}

    def predict_dense(self, layers: dict[int, Tensor], H: int, W: int,
                      frames_chunk_size: int | None = None) -> dict[str, Tensor]:
        """The depth and point heads; `frames_chunk_size` runs them on that many frames at a time (the
        released code's memory bound; the heads treat frames independently)."""
        start = self.aggregator.patch_start_idx
        depth, depth_conf = self.depth_head(layers, H, W, start, frames_chunk_size)
        points, points_conf = self.point_head(layers, H, W, start, frames_chunk_size)
        return {"depth": depth, "depth_conf": depth_conf, "world_points": points, "world_points_conf": points_conf}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Released key names. Track-head weights are never an error: kept when this model carries
        the track head, dropped otherwise; a checkpoint without them leaves the carried ones as built."""
        state_dict = dict(state_dict)
        track_keys = [k for k in state_dict if k.startswith(TRACK_PREFIX)]
        if self.track_head is None and track_keys:
            logger.debug("dropping %d track-head tensors (track head not carried)", len(track_keys))
            for k in track_keys:
                del state_dict[k]
        result = super().load_state_dict(state_dict, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not k.startswith(TRACK_PREFIX)]
        if strict and (missing or result.unexpected_keys):
            raise KeyError(_describe_key_mismatch(missing, result.unexpected_keys))
        return result

    def num_parameters(self, include_track_head: bool = True) -> int:
        return sum(p.numel() for n, p in self.named_parameters()
                   if include_track_head or not n.startswith(TRACK_PREFIX))


def _describe_key_mismatch(missing: list[str], unexpected: list[str], shown: int = 5) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {label} keys: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)
