"""Dataset readers: every dataset becomes a list of `Sequence`s with the same structure.

On-disk layouts read (the ones the datasets ship with; see each reader):
- folder:   ROOT/*.jpg (one scene) or ROOT/<scene>/*.jpg (one scene per folder); no ground truth.
- co3d:     ROOT/<category>/frame_annotations.jgz (+ sequence_annotations.jgz, set_lists/*.json),
            images at ROOT/<image.path>; PyTorch3D cameras converted to OpenCV.
- re10k:    RealEstate10K camera files ROOT/[metadata/]test/<seq>.txt (or ROOT/<seq>.txt), frames in
            ROOT/<seq>/images/ named by line index (0000.png) or by timestamp.
- 7scenes:  ROOT/<scene>/seq-NN/frame-NNNNNN.{color.png, depth[.proj].png, pose.txt}, TestSplit.txt.
- nrgbd:    ROOT/<scene>/images/imgN.png, depth/depthN.png, poses.txt (4x4 camera-to-world, OpenGL).

Frame selection follows docs/evaluation.md: pose datasets (and folders) draw `frames` frames per
sequence with one `np.random.RandomState(seed)` walked over the sequences in sorted order (sequences
with fewer frames are skipped without drawing, as the released evaluation); 7-Scenes takes every 100th
frame, NRGBD every min(100, n // 2)-th. Images go through the released preprocessing ("crop"); ground
truth maps are resampled (nearest) onto the preprocessed pixel grid and intrinsics follow the resize.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..geometry import closed_form_inverse_se3, unproject_depth_map_to_point_map
from ..log import logger
from .images import ResizePlan, image_size, load_and_preprocess_images, open_image, plan_preprocessing

DATASETS = ("synthetic-val", "synthetic-video", "folder", "co3d", "re10k", "7scenes", "nrgbd")
DEFAULT_POSE_FRAMES = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

SEVEN_SCENES_INTRINSIC = np.array([[525.0, 0, 320], [0, 525, 240], [0, 0, 1]])
NRGBD_FOCAL = 554.2562584220408
NRGBD_INTRINSIC = np.array([[NRGBD_FOCAL, 0, 320], [0, NRGBD_FOCAL, 240], [0, 0, 1]])
KEYFRAME_STRIDE = 100
CO3D_MIN_QUALITY = 0.5  # sequences at or below this viewpoint quality are dropped, as released


@dataclass
class Sequence:
    """Views of one scene, preprocessed, with whatever ground truth the dataset has.

    Cameras are OpenCV camera-from-world in the dataset's own world frame; maps are on the
    preprocessed pixel grid [S, H, W]; depth is 0 and `valid` False where there is no ground truth.
    """

    name: str
    group: str  # category (co3d), scene (7scenes) or dataset name: pose pairs are pooled per group
    images: torch.Tensor  # [S, 3, H, W] in [0, 1]
    image_paths: list[Path] = field(default_factory=list)
    extrinsics: np.ndarray | None = None  # [S, 3, 4] float64
    intrinsics: np.ndarray | None = None  # [S, 3, 3] float64, for the preprocessed images
    depth: np.ndarray | None = None  # [S, H, W] float32
    world_points: np.ndarray | None = None  # [S, H, W, 3] float32
    valid: np.ndarray | None = None  # [S, H, W] bool


@dataclass
class _Frame:
    """One frame as found on disk."""

    image: Path
    extrinsic: np.ndarray | None = None  # [3, 4] camera-from-world, OpenCV
    intrinsic: np.ndarray | None = None  # [3, 3] in pixels of the source image
    depth: Path | None = None


@dataclass
class _SequenceSource:
    name: str
    group: str
    frames: list[_Frame]
    depth_decoder: Callable[[np.ndarray], np.ndarray] | None = None  # raw PNG values -> metres, 0 = invalid


class DatasetReader:
    """The sequences of one dataset: listed (and frames selected) up front, loaded one at a time."""

    # (H, W) the images are preprocessed to (a model's native size); None: the released 518 rule.
    image_size: tuple[int, int] | None = None

    def __init__(self, name: str, sources: list[_SequenceSource], skipped: list[str]):
        self.name = name
        self.sources = sources
        self.skipped = skipped

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self) -> Iterator[Sequence]:
        for source in self.sources:
            yield _load_sequence(source, self.image_size)


# ---------------------------------------------------------------------------------------------
# Frame selection


class _FrameSelector:
    """Seeded sampling (one RandomState over all sequences, in order) or keyframe strides."""

    def __init__(self, frames: int | None, seed: int):
        if frames is not None and frames < 1:
            raise InputError(f"--frames must be at least 1, got {frames}")
        self.frames = frames
        self.random = np.random.RandomState(seed)
        self.skipped: list[str] = []

    def _too_few(self, name: str, available: int, wanted: int) -> None:
        logger.warning("skipping %s: %d frames, %d asked", name, available, wanted)
        self.skipped.append(f"{name}: {available} frames < {wanted}")

    def sample(self, name: str, count: int, default: int | None = None) -> list[int] | None:
        """`frames` (or `default`) frame indices drawn without replacement; None if too few; all if unset."""
        wanted = self.frames or default
        if wanted is None:
            return list(range(count))
        if count < wanted:
            self._too_few(name, count, wanted)
            return None
        return [int(i) for i in self.random.choice(count, wanted, replace=False)]

    def keyframes(self, name: str, count: int, stride: int) -> list[int] | None:
        """Every stride-th frame; with `frames` set, a seeded sorted subset of that many keyframes."""
        indices = list(range(0, count, max(stride, 1)))
        if self.frames is None:
            return indices
        if len(indices) < self.frames:
            self._too_few(name, len(indices), self.frames)
            return None
        return sorted(indices[i] for i in self.random.choice(len(indices), self.frames, replace=False))


# ---------------------------------------------------------------------------------------------
# Loading one sequence: images through the released preprocessing, ground truth onto the same grid


def _resize_intrinsic(intrinsic: np.ndarray, source_wh, plan: ResizePlan, offset_yx) -> np.ndarray:
    """Intrinsics of the preprocessed image (pixel centres at integer coordinates)."""
    scale_x, scale_y = plan.resized_hw[1] / source_wh[0], plan.resized_hw[0] / source_wh[1]
    resized = np.array(intrinsic, dtype=np.float64)
    resized[0, 0] *= scale_x
    resized[1, 1] *= scale_y
    resized[0, 2] = (intrinsic[0, 2] + 0.5) * scale_x - 0.5 + plan.pad_left + offset_yx[1]
    resized[1, 2] = (intrinsic[1, 2] + 0.5) * scale_y - 0.5 + plan.pad_top - plan.crop_top + offset_yx[0]
    return resized


def _resample_map(source: np.ndarray, plan: ResizePlan, batch_hw, offset_yx):
    """Nearest-neighbour copy of a map covering the source image onto the preprocessed grid.

    Returns (map [H, W, ...], inside [H, W]): inside is False on padding.
    """

    def axis(length, offset, pad, crop, output, resized, source_length):
        in_image = np.arange(length) - offset  # position in this image's own output
        in_resized = in_image - pad + crop  # position in the resized image
        inside = (in_image >= 0) & (in_image < output) & (in_resized >= 0) & (in_resized < resized)
        index = np.clip(((in_resized + 0.5) * source_length / resized).astype(int), 0, source_length - 1)
        return index, inside

    rows, in_rows = axis(batch_hw[0], offset_yx[0], plan.pad_top, plan.crop_top, plan.output_hw[0],
                         plan.resized_hw[0], source.shape[0])
    cols, in_cols = axis(batch_hw[1], offset_yx[1], plan.pad_left, 0, plan.output_hw[1],
                         plan.resized_hw[1], source.shape[1])
    return source[np.ix_(rows, cols)], in_rows[:, None] & in_cols[None, :]


def _read_depth(path: Path, decoder) -> np.ndarray:
    if not path.is_file():
        raise InputError(f"depth map not found: {path}")
    with open_image(path) as image:  # the pixel limit and one-line errors of data.images
        return decoder(np.asarray(image).astype(np.float64))


def _load_sequence(source: _SequenceSource, size: tuple[int, int] | None = None) -> Sequence:
    paths = [frame.image for frame in source.frames]
    images = load_and_preprocess_images(paths, size=size)
    sequence = Sequence(source.name, source.group, images, image_paths=paths)
    if any(frame.extrinsic is None for frame in source.frames):
        return sequence
    sequence.extrinsics = np.stack([frame.extrinsic for frame in source.frames])
    if any(frame.intrinsic is None for frame in source.frames):
        return sequence
    batch_hw = tuple(images.shape[-2:])
    intrinsics, depths, points, valids = [], [], [], []
    for frame in source.frames:
        source_wh = image_size(frame.image)
        plan = plan_preprocessing(*source_wh, size=size)
        # Mixed sizes are padded (centred) to the largest in the batch.
        offset_yx = ((batch_hw[0] - plan.output_hw[0]) // 2, (batch_hw[1] - plan.output_hw[1]) // 2)
        intrinsics.append(_resize_intrinsic(frame.intrinsic, source_wh, plan, offset_yx))
        if frame.depth is None or source.depth_decoder is None:
            continue
        depth = _read_depth(frame.depth, source.depth_decoder)
        # The depth map covers the image's field of view, possibly at another resolution.
        depth_intrinsic = _resize_intrinsic(
            frame.intrinsic, source_wh, ResizePlan(depth.shape, 0, 0, 0, depth.shape), (0, 0)
        )
        world = unproject_depth_map_to_point_map(depth[None], frame.extrinsic[None], depth_intrinsic[None])[0]
        resampled, inside = _resample_map(np.concatenate([depth[..., None], world], -1), plan, batch_hw, offset_yx)
        valid = inside & (resampled[..., 0] > 0)
        depths.append(np.where(valid, resampled[..., 0], 0.0))
        points.append(resampled[..., 1:])
        valids.append(valid)
    sequence.intrinsics = np.stack(intrinsics)
    if depths and len(depths) == len(source.frames):
        sequence.depth = np.stack(depths).astype(np.float32)
        sequence.world_points = np.stack(points).astype(np.float32)
        sequence.valid = np.stack(valids)
    return sequence


# ---------------------------------------------------------------------------------------------
# Readers


def _require_dir(root, dataset: str) -> Path:
    if root is None:
        raise InputError(f"--root is required for dataset {dataset}")
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{dataset} root not found (or not a folder): {root}")
    return root


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_folder(root, selector: _FrameSelector) -> list[_SequenceSource]:
    """ROOT holding images (one scene) or sub-folders of images (one scene each); no ground truth."""
    root = _require_dir(root, "folder")
    scenes = [root] if _images_in(root) else sorted(d for d in root.iterdir() if d.is_dir() and _images_in(d))
    if not scenes:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root} or its sub-folders")
    sources = []
    for scene in scenes:
        images = _images_in(scene)
        chosen = selector.sample(scene.name, len(images))
        if chosen is not None:
            sources.append(_SequenceSource(scene.name, "folder", [_Frame(images[i]) for i in chosen]))
    return sources


def _read_jgz(path: Path):
    try:
        with gzip.open(path, "rt", encoding="utf-8") as stream:
            return json.load(stream)
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {type(exc).__name__}") from None


def pytorch3d_to_opencv(rotation, translation) -> np.ndarray:
    """PyTorch3D camera (X_cam = X_world R + T, +x left, +y up) -> OpenCV camera-from-world [3, 4]."""
    rotation = np.array(rotation, dtype=np.float64)
    translation = np.array(translation, dtype=np.float64)
    rotation[:, :2] *= -1
    translation[:2] *= -1
    return np.concatenate([rotation.T, translation[:, None]], 1)


def co3d_intrinsic(viewpoint: dict, size_hw) -> np.ndarray:
    """Pixel intrinsics from CO3D's NDC focal length / principal point."""
    height, width = size_hw
    half = np.array([width / 2, height / 2])
    if viewpoint.get("intrinsics_format", "ndc_norm_image_bounds") == "ndc_isotropic":
        half_scale = np.full(2, half.min())
    else:  # ndc_norm_image_bounds: each axis spans [-1, 1]
        half_scale = half
    focal = np.asarray(viewpoint["focal_length"], dtype=np.float64) * half_scale
    principal = half - np.asarray(viewpoint["principal_point"], dtype=np.float64) * half_scale
    return np.array([[focal[0], 0, principal[0]], [0, focal[1], principal[1]], [0, 0, 1]])


