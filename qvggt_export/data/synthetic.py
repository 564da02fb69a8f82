"""Procedural multi-view scenes with exact ground truth, rendered by numpy ray casting.

A scene is a textured room (floor, ceiling, four walls, pictures on the walls) holding boxes and
spheres near its centre, seen by cameras spread around that centre. Everything is drawn from one seed,
so a scene is reproducible on any machine. Ground truth is exact by construction: each pixel's ray
goes through the integer pixel coordinate (u, v) (the unprojection convention of `geometry`), the ray
direction has camera z = 1, so the hit distance along it *is* the depth.

Seed ranges (disjoint, so that training can never touch evaluation or calibration scenes):
- TRAIN_SEEDS: 0 .. 999_999
- VAL_SEEDS: 1_000_000 .. 1_000_009 (SYNTHETIC_VAL: 10 scenes x 10 views)
- VIDEO_VAL_SEEDS: 1_000_100 .. 1_000_111 (SYNTHETIC_VIDEO: 12 scenes x 8 views, video-like cameras)
- CALIBRATION_SEEDS: 2_000_000 .. 2_999_999 (`calibration_scenes` takes the first n)

Camera trajectories (`render_scene(..., trajectory=)`): "arc" (the default: views spread over a 100-220 deg
arc around the scene, in shuffled order) or video-like clips in time order, as users shoot them: "orbit"
(a 10-60 deg drone / handheld orbit), "forward" (walking towards the scene), "pan" (turning 20-60 deg
while stepping sideways), or "video" (one of those three, drawn from the seed). The trajectory only
changes the cameras: the same seed gives the same room and objects, and `render_views` shows them from any
cameras.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..geometry import to_first_camera_frame
from ..io import atomic_output

TRAIN_SEEDS = range(0, 1_000_000)
VAL_SEEDS = range(1_000_000, 1_000_010)
VIDEO_VAL_SEEDS = range(1_000_100, 1_000_112)
CALIBRATION_SEEDS = range(2_000_000, 3_000_000)

VIDEO_TRAJECTORIES = ("orbit", "forward", "pan")
TRAJECTORIES = ("arc", *VIDEO_TRAJECTORIES, "video")

DEFAULT_IMAGE_SIZE = (392, 518)  # (H, W): the landscape shape the released preprocessing gives 4:3 images
_MISS = np.inf


@dataclass(frozen=True)
class SyntheticSet:
    """A named, fixed set of scenes."""

    name: str
    seeds: tuple[int, ...]
    num_views: int
    image_size: tuple[int, int]
    trajectory: str = "arc"


SYNTHETIC_VAL = SyntheticSet("synthetic-val", tuple(VAL_SEEDS), 10, DEFAULT_IMAGE_SIZE)
SYNTHETIC_VIDEO = SyntheticSet("synthetic-video", tuple(VIDEO_VAL_SEEDS), 8, DEFAULT_IMAGE_SIZE, "video")
SYNTHETIC_SETS = {spec.name: spec for spec in (SYNTHETIC_VAL, SYNTHETIC_VIDEO)}


@dataclass
class Scene:
    """Views of one scene; cameras are OpenCV camera-from-world, points in the scene's world frame."""

    seed: int
    images: np.ndarray  # [S, 3, H, W] float32 in [0, 1]
    depth: np.ndarray  # [S, H, W] float32, z in the camera frame
    extrinsics: np.ndarray  # [S, 3, 4] float32
    intrinsics: np.ndarray  # [S, 3, 3] float32
    world_points: np.ndarray  # [S, H, W, 3] float32
    valid: np.ndarray  # [S, H, W] bool

    def in_first_camera_frame(self) -> "Scene":
        """The same scene with the world at camera 0 (the model's convention)."""
        extrinsics, points = to_first_camera_frame(
            self.extrinsics.astype(np.float64), self.world_points.astype(np.float64)
        )
        return replace(self, extrinsics=extrinsics.astype(np.float32), world_points=points.astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Procedural textures. Texture coordinates are in metres on each surface, so detail has a physical
# size and looks the same from every view (what matching needs).


def _hash01(ix: np.ndarray, iy: np.ndarray, salt: int) -> np.ndarray:
    """Deterministic pseudo-random value in [0, 1) per integer lattice point (wrapping uint32 maths)."""
    h = ix.astype(np.uint32) * np.uint32(0x27D4EB2D) ^ iy.astype(np.uint32) * np.uint32(0x165667B1)
    h = (h ^ np.uint32(salt & 0xFFFFFFFF)) * np.uint32(0x9E3779B1)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x85EBCA77)
    h ^= h >> np.uint32(13)
    return (h >> np.uint32(8)).astype(np.float32) / np.float32(1 << 24)


