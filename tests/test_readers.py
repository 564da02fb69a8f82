"""Each reader parses files written here in the dataset's real on-disk format."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qvggt_export.data.readers import (
    _FrameSelector,
    open_dataset,
    parse_nrgbd_poses,
    read_seven_scenes,
)
from qvggt_export.errors import InputError
from qvggt_export.geometry import quat_to_mat, unproject_depth_map_to_point_map


def write_image(path: Path, width: int, height: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def random_rotation(seed: int) -> np.ndarray:
    return quat_to_mat(torch.from_numpy(np.random.default_rng(seed).normal(size=4))).numpy()


def pose_matrix(seed: int) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = random_rotation(seed)
    pose[:3, 3] = np.random.default_rng(seed + 100).normal(size=3)
    return pose


def to_camera(extrinsic: np.ndarray, point: np.ndarray) -> np.ndarray:
    return extrinsic[:, :3] @ point + extrinsic[:, 3]


# ---------------------------------------------------------------------------------------------- 7-Scenes


def write_depth_png(path: Path, millimetres: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(millimetres.astype(np.uint16)).save(path)


@pytest.fixture
def seven_scenes(tmp_path):
    root = tmp_path / "7scenes"
    (root / "chess").mkdir(parents=True)
    (root / "chess" / "TestSplit.txt").write_text("sequence2\n")
    for sequence in ("seq-01", "seq-02"):  # seq-01 is a training sequence: not read
        for frame in range(5):
            stem = root / "chess" / sequence / f"frame-{frame:06d}"
            write_image(Path(f"{stem}.color.png"), 640, 480, seed=frame)
            depth = np.full((480, 640), 2000)
            depth[:40, :] = 65535  # 7-Scenes' invalid marker
            depth[-40:, :] = 12000  # beyond 10 m: invalid
            write_depth_png(Path(f"{stem}.depth.png"), depth)
            # The dataset's pose files: camera-to-world 4x4, tab separated.
            Path(f"{stem}.pose.txt").write_text(
                "\n".join("\t".join(f"{v:.9e}" for v in row) for row in pose_matrix(frame)) + "\n"
            )
    return root


def test_seven_scenes_reader(seven_scenes):
    selector = _FrameSelector(None, 0)
    (source,) = read_seven_scenes(seven_scenes, selector, stride=2)
    assert source.name == "chess/seq-02" and source.group == "chess"
    assert [f.image.name for f in source.frames] == [f"frame-{i:06d}.color.png" for i in (0, 2, 4)]
    reader = open_dataset("7scenes", seven_scenes)  # protocol stride 100: frame 0 only
    (sequence,) = list(reader)
    assert sequence.images.shape == (1, 3, 392, 518)
    # A point 2 m straight ahead of camera 0 (7-Scenes poses are camera-to-world, z forward).
    ahead = pose_matrix(0) @ np.array([0, 0, 2.0, 1])
    np.testing.assert_allclose(to_camera(sequence.extrinsics[0], ahead[:3]), [0, 0, 2], atol=1e-6)
    # 640x480 -> 518x392 (released crop mode), pixel centres at integer coordinates.
    scale_x, scale_y = 518 / 640, 392 / 480
    expected = np.array([[525 * scale_x, 0, 320.5 * scale_x - 0.5],
                         [0, 525 * scale_y, 240.5 * scale_y - 0.5],
                         [0, 0, 1]])
    np.testing.assert_allclose(sequence.intrinsics[0], expected, rtol=1e-12)
    valid = sequence.valid[0]
    assert not valid[:32].any() and not valid[-32:].any() and valid[40:-40].all()
    np.testing.assert_allclose(sequence.depth[0][valid], 2.0)
    # Ground-truth points sit at depth 2 in camera 0 and match unprojection through the resized camera
    # up to the nearest-neighbour resampling (< 0.6 px -> < 3 mm at 2 m).
    extrinsic = sequence.extrinsics[0]
    camera_points = np.einsum("ij,hwj->hwi", extrinsic[:, :3], sequence.world_points[0]) + extrinsic[:, 3]
    np.testing.assert_allclose(camera_points[valid][:, 2], 2.0, atol=1e-5)
    unprojected = unproject_depth_map_to_point_map(sequence.depth, sequence.extrinsics, sequence.intrinsics)[0]
    assert np.abs(unprojected[valid] - sequence.world_points[0][valid]).max() < 3e-3


# ---------------------------------------------------------------------------------------------- NRGBD


def test_nrgbd_reader(tmp_path):
    scene = tmp_path / "nrgbd" / "kitchen"
    lines = []
    for frame in range(8):
        write_image(scene / "images" / f"img{frame}.png", 640, 480, seed=frame)
        write_depth_png(scene / "depth" / f"depth{frame}.png", np.full((480, 640), 1500))
        pose = pose_matrix(frame)
        lines += ["nan nan nan nan"] * 4 if frame == 1 else [" ".join(f"{v:.9f}" for v in row) for row in pose]
    (scene / "poses.txt").write_text("\n".join(lines) + "\n")
    poses = parse_nrgbd_poses(scene / "poses.txt")
    assert len(poses) == 8 and poses[1] is None
    (sequence,) = list(open_dataset("nrgbd", tmp_path / "nrgbd"))
    # Stride min(100, 8 // 2) = 4: frames 0 and 4.
    assert [p.name for p in sequence.image_paths] == ["img0.png", "img4.png"]
    for index, frame in enumerate((0, 4)):
        # OpenGL camera looks down -z: a point 1.5 m along its -z is 1.5 m ahead in OpenCV.
        ahead = pose_matrix(frame) @ np.array([0, 0, -1.5, 1])
        np.testing.assert_allclose(to_camera(sequence.extrinsics[index], ahead[:3]), [0, 0, 1.5], atol=1e-6)
    np.testing.assert_allclose(sequence.intrinsics[:, 0, 0], 554.2562584220408 * 518 / 640)
    assert sequence.valid.all() and np.allclose(sequence.depth, 1.5)


# ---------------------------------------------------------------------------------------------- CO3D


def write_jgz(path: Path, payload) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as stream:
        json.dump(payload, stream)


@pytest.fixture
def co3d(tmp_path):
    root = tmp_path / "co3d"
    category = root / "apple"
    frames, sequences, test_split = [], [], []
    layout = (("110_13051_23361", 12, 2.0), ("189_20393_38136", 5, 1.5), ("bad_quality", 12, 0.3))
    for sequence, count, quality in layout:
        sequences.append({"sequence_name": sequence, "category": "apple", "viewpoint_quality_score": quality})
        for number in range(1, count + 1):
            path = f"apple/{sequence}/images/frame{number:06d}.jpg"
            write_image(root / path, 400, 300, seed=number)
            rotation, translation = random_rotation(number), np.random.default_rng(number).normal(size=3)
            frames.append({
                "sequence_name": sequence, "frame_number": number, "frame_timestamp": number / 30,
                "image": {"path": path, "size": [300, 400]},
                "viewpoint": {"R": rotation.tolist(), "T": translation.tolist(), "focal_length": [2.0, 2.0],
                              "principal_point": [0.1, -0.2], "intrinsics_format": "ndc_isotropic"},
            })
            test_split.append([sequence, number, path])
    write_jgz(category / "frame_annotations.jgz", frames)
    write_jgz(category / "sequence_annotations.jgz", sequences)
    (category / "set_lists").mkdir()
    split = {"train": [], "val": [], "test": test_split}
    (category / "set_lists" / "set_lists_fewview_dev.json").write_text(json.dumps(split))
    return root


def test_co3d_reader(co3d):
    reader = open_dataset("co3d", co3d, frames=10, seed=3)
    assert len(reader) == 1  # low quality dropped; 5-frame sequence skipped and reported
    assert any("189_20393_38136" in entry for entry in reader.skipped)
    (sequence,) = list(reader)
    assert sequence.group == "apple" and sequence.images.shape == (10, 3, 392, 518)
    # Seeded sampling as the released evaluation: RandomState(seed).choice(n, frames, replace=False).
    expected_numbers = np.random.RandomState(3).choice(12, 10, replace=False) + 1
    assert [p.name for p in sequence.image_paths] == [f"frame{n:06d}.jpg" for n in expected_numbers]
    point = np.array([0.3, -0.4, 2.0])
    for index, number in enumerate(expected_numbers):
        rotation, translation = random_rotation(number), np.random.default_rng(number).normal(size=3)
        pytorch3d_camera = point @ rotation + translation  # PyTorch3D: row vectors, +x left, +y up
        opencv_camera = pytorch3d_camera * [-1, -1, 1]
        np.testing.assert_allclose(to_camera(sequence.extrinsics[index], point), opencv_camera, atol=1e-9)
    # NDC isotropic (scale = min(W, H) / 2 = 150): f = 300 px, c = (200 - 0.1 * 150, 150 + 0.2 * 150).
    scale = 518 / 400
    np.testing.assert_allclose(sequence.intrinsics[0, 0, 0], 300 * scale)
    expected_centre = [(185 + 0.5) * scale - 0.5, (180 + 0.5) * 392 / 300 - 0.5]
    np.testing.assert_allclose(sequence.intrinsics[0, :2, 2], expected_centre)


# ---------------------------------------------------------------------------------------------- RealEstate10K


def write_re10k(root: Path, name: str, count: int, frames_dir: Path | None, by_timestamp=False) -> None:
    lines = [f"https://www.youtube.com/watch?v={name}"]
    for index in range(count):
        timestamp = 33366666 * (index + 1)
        extrinsic = pose_matrix(index)[:3]
        intrinsics = ["0.9", "1.6", "0.5", "0.5", "0", "0"]
        lines.append(" ".join([str(timestamp), *intrinsics, *(f"{v:.9f}" for v in extrinsic.ravel())]))
        if frames_dir is not None:
            write_image(frames_dir / (f"{timestamp}.jpg" if by_timestamp else f"{index:04d}.png"), 64, 36, seed=index)
    (root / "test").mkdir(parents=True, exist_ok=True)
    (root / "test" / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_re10k_reader(tmp_path):
    root = tmp_path / "re10k"
    write_re10k(root, "000c3ab189999a83", 12, root / "000c3ab189999a83" / "images")
    write_re10k(root, "1a2b3c4d5e6f7a8b", 10, root / "test" / "1a2b3c4d5e6f7a8b", by_timestamp=True)
    write_re10k(root, "no_frames_extracted", 12, None)
    reader = open_dataset("re10k", root, seed=0)
    assert [s.name for s in reader.sources] == ["000c3ab189999a83", "1a2b3c4d5e6f7a8b"]
    assert any("no_frames_extracted" in entry for entry in reader.skipped)
    first, second = list(reader)
    chosen = np.random.RandomState(0).choice(12, 10, replace=False)
    assert [p.name for p in first.image_paths] == [f"{i:04d}.png" for i in chosen]
    np.testing.assert_allclose(first.extrinsics, np.stack([pose_matrix(i)[:3] for i in chosen]), atol=1e-8)
    # Normalised intrinsics times the frame size (64x36), then the resize to 518 wide.
    scale = 518 / 64
    np.testing.assert_allclose(first.intrinsics[:, 0, 0], 0.9 * 64 * scale)
    np.testing.assert_allclose(first.intrinsics[:, 1, 1], 1.6 * 36 * (first.images.shape[2] / 36))
    assert second.images.shape[0] == 10


def test_re10k_malformed_camera_file_names_the_file(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "broken.txt").write_text("url\n123 0.5 0.5\n")
    with pytest.raises(InputError, match="broken.txt"):
        open_dataset("re10k", tmp_path)


# ---------------------------------------------------------------------------------------------- folders and errors


def test_folder_reader(tmp_path):
    for index in range(4):
        write_image(tmp_path / "scene_a" / f"{index}.png", 56, 42, seed=index)
    for index in range(2):
        write_image(tmp_path / "scene_b" / f"{index}.jpg", 56, 42, seed=index)
    (tmp_path / "scene_a" / "notes.txt").write_text("ignored")
    reader = open_dataset("folder", tmp_path, frames=3, seed=1)
    assert [s.name for s in reader.sources] == ["scene_a"] and len(reader.skipped) == 1
    (sequence,) = list(reader)
    assert sequence.extrinsics is None and sequence.images.shape == (3, 3, 392, 518)
    everything = open_dataset("folder", tmp_path / "scene_a")  # images directly in ROOT: one scene
    assert len(list(everything)[0].image_paths) == 4


@pytest.mark.parametrize("dataset", ["folder", "co3d", "re10k", "7scenes", "nrgbd"])
def test_missing_root_and_wrong_layout_raise_one_line_errors(tmp_path, dataset):
    for root in (tmp_path / "missing", tmp_path):  # missing, then an empty folder
        with pytest.raises(InputError) as info:
            open_dataset(dataset, root)
        assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_all_sequences_too_short_is_an_error(tmp_path):
    write_image(tmp_path / "only" / "0.png", 28, 28)
    with pytest.raises(InputError, match="no usable sequence"):
        open_dataset("folder", tmp_path, frames=5)


def test_synthetic_val_reader():
    reader = open_dataset("synthetic-val", frames=2, max_scenes=1)
    (sequence,) = list(reader)
    assert sequence.images.shape == (2, 3, 392, 518) and sequence.valid.all()