def read_co3d(root, selector: _FrameSelector) -> list[_SequenceSource]:
    """CO3Dv2: per category frame_annotations.jgz; the fewview_dev test split and quality filter if present."""
    root = _require_dir(root, "co3d")
    categories = sorted(d for d in root.iterdir() if (d / "frame_annotations.jgz").is_file())
    if not categories:
        raise InputError(f"no CO3D category folder with frame_annotations.jgz under {root}")
    sources = []
    for category in categories:
        frames_by_sequence: dict[str, dict[int, dict]] = {}
        for annotation in _read_jgz(category / "frame_annotations.jgz"):
            frames_by_sequence.setdefault(annotation["sequence_name"], {})[annotation["frame_number"]] = annotation
        wanted = _co3d_wanted_frames(category, frames_by_sequence)
        for sequence_name in sorted(wanted):
            annotations = [frames_by_sequence[sequence_name][n] for n in sorted(wanted[sequence_name])]
            name = f"{category.name}/{sequence_name}"
            if any(sum(a["viewpoint"]["T"]) > 1e5 for a in annotations):  # broken cameras, as released
                logger.warning("skipping %s: implausible camera translation", name)
                selector.skipped.append(f"{name}: implausible camera translation")
                continue
            chosen = selector.sample(name, len(annotations), DEFAULT_POSE_FRAMES)
            if chosen is None:
                continue
            frames = [
                _Frame(
                    root / annotations[i]["image"]["path"],
                    pytorch3d_to_opencv(annotations[i]["viewpoint"]["R"], annotations[i]["viewpoint"]["T"]),
                    co3d_intrinsic(annotations[i]["viewpoint"], annotations[i]["image"]["size"]),
                )
                for i in chosen
            ]
            sources.append(_SequenceSource(name, category.name, frames))
    return sources