def _value_noise(u: np.ndarray, v: np.ndarray, salt: int) -> np.ndarray:
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)  # smoothstep: no grid-aligned creases
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    top = _hash01(iu, iv, salt) * (1 - fu) + _hash01(iu + 1, iv, salt) * fu
    bottom = _hash01(iu, iv + 1, salt) * (1 - fu) + _hash01(iu + 1, iv + 1, salt) * fu
    return top * (1 - fv) + bottom * fv


def _fbm(u: np.ndarray, v: np.ndarray, frequency: float, octaves: int, salt: int) -> np.ndarray:
    total = np.zeros_like(u)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        scale = frequency * 2.0**octave
        total += amplitude * _value_noise(u * scale, v * scale, salt + 7919 * octave)
        norm += amplitude
        amplitude *= 0.55
    return total / norm


@dataclass(frozen=True)
class _Material:
    """Parameters of one surface's procedural texture."""

    kind: str  # "noise", "tiles", "bricks", "stripes", "mosaic"
    colors: np.ndarray  # [3, 3] palette
    frequency: float  # cycles per metre of the base pattern
    angle: float  # rotation of the pattern on the surface
    salt: int


_MATERIAL_KINDS = ("noise", "tiles", "bricks", "stripes", "mosaic")


def _random_material(rng: np.random.Generator, kinds=_MATERIAL_KINDS) -> _Material:
    hue = rng.uniform(0, 1)
    palette = []
    for offset in (0.0, rng.uniform(0.08, 0.5), rng.uniform(0.5, 0.9)):
        h = (hue + offset) % 1.0
        # A smooth hue wheel; saturation and value vary so palettes range from pastel to deep.
        rgb = 0.5 + 0.5 * np.cos(2 * np.pi * (h + np.array([0.0, 1 / 3, 2 / 3])))
        saturation, value = rng.uniform(0.35, 0.95), rng.uniform(0.35, 1.0)
        palette.append(value * (1 - saturation + saturation * rgb))
    return _Material(
        kind=str(rng.choice(kinds)),
        colors=np.asarray(palette, dtype=np.float32),
        frequency=float(rng.uniform(1.5, 5.0)),
        angle=float(rng.uniform(0, np.pi)),
        salt=int(rng.integers(0, 2**31)),
    )


def _shade_texture(material: _Material, uv: np.ndarray) -> np.ndarray:
    """Albedo [N, 3] of a material at surface coordinates uv [N, 2] (metres)."""
    c, s = np.cos(material.angle), np.sin(material.angle)
    u = (c * uv[:, 0] - s * uv[:, 1]).astype(np.float32)
    v = (s * uv[:, 0] + c * uv[:, 1]).astype(np.float32)
    f, salt = material.frequency, material.salt
    grain = _fbm(u, v, 8 * f, 3, salt)  # fine detail shared by every kind
    if material.kind == "noise":
        blend = np.clip(1.6 * (_fbm(u, v, f, 5, salt + 1) - 0.5) + 0.5, 0, 1)
        pattern, accent = blend, grain
    elif material.kind in ("tiles", "bricks"):
        tile_u, tile_v = u * f, v * f
        if material.kind == "bricks":  # twice as wide as tall, every other row shifted by half
            tile_u = tile_u * 0.5 + 0.5 * (np.floor(tile_v) % 2)
        cell_u, cell_v = np.floor(tile_u), np.floor(tile_v)
        pattern = _hash01(cell_u.astype(np.int64), cell_v.astype(np.int64), salt + 2)
        du, dv = tile_u - cell_u, tile_v - cell_v
        mortar = (np.minimum(du, 1 - du) < 0.04) | (np.minimum(dv, 1 - dv) < 0.06)
        accent = np.where(mortar, 0.0, grain)
    elif material.kind == "stripes":
        warp = _fbm(u, v, f * 0.5, 3, salt + 3)
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * f * (u + 0.6 * warp))
        accent = grain
    else:  # mosaic: random colour per irregular cell, strong corners for matching
        warp = _fbm(u, v, f, 2, salt + 4) * 0.8
        cell_u = np.floor(u * f * 1.5 + warp).astype(np.int64)
        cell_v = np.floor(v * f * 1.5 - warp).astype(np.int64)
        pattern = _hash01(cell_u, cell_v, salt + 5)
        accent = grain
    colors = material.colors
    low = np.where(pattern[:, None] < 0.5, colors[0], colors[1])
    high = np.where(pattern[:, None] < 0.5, colors[1], colors[2])
    t = ((2 * pattern) % 1.0)[:, None]  # pattern 0..1 walks the palette c0 -> c1 -> c2
    albedo = low * (1 - t) + high * t
    return albedo * (0.7 + 0.6 * accent[:, None])


