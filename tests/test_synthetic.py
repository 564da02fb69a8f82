"""The synthetic renderer: exact ground truth, determinism, camera spread, texture detail, speed."""

import time

import numpy as np
import pytest

from qvggt_export.data.synthetic import (
    CALIBRATION_SEEDS,
    SYNTHETIC_SETS,
    SYNTHETIC_VAL,
    SYNTHETIC_VIDEO,
    TRAIN_SEEDS,
    VAL_SEEDS,
    VIDEO_VAL_SEEDS,
    _layout,
    _render_view,
    calibration_scenes,
    render_scene,
    render_views,
)
from qvggt_export.errors import InputError
from qvggt_export.geometry import closed_form_inverse_se3, unproject_depth_map_to_point_map


@pytest.fixture(scope="module")
def scene():
    return render_scene(seed=11, num_views=4, image_size=(56, 84))


def test_shapes_dtypes_and_ranges(scene):
    assert scene.images.shape == (4, 3, 56, 84) and scene.images.dtype == np.float32
    assert scene.depth.shape == (4, 56, 84) and scene.world_points.shape == (4, 56, 84, 3)
    assert scene.extrinsics.shape == (4, 3, 4) and scene.intrinsics.shape == (4, 3, 3)
    assert 0.0 <= scene.images.min() and scene.images.max() <= 1.0
    assert scene.valid.all()  # a closed room: every ray hits something
    assert (scene.depth > 0.5).all() and (scene.depth < 15).all()
    # Principal point at the image centre (the model's decoding assumes it), focal lengths varied.
    np.testing.assert_array_equal(scene.intrinsics[:, 0, 2], 42.0)
    np.testing.assert_array_equal(scene.intrinsics[:, 1, 2], 28.0)
    assert scene.intrinsics[:, 0, 0].std() > 1.0


def test_depth_and_points_agree_with_unprojection_through_own_cameras(scene):
    points = unproject_depth_map_to_point_map(scene.depth, scene.extrinsics, scene.intrinsics)
    error = np.linalg.norm(points - scene.world_points, axis=-1)
    assert (error / np.linalg.norm(scene.world_points, axis=-1)).max() < 1e-5


def test_world_points_project_back_to_their_pixels(scene):
    extrinsics = scene.extrinsics.astype(np.float64)
    cam = np.einsum("sij,shwj->shwi", extrinsics[:, :, :3], scene.world_points) + extrinsics[:, None, None, :, 3]
    np.testing.assert_allclose(cam[..., 2], scene.depth, rtol=1e-5)
    pixels = np.einsum("sij,shwj->shwi", scene.intrinsics.astype(np.float64), cam)
    u, v = pixels[..., 0] / pixels[..., 2], pixels[..., 1] / pixels[..., 2]
    rows, cols = np.meshgrid(np.arange(56), np.arange(84), indexing="ij")
    assert np.abs(u - cols).max() < 1e-3 and np.abs(v - rows).max() < 1e-3


def test_first_camera_frame_helper(scene):
    rebased = scene.in_first_camera_frame()
    np.testing.assert_allclose(rebased.extrinsics[0], np.eye(3, 4), atol=1e-6)
    points = unproject_depth_map_to_point_map(rebased.depth, rebased.extrinsics, rebased.intrinsics)
    np.testing.assert_allclose(points, rebased.world_points, atol=1e-4)
    # World points of view 0 are now its camera coordinates: z equals the depth.
    np.testing.assert_allclose(rebased.world_points[0, ..., 2], scene.depth[0], rtol=1e-5)


def test_deterministic_by_seed():
    first, again, other = (render_scene(s, 2, (28, 42)) for s in (5, 5, 6))
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.extrinsics, again.extrinsics)
    assert np.abs(first.images - other.images).mean() > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cameras_are_spread_and_share_a_view_of_the_centre(seed):
    scene = render_scene(seed, 10, (28, 42))
    centres = closed_form_inverse_se3(scene.extrinsics.astype(np.float64))[:, :3, 3]
    baselines = np.linalg.norm(centres[:, None] - centres[None], axis=-1)[np.triu_indices(10, 1)]
    assert baselines.min() > 0.15 and baselines.max() > 2.0
    assert np.linalg.norm(centres[0]) > 1.0  # the first camera is not at the world origin
    # The optical axes pass near one common point (least squares over the axes).
    axes = scene.extrinsics[:, 2, :3].astype(np.float64)  # third row of R: the viewing direction
    projectors = np.eye(3) - axes[:, :, None] * axes[:, None, :]  # onto each axis' normal plane
    common = np.linalg.solve(projectors.sum(0), np.einsum("sij,sj->i", projectors, centres))
    distances = np.linalg.norm(np.einsum("sij,sj->si", projectors, common - centres), axis=1)
    assert distances.max() < 1.0


def test_textures_have_fine_detail():
    scene = render_scene(3, 3, (112, 168))
    gradient = np.abs(np.diff(scene.images, axis=3)).mean(1)
    assert (gradient > 0.03).mean() > 0.3