def _co3d_wanted_frames(category: Path, frames_by_sequence) -> dict[str, set[int]]:
    """Frame numbers per sequence: the test subset of set_lists_fewview_dev.json if it exists."""
    quality_file = category / "sequence_annotations.jgz"
    good = set(frames_by_sequence)
    if quality_file.is_file():
        good = {
            s["sequence_name"] for s in _read_jgz(quality_file)
            if s.get("viewpoint_quality_score", 1.0) > CO3D_MIN_QUALITY
        }
    split_file = category / "set_lists" / "set_lists_fewview_dev.json"
    if not split_file.is_file():
        return {name: set(frames) for name, frames in frames_by_sequence.items() if name in good}
    try:
        test_entries = json.loads(split_file.read_text())["test"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise InputError(f"cannot read the test split in {split_file}: {type(exc).__name__}") from None
    wanted: dict[str, set[int]] = {}
    for sequence_name, frame_number, _path in test_entries:
        if sequence_name in good and frame_number in frames_by_sequence.get(sequence_name, {}):
            wanted.setdefault(sequence_name, set()).add(frame_number)
    return wanted


def parse_re10k_cameras(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """A RealEstate10K camera file: URL line, then `timestamp fx fy cx cy 0 0 <3x4 row-major w2c>`.

    Returns (timestamps, normalised intrinsics [N, 4] (fx, fy, cx, cy as fractions of W, H), [N, 3, 4]).
    """
    lines = [line.split() for line in path.read_text().splitlines()[1:] if line.strip()]
    if not lines or any(len(line) != 19 for line in lines):
        raise InputError(f"not a RealEstate10K camera file (19 numbers per line after the URL): {path}")
    try:
        values = np.array([[float(v) for v in line[1:]] for line in lines])
    except ValueError:
        raise InputError(f"non-numeric camera values in {path}") from None
    return [line[0] for line in lines], values[:, :4], values[:, 6:].reshape(-1, 3, 4)


def _re10k_camera_files(root: Path) -> list[Path]:
    for folder in (root / "metadata" / "test", root / "test", root):
        files = sorted(folder.glob("*.txt")) if folder.is_dir() else []
        if files:
            return files
    raise InputError(f"no RealEstate10K camera files (*.txt) in {root}, its test/ or metadata/test/")


def _re10k_frame(folders: list[Path], index: int, timestamp: str) -> Path | None:
    for folder in folders:
        for name in (f"{index:04d}.png", f"{timestamp}.png", f"{timestamp}.jpg"):
            if (folder / name).is_file():
                return folder / name
    return None


def read_re10k(root, selector: _FrameSelector) -> list[_SequenceSource]:
    """RealEstate10K camera files; frames extracted to <seq>/images/ (or <seq>/) next to ROOT or the file."""
    root = _require_dir(root, "re10k")
    sources = []
    for camera_file in _re10k_camera_files(root):
        name = camera_file.stem
        timestamps, normalised, extrinsics = parse_re10k_cameras(camera_file)
        folders = [root / name / "images", root / name, camera_file.parent / name]
        images = [_re10k_frame(folders, i, stamp) for i, stamp in enumerate(timestamps)]
        if images[0] is None:
            logger.warning("skipping %s: no extracted frames in %s", name, folders[0])
            selector.skipped.append(f"{name}: no extracted frames")
            continue
        chosen = selector.sample(name, len(timestamps), DEFAULT_POSE_FRAMES)
        if chosen is None:
            continue
        missing = [images[i] is None for i in chosen]
        if any(missing):
            raise InputError(f"RealEstate10K frame {chosen[missing.index(True)]} of {name} not found in {folders[0]}")
        frames = []
        for i in chosen:
            width, height = image_size(images[i])
            fx, fy, cx, cy = normalised[i] * [width, height, width, height]
            frames.append(_Frame(images[i], extrinsics[i], np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])))
        sources.append(_SequenceSource(name, "re10k", frames))
    return sources