# ----------------------------------------------------------------------------------------------
# Geometry: each primitive intersects all rays at once and returns the distance (inf on a miss),
# then, for the rays it wins, the outward normal and surface coordinates. All rays share one origin;
# directions come as three 1-D component arrays, which keeps numpy on fast contiguous loops.


@dataclass(frozen=True)
class _Room:
    size: np.ndarray  # [3] extent along x, y, z; the room is [0, size]
    materials: tuple[_Material, ...]  # one per face, in the order of _ROOM_FACES

    def intersect(self, origin, directions):
        """Exit distance [N] of rays from inside the room and the face index [N] they leave through."""
        exits = np.full(directions[0].shape, np.inf)
        face = np.zeros(directions[0].shape, dtype=np.int64)
        for axis in range(3):
            d = directions[axis]
            with np.errstate(divide="ignore", invalid="ignore"):
                t = np.where(d > 0, self.size[axis] - origin[axis], -origin[axis]) / d
            closer = (d != 0) & (t < exits)
            exits = np.where(closer, t, exits)
            face = np.where(closer, 2 * axis + (d > 0), face)
        return exits, face

    def surface(self, points, face):
        """Inward normals [N, 3] and uv [N, 2] on the given faces."""
        axis = face // 2
        normals = np.zeros_like(points)
        normals[np.arange(len(points)), axis] = np.where(face % 2 == 0, 1.0, -1.0)
        return normals, _face_uv(points, axis)


# Room faces as (axis, at the far end): 2 * axis + far.
_ROOM_FACES = ("wall x=0", "wall x=max", "wall y=0", "wall y=max", "floor", "ceiling")
_FLOOR = 4
_IN_FACE_AXES = np.array([[1, 2], [0, 2], [0, 1]])


def _face_uv(points: np.ndarray, normal_axis: np.ndarray) -> np.ndarray:
    """The two coordinates that lie in a face with the given normal axis."""
    return np.take_along_axis(points, _IN_FACE_AXES[normal_axis], 1)