def test_seed_ranges_are_disjoint_and_sets_use_their_range():
    ranges = sorted([TRAIN_SEEDS, VAL_SEEDS, VIDEO_VAL_SEEDS, CALIBRATION_SEEDS], key=lambda r: r.start)
    assert all(earlier.stop <= later.start for earlier, later in zip(ranges, ranges[1:]))
    assert set(SYNTHETIC_VAL.seeds) <= set(VAL_SEEDS) and len(SYNTHETIC_VAL.seeds) == 10
    assert set(SYNTHETIC_VIDEO.seeds) <= set(VIDEO_VAL_SEEDS) and len(SYNTHETIC_VIDEO.seeds) >= 10
    assert SYNTHETIC_VIDEO.num_views >= 8 and SYNTHETIC_VIDEO.trajectory == "video"
    assert set(SYNTHETIC_SETS) == {"synthetic-val", "synthetic-video"}
    scenes = calibration_scenes(2, num_views=2, image_size=(28, 28))
    assert [s.seed for s in scenes] == list(CALIBRATION_SEEDS[:2])


@pytest.mark.parametrize("size", [(50, 84), (56, 0), (-14, 28)])
def test_sizes_must_be_multiples_of_14(size):
    with pytest.raises(InputError):
        render_scene(0, 1, size)


def test_a_518x518_view_renders_well_under_a_second():
    layout = _layout(1, 1, (518, 518))
    timings = []
    for _ in range(2):
        start = time.perf_counter()
        _render_view(layout, layout.extrinsics[0], layout.intrinsics[0], (518, 518))
        timings.append(time.perf_counter() - start)
    # ~0.3 s on an idle core; the bound leaves room for a loaded CI machine.
    assert min(timings) < 2.0


def _relative_rotation_deg(scene, i, j):
    rotation = scene.extrinsics[i, :, :3].astype(np.float64) @ scene.extrinsics[j, :, :3].astype(np.float64).T
    return np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))


def _centres(scene):
    return closed_form_inverse_se3(scene.extrinsics.astype(np.float64))[:, :3, 3]


def test_trajectory_changes_only_the_cameras():
    arc, orbit = render_scene(4, 3, (28, 42)), render_scene(4, 3, (28, 42), "orbit")
    np.testing.assert_array_equal(arc.images, render_scene(4, 3, (28, 42), "arc").images)
    # Same room, objects and lights: the cameras are drawn last from the seed's stream.
    assert repr(_layout(4, 3, (28, 42), "orbit").room) == repr(_layout(4, 3, (28, 42)).room)
    assert repr(_layout(4, 3, (28, 42), "pan").objects) == repr(_layout(4, 3, (28, 42)).objects)
    assert np.abs(arc.extrinsics - orbit.extrinsics).max() > 0.1
    again = render_scene(4, 3, (28, 42), "orbit")
    np.testing.assert_array_equal(orbit.images, again.images)
    np.testing.assert_array_equal(orbit.extrinsics, again.extrinsics)
    with pytest.raises(InputError, match="trajectory"):
        render_scene(4, 3, (28, 42), "spiral")


def test_render_views_shows_the_seeds_scene_from_any_camera():
    orbit = render_scene(4, 3, (28, 42), "orbit")
    same = render_views(4, orbit.extrinsics, orbit.intrinsics, (28, 42))
    for field in ("images", "depth", "extrinsics", "intrinsics", "world_points", "valid"):
        np.testing.assert_array_equal(getattr(same, field), getattr(orbit, field), err_msg=field)
    # A camera stepped 0.3 m back along its axis sees the same world points, just farther and smaller.
    stepped = orbit.extrinsics[:1].astype(np.float64).copy()
    stepped[0, 2, 3] += 0.3
    back = render_views(4, stepped, orbit.intrinsics[:1], (28, 42))
    assert np.abs(back.images - orbit.images[:1]).mean() > 0.02
    centre = slice(10, 18), slice(17, 25)  # the middle of the view: what both cameras see
    assert np.median(back.depth[0][centre] - orbit.depth[0][centre]) == pytest.approx(0.3, abs=0.05)
    with pytest.raises(InputError, match="extrinsics"):
        render_views(4, orbit.extrinsics[0], orbit.intrinsics[0], (28, 42))


@pytest.mark.parametrize("seed", [20, 21, 22])
def test_video_clips_are_smooth_and_narrow(seed):
    for kind, (low, high) in {"orbit": (9, 62), "pan": (19, 62), "forward": (0, 16)}.items():
        scene = render_scene(seed, 8, (28, 42), kind)
        assert scene.valid.all() and scene.depth.min() > 0.5  # inside the room, clear of the objects
        steps = [_relative_rotation_deg(scene, i, i + 1) for i in range(7)]
        span = max(_relative_rotation_deg(scene, 0, j) for j in range(8))
        assert max(steps) < 15, (kind, steps)  # consecutive frames of a clip, not shuffled views
        assert low <= span <= high, (kind, span)
        np.testing.assert_array_equal(scene.intrinsics, scene.intrinsics[:1].repeat(8, 0))  # one camera
        centres = _centres(scene)
        if kind == "forward":  # it walks along its viewing direction
            walk = centres[-1] - centres[0]
            assert np.linalg.norm(walk) > 0.35 and walk @ scene.extrinsics[0, 2, :3] > 0.6 * np.linalg.norm(walk)


def test_video_mixes_the_three_kinds():
    spans = [max(_relative_rotation_deg(s, 0, j) for j in range(4))
             for s in (render_scene(seed, 4, (28, 42), "video") for seed in SYNTHETIC_VIDEO.seeds)]
    # Forward walks barely turn; orbits and pans turn 10-60 degrees: the split holds both.
    assert min(spans) < 10 and max(spans) > 15
