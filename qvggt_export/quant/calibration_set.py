"""Calibration scenes: synthetic (with exact ground truth) or image folders (no ground truth).

When a scene has no ground truth, the task losses use the full-precision model's own predictions as
targets (pseudo ground truth); see objective.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..io import sha256_json, sha256_tensors
from ..log import logger

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclass
class CalibScene:
    name: str
    images: torch.Tensor  # [S, 3, H, W] in [0, 1]
    # Ground truth in the model's convention (world = camera 0), or None for image folders:
    # extrinsics [S, 3, 4], intrinsics [S, 3, 3], depth [S, H, W], world_points [S, H, W, 3], valid [S, H, W].
    gt: dict[str, torch.Tensor] | None = None


@dataclass
class CalibrationSet:
    scenes: list[CalibScene]
    source: str  # "synthetic" or the folder path
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.scenes:
            raise InputError(f"calibration set {self.source!r} is empty (no scenes with images)")
        for scene in self.scenes:
            if not torch.isfinite(scene.images).all():
                raise InputError(f"calibration scene {scene.name!r} has NaN/Inf pixel values")

    @property
    def num_images(self) -> int:
        return sum(s.images.shape[0] for s in self.scenes)

    @property
    def has_ground_truth(self) -> bool:
        return all(s.gt is not None for s in self.scenes)

    def fingerprint(self) -> str:
        """Hash of the pixels (every byte), ground truth and settings: cached calibration results are reused only for the same data."""
        digests = [sha256_tensors([(s.name, s.images)] + sorted((s.gt or {}).items())) for s in self.scenes]
        return sha256_json({"source": self.source, "settings": self.settings, "scenes": digests})

    def describe(self) -> dict:
        return {"source": self.source, "scenes": len(self.scenes), "images": self.num_images,
                "ground_truth": self.has_ground_truth, "fingerprint": self.fingerprint(), **self.settings}


def _check_counts(scenes: int, frames: int) -> None:
    if scenes < 1:
        raise InputError(f"--calib-scenes must be at least 1, got {scenes}")
    if frames < 1:
        raise InputError(f"--calib-frames must be at least 1, got {frames}")


def synthetic_calibration(num_scenes: int, num_frames: int, image_size: tuple[int, int]) -> CalibrationSet:
    from ..data.synthetic import calibration_scenes

    _check_counts(num_scenes, num_frames)
    scenes = []
    for scene in calibration_scenes(num_scenes, num_frames, image_size):
        scene = scene.in_first_camera_frame()
        gt = {"extrinsics": scene.extrinsics, "intrinsics": scene.intrinsics, "depth": scene.depth,
              "world_points": scene.world_points, "valid": scene.valid}
        scenes.append(CalibScene(f"synthetic:{scene.seed}", torch.from_numpy(scene.images),
                                 {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in gt.items()}))
    return CalibrationSet(scenes, "synthetic", {"scenes": num_scenes, "frames": num_frames,
                                                "image_size": list(image_size)})


def folder_calibration(root: Path, num_scenes: int, num_frames: int,
                       image_size: tuple[int, int] | None = None) -> CalibrationSet:
    """`root` holds one sub-folder of images per scene (or images directly: one scene).

    Frames are taken evenly spaced from each scene's sorted file list. Images go through the released
    preprocessing, then (optionally) are resized to `image_size` (multiples of the patch size).
    """
    from ..data.images import load_and_preprocess_images

    _check_counts(num_scenes, num_frames)
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"calibration folder not found: {root}")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    folders = [root] if images_in(root) else sorted(p for p in root.iterdir() if p.is_dir() and images_in(p))
    scenes = []
    for folder in folders[:num_scenes]:
        paths = images_in(folder)
        picks = np.unique(np.linspace(0, len(paths) - 1, min(num_frames, len(paths))).round().astype(int))
        images = load_and_preprocess_images([paths[i] for i in picks])
        if image_size is not None:
            images = torch.nn.functional.interpolate(images, size=tuple(image_size), mode="bilinear",
                                                     align_corners=False, antialias=True).clamp(0, 1)
        scenes.append(CalibScene(str(folder.relative_to(root)) or ".", images))
    if not scenes:
        raise InputError(f"calibration folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len(scenes) < num_scenes:
        logger.warning("calibration folder %s has %d scene(s), fewer than the %d asked for", root, len(scenes),
                       num_scenes)
    return CalibrationSet(scenes, str(root), {"scenes": num_scenes, "frames": num_frames,
                                             "image_size": None if image_size is None else list(image_size)})


@torch.no_grad()  # PTQ never needs gradients; keeps callers' grad mode untouched
def load_calibration(source: str, model, num_scenes: int = 8, num_frames: int = 4,
                     image_size: tuple[int, int] | None = None) -> CalibrationSet:
    """`source` is "synthetic" or a folder of image folders."""
    if source == "synthetic":
        return synthetic_calibration(num_scenes, num_frames, image_size or model.config.default_image_size)
    return folder_calibration(Path(source), num_scenes, num_frames, image_size)
