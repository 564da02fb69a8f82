"""Learnability probe: can a vggt-tiny recipe learn the simplest cross-view task within a few hundred steps?

Each sample is a pair: a training-scene view and the same view shifted sideways by s pixels (|s| <= --max-shift,
reflect-padded), labelled as the yaw a camera turning by atan(s / f) would have. Only the aggregator and the
camera head train, on VGGT's camera loss. Relative pose on rendered clips needs at least this (matching tokens
across views and reading off where the match lies), so a recipe that cannot learn the sign of the shift here
will not learn pose on the real split at the same budget. Every --eval-every steps it prints, on 64 fixed pairs
of held-out scenes, the quaternion L1 error relative to the identity predictor's and the sign accuracy of the
predicted yaw (a constant predictor scores the share of one sign, about 0.5). `--shift-unit 14` shifts by
whole patches only, so each token of the shifted view equals one of the first view's (bar the border);
`--shift-unit 14,1` alternates whole-patch and sub-patch batches and reads each out on its own pairs.

    python scripts/probe_shift.py --init vggt-tiny --steps 600 --cache-dir runs/cache [--out probed.safetensors]

`--out` keeps the probed model, so that a curriculum can start from it (`train_tiny.py --init`). `--clip-kinds
pan,orbit,forward` ends with the transfer read-out: on the training script's held-out DEV_SEEDS clips of each kind,
the relative rotation error of pairs (k, k + gap) in both orders / the identity predictor's, by frame gap.
`--clip-train video --clip-gap 2` adds batches of real clip pairs (frames at most 2 apart) to the turns.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.transform import Rotation

from qvggt_export.errors import QVGGTError
from qvggt_export.geometry import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from qvggt_export.model import VGGT, load_model, save_vggt
from qvggt_export.model.presets import tiny_config

_spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).with_name("train_tiny.py"))
train_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tiny)

IMAGE_SIZE = (84, 112)
FOCAL = IMAGE_SIZE[1] / 2 / np.tan(np.deg2rad(65) / 2)  # the middle of the renderer's field-of-view range
TRAIN_SCENES, HELD_OUT_SCENES = range(0, 300), range(300, 310)
CLIP_TRAIN_SCENES = range(0, 600)  # --clip-train scenes (training seeds, disjoint from DEV_SEEDS)
CLIP_KINDS = tuple(kind for kind in train_tiny.TRAJECTORIES if kind != "arc")  # video-like clips, time order
CLIP_GAPS = (1, 2, 4, 9)  # frame gaps of the clip read-out (clips have train_tiny.SCENE_VIEWS = 10 frames)
YAW = 4  # pose-encoding index of the quaternion's y component (x, y, z, w after the translation)


def shifted_pair(image: np.ndarray, shift: int, max_shift: int):
    """[3, H, W] uint8 -> the pair (view, view shifted by `shift` px), extrinsics [2, 3, 4], intrinsics [2, 3, 3]."""
    padded = np.pad(image.astype(np.float32) / 255.0, ((0, 0), (0, 0), (max_shift, max_shift)), mode="reflect")
    width = image.shape[-1]
    pair = np.stack([padded[:, :, max_shift:max_shift + width], padded[:, :, max_shift + shift:max_shift + shift + width]])
    extrinsics = np.tile(np.eye(3, 4), (2, 1, 1))
    extrinsics[1, :, :3] = Rotation.from_euler("y", np.arctan(shift / FOCAL)).as_matrix().T
    intrinsics = np.tile(np.array([[FOCAL, 0, width / 2], [0, FOCAL, image.shape[1] / 2], [0, 0, 1.0]]), (2, 1, 1))
    return pair, extrinsics, intrinsics


def make_pairs(cache, rng: np.random.Generator, seeds, n: int, max_shift: int, unit: int = 1):
    """n shifted pairs of random views of `seeds`; shifts are multiples of `unit` px in [-max_shift, max_shift]."""
    pairs, extrinsics, intrinsics = zip(*(
        shifted_pair(cache.get(int(rng.choice(seeds)))[0][int(rng.integers(train_tiny.SCENE_VIEWS))],
                     unit * int(rng.integers(-(max_shift // unit), max_shift // unit + 1)), max_shift)
        for _ in range(n)))
    pose = extri_intri_to_pose_encoding(torch.from_numpy(np.stack(extrinsics)), torch.from_numpy(np.stack(intrinsics)),
                                        IMAGE_SIZE)
    return torch.from_numpy(np.stack(pairs)), pose.float()


def clip_pairs(cache, rng: np.random.Generator, seeds, n: int, max_gap: int):
    """n pairs of frames (k, k + g) of random clips, g in 1..max_gap, in either order, photometric jitter."""
    samples = []
    for _ in range(n):
        scene = cache.get(seeds[int(rng.integers(len(seeds)))])
        gap = int(rng.integers(1, max_gap + 1))
        k = int(rng.integers(0, train_tiny.SCENE_VIEWS - gap))
        samples.append(train_tiny.make_sample(scene, np.array([k, k + gap] if rng.random() < 0.5 else [k + gap, k]),
                                              rng))
    images, extrinsics, intrinsics = (np.stack([sample[i] for sample in samples]) for i in (0, 4, 5))
    pose = extri_intri_to_pose_encoding(torch.from_numpy(extrinsics), torch.from_numpy(intrinsics), IMAGE_SIZE)
    return torch.from_numpy(images), pose.float()


def camera_forward(model: VGGT, images: torch.Tensor):
    return model.camera_head(model.aggregator(images)[model.config.depth - 1])


@torch.no_grad()
def read_out(model: VGGT, images: torch.Tensor, pose: torch.Tensor, identity_l1: float) -> tuple[float, float]:
    """(quaternion L1 of the second views / the identity predictor's, sign accuracy of the predicted yaw)."""
    model.eval()
    pred = camera_forward(model, images)[-1][:, 1]
    model.train()
    gt = pose[:, 1]
    return (float((pred[:, 3:7] - gt[:, 3:7]).abs().mean()) / identity_l1,
            float(((pred[:, YAW] * gt[:, YAW]) > 0).float().mean()))


@torch.no_grad()
def clip_read_out(model: VGGT, cache, seeds, gaps=CLIP_GAPS) -> dict[int, tuple[float, float]]:
    """gap -> (mean relative rotation error in deg, the identity predictor's) over the pairs (k, k + gap) and
    (k + gap, k) of each clip in `cache` (frames in time order)."""
    model.eval()
    errors = {gap: ([], []) for gap in gaps}
    identity_pair = np.tile(np.eye(3, 4), (2, 1, 1))
    for seed in seeds:
        scene = cache.get(seed)
        for gap in gaps:
            pairs = [(k, k + gap) for k in range(train_tiny.SCENE_VIEWS - gap)]
            samples = [train_tiny.make_sample(scene, np.array(pair)) for pair in pairs + [p[::-1] for p in pairs]]
            pose = camera_forward(model, torch.from_numpy(np.stack([sample[0] for sample in samples])))[-1]
            for encoding, sample in zip(pose.double(), samples):
                extrinsics = pose_encoding_to_extri_intri(encoding, IMAGE_SIZE)[0].numpy()
                errors[gap][0].append(train_tiny._rel_errors(extrinsics, sample[4])[0])
                errors[gap][1].append(train_tiny._rel_errors(identity_pair, sample[4])[0])
    model.train()
    return {gap: (float(np.concatenate(ours).mean()), float(np.concatenate(identity).mean()))
            for gap, (ours, identity) in errors.items()}


def _units(text: str) -> list[int]:
    try:
        return [int(unit) for unit in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="", help="checkpoint to start from ('vggt-tiny': the embedded model; '': random)")
    p.add_argument("--config", default="{}", help="JSON overrides of the vggt-tiny config (e.g. a DINOv2 encoder)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-shift", type=int, default=14, help="largest shift in pixels (14: one patch)")
    p.add_argument("--shift-unit", type=_units, default=[1],
                   help="shifts are multiples of this (14: whole patches, so tokens match exactly); a comma list "
                        "alternates units batch by batch")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default="", help="scene cache of scripts/train_tiny.py (rendered when missing)")
    p.add_argument("--out", default="", help="write the probed model here (safetensors), e.g. to start a run from it")
    p.add_argument("--clip-train", default="", help="also train on pairs of clips of this kind (pan, orbit, forward, "
                                                    "video): its batches take turns with the shift batches")
    p.add_argument("--clip-gap", type=int, default=2, help="largest frame gap of the --clip-train pairs")
    p.add_argument("--clip-kinds", default="", help="comma list of clip kinds (pan, orbit, forward, video) for the "
                                                   "transfer read-out at the end")
    p.add_argument("--clip-scenes", type=int, default=8, help="DEV_SEEDS scenes per clip kind of that read-out")
    args = p.parse_args(argv)
    if not all(1 <= unit <= args.max_shift < IMAGE_SIZE[1] for unit in args.shift_unit):
        raise SystemExit(f"error: need 1 <= --shift-unit <= --max-shift < {IMAGE_SIZE[1]}, got "
                         f"{','.join(map(str, args.shift_unit))} and {args.max_shift}")
    read_out_kinds = [kind for kind in args.clip_kinds.split(",") if kind]
    if not set(read_out_kinds) <= set(CLIP_KINDS) or not 1 <= args.clip_scenes <= len(train_tiny.DEV_SEEDS):
        raise SystemExit(f"error: --clip-kinds takes {', '.join(CLIP_KINDS)} and --clip-scenes "
                         f"1..{len(train_tiny.DEV_SEEDS)}, got {args.clip_kinds!r} and {args.clip_scenes}")
    if args.clip_train and (args.clip_train not in CLIP_KINDS or not 1 <= args.clip_gap < train_tiny.SCENE_VIEWS):
        raise SystemExit(f"error: --clip-train takes {', '.join(CLIP_KINDS)} and --clip-gap "
                         f"1..{train_tiny.SCENE_VIEWS - 1}, got {args.clip_train!r} and {args.clip_gap}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        model = VGGT(tiny_config(**json.loads(args.config))).train()
        train_tiny.init_encoder_embeddings(model)
        if args.init:
            train_tiny.warm_start(model, load_model(None if args.init == "vggt-tiny" else args.init))
    except (QVGGTError, OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    cache = train_tiny.SceneCache(IMAGE_SIZE, args.cache_dir, "arc")
    held_out = {}  # unit -> (images, pose, the identity predictor's L1: frame 0 is the identity)
    for unit in args.shift_unit:
        images, pose = make_pairs(cache, np.random.default_rng(7), HELD_OUT_SCENES, 64, args.max_shift, unit)
        held_out[unit] = images, pose, float((pose[:, 1, 3:7] - pose[:, 0, 3:7]).abs().mean())
    params = [q for name, q in model.named_parameters() if not name.startswith(("depth_head", "point_head"))]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = argparse.Namespace(lr=args.lr, warmup=min(50, args.steps), steps=args.steps)
    batch_kinds = [*args.shift_unit, *(["clip"] if args.clip_train else [])]  # taken in turn, one a step
    clip_cache = train_tiny.SceneCache(IMAGE_SIZE, args.cache_dir, args.clip_train) if args.clip_train else None
    rng, start = np.random.default_rng(args.seed), time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = train_tiny.lr_at(schedule, step)
        turn = step % len(batch_kinds)
        if batch_kinds[turn] == "clip":
            images, pose = clip_pairs(clip_cache, rng, CLIP_TRAIN_SCENES, args.batch, args.clip_gap)
        else:
            images, pose = make_pairs(cache, rng, TRAIN_SCENES, args.batch, args.max_shift, batch_kinds[turn])
        loss, _ = train_tiny.camera_loss(camera_forward(model, images), pose)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            reports = []
            for unit, pairs in held_out.items():
                ratio, sign = read_out(model, *pairs)
                reports.append(f"unit {unit}: rotation L1 / identity's {ratio:.3f} yaw sign accuracy {sign:.2f}")
            print(f"step {step + 1:5d} {time.time() - start:6.0f}s " + "; ".join(reports), flush=True)
    if args.out:
        save_vggt(model.eval(), args.out)
    for kind in read_out_kinds:
        by_gap = clip_read_out(model, train_tiny.SceneCache(IMAGE_SIZE, args.cache_dir, kind),
                               train_tiny.DEV_SEEDS[:args.clip_scenes])
        print(f"{kind} clips, rotation error / identity's by frame gap: " + ", ".join(
            f"{gap}: {ours:.2f} / {identity:.2f} deg = {ours / identity:.3f}" for gap, (ours, identity) in by_gap.items()),
            flush=True)


if __name__ == "__main__":
    main()