def _metric_depth(raw: np.ndarray, invalid_raw: float | None = None) -> np.ndarray:
    """Millimetre PNG values -> metres; invalid (0) outside [1e-3, 10] m (CUT3R's rules)."""
    depth = raw / 1000.0
    invalid = (depth > 10) | (depth < 1e-3) | ~np.isfinite(depth)
    if invalid_raw is not None:
        invalid |= raw == invalid_raw
    return np.where(invalid, 0.0, depth)


def _seven_scenes_depth(raw: np.ndarray) -> np.ndarray:
    return _metric_depth(raw, invalid_raw=65535)


def _load_pose(path: Path) -> np.ndarray:
    try:
        pose = np.loadtxt(path, dtype=np.float64)
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read pose {path}: {type(exc).__name__}") from None
    if pose.shape != (4, 4):
        raise InputError(f"pose file must hold a 4x4 matrix: {path}")
    return pose


def read_seven_scenes(root, selector: _FrameSelector, stride: int = KEYFRAME_STRIDE) -> list[_SequenceSource]:
    """7-Scenes test sequences (TestSplit.txt; all seq-XX folders without it), every stride-th frame."""
    root = _require_dir(root, "7scenes")
    sources = []
    for scene in sorted(d for d in root.iterdir() if d.is_dir()):
        split = scene / "TestSplit.txt"
        if split.is_file():
            numbers = ["".join(filter(str.isdigit, line)) for line in split.read_text().split()]
            sequences = [scene / f"seq-{int(n):02d}" for n in numbers if n]
        else:
            sequences = sorted(scene.glob("seq-*"))
        for sequence in sequences:
            colors = sorted(sequence.glob("frame-*.color.png"))
            if not colors:
                continue
            name = f"{scene.name}/{sequence.name}"
            chosen = selector.keyframes(name, len(colors), stride)
            if chosen is None:
                continue
            frames = []
            for i in chosen:
                stem = colors[i].name[: -len(".color.png")]
                # The registered ("proj") depth is what CUT3R evaluates against; raw depth otherwise.
                depth = sequence / f"{stem}.depth.proj.png"
                if not depth.is_file():
                    depth = sequence / f"{stem}.depth.png"
                camera_to_world = _load_pose(sequence / f"{stem}.pose.txt")
                world_to_camera = closed_form_inverse_se3(camera_to_world)[:3]
                frames.append(_Frame(colors[i], world_to_camera, SEVEN_SCENES_INTRINSIC, depth))
            sources.append(_SequenceSource(name, scene.name, frames, _seven_scenes_depth))
    if not sources and not selector.skipped:
        raise InputError(f"no 7-Scenes sequences (<scene>/seq-NN/frame-NNNNNN.color.png) under {root}")
    return sources


