#!/usr/bin/env python
"""Train `vggt-tiny` (the embedded default model) from scratch on synthetic scenes, with VGGT's losses.

Data: scenes from qvggt_export.data.synthetic, training seeds only (TRAIN_SEEDS[0:num_scenes]; the last
DEV_SEEDS of TRAIN_SEEDS are held out for the experiment read-outs, and the synthetic-val / synthetic-video /
calibration seeds are never touched). Each scene is rendered once with 10 views and cached; each sample
draws `views` of them in random order. `--trajectory` picks the cameras: "arc" (synthetic-val's wide arcs),
"video" (synthetic-video's clips), one kind of clip ("orbit", "forward", "pan") or "mix" (even seeds video,
odd seeds arc). `--stages` switches
trajectory / views / batch at given steps (a curriculum: narrow clips and pairs first).

Ground truth is normalised as VGGT trains: the first camera is the world frame and the scene scale is
the mean distance of the valid GT points to that origin; GT translation, depth and points are divided
by it.

Losses (VGGT): camera loss on the pose encoding over all refinement iterations (weights gamma^(n-1-i)),
translation + rotation + 0.5 * field of view, L1 or Huber; confidence-weighted depth and point losses
conf * |err| - alpha * log(conf); optional gradient loss on depth/points.

A run can span sessions: `--state FILE` saves the full training state (model, optimizer, step, every random
stream, the log) atomically every `--state-every` steps and on SIGTERM / SIGINT; `--resume` continues from it
with the saved arguments (only --steps, --minutes, --stop-step, --threads, --out and the output paths may be
changed). `--curves` writes the learning curves (camera T/R/FoV loss, dev rotation error of the model and of
the identity predictor on video-like and wide-arc dev scenes, depth AbsRel) as JSON and a PNG beside it.

`--freeze aggregator,camera_head` trains only the dense heads, on a trunk whose poses stay exactly as they were
(vggt-tiny v2.1). `--kind-report CKPT,...` reads checkpoints out per kind of camera path (pan, orbit, forward
clips, wide arcs) on the held-out DEV_SEEDS.

Deterministic by seed (same thread count). The shipped checkpoint: see qvggt_export/weights/vggt_tiny.md.
synthetic-val report with trivial baselines:  python scripts/train_tiny.py --report --val-scenes 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvggt_export.data.synthetic import TRAIN_SEEDS, TRAJECTORIES, render_scene  # noqa: E402
from qvggt_export.geometry import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri  # noqa: E402
from qvggt_export.errors import QVGGTError  # noqa: E402
from qvggt_export.io import atomic_output, write_json  # noqa: E402
from qvggt_export.model import VGGT, save_vggt  # noqa: E402
from qvggt_export.model.checkpoint import resolve_source  # noqa: E402
from qvggt_export.model.dinov2 import DINOv2  # noqa: E402
from qvggt_export.model.presets import TINY_CONFIG, tiny_config  # noqa: E402

SCENE_VIEWS = 10  # views rendered per training scene (as synthetic-val)
DEV_SEEDS = range(TRAIN_SEEDS.stop - 16, TRAIN_SEEDS.stop)  # held-out training-range seeds for read-outs
DEV_SETS = {"video": 8, "arc": 10}  # dev read-outs: trajectory -> views (as synthetic-video / synthetic-val)
TRAIN_TRAJECTORIES = (*TRAJECTORIES, "mix")  # any renderer trajectory, or "mix"


def scene_trajectory(seed: int, trajectory: str) -> str:
    """The cameras of a training seed: "mix" gives video clips to even seeds and wide arcs to odd ones."""
    if trajectory == "mix":
        return "video" if seed % 2 == 0 else "arc"
    return trajectory


# ---------------------------------------------------------------------------------------------- data

class SceneCache:
    """Renders training scenes lazily (once) and keeps them as compact arrays."""

    def __init__(self, image_size: tuple[int, int], cache_dir: str = "", trajectory: str = "arc") -> None:
        self.image_size = image_size
        self.trajectory = trajectory
        self.scenes: dict[int, tuple] = {}
        self.cache_dir = Path(cache_dir) / f"{image_size[0]}x{image_size[1]}" if cache_dir else None

    def _path(self, seed: int) -> Path | None:
        if self.cache_dir is None:
            return None
        trajectory = scene_trajectory(seed, self.trajectory)  # arc scenes keep the cache layout of old runs
        return (self.cache_dir if trajectory == "arc" else self.cache_dir / trajectory) / f"{seed}.npz"

    def render(self, seed: int):
        if seed not in TRAIN_SEEDS:  # so never a synthetic-val, synthetic-video or calibration seed
            raise ValueError(f"seed {seed} is not a training seed")
        s = render_scene(seed, SCENE_VIEWS, self.image_size, scene_trajectory(seed, self.trajectory))
        images = (s.images * 255).round().astype(np.uint8)
        return (images, s.depth.astype(np.float32), s.extrinsics.astype(np.float64),
                s.intrinsics.astype(np.float64), s.valid)

    def get(self, seed: int):
        if seed not in self.scenes:
            path = self._path(seed)
            if path is not None and path.exists():
                with np.load(path) as f:
                    self.scenes[seed] = tuple(f[k] for k in ("images", "depth", "extrinsics", "intrinsics", "valid"))
            else:
                self.scenes[seed] = self.render(seed)
                if path is not None:  # a rendering cache only: the same arrays as render_scene gives
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f"{seed}.{os.getpid()}.tmp.npz")
                    np.savez(tmp, **dict(zip(("images", "depth", "extrinsics", "intrinsics", "valid"),
                                             self.scenes[seed])))
                    tmp.rename(path)
        return self.scenes[seed]


def make_sample(scene, views: np.ndarray, jitter: np.random.Generator | None = None):
    """Selects views (in the given order), re-bases on the first one and normalises the scale."""
    images, depth, extr, intr, valid = (a[views] for a in scene)
    images = images.astype(np.float32) / 255.0
    if jitter is not None:  # photometric jitter per view: gain and bias
        gain = jitter.uniform(0.8, 1.2, (len(views), 1, 1, 1)).astype(np.float32)
        bias = jitter.uniform(-0.08, 0.08, (len(views), 1, 1, 1)).astype(np.float32)
        images = np.clip(images * gain + bias, 0.0, 1.0)
    S, H, W = depth.shape
    first_inv = np.eye(4)
    first_inv[:3, :3] = extr[0, :3, :3].T
    first_inv[:3, 3] = -extr[0, :3, :3].T @ extr[0, :3, 3]
    extr = extr @ first_inv  # cameras relative to camera 0
    # Points in camera 0's frame from depth: camera i point -> frame 0.
    u, v = np.meshgrid(np.arange(W), np.arange(H))
    x = (u[None] - intr[:, 0, 2, None, None]) * depth / intr[:, 0, 0, None, None]
    y = (v[None] - intr[:, 1, 2, None, None]) * depth / intr[:, 1, 1, None, None]
    cam = np.stack([x, y, depth], -1)  # [S, H, W, 3]
    R, t = extr[:, :3, :3], extr[:, :3, 3]
    world = np.einsum("sji,shwj->shwi", R, cam - t[:, None, None, :])
    scale = float(np.linalg.norm(world[valid], axis=-1).mean())
    extr = extr.copy()
    extr[:, :3, 3] /= scale
    return images, depth / scale, world / scale, valid, extr, intr


def make_batch(cache: SceneCache, rng: np.random.Generator, seeds: list[int], batch: int, views: int,
               augment: bool = True):
    samples = []
    for _ in range(batch):
        seed = seeds[int(rng.integers(len(seeds)))]
        order = rng.permutation(SCENE_VIEWS)[:views]
        samples.append(make_sample(cache.get(seed), order, rng if augment else None))
    images, depth, points, valid, extr, intr = (np.stack(parts) for parts in zip(*samples))
    H, W = depth.shape[-2:]
    pose = extri_intri_to_pose_encoding(torch.from_numpy(extr), torch.from_numpy(intr), (H, W))
    return {
        "images": torch.from_numpy(images),
        "depth": torch.from_numpy(depth.astype(np.float32)),
        "points": torch.from_numpy(points.astype(np.float32)),
        "valid": torch.from_numpy(valid),
        "pose_enc": pose.float(),
        "extrinsics": extr,
    }


# -------------------------------------------------------------------------------------------- losses

def forward_train(model: VGGT, images: torch.Tensor, dense_frames: int = 0) -> dict:
    """model(images), except that the dense (DPT) heads run only on the first `dense_frames` views of
    each sample (0: all). Views are in random order, so this is an unbiased, cheaper dense loss; the
    camera head always sees all views. Same modules as VGGT.forward."""
    if dense_frames <= 0 or dense_frames >= images.shape[1]:
        return model(images)
    H, W = images.shape[-2:]
    layers = model.aggregator(images)
    start = model.aggregator.patch_start_idx
    pose_enc_list = model.camera_head(layers[model.config.depth - 1])
    sub = {i: t[:, :dense_frames] for i, t in layers.items()}
    depth, depth_conf = model.depth_head(sub, H, W, start)
    points, points_conf = model.point_head(sub, H, W, start)
    return {"pose_enc": pose_enc_list[-1], "pose_enc_list": pose_enc_list, "depth": depth,
            "depth_conf": depth_conf, "world_points": points, "world_points_conf": points_conf}


def camera_loss(pose_enc_list, gt, loss_type: str = "l1", gamma: float = 0.6, weight_fov: float = 0.5):
    n = len(pose_enc_list)
    total = 0.0
    parts = {}
    for i, pred in enumerate(pose_enc_list):
        w = gamma ** (n - 1 - i)
        if loss_type == "huber":
            f = lambda a, b: F.huber_loss(a, b, delta=1.0, reduction="none").mean()  # noqa: E731
        else:
            f = lambda a, b: (a - b).abs().mean()  # noqa: E731
        lt, lr, lf = f(pred[..., :3], gt[..., :3]), f(pred[..., 3:7], gt[..., 3:7]), f(pred[..., 7:], gt[..., 7:])
        total = total + w * (lt + lr + weight_fov * lf)
        if i == n - 1:
            parts = {"T": float(lt.detach()), "R": float(lr.detach()), "FL": float(lf.detach())}
    return total / sum(gamma ** (n - 1 - i) for i in range(n)), parts


def track_loss(predictions: list[torch.Tensor], vis_logits: torch.Tensor, conf_logits: torch.Tensor,
               tracks: torch.Tensor, visible: torch.Tensor, gamma: float = 0.8, conf_px: float = 3.0):
    """VGGT's tracking loss (as its released training code): L1 of the predicted positions [B, S, N, 2] where the
    point is visible, over the refinement iterations (weights gamma^(n-1-i), averaged), plus the BCE of the
    visibility logits and of the confidence logits against "the last position is within conf_px pixels".
    Every query is a point of view 0, visible there by construction."""
    n = len(predictions)
    position = sum(gamma ** (n - 1 - i) * (pred - tracks).abs().mean(-1)[visible].mean()
                   for i, pred in enumerate(predictions)) / n
    vis = F.binary_cross_entropy_with_logits(vis_logits, visible.float())
    close = ((predictions[-1].detach() - tracks).norm(dim=-1) < conf_px).float()
    conf = F.binary_cross_entropy_with_logits(conf_logits, close)
    return position + vis + conf, {"track": float(position.detach()), "vis": float(vis.detach()),
                                   "conf": float(conf.detach())}


def track_targets(depth: np.ndarray, world: np.ndarray, valid: np.ndarray, extrinsics: np.ndarray,
                  intrinsics: np.ndarray, n: int, rng: np.random.Generator, tolerance: float = 0.05):
    """Ground-truth tracks of a make_sample sample: n query pixels of view 0 with valid depth -> (tracks [S, n, 2]
    in pixels (x, y), visible [S, n]). View 0's point is projected by every camera; it is visible where it lands
    inside the image in front of the camera and that view's own depth there (nearest pixel) agrees within
    `tolerance` (relative), and occluded otherwise."""
    S, H, W = depth.shape
    ys, xs = np.nonzero(valid[0])
    pick = rng.choice(len(xs), n, replace=len(xs) < n)
    points = world[0][ys[pick], xs[pick]]  # view 0's camera frame is the world frame
    cam = np.einsum("sij,nj->sni", extrinsics[:, :, :3], points) + extrinsics[:, None, :, 3]
    z = cam[..., 2]
    front = z > 1e-6
    uv = np.einsum("sij,snj->sni", intrinsics, cam)[..., :2] / np.where(front, z, 1.0)[..., None]
    inside = front & (uv >= 0).all(-1) & (uv[..., 0] <= W - 1) & (uv[..., 1] <= H - 1)
    px = np.clip(np.rint(uv), 0, [W - 1, H - 1]).astype(int)
    view = np.arange(S)[:, None]
    seen = depth[view, px[..., 1], px[..., 0]]
    visible = inside & valid[view, px[..., 1], px[..., 0]] & (np.abs(seen - z) <= tolerance * z)
    uv[0], visible[0] = np.stack([xs[pick], ys[pick]], -1), True
    return uv.astype(np.float32), visible


def gradient_loss(err: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean |spatial difference| of the error map along x and y where both pixels are valid: [B,S,H,W,C]."""
    dx = (err[..., :, 1:, :] - err[..., :, :-1, :]).abs().sum(-1)
    vx = valid[..., :, 1:] & valid[..., :, :-1]
    dy = (err[..., 1:, :, :] - err[..., :-1, :, :]).abs().sum(-1)
    vy = valid[..., 1:, :] & valid[..., :-1, :]
    return (dx[vx].mean() + dy[vy].mean()) / 2


