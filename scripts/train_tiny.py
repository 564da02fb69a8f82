#!/usr/bin/env python
"""Train `vggt-tiny` (the embedded default model) from scratch on synthetic scenes, with VGGT's losses.

Data: scenes from qvggt_export.data.synthetic, training seeds only (TRAIN_SEEDS[0:num_scenes]; the last
DEV_SEEDS of TRAIN_SEEDS are held out for the experiment read-outs, and `synthetic-val` / calibration
seeds are never touched). Each scene is rendered once with 10 views (the same camera arc as the
10-view synthetic-val scenes) and cached; each sample draws `views` of them in random order.

Ground truth is normalised as VGGT trains: the first camera is the world frame and the scene scale is
the mean distance of the valid GT points to that origin; GT translation, depth and points are divided
by it.

Losses (VGGT): camera loss on the pose encoding over all refinement iterations (weights gamma^(n-1-i)),
translation + rotation + 0.5 * field of view, L1 or Huber; confidence-weighted depth and point losses
conf * |err| - alpha * log(conf); optional gradient loss on depth/points.

Deterministic by seed (same thread count). The shipped checkpoint (see qvggt_export/weights/vggt_tiny.md):
    python scripts/train_tiny.py --seed 0 --num-scenes 300 --steps 650 --threads 1 --lr 7e-4 --batch 2 \
        --views 8 --dense-frames 4 --cache-dir /tmp/qv_cache --out qvggt_export/weights/vggt_tiny.safetensors
synthetic-val report with trivial baselines:  python scripts/train_tiny.py --report --val-scenes 5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qvggt_export.data.synthetic import TRAIN_SEEDS, VAL_SEEDS, CALIBRATION_SEEDS, render_scene  # noqa: E402
from qvggt_export.geometry import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri  # noqa: E402
from qvggt_export.model import VGGT, save_vggt  # noqa: E402
from qvggt_export.model.presets import TINY_CONFIG, tiny_config  # noqa: E402

SCENE_VIEWS = 10  # views rendered per training scene (as synthetic-val)
DEV_SEEDS = range(TRAIN_SEEDS.stop - 16, TRAIN_SEEDS.stop)  # held-out training-range seeds for read-outs


# ---------------------------------------------------------------------------------------------- data

class SceneCache:
    """Renders training scenes lazily (once) and keeps them as compact arrays."""

    def __init__(self, image_size: tuple[int, int], cache_dir: str = "") -> None:
        self.image_size = image_size
        self.scenes: dict[int, tuple] = {}
        self.cache_dir = Path(cache_dir) / f"{image_size[0]}x{image_size[1]}" if cache_dir else None

    def render(self, seed: int):
        if seed in VAL_SEEDS or seed in CALIBRATION_SEEDS or seed not in TRAIN_SEEDS:
            raise ValueError(f"seed {seed} is not a training seed")
        s = render_scene(seed, SCENE_VIEWS, self.image_size)
        images = (s.images * 255).round().astype(np.uint8)
        return (images, s.depth.astype(np.float32), s.extrinsics.astype(np.float64),
                s.intrinsics.astype(np.float64), s.valid)

    def get(self, seed: int):
        if seed not in self.scenes:
            path = self.cache_dir / f"{seed}.npz" if self.cache_dir else None
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
    """Per-pair rotation / translation-direction errors (degrees) as in METRICS.md (float64)."""
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
    """Dev read-out on held-out training-range seeds: AUC@30, RRA/RTA@30, mean rot err, depth AbsRel."""
    model.eval()
    ers, ets, absrel = [], [], []
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
    model.train()
    er, et = np.concatenate(ers), np.concatenate(ets)
    m = np.maximum(er, et)
    auc = np.mean(np.cumsum(np.histogram(m, bins=np.arange(31))[0] / len(m))) * 100
    return {"auc30": float(auc), "rra30": float((er < 30).mean() * 100), "rta30": float((et < 30).mean() * 100),
            "rot_err": float(er.mean()), "absrel": float(np.mean(absrel))}


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


def val_report(checkpoint: str | None, scenes: int, views: int, image_size: tuple[int, int],
               baselines: bool = True) -> dict:
    """synthetic-val metrics (first `scenes` scenes, `views` views at `image_size`) of a checkpoint,
    an untrained model of the same config, and trivial baselines; all through qvggt_export.evaluate."""
    from qvggt_export.data.readers import SyntheticReader
    from qvggt_export.evaluate import evaluate
    from qvggt_export.model import load_model

    def run(predictor):
        reader = SyntheticReader(num_views=views, max_scenes=scenes, image_size=image_size)
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
    return {"scenes": scenes, "views": views, "image_size": list(image_size), "rows": rows}


# -------------------------------------------------------------------------------------------- training

def save_checkpoint(model, args, steps: int, wall_s: float, train_seeds) -> None:
    """save_vggt (config in the metadata) plus the training provenance."""
    model.eval()
    meta = {"qvggt_training": json.dumps({"script": "scripts/train_tiny.py", "seed": args.seed, "steps": steps,
                                           "train_seeds": [train_seeds[0], train_seeds[-1]],
                                           "wall_s": round(wall_s), "args": vars(args)})}
    save_vggt(model, args.out, extra_metadata=meta)
    print(f"wrote {args.out} after {steps} steps", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--stop-step", type=int, default=0,
                   help="stop after this many steps of the --steps schedule (replays a run cut by --minutes)")
    p.add_argument("--minutes", type=float, default=0.0, help="stop after this wall time (0: no limit)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--views", type=int, default=4, help="views per training sample")
    p.add_argument("--num-scenes", type=int, default=2000, help="training scenes: TRAIN_SEEDS[0:N]")
    p.add_argument("--height", type=int, default=84)
    p.add_argument("--width", type=int, default=112)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--camera-weight", type=float, default=5.0)
    p.add_argument("--depth-weight", type=float, default=1.0)
    p.add_argument("--point-weight", type=float, default=1.0)
    p.add_argument("--conf-alpha", type=float, default=0.2)
    p.add_argument("--grad-weight", type=float, default=0.0, help="gradient loss weight (0: off)")
    p.add_argument("--dense-frames", type=int, default=0, help="views per sample that get the dense losses (0: all)")
    p.add_argument("--camera-loss", choices=("l1", "huber"), default="l1")
    p.add_argument("--config", type=str, default="{}", help="JSON overrides of the vggt-tiny config")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cache-dir", type=str, default="", help="on-disk cache of rendered training scenes")
    p.add_argument("--report", type=str, default=None, nargs="?", const="",
                   help="only evaluate CHECKPOINT (default: the embedded vggt-tiny) and baselines on synthetic-val")
    p.add_argument("--val-scenes", type=int, default=10)
    p.add_argument("--no-baselines", action="store_true", help="--report: the checkpoint only")
    p.add_argument("--prerender", type=str, default="", help="only render seeds A:B into --cache-dir")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-scenes", type=int, default=8)
    p.add_argument("--eval-views", type=int, default=10)
    p.add_argument("--out", type=str, default="")
    p.add_argument("--save-every", type=int, default=0, help="also write --out every N steps")
    p.add_argument("--log", type=str, default="", help="JSON log file")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report is not None:
        ckpt = args.report or None
        rep = val_report(ckpt, args.val_scenes, args.eval_views, (args.height, args.width),
                         baselines=not args.no_baselines)
        text = json.dumps(rep, indent=1)
        print(text, flush=True)
        if args.log:
            Path(args.log).write_text(text)
        return rep
    if args.prerender:
        a, b = (int(x) for x in args.prerender.split(":"))
        cache = SceneCache((args.height, args.width), args.cache_dir)
        for seed in list(DEV_SEEDS[: args.eval_scenes]) + list(range(a, b)):
            cache.get(seed)
            cache.scenes.clear()
        return {}
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    overrides = json.loads(args.config)
    cfg = tiny_config(**overrides)
    model = VGGT(cfg).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config {cfg.to_dict()}\nparameters {n_params / 1e6:.2f} M", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    image_size = (args.height, args.width)
    cache = SceneCache(image_size, args.cache_dir)
    train_seeds = list(TRAIN_SEEDS[: args.num_scenes])
    assert not set(train_seeds) & set(DEV_SEEDS)
    dev_seeds = list(DEV_SEEDS[: args.eval_scenes])
    dev_cache = SceneCache(image_size, args.cache_dir)
    log = {"args": vars(args), "config": cfg.to_dict(), "parameters": n_params, "history": [], "evals": []}
    start = time.time()
    step = 0
    running = None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = make_batch(cache, rng, train_seeds, args.batch, args.views)
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
        rec = {"step": step, "loss": float(loss), "cam": float(l_cam), **cam_parts, "depth_err": depth_err,
               "point_err": point_err, "gnorm": gnorm, "time": time.time() - start}
        running = rec if running is None else {k: 0.9 * running[k] + 0.1 * rec[k] for k in rec}
        if step % 25 == 0 or step == args.steps - 1:
            log["history"].append(rec)
            print(f"step {step:5d} {time.time() - start:7.0f}s loss {running['loss']:.3f} T {running['T']:.3f} "
                  f"R {running['R']:.3f} FL {running['FL']:.3f} depth {running['depth_err']:.3f} "
                  f"pts {running['point_err']:.3f} gn {running['gnorm']:.2f} lr {lr_at(step):.1e}", flush=True)
        last = step == args.steps - 1
        timed_out = (args.minutes > 0 and time.time() - start > args.minutes * 60) or step + 1 == args.stop_step
        if args.eval_every and (step % args.eval_every == args.eval_every - 1 or last or timed_out):
            ev = quick_eval(model, dev_cache, dev_seeds, args.eval_views)
            ev.update(step=step, time=time.time() - start)
            log["evals"].append(ev)
            print("eval", json.dumps({k: round(v, 3) for k, v in ev.items()}), flush=True)
        if args.out and args.save_every and step % args.save_every == args.save_every - 1 and not (last or timed_out):
            save_checkpoint(model, args, step + 1, time.time() - start, train_seeds)
            model.train()
        if timed_out:
            print(f"stopping after {step + 1} steps of a {args.steps}-step schedule", flush=True)
            break
    log["steps_done"] = step + 1
    log["wall_s"] = time.time() - start
    log["train_seeds"] = [train_seeds[0], train_seeds[-1]]
    log["scenes_rendered"] = len(cache.scenes)
    if args.out:
        save_checkpoint(model, args, step + 1, log["wall_s"], train_seeds)
    if args.log:
        Path(args.log).write_text(json.dumps(log, indent=1))
    return log


if __name__ == "__main__":
    main()