@dataclass(frozen=True)
class _Box:
    center: np.ndarray  # [3]
    half_size: np.ndarray  # [3]
    yaw: float  # rotation about the vertical (z) axis
    material: _Material

    def _rotation(self) -> np.ndarray:
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])  # local -> world

    def bounding_sphere(self):
        return self.center, float(np.linalg.norm(self.half_size))

    def intersect(self, origin, directions):
        rotation = self._rotation()
        local_origin = rotation.T @ (origin - self.center)
        near = np.full(directions[0].shape, -np.inf)
        far = np.full(directions[0].shape, np.inf)
        for axis in range(3):
            # Local direction component: a row of R^T applied to the world components.
            d = sum(rotation[k, axis] * directions[k] for k in range(3) if rotation[k, axis] != 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                inverse = 1.0 / d
                t1 = (-self.half_size[axis] - local_origin[axis]) * inverse
                t2 = (self.half_size[axis] - local_origin[axis]) * inverse
            np.fmax(near, np.fmin(t1, t2), out=near)
            np.fmin(far, np.fmax(t1, t2), out=far)
        return np.where((far >= near) & (near > 0), near, _MISS)

    def surface(self, points):
        rotation = self._rotation()
        local = (points - self.center) @ rotation  # R^T p for row vectors
        axis = np.abs(local / self.half_size).argmax(1)
        rows = np.arange(len(points))
        local_normals = np.zeros_like(points)
        local_normals[rows, axis] = np.sign(local[rows, axis])
        # Offset per face so that opposite faces do not repeat each other.
        uv = _face_uv(local, axis) + (axis * 3.7 + (local_normals.sum(1) > 0) * 11.3)[:, None]
        return local_normals @ rotation.T, uv


@dataclass(frozen=True)
class _Sphere:
    center: np.ndarray
    radius: float
    material: _Material

    def bounding_sphere(self):
        return self.center, self.radius

    def intersect(self, origin, directions):
        offset = origin - self.center
        a = directions[0] ** 2 + directions[1] ** 2 + directions[2] ** 2
        half_b = offset[0] * directions[0] + offset[1] * directions[1] + offset[2] * directions[2]
        c = offset @ offset - self.radius**2
        discriminant = half_b * half_b - a * c
        with np.errstate(invalid="ignore"):
            t = (-half_b - np.sqrt(discriminant)) / a
        return np.where((discriminant >= 0) & (t > 0), t, _MISS)

    def surface(self, points):
        normals = (points - self.center) / self.radius
        longitude = np.arctan2(normals[:, 1], normals[:, 0])
        latitude = np.arcsin(np.clip(normals[:, 2], -1, 1))
        return normals, np.stack([longitude * self.radius, latitude * self.radius], 1)


@dataclass(frozen=True)
class _SceneLayout:
    room: _Room
    objects: tuple  # _Box | _Sphere
    light_directions: np.ndarray  # [2, 3] unit vectors towards the lights
    light_strengths: np.ndarray  # [2]
    extrinsics: np.ndarray  # [S, 3, 4] float64
    intrinsics: np.ndarray  # [S, 3, 3] float64


def _place_objects(rng: np.random.Generator, center_xy: np.ndarray, room_size: np.ndarray):
    objects, footprints = [], []  # footprints: (x, y, radius) circles, to avoid overlaps
    for _ in range(int(rng.integers(5, 10))):
        for _attempt in range(20):
            radius_from_center = rng.uniform(0, 1.3)
            angle = rng.uniform(0, 2 * np.pi)
            xy = center_xy + radius_from_center * np.array([np.cos(angle), np.sin(angle)])
            if rng.uniform() < 0.6:
                half = np.array([rng.uniform(0.12, 0.45), rng.uniform(0.12, 0.45), rng.uniform(0.12, 0.7)])
                extent = float(np.hypot(half[0], half[1]))
            else:
                half = None
                extent = float(rng.uniform(0.15, 0.45))
            if radius_from_center + extent > 1.6:
                continue
            if all(np.hypot(*(xy - f[:2])) > extent + f[2] + 0.05 for f in footprints):
                break
        else:
            continue
        footprints.append(np.array([xy[0], xy[1], extent]))
        material = _random_material(rng)
        if half is not None:
            objects.append(_Box(np.array([xy[0], xy[1], half[2]]), half, float(rng.uniform(0, np.pi)), material))
        else:
            objects.append(_Sphere(np.array([xy[0], xy[1], extent]), extent, material))
    # Pictures and shelves on the walls: thin boxes that add detail high up in the views.
    for _ in range(int(rng.integers(3, 7))):
        wall = int(rng.integers(0, 4))
        axis, at_max = wall // 2, wall % 2
        along = 1 - axis
        half = np.zeros(3)
        half[axis] = rng.uniform(0.02, 0.12)
        half[along] = rng.uniform(0.3, 0.9)
        half[2] = rng.uniform(0.2, 0.6)
        center = np.zeros(3)
        center[axis] = room_size[axis] - half[axis] if at_max else half[axis]
        center[along] = rng.uniform(half[along] + 0.1, room_size[along] - half[along] - 0.1)
        center[2] = rng.uniform(1.0, room_size[2] - half[2] - 0.2)
        objects.append(_Box(center, half, 0.0, _random_material(rng)))
    return tuple(objects)


def _look_at(position: np.ndarray, target: np.ndarray, roll: float) -> np.ndarray:
    """OpenCV camera-from-world [3, 4] for a camera at `position` looking at `target` (world z up)."""
    forward = target - position
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    c, s = np.cos(roll), np.sin(roll)
    right, down = c * right + s * down, -s * right + c * down
    rotation = np.stack([right, down, forward])
    return np.concatenate([rotation, -(rotation @ position)[:, None]], 1)


def _arc_cameras(rng, num_views: int, center_xy, room_size, image_size):
    height, width = image_size
    # Cameras on an arc around the centre; the arc is wide enough that every pair has a real baseline.
    arc = np.deg2rad(rng.uniform(100, 220))
    start = rng.uniform(0, 2 * np.pi)
    azimuths = start + arc * (np.arange(num_views) + rng.uniform(-0.3, 0.3, num_views)) / max(num_views - 1, 1)
    azimuths = rng.permutation(azimuths)  # frame order is not the arc order
    max_radius = min(*center_xy, *(room_size[:2] - center_xy)) - 0.5  # stay clear of the walls
    extrinsics, intrinsics = [], []
    for azimuth in azimuths:
        radius = rng.uniform(2.3, max_radius)
        ground = center_xy + radius * np.array([np.cos(azimuth), np.sin(azimuth)])
        position = np.array([*ground, rng.uniform(0.9, 2.1)])
        target = np.array([*(center_xy + rng.uniform(-0.5, 0.5, 2)), rng.uniform(0.2, 0.9)])
        extrinsics.append(_look_at(position, target, rng.uniform(-np.deg2rad(8), np.deg2rad(8))))
        focal = (width / 2) / np.tan(np.deg2rad(rng.uniform(50, 80)) / 2)
        intrinsics.append(np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]]))
    return np.stack(extrinsics), np.stack(intrinsics)


