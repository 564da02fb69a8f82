"""The API behind `qvggt-export predict`: one scene's views through a model, predictions to .npz."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .io import atomic_output
from .log import logger
from .visualize import ReconstructionOutputs


def save_predictions(path: str | Path, predictions: dict[str, np.ndarray]) -> None:
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"output must be an .npz file, got {path}")
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:  # a file object keeps numpy from appending ".npz" to the temp name
            np.savez(f, **predictions)


def _load(checkpoint: str | None, device: str):
    from .model import load_model

    start = time.perf_counter()
    model = load_model(checkpoint, device)
    logger.info("model %s loaded in %.1f s", checkpoint or "vggt-tiny (embedded default)", time.perf_counter() - start)
    return model


def _run(model, images, device: str) -> dict[str, np.ndarray]:
    from .inference import run_model

    start = time.perf_counter()
    preds = run_model(model, images, device)
    logger.info("%d views of %dx%d in %.2f s on %s", images.shape[0], images.shape[-2], images.shape[-1],
                time.perf_counter() - start, device)
    return preds


def predict_images(paths, checkpoint: str | None, mode: str, out: str | Path, device: str = "cpu",
                   image_size: tuple[int, int] | None = None,
                   reconstruction: ReconstructionOutputs | None = None) -> dict:
    """`image_size` (H, W) overrides the model's native input size (data.images.native_size);
    `reconstruction`: also a PLY / GLB of the scene."""
    from .data.images import image_size as read_image_size
    from .data.images import load_and_preprocess_images, native_size

    if Path(out).suffix != ".npz":
        raise InputError(f"output must be an .npz file, got {out}")
    reconstruction = reconstruction or ReconstructionOutputs()
    reconstruction.check()
    for path in paths:  # a bad file fails before the (slow) model load
        read_image_size(path)
    model = _load(checkpoint, device)
    images = load_and_preprocess_images([str(p) for p in paths], mode=mode,
                                        size=image_size or native_size(model.config))
    logger.info("preprocessed %d images to %dx%d (%s)", images.shape[0], images.shape[-2], images.shape[-1], mode)
    preds = _run(model, images, device)
    save_predictions(out, preds)
    reconstruction.write(preds, images)
    return preds


def parse_scene(spec: str) -> tuple[int, str]:
    """'synthetic:SEED' (wide-arc cameras) or 'synthetic-TRAJECTORY:SEED' -> (seed, trajectory)."""
    from .data.synthetic import TRAJECTORIES

    kind, _, seed = spec.partition(":")
    trajectory = kind.removeprefix("synthetic-") if kind.startswith("synthetic-") else "arc"
    if kind not in ("synthetic", f"synthetic-{trajectory}") or trajectory not in TRAJECTORIES \
            or not seed.lstrip("-").isdigit():
        raise InputError(f"--scene must look like synthetic:SEED or synthetic-TRAJECTORY:SEED "
                         f"(TRAJECTORY: {', '.join(TRAJECTORIES)}), got {spec!r}")
    return int(seed), trajectory


def predict_synthetic(spec: str, checkpoint: str | None, views: int, image_size: str | None,
                      out: str | Path, device: str = "cpu",
                      reconstruction: ReconstructionOutputs | None = None) -> list[str]:
    """Predicts a rendered scene, saves predictions and ground truth, returns a short error report."""
    import torch

    from .data.synthetic import render_scene
    from .evaluate import scene_metrics
    from .data.images import parse_image_size
    from .metrics import camera_pose_metrics

    if Path(out).suffix != ".npz":
        raise InputError(f"output must be an .npz file, got {out}")
    reconstruction = reconstruction or ReconstructionOutputs()
    reconstruction.check()
    seed, trajectory = parse_scene(spec)
    model = _load(checkpoint, device)
    size = parse_image_size(image_size) if image_size else model.config.default_image_size
    scene = render_scene(seed, views, size, trajectory).in_first_camera_frame()
    preds = _run(model, torch.from_numpy(scene.images), device)
    metrics = scene_metrics(preds, scene)
    save_predictions(out, {**preds, "gt_extrinsic": scene.extrinsics, "gt_intrinsic": scene.intrinsics,
                           "gt_depth": scene.depth, "gt_world_points": scene.world_points, "gt_valid": scene.valid,
                           "images": scene.images})
    reconstruction.write(preds, scene.images)
    # What predicting every camera at the first one scores: the bar a pose estimate has to clear.
    identity = camera_pose_metrics(np.tile(np.eye(3, 4), (views, 1, 1)), scene.extrinsics)
    return [f"synthetic scene {seed} ({trajectory} cameras): {views} views at {size[0]}x{size[1]}"] + [
        f"  {name:<22}{value:.4f}" for name, value in metrics.items()] + [
        "  identity-pose baseline: " + "  ".join(f"{k} {identity[k]:.4f}" for k in ("rotation_error_deg", "auc@30"))]