def conf_regression_loss(pred, conf, gt, valid, alpha: float, grad_weight: float = 0.0):
    """VGGT's confidence-weighted regression: mean over valid pixels of conf*||err|| - alpha*log(conf)."""
    err = pred - gt
    dist = err.norm(dim=-1)
    loss = (conf * dist - alpha * torch.log(conf))[valid].mean()
    if grad_weight > 0:
        loss = loss + grad_weight * gradient_loss(err, valid)
    return loss, float(dist[valid].mean().detach())


# ---------------------------------------------------------------------------------------- evaluation

def _rel_errors(pred_extr: np.ndarray, gt_extr: np.ndarray):
    """Per-pair rotation / translation-direction errors (degrees) as in docs/evaluation.md (float64)."""
    def to44(e):
        out = np.tile(np.eye(4), (len(e), 1, 1))
        out[:, :3, :] = e[:, :3, :]
        return out
    P, G = to44(pred_extr.astype(np.float64)), to44(gt_extr.astype(np.float64))
    er, et = [], []
    for i in range(len(P)):
        for j in range(i + 1, len(P)):
            rp, rg = P[i] @ np.linalg.inv(P[j]), G[i] @ np.linalg.inv(G[j])
            dR = rp[:3, :3].T @ rg[:3, :3]
            er.append(np.degrees(np.arccos(np.clip((np.trace(dR) - 1) / 2, -1, 1))))
            tp, tg = rp[:3, 3], rg[:3, 3]
            c = abs(np.dot(tp, tg) / (np.linalg.norm(tp) * np.linalg.norm(tg) + 1e-15))
            e = np.degrees(np.arccos(np.clip(c, 0, 1)))
            et.append(e)
    return np.array(er), np.array(et)


