"""The API behind `qvggt-export eval`: run a model, or any predict function, over a dataset.

A predict function takes images [S, 3, H, W] (float, [0, 1]) and returns numpy arrays: extrinsic
[S, 3, 4], intrinsic [S, 3, 3], depth [S, H, W, 1], depth_conf, world_points [S, H, W, 3],
world_points_conf — so quantized models and ONNX sessions are evaluated the same way as the model.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import torch

from .data.readers import DatasetReader, open_dataset
from .errors import QVGGTError
from .geometry import to_first_camera_frame
from .metrics import (
    camera_pose_metrics,
    depth_metrics,
    pointmap_metrics,
    pose_metrics_from_errors,
    relative_pose_errors,
)
from .visualize import ReconstructionOutputs

PredictFn = Callable[[torch.Tensor], dict]


def as_predict_fn(model_or_predict_fn, device: str = "cpu") -> PredictFn:
    """A torch model becomes `run_model` on it; a callable is used as it is."""
    if isinstance(model_or_predict_fn, torch.nn.Module):
        from .inference import run_model

        model = model_or_predict_fn.eval()
        return lambda images: run_model(model, images, device)
    if callable(model_or_predict_fn):
        return model_or_predict_fn
    raise TypeError(f"expected a torch model or a predict function, got {type(model_or_predict_fn).__name__}")


def _check_shape(preds: dict, key: str, expected: tuple) -> np.ndarray:
    if key not in preds:
        raise QVGGTError(f"predictions lack {key!r} (have {', '.join(sorted(preds))})")
    value = np.asarray(preds[key])
    if value.shape != expected:
        raise QVGGTError(f"prediction {key!r} has shape {value.shape}, expected {expected}")
    return value


def scene_metrics(preds: dict, truth) -> dict[str, float]:
    """Metrics of one scene's predictions against whatever ground truth `truth` carries.

    `truth` has extrinsics [S, 3, 4], depth [S, H, W], world_points [S, H, W, 3], valid [S, H, W]
    (a `Sequence` or a synthetic `Scene`; missing ground truth is None). Ground-truth points are taken
    to camera 0's frame, where the model puts its world.
    """
    metrics: dict[str, float] = {}
    if truth.extrinsics is None:
        return metrics
    frames = len(truth.extrinsics)
    metrics.update(camera_pose_metrics(_check_shape(preds, "extrinsic", (frames, 3, 4)), truth.extrinsics))
    if truth.depth is not None:
        depth = _check_shape(preds, "depth", truth.depth.shape + (1,))[..., 0]
        metrics.update(depth_metrics(depth, truth.depth, truth.valid))
    if truth.world_points is not None:
        points = _check_shape(preds, "world_points", truth.world_points.shape)
        _, gt_points = to_first_camera_frame(np.asarray(truth.extrinsics, np.float64), truth.world_points)
        metrics.update(pointmap_metrics(points, gt_points, truth.valid))
    return metrics


def _mean(values) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _json_safe(value):
    """NaN / inf -> None, numpy scalars -> Python numbers, recursively."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def evaluate(
    model_or_predict_fn,
    dataset_name: str | DatasetReader,
    root=None,
    frames: int | None = None,
    seed: int = 0,
    max_scenes: int | None = None,
    progress: bool = True,
    device: str = "cpu",
    image_size: tuple[int, int] | None = None,
    reconstruction: ReconstructionOutputs | None = None,
) -> dict:
    """Per-scene metrics and their aggregate (JSON-serialisable; missing values are None).

    `reconstruction`: also a PLY / GLB per scene (visualize.scene_path: FILE-SCENE.ply).

    Pose AUC pools the pairs of each group (a CO3D category; the whole dataset otherwise) and averages
    the groups, as the released evaluation; the other metrics are means over scenes.
    """
    from tqdm import tqdm

    if reconstruction:
        reconstruction.check()
    predict = as_predict_fn(model_or_predict_fn, device)
    reader = dataset_name if isinstance(dataset_name, DatasetReader) else open_dataset(
        dataset_name, root, frames, seed, max_scenes, image_size
    )
    scenes, pose_errors = [], {}
    for sequence in tqdm(reader, total=len(reader), desc=f"eval {reader.name}", unit="scene", disable=not progress):
        start = time.perf_counter()
        preds = predict(sequence.images)
        seconds = time.perf_counter() - start
        if reconstruction:
            reconstruction.write(preds, sequence.images, name=sequence.name)
        report = {"name": sequence.name, "group": sequence.group, "frames": int(sequence.images.shape[0]),
                  "seconds": seconds}
        for key in ("depth_conf", "world_points_conf"):
            if key in preds:
                report[f"{key}_mean"] = float(np.mean(preds[key]))
        report.update(scene_metrics(preds, sequence))
        if sequence.extrinsics is not None:
            errors = relative_pose_errors(preds["extrinsic"], sequence.extrinsics)
            pose_errors.setdefault(sequence.group, []).append(errors)
        scenes.append(report)

    groups = {
        group: pose_metrics_from_errors(*(np.concatenate(parts) for parts in zip(*errors)))
        for group, errors in pose_errors.items()
    }
    aggregate: dict[str, float] = {"scenes": len(scenes), "seconds_per_scene": _mean(s["seconds"] for s in scenes)}
    scene_keys = [k for k in (scenes[0] if scenes else {}) if k not in ("name", "group", "frames", "seconds")]
    for key in scene_keys:
        if groups and key in next(iter(groups.values())):
            aggregate[key] = _mean(g[key] for g in groups.values())  # mean over groups of pooled pairs
        else:
            aggregate[key] = _mean(s.get(key) for s in scenes)
    if groups:
        aggregate["pairs"] = sum(g["pairs"] for g in groups.values())
    return _json_safe({
        "dataset": reader.name,
        "root": None if root is None else str(root),
        "frames": frames,
        "seed": seed,
        "aggregate": aggregate,
        "groups": groups,
        "scenes": scenes,
        "skipped": reader.skipped,
    })


def format_report(result: dict) -> str:
    """A plain-text table: one row per scene, then the aggregate."""
    wanted = ("auc@30", "auc@5", "rra@30", "rta@30", "abs_rel", "delta<1.25", "acc_mean", "comp_mean", "nc_mean",
              "depth_conf_mean", "seconds")
    columns = [k for k in wanted if any(k in s for s in result["scenes"])]

    def cell(value) -> str:
        return f"{value:>11.4f}" if isinstance(value, (int, float)) and value is not None else f"{'-':>11}"

    name_width = max([len("scene"), *(len(s["name"]) for s in result["scenes"])])
    lines = [f"{'scene':<{name_width}} {'frames':>6}" + "".join(f"{c:>11}" for c in columns)]
    for scene in result["scenes"]:
        cells = "".join(cell(scene.get(c)) for c in columns)
        lines.append(f"{scene['name']:<{name_width}} {scene['frames']:>6}" + cells)
    aggregate = result["aggregate"]
    lines.append(f"{'mean':<{name_width}} {'':>6}" + "".join(
        cell(aggregate.get("seconds_per_scene" if c == "seconds" else c)) for c in columns))
    if result["skipped"]:
        lines.append(f"skipped {len(result['skipped'])}: " + "; ".join(result["skipped"]))
    return "\n".join(lines)
