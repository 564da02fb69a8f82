"""Running a model on one scene's views and returning numpy predictions (batch dim removed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .errors import ResourceError
from .io import resource_errors

PREDICTION_KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
# Floats per pixel of the outputs (depth, depth_conf, world_points, world_points_conf) plus the input (3).
_FLOATS_PER_PIXEL = 1 + 1 + 3 + 1 + 3


def forward_bytes(config, views: int, hw: tuple[int, int], element_size: int = 4) -> int:
    """A lower bound of the memory a forward pass of `views` views of hw holds at once, with activations of
    `element_size` bytes: the input, the aggregator outputs the heads read (each 2 x embed_dim per token)
    and the dense outputs. The blocks' own activations and the DPT heads' feature maps come on top."""
    h, w = hw
    tokens = views * ((h // config.patch_size) * (w // config.patch_size) + 1 + config.num_register_tokens)
    kept = len(config.kept_layers) * tokens * 2 * config.embed_dim
    return element_size * (kept + views * h * w * _FLOATS_PER_PIXEL)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on `device` (CUDA: free device memory; CPU: MemAvailable, capped by
    the cgroup's limit); None when this platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    free = next((int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:")), None)
    try:
        limit, used = (Path("/sys/fs/cgroup", f).read_text().strip() for f in ("memory.max", "memory.current"))
        if free is not None and limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass  # no cgroup v2 memory controller here: MemAvailable alone
    return free


def check_memory(model: torch.nn.Module, views: int, hw: tuple[int, int], device: torch.device) -> None:
    """ResourceError before the forward pass when its lower bound (forward_bytes) exceeds the memory free."""
    config = getattr(model, "config", None)
    free = available_memory(device)
    if config is None or free is None:
        return
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    need = forward_bytes(config, views, hw, weight.element_size() if weight is not None else 4)
    if need > free:
        raise ResourceError(f"{views} views of {hw[0]}x{hw[1]} need at least {need / 1e9:.1f} GB for the forward "
                            f"pass and {free / 1e9:.1f} GB is free on {device}; use fewer views (or smaller ones)")


@torch.no_grad()
def run_model(model: torch.nn.Module, images: torch.Tensor, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """images [S, 3, H, W] in [0, 1] -> pose_enc [S, 9], extrinsic [S, 3, 4], intrinsic [S, 3, 3],
    depth [S, H, W, 1], depth_conf [S, H, W], world_points [S, H, W, 3], world_points_conf [S, H, W].
    More views than the memory can hold, where that can be foreseen, or running out of memory during
    the forward pass: ResourceError."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images [S, 3, H, W], got {tuple(images.shape)}")
    views, hw, device = images.shape[0], tuple(images.shape[-2:]), torch.device(device)
    check_memory(model, views, hw, device)
    with resource_errors(f"running {views} views of {hw[0]}x{hw[1]} on {device}"):
        preds = model(images.to(device)[None])
    return graph_predictions({k: preds[k].float().cpu().numpy() for k in PREDICTION_KEYS})


def graph_predictions(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A model's or an exported graph's outputs (batch of one) -> `run_model`'s dict: batch dim removed,
    extrinsic and intrinsic decoded from pose_enc at the depth maps' size."""
    from .geometry import pose_encoding_to_extri_intri

    preds = {k: np.asarray(v)[0] for k, v in raw.items()}
    extrinsic, intrinsic = pose_encoding_to_extri_intri(torch.from_numpy(np.asarray(raw["pose_enc"])).float(),
                                                        preds["depth"].shape[1:3])
    preds["extrinsic"] = np.asarray(extrinsic[0], dtype=np.float32)
    preds["intrinsic"] = np.asarray(intrinsic[0], dtype=np.float32)
    return preds