@torch.no_grad()
def quick_eval(model, cache_dev: SceneCache, seeds, views: int):
    """Dev read-out on held-out training-range seeds: AUC@30, RRA/RTA@30, mean rot err, depth AbsRel, and
    the identity predictor's rotation error and AUC@30 on the same pairs."""
    model.eval()
    ers, ets, absrel, id_ers, id_ets = [], [], [], [], []
    for seed in seeds:
        s = cache_dev.get(seed)
        images, depth, points, valid, extr, intr = make_sample(s, np.arange(views))
        out = model(torch.from_numpy(images)[None])
        H, W = depth.shape[-2:]
        pe, _ = pose_encoding_to_extri_intri(out["pose_enc"][0].double(), (H, W))
        er, et = _rel_errors(pe.numpy(), extr)
        ers.append(er)
        ets.append(et)
        d = out["depth"][0, ..., 0].numpy()
        for k in range(views):
            m = valid[k]
            p = d[k][m] * np.median(depth[k][m]) / np.median(d[k][m])
            absrel.append(np.mean(np.abs(p - depth[k][m]) / depth[k][m]))
        id_er, id_et = _rel_errors(np.tile(np.eye(3, 4), (views, 1, 1)), extr)  # all cameras at the first
        id_ers.append(id_er)
        id_ets.append(id_et)
    model.train()
    er, et = np.concatenate(ers), np.concatenate(ets)
    return {"auc30": _auc30(er, et), "rra30": float((er < 30).mean() * 100), "rta30": float((et < 30).mean() * 100),
            "rot_err": float(er.mean()), "absrel": float(np.mean(absrel)),
            "id_rot_err": float(np.concatenate(id_ers).mean()),
            "id_auc30": _auc30(np.concatenate(id_ers), np.concatenate(id_ets))}