def _smooth_path(rng, num_views: int, amplitude: float) -> np.ndarray:
    """A smooth random wobble over the clip (one slow sine), as a handheld or drone path has."""
    phase, cycles = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0)
    return amplitude * np.sin(phase + 2 * np.pi * cycles * np.linspace(0, 1, num_views))


def _clip_times(rng, num_views: int) -> np.ndarray:
    """Frame times in [0, 1], in order, with an uneven speed (frames picked from a video)."""
    steps = rng.uniform(0.6, 1.4, max(num_views - 1, 1))
    return np.concatenate([[0.0], np.cumsum(steps) / steps.sum()])[:num_views]


def _video_cameras(rng, kind: str, num_views: int, center_xy, room_size, image_size):
    """Cameras of a video-like clip, in time order; one field of view for the whole clip."""
    height, width = image_size
    times = _clip_times(rng, num_views)
    max_radius = min(*center_xy, *(room_size[:2] - center_xy)) - 0.5  # stay clear of the walls
    start = rng.uniform(0, 2 * np.pi)
    direction = rng.choice([-1.0, 1.0])
    heights = rng.uniform(1.0, 2.0) + _smooth_path(rng, num_views, 0.15)
    rolls = np.deg2rad(rng.uniform(-4, 4)) + _smooth_path(rng, num_views, np.deg2rad(2))
    if kind == "orbit":
        azimuths = start + direction * np.deg2rad(rng.uniform(10, 60)) * times
        radii = np.clip(rng.uniform(2.4, max_radius) + _smooth_path(rng, num_views, 0.2), 2.3, max_radius)
        positions = center_xy + radii[:, None] * np.stack([np.cos(azimuths), np.sin(azimuths)], 1)
        targets = center_xy + rng.uniform(-0.4, 0.4, 2) + _smooth_path(rng, num_views, 0.15)[:, None]
    elif kind == "forward":  # towards the scene centre, drifting sideways
        radius = rng.uniform(min(3.0, max_radius), max_radius)
        away = np.array([np.cos(start), np.sin(start)])
        side = np.array([-away[1], away[0]])
        walked = rng.uniform(0.4, min(1.4, radius - 2.2)) * times
        sway = rng.uniform(-0.3, 0.3) * times + _smooth_path(rng, num_views, 0.05)
        positions = center_xy + (radius - walked)[:, None] * away + sway[:, None] * side
        turn = np.deg2rad(rng.uniform(-12, 12)) * times  # the heading drifts a little
        targets = positions - 2.5 * np.stack([np.cos(start + turn), np.sin(start + turn)], 1)
    elif kind == "pan":  # turning on the spot while stepping sideways
        radius = rng.uniform(2.4, max_radius)
        away = np.array([np.cos(start), np.sin(start)])
        side = np.array([-away[1], away[0]])
        step = rng.choice([-1.0, 1.0]) * rng.uniform(0.2, 0.7) * (times - 0.5)  # either way of the turn
        positions = center_xy + radius * away + step[:, None] * side
        yaws = start + np.pi + direction * np.deg2rad(rng.uniform(20, 60)) * (times - 0.5)
        targets = positions + 2.5 * np.stack([np.cos(yaws), np.sin(yaws)], 1)
    else:
        raise ValueError(f"unknown video trajectory {kind!r}")
    target_heights = rng.uniform(0.3, 0.9) + _smooth_path(rng, num_views, 0.1)
    focal = (width / 2) / np.tan(np.deg2rad(rng.uniform(50, 80)) / 2)
    intrinsic = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1.0]])
    extrinsics = [_look_at(np.array([*p, h]), np.array([*t, th]), roll)
                  for p, h, t, th, roll in zip(positions, heights, targets, target_heights, rolls)]
    return np.stack(extrinsics), np.tile(intrinsic, (num_views, 1, 1))


