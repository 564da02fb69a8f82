"""Reconstructions to look at: coloured point clouds (PLY), point clouds with one frustum per camera
(GLB), and the pictures of the compare report (depth maps side by side, a top view of two clouds).

Conventions of the released VGGT demo (demo_gradio, visual_util.predictions_to_glb, its default
"Depthmap and Camera Branch"): the points are the depth maps unprojected through the predicted cameras,
in the model's world frame (the first camera's; OpenCV axes: x right, y down, z forward); a point's
colour is its input pixel; a point is kept when its depth confidence is at least the `conf_percentile`-th
percentile of the scene's confidences (0 keeps every point) and above MIN_CONFIDENCE. The PLY holds the
points as they are. The GLB holds the same vertices plus one frustum per camera (apex at the camera
centre, base at the image corners), every node carrying OPENCV_TO_GLTF so that glTF viewers (y up)
show the scene upright; trimesh applies it when asked (`scene.dump()`).

Top-level imports stay light (the CLI reads DEFAULT_CONF_PERCENTILE at start-up); numpy, matplotlib
and trimesh (optional: the `viz` extra) are imported where used.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError, QVGGTError

DEFAULT_CONF_PERCENTILE = 50.0
MIN_CONFIDENCE = 1e-5
# OpenCV camera axes -> glTF's (y up, z towards the viewer): the released demo's OpenGL conversion.
OPENCV_TO_GLTF = ((1.0, 0.0, 0.0, 0.0), (0.0, -1.0, 0.0, 0.0), (0.0, 0.0, -1.0, 0.0), (0.0, 0.0, 0.0, 1.0))
# Frustum depth as a fraction of the kept points' extent (the diagonal of their 5-95 % box).
FRUSTUM_SCALE = 0.08
VIZ_INSTALL = 'pip install "qvggt-export[viz]"'


def import_trimesh():
    try:
        import trimesh
    except ImportError:
        raise QVGGTError(f"writing .ply/.glb needs trimesh: {VIZ_INSTALL}") from None
    return trimesh


def check_conf_percentile(value: float) -> float:
    if not 0 <= value < 100:
        raise InputError(f"--conf-percentile must be in [0, 100), got {value:g}")
    return float(value)


def check_writable(path: str | os.PathLike) -> Path:
    """The folder `path` goes to exists (or can be made) and is writable; checked before slow work."""
    path = Path(path)
    folder = path.parent.absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise QVGGTError(f"cannot write to {folder}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise QVGGTError(f"cannot write to {folder}: permission denied")
    if path.is_dir():
        raise QVGGTError(f"cannot write to {path}: it is a directory")
    return path


def scene_path(path: str | os.PathLike, name: str) -> Path:
    """FILE -> FILE's stem + '-NAME' + its suffix: one file per scene (`eval`)."""
    path = Path(path)
    return path.with_name(f"{path.stem}-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}{path.suffix}")


@dataclass
class Cloud:
    """One scene's kept points and its cameras."""

    points: "np.ndarray"  # [N, 3] float32, first camera's frame
    colors: "np.ndarray"  # [N, 3] uint8
    extrinsic: "np.ndarray"  # [S, 3, 4] camera-from-world
    intrinsic: "np.ndarray"  # [S, 3, 3]
    image_size: tuple[int, int]  # (H, W)

    def frustum_depth(self) -> float:
        import numpy as np

        if len(self.points) < 2:
            return 1.0
        low, high = np.percentile(self.points, [5, 95], axis=0)
        extent = float(np.linalg.norm(high - low))
        return FRUSTUM_SCALE * extent if extent > 0 else 1.0


def image_colors(images) -> "np.ndarray":
    """Images [S, 3, H, W] in [0, 1] (numpy or torch) -> uint8 colours [S, H, W, 3]."""
    import numpy as np

    images = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    return np.clip(np.round(images.transpose(0, 2, 3, 1) * 255.0), 0, 255).astype(np.uint8)


def confidence_mask(conf, conf_percentile: float) -> "np.ndarray":
    """The demo's filter: at least the percentile of the scene's confidences, and above MIN_CONFIDENCE."""
    import numpy as np

    conf = np.asarray(conf, dtype=np.float64)
    threshold = np.percentile(conf, check_conf_percentile(conf_percentile)) if conf_percentile > 0 else 0.0
    return (conf >= threshold) & (conf > MIN_CONFIDENCE)


def reconstruction(preds: dict, images, conf_percentile: float = DEFAULT_CONF_PERCENTILE) -> Cloud:
    """Scene predictions (`predict`'s keys, no batch dim) and their input views -> the kept points."""
    import numpy as np

    from .geometry import unproject_depth_map_to_point_map

    extrinsic, intrinsic = np.asarray(preds["extrinsic"]), np.asarray(preds["intrinsic"])
    points = unproject_depth_map_to_point_map(preds["depth"], extrinsic, intrinsic)
    colors = image_colors(images)
    if colors.shape[:3] != points.shape[:3]:
        raise QVGGTError(f"images {colors.shape[:3]} and predictions {points.shape[:3]} differ in views or size")
    keep = confidence_mask(preds["depth_conf"], conf_percentile) & np.isfinite(points).all(-1)
    return Cloud(points=points[keep].astype(np.float32), colors=colors[keep], extrinsic=extrinsic,
                 intrinsic=intrinsic, image_size=tuple(points.shape[1:3]))