def _auc30(er: np.ndarray, et: np.ndarray) -> float:
    m = np.maximum(er, et)
    return float(np.mean(np.cumsum(np.histogram(m, bins=np.arange(31))[0] / len(m))) * 100)


# ------------------------------------------------------------------------ synthetic-val report + baselines

def _baseline_predict(kind: str, height: int, width: int, seed: int = 0):
    """Trivial predictors with the outputs of run_model: 'random' pose, 'identity' pose; constant depth."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    focal = (width / 2) / np.tan(np.deg2rad(65) / 2)  # the middle of the synthetic FOV range
    intrinsic = np.array([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], np.float32)

    def predict(images):
        S = images.shape[0]
        extr = np.tile(np.eye(4)[:3], (S, 1, 1))
        if kind == "random":
            extr[1:, :, :3] = Rotation.random(S - 1, random_state=rng).as_matrix()
            extr[1:, :, 3] = rng.normal(size=(S - 1, 3))
        depth = np.ones((S, height, width, 1), np.float32)
        u, v = np.meshgrid(np.arange(width), np.arange(height))
        cam = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones_like(u, float)], -1)
        R, t = extr[:, :, :3], extr[:, :, 3]
        points = np.einsum("sji,hwj->shwi", R, cam)[...] - np.einsum("sji,sj->si", R, t)[:, None, None]
        return {"extrinsic": extr.astype(np.float32), "intrinsic": np.tile(intrinsic, (S, 1, 1)),
                "depth": depth, "depth_conf": np.ones_like(depth[..., 0]),
                "world_points": points.astype(np.float32), "world_points_conf": np.ones_like(depth[..., 0])}

    return predict


VAL_REPORT_KEYS = ("auc@30", "auc@15", "auc@5", "rra@30", "rta@30", "rotation_error_deg",
                   "translation_error_deg", "abs_rel", "delta<1.25", "acc_mean", "comp_mean")


def val_report(checkpoint: str | None, scenes: int, views: int | None, image_size: tuple[int, int],
               baselines: bool = True, dataset: str = "synthetic-val") -> dict:
    """Metrics on a synthetic set (first `scenes` scenes, `views` views (None: the set's) at `image_size`) of a
    checkpoint, an untrained model of the same config, and trivial baselines; all through qvggt_export.evaluate."""
    from qvggt_export.data.readers import SyntheticReader
    from qvggt_export.data.synthetic import SYNTHETIC_SETS
    from qvggt_export.evaluate import evaluate
    from qvggt_export.model import load_model

    views = views or SYNTHETIC_SETS[dataset].num_views

    def run(predictor):
        reader = SyntheticReader(SYNTHETIC_SETS[dataset], num_views=views, max_scenes=scenes, image_size=image_size)
        agg = evaluate(predictor, reader, progress=False)["aggregate"]
        return {k: agg.get(k) for k in VAL_REPORT_KEYS}

    rows = {}
    if checkpoint != "baselines-only":
        model = load_model(checkpoint)
        rows["vggt-tiny" if checkpoint is None else str(checkpoint)] = run(model)
    if baselines:
        torch.manual_seed(0)
        rows["untrained (same config, seed 0)"] = run(VGGT(tiny_config()).eval())
        rows["random pose, constant depth"] = run(_baseline_predict("random", *image_size))
        rows["identity pose, constant depth"] = run(_baseline_predict("identity", *image_size))
    return {"dataset": dataset, "scenes": scenes, "views": views, "image_size": list(image_size), "rows": rows}


KIND_READOUT = {"pan": 8, "orbit": 8, "forward": 8, "arc": 10}  # camera path -> views (time order for clips)


def kind_report(checkpoints: list[str], scenes: int, image_size: tuple[int, int], cache_dir: str = "") -> dict:
    """quick_eval per kind of camera path on the first `scenes` DEV_SEEDS, for each checkpoint ('vggt-tiny':
    the embedded model). The training read-out's 'video' dev clips mix the kinds at random, 8 of them: too few
    to rank models whose pose is near the identity predictor's, when one kind (pans) improves and another
    (forward motion) worsens."""
    from qvggt_export.model import load_model

    caches = {kind: SceneCache(image_size, cache_dir, kind) for kind in KIND_READOUT}
    rows = {}
    for checkpoint in checkpoints:
        model = load_model(checkpoint)
        rows[checkpoint] = {kind: quick_eval(model, caches[kind], list(DEV_SEEDS[:scenes]), views)
                            for kind, views in KIND_READOUT.items()}
        print(checkpoint + ": rotation error / identity's " + ", ".join(
            f"{kind} {r['rot_err']:.2f} / {r['id_rot_err']:.2f} deg = {r['rot_err'] / r['id_rot_err']:.3f}"
            for kind, r in rows[checkpoint].items()) + "; AbsRel " + ", ".join(
            f"{kind} {r['absrel']:.3f}" for kind, r in rows[checkpoint].items()), flush=True)
    return {"scenes": list(DEV_SEEDS[:scenes]), "image_size": list(image_size), "rows": rows}


# -------------------------------------------------------------------------------------------- training

RESUME_OVERRIDES = ("steps", "minutes", "stop_step", "threads", "out", "best_out", "log", "curves", "state",
                    "state_every", "save_every", "eval_every", "resume", "cache_dir")


def init_encoder_embeddings(model: VGGT) -> None:
    """DINOv2's own initialisation of its learned embeddings (the module keeps zeros, as loading a released
    checkpoint overwrites them): absolute position embeddings trunc-normal 0.02, class and register tokens
    1e-6. A no-op for the conv patch embed."""
    encoder = model.aggregator.patch_embed
    if isinstance(encoder, DINOv2):
        torch.nn.init.trunc_normal_(encoder.pos_embed, std=0.02)
        torch.nn.init.normal_(encoder.cls_token, std=1e-6)
        torch.nn.init.normal_(encoder.register_tokens, std=1e-6)


def warm_start(model: VGGT, init: VGGT) -> tuple[int, list[str]]:
    """Loads `init`'s weights into `model`. Same config: every tensor. A conv patch embed into a DINOv2
    one (the released encoder, which adds learned absolute position embeddings): the patchify conv moves
    to the encoder's, every other tensor of equal name and shape is loaded and the rest (position
    embeddings, encoder blocks, their norm) keep their fresh initialisation. Any other change: an error."""
    if init.config == model.config:
        model.load_state_dict(init.state_dict())
        return len(init.state_dict()), []
    def beyond_encoder(cfg) -> dict:
        return {k: v for k, v in cfg.to_dict().items() if k not in ("patch_embed", "dinov2_depth", "dinov2_num_heads")}

    if (init.config.patch_embed != "conv" or model.config.patch_embed == "conv"
            or beyond_encoder(init.config) != beyond_encoder(model.config)):
        raise SystemExit("error: --init has another config than the run's (only conv -> DINOv2 patch embed converts)")
    source = {k.replace("aggregator.patch_embed.proj.", "aggregator.patch_embed.patch_embed.proj."): v
              for k, v in init.state_dict().items()}
    target = model.state_dict()
    shared = {k: v for k, v in source.items() if k in target and target[k].shape == v.shape}
    model.load_state_dict(shared, strict=False)
    return len(shared), sorted(set(target) - set(shared))


def parse_stages(text: str, args) -> list[dict]:
    """'STEP:TRAJECTORY:VIEWS:BATCH,...' (a curriculum) -> stages by start step; '' -> one stage of the flat args."""
    if not text:
        return [{"start": 0, "trajectory": args.trajectory, "views": args.views, "batch": args.batch}]
    stages = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) != 4 or fields[1] not in TRAIN_TRAJECTORIES or not all(f.isdigit() for f in fields[::2] + fields[3:]):
            raise ValueError(f"--stages wants STEP:TRAJECTORY:VIEWS:BATCH items (TRAJECTORY: "
                             f"{', '.join(TRAIN_TRAJECTORIES)}), got {part!r}")
        start, trajectory, views, batch = int(fields[0]), fields[1], int(fields[2]), int(fields[3])
        if not 2 <= views <= SCENE_VIEWS or batch < 1:
            raise ValueError(f"--stages: views must be in 2..{SCENE_VIEWS} and batch at least 1, got {part!r}")
        stages.append({"start": start, "trajectory": trajectory, "views": views, "batch": batch})
    stages.sort(key=lambda st: st["start"])
    if stages[0]["start"] != 0:
        raise ValueError("--stages: the first stage must start at step 0")
    return stages


def stage_at(stages: list[dict], step: int) -> dict:
    return [st for st in stages if st["start"] <= step][-1]


FREEZABLE = ("aggregator", "camera_head", "depth_head", "point_head")


def parse_freeze(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in FREEZABLE]
    if bad:
        raise ValueError(f"--freeze {text!r}: {', '.join(bad)} is not one of {', '.join(FREEZABLE)}")
    if set(names) == set(FREEZABLE):
        raise ValueError("--freeze: every module frozen leaves nothing to train")
    return names


def freeze(model: VGGT, names: list[str]) -> None:
    """Takes these top-level modules out of training: no gradients, no optimizer state, no weight decay.
    A frozen aggregator keeps the views' cross-view features (and with the camera head, the poses) exactly
    as they are, while the dense heads learn on top of them; autograd then records nothing inside it."""
    for name in names:
        getattr(model, name).requires_grad_(False)


def make_optimizer(model: VGGT, args) -> torch.optim.Optimizer:
    """AdamW over the trained (not --freeze) parameters, weight decay on matrices only; the camera head's
    groups run at --camera-lr-mult times the lr."""
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and "token" not in name
        camera = name.startswith("camera_head.")
        groups.setdefault((decay, camera), []).append(param)
    return torch.optim.AdamW(
        [{"params": params, "weight_decay": args.weight_decay if decay else 0.0,
          "lr_mult": args.camera_lr_mult if camera else 1.0} for (decay, camera), params in groups.items()],
        lr=args.lr, betas=(0.9, 0.95))


def lr_at(args, step: int) -> float:
    """Linear warm-up, then cosine to 5 % of the peak at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def save_state(path: str, model, opt, rng: np.random.Generator, step: int, log: dict, running, args) -> None:
    """Everything a resumed run needs to continue exactly: weights, optimizer, step, random streams, log."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step,
             "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "log": log,
             "running": running, "args": vars(args)}
    with atomic_output(path) as tmp:
        torch.save(state, tmp)
    print(f"saved training state at step {step} to {path}", flush=True)


def resumed_args(args, argv) -> argparse.Namespace:
    """The saved run's arguments, with the few that may change between sessions taken from the command line."""
    saved = torch.load(args.state, map_location="cpu", weights_only=False)["args"]
    given, defaults = vars(args), vars(parse_args([]))
    for key, value in given.items():
        if key not in RESUME_OVERRIDES and value != defaults[key] and value != saved.get(key):
            raise ValueError(f"--{key.replace('_', '-')} {value} differs from the saved run's {saved.get(key)} "
                             f"(only {', '.join(RESUME_OVERRIDES)} may change on --resume)")
    merged = dict(saved)
    for key in RESUME_OVERRIDES:
        if given[key] != defaults[key] or key in ("resume", "state"):
            merged[key] = given[key]
    return argparse.Namespace(**{**defaults, **merged})