def _place_cameras(rng, num_views: int, center_xy, room_size, image_size, trajectory: str = "arc"):
    if trajectory == "arc":
        return _arc_cameras(rng, num_views, center_xy, room_size, image_size)
    if trajectory == "video":
        trajectory = VIDEO_TRAJECTORIES[int(rng.integers(len(VIDEO_TRAJECTORIES)))]
    return _video_cameras(rng, trajectory, num_views, center_xy, room_size, image_size)


def _layout(seed: int, num_views: int, image_size: tuple[int, int], trajectory: str = "arc") -> _SceneLayout:
    rng = np.random.default_rng(seed)
    room_size = np.array([rng.uniform(7.0, 11.0), rng.uniform(7.0, 11.0), rng.uniform(2.6, 3.4)])
    room = _Room(
        room_size,
        tuple(
            _random_material(rng, ("tiles", "noise", "mosaic") if face == _FLOOR else _MATERIAL_KINDS)
            for face in range(len(_ROOM_FACES))
        ),
    )
    center_xy = room_size[:2] / 2 + rng.uniform(-0.4, 0.4, 2)
    objects = _place_objects(rng, center_xy, room_size)
    lights = rng.normal(size=(2, 3))
    lights[:, 2] = np.abs(lights[:, 2]) + 0.8  # from above
    lights /= np.linalg.norm(lights, axis=1, keepdims=True)
    strengths = np.array([rng.uniform(0.35, 0.55), rng.uniform(0.1, 0.25)])
    extrinsics, intrinsics = _place_cameras(rng, num_views, center_xy, room_size, image_size, trajectory)
    # Rays are cast through the float32-rounded cameras that the scene stores, so that unprojecting
    # the stored depth through the stored cameras gives the rendered points exactly.
    extrinsics = extrinsics.astype(np.float32).astype(np.float64)
    intrinsics = intrinsics.astype(np.float32).astype(np.float64)
    return _SceneLayout(room, objects, lights, strengths, extrinsics, intrinsics)


_TILE = 14  # image sizes are multiples of 14, so 14x14 tiles cover every image exactly