def frustum_segments(extrinsic, intrinsic, image_size, depth: float) -> "np.ndarray":
    """Line segments [S, 8, 2, 3] of each camera's frustum in the world frame: centre to the four image
    corners at `depth`, and the rectangle joining them."""
    import numpy as np

    from .geometry import closed_form_inverse_se3

    height, width = image_size
    pixels = np.array([[0, 0, 1], [width, 0, 1], [width, height, 1], [0, height, 1]], dtype=np.float64)
    segments = []
    for ext, k in zip(np.asarray(extrinsic, np.float64), np.asarray(intrinsic, np.float64)):
        cam_to_world = closed_form_inverse_se3(ext)
        corners_cam = (np.linalg.inv(k) @ pixels.T).T * depth
        corners = corners_cam @ cam_to_world[:3, :3].T + cam_to_world[:3, 3]
        centre = cam_to_world[:3, 3]
        segments.append([(centre, c) for c in corners] + [(corners[i], corners[(i + 1) % 4]) for i in range(4)])
    return np.asarray(segments, dtype=np.float64)


def camera_colors(count: int) -> "np.ndarray":
    """uint8 RGBA per camera, along matplotlib's gist_rainbow as the released demo."""
    import numpy as np
    from matplotlib import colormaps

    cmap = colormaps["gist_rainbow"]
    return np.array([[round(255 * c) for c in cmap(i / max(count, 1))] for i in range(count)], dtype=np.uint8)


def _point_cloud(trimesh, cloud: Cloud):
    import numpy as np

    rgba = np.concatenate([cloud.colors, np.full((len(cloud.colors), 1), 255, np.uint8)], axis=1)
    return trimesh.PointCloud(vertices=cloud.points, colors=rgba)


def write_ply(path: str | os.PathLike, cloud: Cloud) -> Path:
    """Binary PLY: x, y, z float and red, green, blue, alpha uchar per point."""
    from .io import atomic_output

    trimesh = import_trimesh()
    data = _point_cloud(trimesh, cloud).export(file_type="ply")
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_glb(path: str | os.PathLike, cloud: Cloud) -> Path:
    """GLB scene: node "points" (the cloud) and nodes "camera_000", ... (one frustum each, as lines)."""
    import numpy as np

    from .io import atomic_output

    trimesh = import_trimesh()
    to_gltf = np.array(OPENCV_TO_GLTF)
    scene = trimesh.Scene()
    if len(cloud.points):  # glTF has no empty primitives
        scene.add_geometry(_point_cloud(trimesh, cloud), node_name="points", geom_name="points", transform=to_gltf)
    segments = frustum_segments(cloud.extrinsic, cloud.intrinsic, cloud.image_size, cloud.frustum_depth())
    for i, (lines, rgba) in enumerate(zip(segments, camera_colors(len(segments)))):
        path3d = trimesh.load_path(lines)
        path3d.colors = np.tile(rgba, (len(path3d.entities), 1))
        scene.add_geometry(path3d, node_name=f"camera_{i:03d}", geom_name=f"camera_{i:03d}", transform=to_gltf)
    data = scene.export(file_type="glb")
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@dataclass
class ReconstructionOutputs:
    """The `--ply`, `--glb` and `--conf-percentile` options of `predict`, `infer` and `eval`."""

    ply: str | None = None
    glb: str | None = None
    conf_percentile: float = DEFAULT_CONF_PERCENTILE

    def __bool__(self) -> bool:
        return bool(self.ply or self.glb)

    def check(self) -> None:
        """Everything that can be wrong with the options, before any model runs."""
        check_conf_percentile(self.conf_percentile)
        for path, suffix in ((self.ply, ".ply"), (self.glb, ".glb")):
            if path is None:
                continue
            if Path(path).suffix.lower() != suffix:
                raise InputError(f"--{suffix[1:]} must name a {suffix} file, got {path}")
            check_writable(path)
        if self:
            import_trimesh()

    def write(self, preds: dict, images, name: str | None = None) -> list[Path]:
        """Writes the requested files of one scene (`name`: one file per scene, see scene_path)."""
        from .log import logger

        if not self:
            return []
        cloud = reconstruction(preds, images, self.conf_percentile)
        written = []
        for path, writer in ((self.ply, write_ply), (self.glb, write_glb)):
            if path is not None:
                written.append(writer(scene_path(path, name) if name is not None else path, cloud))
                logger.info("wrote %s (%d points, %d cameras)", written[-1], len(cloud.points), len(cloud.extrinsic))
        return written


