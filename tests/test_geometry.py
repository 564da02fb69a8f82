"""Parity of pose encoding and depth unprojection with the released VGGT (fixtures), plus conventions."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qvggt_export.geometry import (
    closed_form_inverse_se3,
    extri_intri_to_pose_encoding,
    mat_to_quat,
    pose_encoding_to_extri_intri,
    quat_to_mat,
    to_first_camera_frame,
    unproject_depth_map_to_point_map,
)

FIXTURES = Path(__file__).parent / "fixtures" / "geometry"


@pytest.fixture(scope="module")
def cases():
    assert "note" in json.loads((FIXTURES / "config.json").read_text())
    return dict(np.load(FIXTURES / "cases.npz"))


def assert_parity(actual, expected):
    """The project's bar: float32 max abs error <= 1e-4 + 1e-4 * max|expected|."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    error = np.abs(actual - expected).max()
    assert error <= 1e-4 + 1e-4 * np.abs(expected).max(), error


def test_decode_pose_encoding_matches_released(cases):
    image_size_hw = tuple(int(v) for v in cases["image_size_hw"])
    extrinsics, intrinsics = pose_encoding_to_extri_intri(torch.from_numpy(cases["pose_enc"]), image_size_hw)
    assert_parity(extrinsics, cases["extrinsic"])
    assert_parity(intrinsics, cases["intrinsic"])


def test_encode_after_decode_matches_released_roundtrip(cases):
    image_size_hw = tuple(int(v) for v in cases["image_size_hw"])
    extrinsics, intrinsics = pose_encoding_to_extri_intri(torch.from_numpy(cases["pose_enc"]), image_size_hw)
    encoding = extri_intri_to_pose_encoding(extrinsics, intrinsics, image_size_hw)
    assert encoding.dtype == torch.float32
    assert_parity(encoding, cases["pose_enc_roundtrip"])


@pytest.mark.parametrize("as_torch", [False, True])
def test_unprojection_matches_released(cases, as_torch):
    inputs = [cases["depth"], cases["extrinsic"][0], cases["intrinsic"][0]]
    if as_torch:
        inputs = [torch.from_numpy(x) for x in inputs]
    points = unproject_depth_map_to_point_map(*inputs)
    assert isinstance(points, np.ndarray)
    assert_parity(points, cases["world_points"])


def test_decode_without_intrinsics_returns_none(cases):
    extrinsics, intrinsics = pose_encoding_to_extri_intri(
        torch.from_numpy(cases["pose_enc"]), build_intrinsics=False
    )
    assert intrinsics is None and extrinsics.shape == (2, 5, 3, 4)


def test_quaternion_convention_is_scalar_last_and_standardised():
    # 90 degrees about z: (x, y, z, w) = (0, 0, sin 45, cos 45).
    quaternion = torch.tensor([0.0, 0.0, -np.sqrt(0.5), -np.sqrt(0.5)], dtype=torch.float64)
    rotation = quat_to_mat(quaternion)
    assert torch.allclose(rotation, torch.tensor([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64))
    assert torch.allclose(mat_to_quat(rotation), -quaternion, atol=1e-12)


def test_mat_to_quat_inverts_quat_to_mat_for_all_branches():
    generator = torch.Generator().manual_seed(0)
    quaternions = torch.randn(4000, 4, generator=generator, dtype=torch.float64)
    quaternions = quaternions / quaternions.norm(dim=-1, keepdim=True)
    # Rotations near 180 degrees exercise the x/y/z branches of the conversion.
    half_turns = [[1.0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0.6, 0.8, 0, 0]] * 2 + [[0, 0, 0, 1]] * 2
    quaternions[:10] = torch.tensor(half_turns, dtype=torch.float64)
    standard = torch.where(quaternions[:, 3:] < 0, -quaternions, quaternions)
    recovered = mat_to_quat(quat_to_mat(quaternions))
    # At w == 0 both signs are standard: compare rotations there, quaternions elsewhere.
    same_sign = standard[:, 3] > 1e-9
    assert torch.allclose(recovered[same_sign], standard[same_sign], atol=1e-12)
    assert torch.allclose(quat_to_mat(recovered), quat_to_mat(quaternions), atol=1e-12)


def test_mat_to_quat_gradient_is_finite_at_identity():
    rotation = torch.eye(3, dtype=torch.float64, requires_grad=True)
    mat_to_quat(rotation).sum().backward()
    assert torch.isfinite(rotation.grad).all()


@pytest.mark.parametrize("as_torch", [False, True])
def test_closed_form_inverse_se3(as_torch):
    rng = np.random.default_rng(1)
    rotation = quat_to_mat(torch.from_numpy(rng.normal(size=(6, 4)))).numpy()
    transforms = np.concatenate([rotation, rng.normal(size=(6, 3, 1))], -1)
    inputs = torch.from_numpy(transforms) if as_torch else transforms
    inverse = np.asarray(closed_form_inverse_se3(inputs))
    padded = np.concatenate([transforms, np.tile([[[0, 0, 0, 1.0]]], (6, 1, 1))], 1)
    np.testing.assert_allclose(inverse @ padded, np.tile(np.eye(4), (6, 1, 1)), atol=1e-12)


def test_to_first_camera_frame_makes_camera_zero_identity_and_keeps_camera_coordinates():
    rng = np.random.default_rng(2)
    rotation = quat_to_mat(torch.from_numpy(rng.normal(size=(3, 4)))).numpy()
    extrinsics = np.concatenate([rotation, rng.normal(size=(3, 3, 1))], -1)
    points = rng.normal(size=(5, 3))
    rebased, rebased_points = to_first_camera_frame(extrinsics, points)
    np.testing.assert_allclose(rebased[0], np.eye(3, 4), atol=1e-12)
    for camera in range(3):  # every camera sees the points at the same camera coordinates
        before = points @ extrinsics[camera, :, :3].T + extrinsics[camera, :, 3]
        after = rebased_points @ rebased[camera, :, :3].T + rebased[camera, :, 3]
        np.testing.assert_allclose(after, before, atol=1e-12)