def _tiles(x_cam: np.ndarray, y_cam: np.ndarray, height: int, width: int):
    """Ray indices per tile [T, 196], unit centre ray per tile [T, 3] and the tile's angular radius [T]."""
    rows, cols = height // _TILE, width // _TILE
    indices = np.arange(height * width).reshape(rows, _TILE, cols, _TILE).transpose(0, 2, 1, 3)
    indices = indices.reshape(rows * cols, _TILE * _TILE)

    def unit_rays(ray_indices):
        rays = np.stack([x_cam[ray_indices], y_cam[ray_indices], np.ones(ray_indices.shape)], -1)
        return rays / np.linalg.norm(rays, axis=-1, keepdims=True)

    centres = unit_rays(indices).mean(1)
    centres /= np.linalg.norm(centres, axis=-1, keepdims=True)
    # The largest angle from the centre over a tile is reached at a corner (the rays within an angle
    # of the centre meet the image plane in a convex region).
    corners = unit_rays(indices[:, [0, _TILE - 1, -_TILE, -1]])
    radius = np.arccos(np.clip(np.einsum("tk,tck->tc", centres, corners), -1, 1)).max(1)
    return indices, centres, radius


def _candidate_rays(primitive, extrinsic, tiles) -> np.ndarray:
    """Rays that can hit the primitive: those of tiles whose cone meets its bounding sphere's cone."""
    indices, centres, tile_radius = tiles
    center, radius = primitive.bounding_sphere()
    center_cam = extrinsic[:, :3] @ center + extrinsic[:, 3]
    distance = np.linalg.norm(center_cam)
    if distance <= radius:
        return indices.ravel()
    cone = np.arcsin(radius / distance)
    angle = np.arccos(np.clip(centres @ (center_cam / distance), -1, 1))
    return indices[angle <= tile_radius + cone + 1e-6].ravel()


def _render_view(layout: _SceneLayout, extrinsic: np.ndarray, intrinsic: np.ndarray, image_size):
    height, width = image_size
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    # Camera-frame ray through pixel (u, v) with z = 1, so the hit distance is the depth.
    x_cam = ((u - intrinsic[0, 2]) / intrinsic[0, 0]).ravel()
    y_cam = ((v - intrinsic[1, 2]) / intrinsic[1, 1]).ravel()
    rotation, translation = extrinsic[:, :3], extrinsic[:, 3]
    directions = tuple(rotation[0, k] * x_cam + rotation[1, k] * y_cam + rotation[2, k] for k in range(3))
    origin = -rotation.T @ translation
    tiles = _tiles(x_cam, y_cam, height, width)

    depth, room_face = layout.room.intersect(origin, directions)
    hit_object = np.full(depth.shape, -1)
    for index, primitive in enumerate(layout.objects):
        rays = _candidate_rays(primitive, extrinsic, tiles)
        t = primitive.intersect(origin, tuple(d[rays] for d in directions))
        closer = t < depth[rays]
        depth[rays[closer]] = t[closer]
        hit_object[rays[closer]] = index
    points = origin + depth[:, None] * np.stack(directions, 1)

    albedo = np.zeros((len(depth), 3), dtype=np.float32)
    normals = np.zeros_like(points)
    room_rays = np.flatnonzero(hit_object < 0)
    face = room_face[room_rays]
    normals[room_rays], room_uv = layout.room.surface(points[room_rays], face)
    for face_index, material in enumerate(layout.room.materials):
        on_face = face == face_index
        albedo[room_rays[on_face]] = _shade_texture(material, room_uv[on_face])
    for index, primitive in enumerate(layout.objects):
        rays = np.flatnonzero(hit_object == index)
        normals[rays], uv = primitive.surface(points[rays])
        albedo[rays] = _shade_texture(primitive.material, uv)

    # Lambertian light from two directions plus ambient; view-independent so views agree.
    lambert = np.clip(normals @ layout.light_directions.T, 0, None) @ layout.light_strengths
    image = np.clip(albedo * (0.5 + lambert)[:, None].astype(np.float32), 0, 1)
    valid = np.isfinite(depth) & (depth > 0)
    return (
        image.reshape(height, width, 3).transpose(2, 0, 1),
        depth.reshape(height, width),
        points.reshape(height, width, 3),
        valid.reshape(height, width),
    )


def check_image_size(image_size) -> tuple[int, int]:
    height, width = (int(x) for x in image_size)
    if height <= 0 or width <= 0 or height % 14 or width % 14:
        raise InputError(f"image size must be positive multiples of 14 (H, W), got {tuple(image_size)}")
    return height, width