# ---- pictures of the compare report (matplotlib, Agg) ----

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_png(figure, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes (and closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    return buffer.getvalue()


def _shared_range(*arrays, low: float = 2, high: float = 98) -> tuple[float, float]:
    import numpy as np

    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
    values = values[np.isfinite(values)]
    if not len(values):
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1e-6)


def depth_figure(images, reference: dict, candidate: dict, labels: tuple[str, str]) -> bytes:
    """One row per view: input, reference depth, candidate depth (one colour scale), candidate - reference
    (one symmetric scale over all views), reference and candidate confidence (one scale). PNG bytes."""
    import numpy as np

    plt = _pyplot()
    colors = image_colors(images)
    depth_ref, depth_cand = reference["depth"][..., 0], candidate["depth"][..., 0]
    conf_ref, conf_cand = reference["depth_conf"], candidate["depth_conf"]
    difference = depth_cand - depth_ref
    depth_range = _shared_range(depth_ref, depth_cand)
    conf_range = _shared_range(conf_ref, conf_cand)
    limit = _shared_range(np.abs(difference), low=0, high=99.5)[1]
    views, height, width = depth_ref.shape
    columns = [("input", None), (f"depth: {labels[0]}", "depth"), (f"depth: {labels[1]}", "depth"),
               ("depth difference (2nd - 1st)", "diff"), (f"confidence: {labels[0]}", "conf"),
               (f"confidence: {labels[1]}", "conf")]
    panel_width = min(1.9 * width / height, 2.6)  # inches: 1.9 high, at most 2.6 wide
    figure, axes = plt.subplots(views, len(columns), squeeze=False, layout="constrained",
                                figsize=(len(columns) * panel_width + 0.3, views * panel_width * height / width + 0.9))
    shown = {}
    for view in range(views):
        maps = [colors[view], depth_ref[view], depth_cand[view], difference[view], conf_ref[view], conf_cand[view]]
        for col, ((title, kind), data) in enumerate(zip(columns, maps)):
            axis = axes[view, col]
            if kind is None:
                axis.imshow(data)
            elif kind == "depth":
                shown[kind] = axis.imshow(data, cmap="turbo", vmin=depth_range[0], vmax=depth_range[1])
            elif kind == "diff":
                shown[kind] = axis.imshow(data, cmap="RdBu_r", vmin=-limit, vmax=limit)
            else:
                shown[kind] = axis.imshow(data, cmap="viridis", vmin=conf_range[0], vmax=conf_range[1])
            axis.set_xticks([])
            axis.set_yticks([])
            if view == 0:
                axis.set_title(title, fontsize=7)
            if col == 0:
                axis.set_ylabel(f"view {view}", fontsize=8)
    for kind, cols, label in (("depth", [1, 2], "depth"), ("diff", [3], "depth difference"),
                              ("conf", [4, 5], "confidence")):
        bar = figure.colorbar(shown[kind], ax=axes[:, cols].ravel().tolist(), location="bottom", shrink=0.8,
                              aspect=30, pad=0.01)
        if kind == "diff":
            bar.set_ticks([-limit, 0, limit])
            bar.ax.set_xticklabels([f"{-limit:.2g}", "0", f"{limit:.2g}"])
        bar.set_label(label, fontsize=7)
        bar.ax.tick_params(labelsize=7)
    return figure_png(figure)


def top_view_figure(clouds: tuple[Cloud, Cloud], labels: tuple[str, str], max_points: int = 15000) -> bytes:
    """Both clouds seen from above (x right, z forward: the first camera looks up the page) with every
    camera's frustum footprint, in one PNG."""
    import numpy as np

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.4, 5.6))
    rng = np.random.default_rng(0)
    depth = clouds[0].frustum_depth()
    # The reference in larger dots under the candidate: where the clouds agree, blue rims orange dots.
    for cloud, label, color, marker, size in zip(clouds, labels, ("tab:blue", "tab:orange"), ("-", "--"), (2.5, 0.8)):
        points = cloud.points
        if len(points) > max_points:
            points = points[rng.choice(len(points), max_points, replace=False)]
        axis.scatter(points[:, 0], points[:, 2], s=size, alpha=0.3, color=color, linewidths=0,
                     label=f"{label} ({len(cloud.points)} points)")
        for i, lines in enumerate(frustum_segments(cloud.extrinsic, cloud.intrinsic, cloud.image_size, depth)):
            for start, end in lines:
                axis.plot([start[0], end[0]], [start[2], end[2]], marker, color=color, linewidth=0.9)
            centre = lines[0][0]
            axis.annotate(str(i), (centre[0], centre[2]), fontsize=7, color=color, xytext=(3, -9),
                          textcoords="offset points")
    axis.set_aspect("equal", adjustable="datalim")
    axis.set_xlabel("x (first camera, right)")
    axis.set_ylabel("z (first camera, forward)")
    legend = axis.legend(loc="upper right", fontsize=7, markerscale=8)
    for handle in legend.legend_handles:
        handle.set_alpha(1)
    axis.set_title("top view: points and cameras", fontsize=9)
    figure.tight_layout()
    return figure_png(figure)