def parse_nrgbd_poses(path: Path) -> list[np.ndarray | None]:
    """NRGBD poses.txt: 4 lines per frame (4x4 camera-to-world, OpenGL); None where a pose is 'nan'."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if len(lines) % 4:
        raise InputError(f"{path} must hold 4 lines per frame, has {len(lines)} lines")
    poses = []
    for start in range(0, len(lines), 4):
        block = lines[start : start + 4]
        if any("nan" in line.lower() for line in block):
            poses.append(None)
            continue
        try:
            poses.append(np.array([[float(v) for v in line.split()] for line in block]).reshape(4, 4))
        except ValueError:
            raise InputError(f"bad pose at line {start + 1} of {path}") from None
    return poses


def read_nrgbd(root, selector: _FrameSelector, stride: int = KEYFRAME_STRIDE) -> list[_SequenceSource]:
    """Neural RGB-D scenes, every min(stride, n // 2)-th frame; frames without a valid pose are dropped."""
    root = _require_dir(root, "nrgbd")
    scenes = sorted(d for d in root.iterdir() if (d / "poses.txt").is_file() and (d / "images").is_dir())
    if not scenes:
        raise InputError(f"no NRGBD scene (<scene>/images/, <scene>/poses.txt) under {root}")
    gl_to_cv = np.diag([1.0, -1.0, -1.0, 1.0])  # flip the camera's y and z axes
    sources = []
    for scene in scenes:
        poses = parse_nrgbd_poses(scene / "poses.txt")
        count = len(list((scene / "images").glob("img*.png")))
        chosen = selector.keyframes(scene.name, count, min(stride, count // 2))
        if chosen is None:
            continue
        frames = []
        for i in chosen:
            if i >= len(poses) or poses[i] is None:
                logger.debug("%s frame %d has no valid pose; dropped", scene.name, i)
                continue
            world_from_camera = poses[i] @ gl_to_cv
            frames.append(_Frame(scene / "images" / f"img{i}.png", closed_form_inverse_se3(world_from_camera)[:3],
                                 NRGBD_INTRINSIC, scene / "depth" / f"depth{i}.png"))
        if frames:
            sources.append(_SequenceSource(scene.name, scene.name, frames, _metric_depth))
    return sources


class SyntheticReader(DatasetReader):
    """Scenes of a named synthetic set; `sources` are their seeds, rendered during iteration."""

    def __init__(self, spec=None, num_views: int | None = None, max_scenes: int | None = None,
                 image_size: tuple[int, int] | None = None):
        from .synthetic import SYNTHETIC_VAL, check_image_size

        self.spec = spec or SYNTHETIC_VAL
        self.num_views = num_views or self.spec.num_views
        self.image_size = check_image_size(image_size or self.spec.image_size)
        super().__init__(self.spec.name, list(self.spec.seeds[:max_scenes]), [])

    def __iter__(self) -> Iterator[Sequence]:
        from .synthetic import render_scene

        for seed in self.sources:
            scene = render_scene(seed, self.num_views, self.image_size, self.spec.trajectory)
            yield Sequence(
                f"seed-{seed}", self.spec.name, torch.from_numpy(scene.images),
                extrinsics=scene.extrinsics.astype(np.float64), intrinsics=scene.intrinsics.astype(np.float64),
                depth=scene.depth, world_points=scene.world_points, valid=scene.valid,
            )


_READERS = {"folder": read_folder, "co3d": read_co3d, "re10k": read_re10k, "7scenes": read_seven_scenes,
            "nrgbd": read_nrgbd}


def open_dataset(name: str, root=None, frames: int | None = None, seed: int = 0,
                 max_scenes: int | None = None, image_size: tuple[int, int] | None = None) -> DatasetReader:
    """List a dataset's sequences and select their frames (layout errors raise InputError here).

    `image_size` (H, W) renders a synthetic set (synthetic-val, synthetic-video) at another size (quick runs
    of small models), or is the size real images are preprocessed to.
    """
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if max_scenes is not None and max_scenes < 1:
        raise InputError(f"--max-scenes must be at least 1, got {max_scenes}")
    from .synthetic import SYNTHETIC_SETS

    if name in SYNTHETIC_SETS:
        if frames is not None and frames < 1:
            raise InputError(f"--frames must be at least 1, got {frames}")
        return SyntheticReader(SYNTHETIC_SETS[name], num_views=frames, max_scenes=max_scenes, image_size=image_size)
    selector = _FrameSelector(frames, seed)
    sources = _READERS[name](root, selector)
    if max_scenes is not None:
        sources = sources[:max_scenes]
    if not sources:
        raise InputError(f"no usable sequence in {root} ({len(selector.skipped)} skipped, see the warnings)")
    reader = DatasetReader(name, sources, selector.skipped)
    if image_size is not None:
        from .images import check_size

        reader.image_size = check_size(image_size)
    return reader