def render_scene(seed: int, num_views: int = 10, image_size=DEFAULT_IMAGE_SIZE, trajectory: str = "arc") -> Scene:
    """Render `num_views` views of the scene drawn from `seed` along a camera `trajectory` (TRAJECTORIES),
    with exact ground truth."""
    if num_views < 1:
        raise InputError(f"num_views must be at least 1, got {num_views}")
    if trajectory not in TRAJECTORIES:
        raise InputError(f"unknown camera trajectory {trajectory!r}; choose one of {', '.join(TRAJECTORIES)}")
    image_size = check_image_size(image_size)
    layout = _layout(seed, num_views, image_size, trajectory)
    return _render_scene_views(seed, layout, layout.extrinsics, layout.intrinsics, image_size)


def render_views(seed: int, extrinsics, intrinsics, image_size=DEFAULT_IMAGE_SIZE) -> Scene:
    """The scene drawn from `seed` (render_scene's room, objects and lights, whatever its trajectory) seen by the
    given cameras: extrinsics [S, 3, 4] camera-from-world, intrinsics [S, 3, 3] for `image_size`. Seen by the
    cameras of render_scene(seed, ...), it is that scene exactly."""
    image_size = check_image_size(image_size)
    # float32-rounded as the layout's own cameras are, so the stored cameras and depth agree exactly.
    extrinsics = np.asarray(extrinsics, dtype=np.float32).astype(np.float64)
    intrinsics = np.asarray(intrinsics, dtype=np.float32).astype(np.float64)
    if extrinsics.ndim != 3 or extrinsics.shape[1:] != (3, 4) or intrinsics.shape != (len(extrinsics), 3, 3):
        raise InputError(f"need extrinsics [S, 3, 4] and intrinsics [S, 3, 3], got {extrinsics.shape} and "
                         f"{intrinsics.shape}")
    return _render_scene_views(seed, _layout(seed, 1, image_size), extrinsics, intrinsics, image_size)


def _render_scene_views(seed: int, layout: _SceneLayout, extrinsics, intrinsics, image_size) -> Scene:
    views = [_render_view(layout, e, k, image_size) for e, k in zip(extrinsics, intrinsics)]
    images, depth, points, valid = (np.stack(parts) for parts in zip(*views))
    return Scene(
        seed=seed,
        images=images.astype(np.float32),
        depth=depth.astype(np.float32),
        extrinsics=extrinsics.astype(np.float32),
        intrinsics=intrinsics.astype(np.float32),
        world_points=points.astype(np.float32),
        valid=valid,
    )


def calibration_scenes(n: int, num_views: int = 10, image_size=DEFAULT_IMAGE_SIZE) -> list[Scene]:
    """The first `n` calibration scenes (seeds from CALIBRATION_SEEDS, disjoint from val and train)."""
    if not 0 < n <= len(CALIBRATION_SEEDS):
        raise InputError(f"number of calibration scenes must be in 1..{len(CALIBRATION_SEEDS)}, got {n}")
    return [render_scene(seed, num_views, image_size) for seed in CALIBRATION_SEEDS[:n]]


def save_scene_figure(scene: Scene, path) -> Path:
    """A PNG with the RGB views on the top row and their depth maps below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    num_views = len(scene.images)
    height, width = scene.images.shape[2:]
    figure, axes = plt.subplots(2, num_views, figsize=(2.6 * num_views * width / height, 5.4), squeeze=False)
    for view in range(num_views):
        axes[0, view].imshow(scene.images[view].transpose(1, 2, 0))
        axes[0, view].set_title(f"view {view}", fontsize=9)
        shown = axes[1, view].imshow(np.where(scene.valid[view], scene.depth[view], np.nan), cmap="turbo")
        label = "depth (m)" if view == num_views - 1 else None
        figure.colorbar(shown, ax=axes[1, view], fraction=0.046, pad=0.02, label=label)
    for axis in axes.ravel():
        axis.set_axis_off()
    figure.suptitle(f"synthetic scene, seed {scene.seed}", fontsize=10)
    figure.tight_layout()
    with atomic_output(path) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    return Path(path)