def write_curves(log: dict, path: str) -> None:
    """The log as JSON at `path` and the learning curves as a PNG beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_json(path, log)
    hist, evals = log["history"], log["evals"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [h["step"] for h in hist]
    for key, label in (("T", "translation"), ("R", "rotation (quaternion)"), ("FL", "field of view")):
        axes[0].plot(steps, [h["ema_" + key] for h in hist], label=label)
    axes[0].set(title="camera L1 loss (train, EMA 0.9)", xlabel="step", yscale="log")
    for traj, color in (("video", "C0"), ("arc", "C1")):
        ev = [e for e in evals if traj in e]
        x = [e["step"] for e in ev]
        axes[1].plot(x, [e[traj]["rot_err"] / e[traj]["id_rot_err"] for e in ev], color=color, marker=".",
                     label=f"dev {traj} (identity: {ev[0][traj]['id_rot_err']:.1f} deg)" if ev else traj)
        axes[2].plot(x, [e[traj]["auc30"] for e in ev], color=color, marker=".", label=f"AUC@30, dev {traj}")
        axes[2].plot(x, [100 * e[traj]["absrel"] for e in ev], color=color, ls=":", label=f"100 x AbsRel, dev {traj}")
    axes[1].axhline(1.0, color="k", ls="--", lw=0.8)
    axes[1].set(title="rotation error / the identity predictor's", xlabel="step")
    axes[2].set(title="pose AUC@30 and depth AbsRel", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(Path(path).with_suffix(".png")) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def save_checkpoint(model, args, path: str, steps: int, wall_s: float, train_seeds) -> None:
    """save_vggt (config in the metadata) plus the training provenance."""
    model.eval()
    meta = {"qvggt_training": json.dumps({"script": "scripts/train_tiny.py", "seed": args.seed, "steps": steps,
                                           "train_seeds": [train_seeds[0], train_seeds[-1]],
                                           "wall_s": round(wall_s), "args": vars(args)})}
    save_vggt(model, path, extra_metadata=meta)
    model.train()
    print(f"wrote {path} after {steps} steps", flush=True)


def _render_seeds(job) -> int:
    image_size, cache_dir, trajectory, seeds = job
    cache = SceneCache(image_size, cache_dir, trajectory)
    for seed in seeds:
        cache.get(seed)
        cache.scenes.clear()
    return len(seeds)


def prerender(args) -> None:
    """Fills --cache-dir with the training seeds A:B (every trajectory of --trajectory / --stages) and the
    dev scenes, on --workers processes."""
    a, b = (int(x) for x in args.prerender.split(":"))
    size = (args.height, args.width)
    trajectories = {st["trajectory"] for st in parse_stages(args.stages, args)}
    jobs = [(size, args.cache_dir, traj, list(DEV_SEEDS[: args.eval_scenes])) for traj in DEV_SETS]
    for traj in sorted(trajectories):
        jobs += [(size, args.cache_dir, traj, list(range(a, b))[w::args.workers]) for w in range(args.workers)]
    with ProcessPoolExecutor(args.workers) as pool:
        done = sum(pool.map(_render_seeds, jobs))
    print(f"rendered {done} scenes into {args.cache_dir}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500, help="length of the learning-rate schedule")
    p.add_argument("--stop-step", type=int, default=0,
                   help="stop after this many steps of the --steps schedule (replays a run cut by --minutes)")
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this wall time of this session (0: no limit)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--views", type=int, default=4, help="views per training sample")
    p.add_argument("--trajectory", choices=TRAIN_TRAJECTORIES, default="arc", help="cameras of the training scenes")
    p.add_argument("--stages", type=str, default="",
                   help="curriculum STEP:TRAJECTORY:VIEWS:BATCH,... (overrides --trajectory/--views/--batch)")
    p.add_argument("--num-scenes", type=int, default=2000, help="training scenes: TRAIN_SEEDS[0:N]")
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--camera-lr-mult", type=float, default=1.0, help="camera head learning rate / --lr")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--camera-weight", type=float, default=5.0)
    p.add_argument("--depth-weight", type=float, default=1.0)
    p.add_argument("--point-weight", type=float, default=1.0)
    p.add_argument("--conf-alpha", type=float, default=0.2)
    p.add_argument("--grad-weight", type=float, default=0.0, help="gradient loss weight (0: off)")
    p.add_argument("--dense-frames", type=int, default=0, help="views per sample that get the dense losses (0: all)")
    p.add_argument("--camera-loss", choices=("l1", "huber"), default="l1")
    p.add_argument("--freeze", type=str, default="",
                   help=f"comma list of modules not trained ({', '.join(FREEZABLE)}), e.g. aggregator,camera_head "
                        "to fit the dense heads to a pose-trained trunk without moving its poses")
    p.add_argument("--config", type=str, default="{}", help="JSON overrides of the vggt-tiny config")
    p.add_argument("--init", type=str, default="",
                   help="start from this checkpoint's weights ('vggt-tiny': the embedded model) instead of random")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=str, default="", help="on-disk cache of rendered training scenes")
    p.add_argument("--report", type=str, default=None, nargs="?", const="",
                   help="only evaluate CHECKPOINT (default: the embedded vggt-tiny) and baselines on --report-sets")
    p.add_argument("--report-sets", type=str, default="synthetic-val,synthetic-video")
    p.add_argument("--val-scenes", type=int, default=10)
    p.add_argument("--no-baselines", action="store_true", help="--report: the checkpoint only")
    p.add_argument("--kind-report", type=str, default="",
                   help="only read out these checkpoints (comma list; 'vggt-tiny': the embedded model) per kind of "
                        f"camera path ({', '.join(KIND_READOUT)}) on the first --eval-scenes DEV_SEEDS")
    p.add_argument("--prerender", type=str, default="", help="only render training seeds A:B into --cache-dir")
    p.add_argument("--workers", type=int, default=2, help="--prerender processes")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-scenes", type=int, default=8)
    p.add_argument("--out", type=str, default="", help="checkpoint (safetensors) written at the end")
    p.add_argument("--best-out", type=str, default="",
                   help="checkpoint written at each read-out that lowers the dev rotation error / identity's "
                        "(summed over the video and arc dev scenes)")
    p.add_argument("--save-every", type=int, default=0, help="also write --out every N steps")
    p.add_argument("--state", type=str, default="", help="full training state file (for --resume)")
    p.add_argument("--state-every", type=int, default=200, help="write --state every N steps (and on SIGTERM)")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --state")
    p.add_argument("--log", type=str, default="", help="JSON log file")
    p.add_argument("--curves", type=str, default="", help="learning curves: JSON here and a PNG beside it")
    return p.parse_args(argv)


def run_report(args) -> dict:
    reports = {}
    for dataset in args.report_sets.split(","):
        reports[dataset] = val_report(args.report or None, args.val_scenes, None, (args.height, args.width),
                                      baselines=not args.no_baselines, dataset=dataset)
    text = json.dumps(reports, indent=1)
    print(text, flush=True)
    if args.log:
        write_json(args.log, reports)
    return reports


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        if args.resume:
            if not args.state or not Path(args.state).exists():
                raise ValueError("--resume needs an existing --state file")
            args = resumed_args(args, argv)
        stages = parse_stages(args.stages, args)
        frozen = parse_freeze(args.freeze)
        if args.kind_report and not 1 <= args.eval_scenes <= len(DEV_SEEDS):
            raise ValueError(f"--kind-report reads 1..{len(DEV_SEEDS)} --eval-scenes, got {args.eval_scenes}")
        kind_checkpoints = [c for c in args.kind_report.split(",") if c]
        for checkpoint in kind_checkpoints:
            resolve_source(checkpoint)
    except (ValueError, QVGGTError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(args.threads)
    if args.report is not None:
        return run_report(args)
    if args.prerender:
        prerender(args)
        return {}
    if kind_checkpoints:
        report = kind_report(kind_checkpoints, args.eval_scenes, (args.height, args.width), args.cache_dir)
        if args.log:
            write_json(args.log, report)
        return report
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = tiny_config(**json.loads(args.config))
    model = VGGT(cfg).train()
    init_encoder_embeddings(model)
    if args.init:  # warm start, e.g. from the previous vggt-tiny
        from qvggt_export.model import load_model

        init = load_model(args.init)
        loaded, fresh = warm_start(model, init)
        print(f"initialised from {args.init}: {loaded} tensors loaded, {len(fresh)} fresh "
              f"({', '.join(fresh[:6])}{', ...' if len(fresh) > 6 else ''})", flush=True)
    freeze(model, frozen)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"config {cfg.to_dict()}\nparameters {n_params / 1e6:.2f} M ({n_trained / 1e6:.2f} M trained"
          f"{', frozen: ' + ', '.join(frozen) if frozen else ''})", flush=True)
    opt = make_optimizer(model, args)
    image_size = (args.height, args.width)
    train_seeds = list(TRAIN_SEEDS[: args.num_scenes])
    assert not set(train_seeds) & set(DEV_SEEDS)
    caches = {traj: SceneCache(image_size, args.cache_dir, traj) for traj in {st["trajectory"] for st in stages}}
    dev_caches = {traj: SceneCache(image_size, args.cache_dir, traj) for traj in DEV_SETS}
    dev_seeds = list(DEV_SEEDS[: args.eval_scenes])
    log = {"config": cfg.to_dict(), "parameters": n_params, "history": [], "evals": [], "wall_s": 0.0,
           "best": None, "sessions": []}
    step, running = 0, None
    if args.resume:
        state = torch.load(args.state, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        step, log, running = state["step"], state["log"], state["running"]
        print(f"resumed {args.state} at step {step}", flush=True)
    log["args"] = vars(args)
    log["sessions"].append({"start_step": step, "threads": args.threads})
    wall_before = log["wall_s"]
    stop_signal = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda sig, frame: stop_signal.append(sig))
    start = time.time()

    def readout():
        ev = {traj: quick_eval(model, dev_caches[traj], dev_seeds, views) for traj, views in DEV_SETS.items()}
        ev.update(step=step, wall_s=wall_before + time.time() - start)
        log["evals"].append(ev)
        print(f"eval step {step}", json.dumps({t: {k: round(v, 2) for k, v in ev[t].items()} for t in DEV_SETS}),
              flush=True)
        score = sum(ev[t]["rot_err"] / ev[t]["id_rot_err"] for t in DEV_SETS)
        if args.best_out and (log["best"] is None or score < log["best"]["score"]):
            log["best"] = {"step": step, "score": score}
            save_checkpoint(model, args, args.best_out, step, ev["wall_s"], train_seeds)

    while step < args.steps and not stop_signal:
        stage = stage_at(stages, step)
        for g in opt.param_groups:
            g["lr"] = lr_at(args, step) * g["lr_mult"]
        batch = make_batch(caches[stage["trajectory"]], rng, train_seeds, stage["batch"], stage["views"])
        out = forward_train(model, batch["images"], args.dense_frames)
        k = out["depth"].shape[1]
        l_cam, cam_parts = camera_loss(out["pose_enc_list"], batch["pose_enc"], args.camera_loss)
        valid = batch["valid"][:, :k]
        l_depth, depth_err = conf_regression_loss(out["depth"], out["depth_conf"], batch["depth"][:, :k, ..., None],
                                                  valid, args.conf_alpha, args.grad_weight)
        l_point, point_err = conf_regression_loss(out["world_points"], out["world_points_conf"],
                                                  batch["points"][:, :k], valid, args.conf_alpha, args.grad_weight)
        loss = args.camera_weight * l_cam + args.depth_weight * l_depth + args.point_weight * l_point
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        opt.step()
        rec = {"step": step, "loss": float(loss.detach()), "cam": float(l_cam.detach()), **cam_parts, "depth_err": depth_err,
               "point_err": point_err, "gnorm": gnorm, "wall_s": wall_before + time.time() - start}
        ema = {k: rec[k] if running is None else 0.9 * running["ema_" + k] + 0.1 * rec[k] for k in cam_parts}
        running = {**rec, **{"ema_" + k: v for k, v in ema.items()}}
        step += 1
        if step % 25 == 1 or step == args.steps:
            log["history"].append(running)
            print(f"step {step - 1:5d} {running['wall_s']:7.0f}s loss {rec['loss']:.3f} T {ema['T']:.3f} "
                  f"R {ema['R']:.3f} FL {ema['FL']:.3f} depth {depth_err:.3f} pts {point_err:.3f} gn {gnorm:.2f} "
                  f"lr {lr_at(args, step - 1):.1e} {stage['trajectory']} {stage['batch']}x{stage['views']}", flush=True)
        timed_out = (args.minutes > 0 and time.time() - start > args.minutes * 60) or step == args.stop_step
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps or timed_out):
            readout()
            if args.curves:
                write_curves(log, args.curves)
        if args.out and args.save_every and step % args.save_every == 0:
            save_checkpoint(model, args, args.out, step, wall_before + time.time() - start, train_seeds)
        if args.state and step % args.state_every == 0 and not timed_out:
            log["wall_s"] = wall_before + time.time() - start
            save_state(args.state, model, opt, rng, step, log, running, args)
        if timed_out:
            print(f"stopping after {step} steps of a {args.steps}-step schedule", flush=True)
            break
    if stop_signal:
        print(f"signal {stop_signal[0]}: stopping after {step} steps", flush=True)
    log["steps_done"] = step
    log["wall_s"] = wall_before + time.time() - start
    log["train_seeds"] = [train_seeds[0], train_seeds[-1]]
    if args.state:
        save_state(args.state, model, opt, rng, step, log, running, args)
    if args.out:
        save_checkpoint(model, args, args.out, step, log["wall_s"], train_seeds)
    if args.log:
        write_json(args.log, log)
    if args.curves:
        write_curves(log, args.curves)
    return log


if __name__ == "__main__":
    main()
