"""Running a model on one scene's views and returning numpy predictions (batch dim removed)."""

from __future__ import annotations

import numpy as np
import torch

PREDICTION_KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


@torch.no_grad()
def run_model(model: torch.nn.Module, images: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """images [S, 3, H, W] in [0, 1] -> pose_enc [S, 9], extrinsic [S, 3, 4], intrinsic [S, 3, 3],
    depth [S, H, W, 1], depth_conf [S, H, W], world_points [S, H, W, 3], world_points_conf [S, H, W]."""
    from .geometry import pose_encoding_to_extri_intri

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [S, 3, H, W], got {tuple(images.shape)}")
    preds = model(images.to(device)[None])
    out = {k: preds[k][0].float().cpu().numpy() for k in PREDICTION_KEYS}
    extrinsic, intrinsic = pose_encoding_to_extri_intri(preds["pose_enc"].float().cpu(), images.shape[-2:])
    out["extrinsic"] = np.asarray(extrinsic[0], dtype=np.float32)
    out["intrinsic"] = np.asarray(intrinsic[0], dtype=np.float32)
    return out


def graph_predictions(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """An exported graph's outputs (batch of one) -> `run_model`'s dict: batch dim removed, extrinsic and
    intrinsic decoded from pose_enc at the depth maps' size."""
    from .geometry import pose_encoding_to_extri_intri

    preds = {k: np.asarray(v)[0] for k, v in raw.items()}
    extrinsic, intrinsic = pose_encoding_to_extri_intri(torch.from_numpy(np.asarray(raw["pose_enc"])).float(),
                                                        preds["depth"].shape[1:3])
    preds["extrinsic"] = np.asarray(extrinsic[0], dtype=np.float32)
    preds["intrinsic"] = np.asarray(intrinsic[0], dtype=np.float32)
    return preds
