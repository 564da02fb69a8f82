"""Camera geometry with the released VGGT conventions.

- Extrinsics are OpenCV camera-from-world [R | t] (x right, y down, z forward); the model puts the
  world at its first frame.
- Quaternions are scalar-last (x, y, z, w), standardised to w >= 0.
- The pose encoding "absT_quaR_FoV" is 9 numbers: t (3), quaternion (4), fov_h, fov_w; decoding puts
  the principal point at the image centre (W/2, H/2).
- Depth unprojection uses integer pixel coordinates (u, v) as pixel centres.
"""

from __future__ import annotations

import numpy as np
import torch

POSE_ENCODING_TYPE = "absT_quaR_FoV"


def _check_encoding_type(pose_encoding_type: str) -> None:
    if pose_encoding_type != POSE_ENCODING_TYPE:
        raise ValueError(f"unsupported pose encoding {pose_encoding_type!r} (only {POSE_ENCODING_TYPE!r})")


def quat_to_mat(quaternions: torch.Tensor) -> torch.Tensor:
    """Scalar-last quaternions [..., 4] (not necessarily unit) -> rotation matrices [..., 3, 3]."""
    x, y, z, w = torch.unbind(quaternions, -1)
    two_over_norm2 = 2.0 / (quaternions * quaternions).sum(-1)
    entries = (
        1 - two_over_norm2 * (y * y + z * z),
        two_over_norm2 * (x * y - z * w),
        two_over_norm2 * (x * z + y * w),
        two_over_norm2 * (x * y + z * w),
        1 - two_over_norm2 * (x * x + z * z),
        two_over_norm2 * (y * z - x * w),
        two_over_norm2 * (x * z - y * w),
        two_over_norm2 * (y * z + x * w),
        1 - two_over_norm2 * (x * x + y * y),
    )
    return torch.stack(entries, -1).reshape(quaternions.shape[:-1] + (3, 3))


def _safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """sqrt(max(values, 0)) with a zero (not infinite) gradient where values <= 0."""
    positive = values > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, values, torch.ones_like(values))), 0.0)


def mat_to_quat(matrix: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [..., 3, 3] -> scalar-last unit quaternions [..., 4] with w >= 0."""
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"expected rotation matrices [..., 3, 3], got {tuple(matrix.shape)}")
    m = matrix.reshape(matrix.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = torch.unbind(m, -1)
    # 2|w|, 2|x|, 2|y|, 2|z| from the diagonal.
    doubled_abs = _safe_sqrt(
        torch.stack(
            [1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1
        )
    )
    # Row k is the quaternion (w, x, y, z) times 4 * its k-th component.
    scaled = torch.stack(
        [
            torch.stack([doubled_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            torch.stack([m21 - m12, doubled_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            torch.stack([m02 - m20, m10 + m01, doubled_abs[..., 2] ** 2, m12 + m21], -1),
            torch.stack([m10 - m01, m20 + m02, m21 + m12, doubled_abs[..., 3] ** 2], -1),
        ],
        -2,
    )
    # Dividing by the largest component is the best-conditioned choice; the floor only guards the
    # rows that are not picked.
    candidates = scaled / (2.0 * doubled_abs[..., None].clamp(min=0.1))
    best = doubled_abs.argmax(-1)[..., None, None].expand(matrix.shape[:-2] + (1, 4))
    wxyz = candidates.gather(-2, best).squeeze(-2)
    xyzw = wxyz[..., [1, 2, 3, 0]]
    return torch.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


def extri_intri_to_pose_encoding(
    extrinsics, intrinsics, image_size_hw=None, pose_encoding_type: str = POSE_ENCODING_TYPE
) -> torch.Tensor:
    """Extrinsics [..., 3, 4] (camera-from-world) and intrinsics [..., 3, 3] -> pose encoding [..., 9] (float32)."""
    _check_encoding_type(pose_encoding_type)
    height, width = image_size_hw
    rotation = extrinsics[..., :3, :3]
    translation = extrinsics[..., :3, 3]
    fov_h = 2 * torch.atan((height / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((width / 2) / intrinsics[..., 0, 0])
    return torch.cat([translation, mat_to_quat(rotation), fov_h[..., None], fov_w[..., None]], -1).float()


def pose_encoding_to_extri_intri(
    pose_encoding,
    image_size_hw=None,
    pose_encoding_type: str = POSE_ENCODING_TYPE,
    build_intrinsics: bool = True,
):
    """Pose encoding [..., 9] -> (extrinsics [..., 3, 4], intrinsics [..., 3, 3] or None)."""
    _check_encoding_type(pose_encoding_type)
    translation = pose_encoding[..., :3]
    rotation = quat_to_mat(pose_encoding[..., 3:7])
    extrinsics = torch.cat([rotation, translation[..., None]], -1)
    if not build_intrinsics:
        return extrinsics, None
    height, width = image_size_hw
    intrinsics = torch.zeros(
        pose_encoding.shape[:-1] + (3, 3), dtype=pose_encoding.dtype, device=pose_encoding.device
    )
    intrinsics[..., 0, 0] = (width / 2.0) / torch.tan(pose_encoding[..., 8] / 2.0)
    intrinsics[..., 1, 1] = (height / 2.0) / torch.tan(pose_encoding[..., 7] / 2.0)
    intrinsics[..., 0, 2] = width / 2
    intrinsics[..., 1, 2] = height / 2
    intrinsics[..., 2, 2] = 1.0
    return extrinsics, intrinsics


def closed_form_inverse_se3(se3):
    """Inverse of rigid transforms [..., 3, 4] or [..., 4, 4] -> [..., 4, 4]; numpy or torch, same type out."""
    if se3.shape[-2:] not in ((3, 4), (4, 4)):
        raise ValueError(f"expected [..., 3, 4] or [..., 4, 4] transforms, got {tuple(se3.shape)}")
    rotation = se3[..., :3, :3]
    translation = se3[..., :3, 3:]
    if isinstance(se3, np.ndarray):
        rotation_t = np.swapaxes(rotation, -1, -2)
        inverse = np.broadcast_to(np.eye(4, dtype=se3.dtype), se3.shape[:-2] + (4, 4)).copy()
    else:
        rotation_t = rotation.transpose(-1, -2)
        inverse = torch.eye(4, dtype=se3.dtype, device=se3.device).expand(se3.shape[:-2] + (4, 4)).clone()
    inverse[..., :3, :3] = rotation_t
    inverse[..., :3, 3:] = -(rotation_t @ translation)
    return inverse


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def unproject_depth_map_to_point_map(depth_map, extrinsics_cam, intrinsics_cam) -> np.ndarray:
    """Depth [S, H, W, 1] or [S, H, W] through cameras [S, 3, 4] / [S, 3, 3] -> world points [S, H, W, 3].

    Accepts numpy or torch, returns numpy (float64). Pixel (u, v) is taken at integer coordinates:
    x = (u - cx) d / fx, y = (v - cy) d / fy, z = d, world = R^T (x_cam - t).
    """
    depth = _to_numpy(depth_map).astype(np.float64)
    if depth.ndim == 4:
        depth = depth[..., 0]
    extrinsics = _to_numpy(extrinsics_cam).astype(np.float64)
    intrinsics = _to_numpy(intrinsics_cam).astype(np.float64)
    _, height, width = depth.shape
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    fx, fy = intrinsics[:, 0, 0, None, None], intrinsics[:, 1, 1, None, None]
    cx, cy = intrinsics[:, 0, 2, None, None], intrinsics[:, 1, 2, None, None]
    cam_points = np.stack([(u - cx) * depth / fx, (v - cy) * depth / fy, depth], -1)
    cam_to_world = closed_form_inverse_se3(extrinsics)
    # A batched matmul rather than einsum: the same sums, ~10x faster (the quantizer's task loss runs this
    # once per trial).
    rotated = np.matmul(cam_points.reshape(len(depth), -1, 3), np.swapaxes(cam_to_world[:, :3, :3], -1, -2))
    return rotated.reshape(cam_points.shape) + cam_to_world[:, None, None, :3, 3]


def to_first_camera_frame(extrinsics: np.ndarray, world_points: np.ndarray | None = None):
    """Re-express cameras [S, 3|4, 4] (and optionally points [..., 3]) in the frame of camera 0.

    Returns (extrinsics [S, 3, 4] with extrinsics[0] = [I | 0], points or None): the convention of the
    model's outputs.
    """
    first_to_world = closed_form_inverse_se3(extrinsics[:1])[0]
    rebased = extrinsics[:, :3, :] @ first_to_world
    if world_points is None:
        return rebased, None
    first = extrinsics[0]
    return rebased, world_points @ first[:3, :3].T + first[:3, 3]
