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
`--rotation-warp 28,6,6` adds exact pure-rotation pairs: a view and the view of the same camera turned about its
centre by up to 28 / 6 / 6 deg of yaw / pitch / roll (a homography K R K^-1 of the rendered view, no parallax), so
the turn is not yaw-only and small turns are common; `--shift-unit ''` leaves the shift batches out.
`--translation-pairs 0.3` adds pure-translation pairs: a view and the view its camera sees after a step of up to
0.3 scene units (metres) in any direction without turning, rendered (so with real parallax) and labelled [I | t];
they teach that forward or sideways motion is not a turn. Their read-out is the turn the model predicts where there
is none and its translation direction error.
`--track-weight 0.05` adds VGGT's fourth loss: a track head (the released modules at presets.TINY_TRACKER's size,
trained alongside, never saved) tracks 64 query points of view 0 into view 1 of every pair, supervised by the
pair's ground-truth tracks (a shift moves them by the shift, a warp by its homography, rendered pairs by their
depth and cameras with an occlusion test); its read-out is the held-out tracks' pixel error.
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

from qvggt_export.data.synthetic import render_views
from qvggt_export.errors import QVGGTError
from qvggt_export.geometry import extri_intri_to_pose_encoding, pose_encoding_to_extri_intri
from qvggt_export.model import VGGT, load_model, save_vggt
from qvggt_export.model.presets import TINY_TRACKER, tiny_config
from qvggt_export.model.track_head import TrackHead

_spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).with_name("train_tiny.py"))
train_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tiny)

IMAGE_SIZE = (84, 112)
FOCAL = IMAGE_SIZE[1] / 2 / np.tan(np.deg2rad(65) / 2)  # the middle of the renderer's field-of-view range
TRAIN_SCENES, HELD_OUT_SCENES = range(0, 300), range(300, 310)
CLIP_TRAIN_SCENES = range(0, 600)  # --clip-train scenes (training seeds, disjoint from DEV_SEEDS)
CLIP_KINDS = tuple(kind for kind in train_tiny.TRAJECTORIES if kind != "arc")  # video-like clips, time order
CLIP_GAPS = (1, 2, 4, 9)  # frame gaps of the clip read-out (clips have train_tiny.SCENE_VIEWS = 10 frames)
# A turn of at most 40 deg keeps every ray of the turned camera in front of the first (the widest rendered view's
# corner rays are 46 deg off its axis), so rotated_pair's homography never divides by z <= 0.
MAX_WARP_DEGREES = 40.0
YAW = 4  # pose-encoding index of the quaternion's y component (x, y, z, w after the translation)
# Training cameras stand >= 0.5 m from the walls and ceiling and >= 0.7 m from the objects (arc cameras 2.3 m or
# more from the centre, objects within 1.6 m of it), so a step of at most this stays in free space.
MAX_STEP = 0.35


def shifted_pair(image: np.ndarray, shift: int, max_shift: int):
    """[3, H, W] uint8 -> the pair (view, view shifted by `shift` px), extrinsics [2, 3, 4], intrinsics [2, 3, 3]."""
    padded = np.pad(image.astype(np.float32) / 255.0, ((0, 0), (0, 0), (max_shift, max_shift)), mode="reflect")
    width = image.shape[-1]
    pair = np.stack([padded[:, :, max_shift:max_shift + width], padded[:, :, max_shift + shift:max_shift + shift + width]])
    extrinsics = np.tile(np.eye(3, 4), (2, 1, 1))
    extrinsics[1, :, :3] = Rotation.from_euler("y", np.arctan(shift / FOCAL)).as_matrix().T
    intrinsics = np.tile(np.array([[FOCAL, 0, width / 2], [0, FOCAL, image.shape[1] / 2], [0, 0, 1.0]]), (2, 1, 1))
    return pair, extrinsics, intrinsics


def labelled_batch(pairs) -> tuple[torch.Tensor, ...]:
    """[(pair [2, 3, H, W], extrinsics [2, 3, 4], intrinsics [2, 3, 3][, tracks [2, N, 2], visible [2, N]])] ->
    (images [B, 2, 3, H, W], pose encodings[, tracks [B, 2, N, 2], visible [B, 2, N]])."""
    images, extrinsics, intrinsics, *tracks = (np.stack(parts) for parts in zip(*pairs))
    pose = extri_intri_to_pose_encoding(torch.from_numpy(extrinsics), torch.from_numpy(intrinsics), IMAGE_SIZE)
    return torch.from_numpy(images), pose.float(), *(torch.from_numpy(part) for part in tracks)


def _query_points(rng: np.random.Generator, n: int) -> np.ndarray:
    """n query positions (x, y) uniform over the image, in pixels."""
    return rng.uniform(0, 1, (n, 2)) * np.array([IMAGE_SIZE[1] - 1, IMAGE_SIZE[0] - 1])


def _tracks(query: np.ndarray, moved: np.ndarray, seen: np.ndarray):
    """Queries of view 0 and where view 1 shows them -> (tracks [2, N, 2], visible [2, N]): visible in view 1
    where `seen` and inside the image."""
    inside = seen & (moved >= 0).all(-1) & (moved[:, 0] <= IMAGE_SIZE[1] - 1) & (moved[:, 1] <= IMAGE_SIZE[0] - 1)
    return np.stack([query, moved]).astype(np.float32), np.stack([np.ones_like(inside), inside])


def shift_tracks(rng: np.random.Generator, n: int, shift: int):
    """Tracks of a shifted pair: view 1 shows view 0's pixel x at x - shift (reflected content is no match)."""
    query = _query_points(rng, n)
    return _tracks(query, query - np.array([shift, 0.0]), np.ones(n, dtype=bool))


def warp_tracks(rng: np.random.Generator, n: int, intrinsics: np.ndarray, rotation: np.ndarray):
    """Tracks of a rotated pair: the turned camera shows view 0's pixel p at K R K^-1 p (in front of it)."""
    query = _query_points(rng, n)
    rays = np.concatenate([query, np.ones((n, 1))], -1) @ (intrinsics @ rotation @ np.linalg.inv(intrinsics)).T
    front = rays[:, 2] > 1e-6
    return _tracks(query, rays[:, :2] / np.where(front, rays[:, 2], 1.0)[:, None], front)


def make_pairs(cache, rng: np.random.Generator, seeds, n: int, max_shift: int, unit: int = 1, track_points: int = 0):
    """n shifted pairs of random views of `seeds`; shifts are multiples of `unit` px in [-max_shift, max_shift].
    With `track_points`, each pair also carries that many ground-truth tracks."""
    pairs = []
    for _ in range(n):
        image = cache.get(int(rng.choice(seeds)))[0][int(rng.integers(train_tiny.SCENE_VIEWS))]
        shift = unit * int(rng.integers(-(max_shift // unit), max_shift // unit + 1))
        pair = shifted_pair(image, shift, max_shift)
        pairs.append((*pair, *shift_tracks(rng, track_points, shift)) if track_points else pair)
    return labelled_batch(pairs)


def rotated_pair(image: np.ndarray, intrinsics: np.ndarray, rotation: np.ndarray):
    """[3, H, W] uint8, its camera's K [3, 3] and a rotation R [3, 3] -> the pair (view, the view a camera turned
    by R about its centre sees), extrinsics [2, 3, 4] ([I | 0], [R | 0]), intrinsics [2, 3, 3]. With no parallax
    the second view is exact: pixel x of it looks along the ray K^-1 x of the turned camera, which is the first
    view's pixel K R^T K^-1 x, sampled bilinearly (reflected about the border where the turned camera sees past it)."""
    height, width = image.shape[1:]
    v, u = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    rays = np.stack([u, v, np.ones_like(u)], -1) @ (intrinsics @ rotation.T @ np.linalg.inv(intrinsics)).T
    source = rays[..., :2] / rays[..., 2:]  # z > 0 for turns up to MAX_WARP_DEGREES
    grid = torch.from_numpy(2 * source / np.array([width - 1, height - 1]) - 1)[None]  # float64: no turn = same view
    first = torch.from_numpy(image.astype(np.float64) / 255.0)[None]
    second = torch.nn.functional.grid_sample(first, grid, mode="bilinear", padding_mode="reflection",
                                             align_corners=True)
    extrinsics = np.tile(np.eye(3, 4), (2, 1, 1))
    extrinsics[1, :, :3] = rotation
    return np.concatenate([first, second]).astype(np.float32), extrinsics, np.stack([intrinsics, intrinsics])


def draw_rotation(rng: np.random.Generator, max_degrees) -> np.ndarray:
    """A turn about the camera's y, x, z axes (yaw, pitch, roll) of at most `max_degrees` each; one scale for all
    three axes, uniform in [0, 1], so small and near-zero turns are as common as in short video gaps."""
    angles = rng.uniform() * rng.uniform(-1, 1, 3) * np.asarray(max_degrees, dtype=np.float64)
    return Rotation.from_euler("yxz", angles, degrees=True).as_matrix()


def warp_pairs(cache, rng: np.random.Generator, seeds, n: int, max_degrees, track_points: int = 0):
    """n pure-rotation pairs (rotated_pair) of random views of `seeds`, turns drawn by draw_rotation."""
    pairs = []
    for _ in range(n):
        scene = cache.get(int(rng.choice(seeds)))
        view = int(rng.integers(train_tiny.SCENE_VIEWS))
        rotation = draw_rotation(rng, max_degrees)
        pair = rotated_pair(scene[0][view], scene[3][view], rotation)
        pairs.append((*pair, *warp_tracks(rng, track_points, scene[3][view], rotation)) if track_points else pair)
    return labelled_batch(pairs)


def draw_step(rng: np.random.Generator, max_step: float) -> np.ndarray:
    """A camera-frame step in a uniformly random direction (forward as often as sideways), length uniform in
    [0, max_step], so small steps are as common as between neighbouring video frames."""
    direction = rng.normal(size=3)
    return rng.uniform(0, max_step) * direction / np.linalg.norm(direction)


def moved_sample(seed: int, scene, view: int, step: np.ndarray):
    """View `view` of training scene `seed` (its cached arrays `scene`) and the view its camera renders after moving
    by `step` (camera frame, no turn), as a train_tiny.make_sample sample: re-based on the first camera and
    scale-normalised, extrinsics [I | 0], [I | -step / scale]."""
    extrinsic, intrinsic = scene[2][view].copy(), scene[3][view]
    extrinsic[:, 3] -= step  # camera centre c' = c + R^T step
    moved = render_views(seed, extrinsic[None], intrinsic[None], IMAGE_SIZE)
    moved_image = (moved.images[0] * 255).round().astype(np.uint8)  # as the scene cache stores views
    two_views = tuple(np.stack([part[view], new]) for part, new in zip(
        scene, (moved_image, moved.depth[0], moved.extrinsics[0].astype(np.float64), intrinsic, moved.valid[0])))
    return train_tiny.make_sample(two_views, np.array([0, 1]))


def sample_pairs(samples, rng: np.random.Generator, track_points: int):
    """Two-view make_sample samples -> labelled_batch, with that many ground-truth tracks of each
    (train_tiny.track_targets: projection and occlusion) when `track_points`."""
    return labelled_batch([(sample[0], sample[4], sample[5],
                            *(train_tiny.track_targets(*sample[1:], track_points, rng) if track_points else ()))
                           for sample in samples])


def move_pairs(cache, rng: np.random.Generator, seeds, n: int, max_step: float, track_points: int = 0):
    """n pure-translation pairs (moved_sample) of random views of `seeds`, steps drawn by draw_step."""
    samples = []
    for _ in range(n):
        seed = int(rng.choice(seeds))
        samples.append(moved_sample(seed, cache.get(seed), int(rng.integers(train_tiny.SCENE_VIEWS)),
                                    draw_step(rng, max_step)))
    return sample_pairs(samples, rng, track_points)


def clip_pairs(cache, rng: np.random.Generator, seeds, n: int, max_gap: int, track_points: int = 0):
    """n pairs of frames (k, k + g) of random clips, g in 1..max_gap, in either order, photometric jitter."""
    samples = []
    for _ in range(n):
        scene = cache.get(seeds[int(rng.integers(len(seeds)))])
        gap = int(rng.integers(1, max_gap + 1))
        k = int(rng.integers(0, train_tiny.SCENE_VIEWS - gap))
        samples.append(train_tiny.make_sample(scene, np.array([k, k + gap] if rng.random() < 0.5 else [k + gap, k]),
                                              rng))
    return sample_pairs(samples, rng, track_points)


def camera_forward(model: VGGT, images: torch.Tensor):
    return model.camera_head(model.aggregator(images)[model.config.depth - 1])


def track_forward(model: VGGT, track_head: TrackHead, layers: dict, tracks: torch.Tensor):
    """The track head on the aggregator's `layers`, queried at view 0's ground-truth positions tracks[:, 0]."""
    return track_head(layers, *IMAGE_SIZE, model.aggregator.patch_start_idx, tracks[:, 0])


@torch.no_grad()
def track_read_out(model: VGGT, track_head: TrackHead, images: torch.Tensor, tracks: torch.Tensor,
                   visible: torch.Tensor) -> tuple[float, float]:
    """(mean pixel error of the tracks in view 1 where visible, the same for tracks that stay at their queries)."""
    model.eval()
    predicted = track_forward(model, track_head, model.aggregator(images), tracks)[0][-1]
    model.train()
    seen = visible[:, 1]
    return (float((predicted[:, 1] - tracks[:, 1]).norm(dim=-1)[seen].mean()),
            float((tracks[:, 0] - tracks[:, 1]).norm(dim=-1)[seen].mean()))


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
def move_read_out(model: VGGT, images: torch.Tensor, pose: torch.Tensor) -> tuple[float, float]:
    """(mean turn in deg the model predicts for the second views, where there is none; mean angle in deg between
    the predicted and the true translation direction)."""
    model.eval()
    pred = camera_forward(model, images)[-1][:, 1].double()
    model.train()
    quaternion = torch.nn.functional.normalize(pred[:, 3:7], dim=-1)
    turn = torch.rad2deg(2 * torch.acos(quaternion[:, 3].abs().clamp(max=1)))
    cosine = torch.nn.functional.cosine_similarity(pred[:, :3], pose[:, 1, :3].double(), dim=-1)
    return float(turn.mean()), float(torch.rad2deg(torch.acos(cosine.clamp(-1, 1))).mean())


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
        return [int(unit) for unit in text.split(",") if unit]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None


def parse_warp_degrees(text: str) -> list[float]:
    """--rotation-warp 'YAW,PITCH,ROLL' -> the three largest turns in degrees (a one-line error when malformed)."""
    try:
        degrees = [float(angle) for angle in text.split(",")]
    except ValueError:
        degrees = []
    if len(degrees) != 3 or min(degrees) < 0 or sum(degrees) > MAX_WARP_DEGREES:
        raise SystemExit(f"error: --rotation-warp takes YAW,PITCH,ROLL in degrees, >= 0, summing to at most "
                         f"{MAX_WARP_DEGREES:g}, got {text!r}")
    return degrees


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
                        "alternates units batch by batch; '' for no shift batches")
    p.add_argument("--rotation-warp", default="", metavar="YAW,PITCH,ROLL",
                   help="also train on exact pure-rotation pairs (a view and its homography K R K^-1) turned by at "
                        "most these degrees about each axis; their batches take turns after the shift batches")
    p.add_argument("--translation-pairs", type=float, default=0.0, metavar="MAX_STEP",
                   help=f"also train on pure-translation pairs: a view and the view its camera renders after a step "
                        f"of up to MAX_STEP (<= {MAX_STEP}) scene units in any direction, no turn; their batches "
                        f"take turns after the warp batches")
    p.add_argument("--track-weight", type=float, default=0.0,
                   help="also train a track head (presets.TINY_TRACKER, training only) with VGGT's tracking loss "
                        "at this weight (the paper's: 0.05) on every pair's ground-truth tracks")
    p.add_argument("--track-points", type=int, default=64, help="query points per pair for the tracking loss")
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
    args.rotation_warp = parse_warp_degrees(args.rotation_warp) if args.rotation_warp else []
    if not args.shift_unit and not args.rotation_warp and not args.translation_pairs and not args.clip_train:
        raise SystemExit("error: nothing to train on: give --shift-unit, --rotation-warp, --translation-pairs or "
                         "--clip-train")
    if not 0 <= args.translation_pairs <= MAX_STEP:
        raise SystemExit(f"error: --translation-pairs takes a step in 0..{MAX_STEP} scene units, got "
                         f"{args.translation_pairs:g}")
    if args.track_weight < 0 or args.track_points < 1:
        raise SystemExit(f"error: need --track-weight >= 0 and --track-points >= 1, got {args.track_weight:g} and "
                         f"{args.track_points}")
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
            train_tiny.warm_start(model, load_model(args.init))
    except (QVGGTError, OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    cache = train_tiny.SceneCache(IMAGE_SIZE, args.cache_dir, "arc")
    held_out = {}  # batch kind -> (images, pose, the identity predictor's L1: frame 0 is the identity)
    for unit in args.shift_unit:
        held_out[f"unit {unit}"] = make_pairs(cache, np.random.default_rng(7), HELD_OUT_SCENES, 64, args.max_shift,
                                              unit)
    if args.rotation_warp:
        held_out["warp"] = warp_pairs(cache, np.random.default_rng(7), HELD_OUT_SCENES, 64, args.rotation_warp)
    held_out = {kind: (images, pose, float((pose[:, 1, 3:7] - pose[:, 0, 3:7]).abs().mean()))
                for kind, (images, pose) in held_out.items()}
    held_out_moves = (move_pairs(cache, np.random.default_rng(7), HELD_OUT_SCENES, 64, args.translation_pairs)
                      if args.translation_pairs else None)
    params = [q for name, q in model.named_parameters() if not name.startswith(("depth_head", "point_head"))]
    track_points = args.track_points if args.track_weight else 0
    track_head = None
    if track_points:
        cfg = model.config
        track_head = TrackHead(2 * cfg.embed_dim, cfg.patch_size, cfg.dpt_out_channels, cfg.intermediate_layer_idx,
                               TINY_TRACKER).train()
        params += list(track_head.parameters())
        held_out_tracks = make_pairs(cache, np.random.default_rng(8), HELD_OUT_SCENES, 64, args.max_shift,
                                     args.shift_unit[-1] if args.shift_unit else 1, track_points)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    schedule = argparse.Namespace(lr=args.lr, warmup=min(50, args.steps), steps=args.steps)
    # Taken in turn, one a step: shift units (int), then "warp", "move" and "clip".
    batch_kinds = [*args.shift_unit, *(["warp"] if args.rotation_warp else []),
                   *(["move"] if args.translation_pairs else []), *(["clip"] if args.clip_train else [])]
    clip_cache = train_tiny.SceneCache(IMAGE_SIZE, args.cache_dir, args.clip_train) if args.clip_train else None
    rng, start = np.random.default_rng(args.seed), time.time()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = train_tiny.lr_at(schedule, step)
        turn = step % len(batch_kinds)
        if batch_kinds[turn] == "clip":
            batch = clip_pairs(clip_cache, rng, CLIP_TRAIN_SCENES, args.batch, args.clip_gap, track_points)
        elif batch_kinds[turn] == "warp":
            batch = warp_pairs(cache, rng, TRAIN_SCENES, args.batch, args.rotation_warp, track_points)
        elif batch_kinds[turn] == "move":
            batch = move_pairs(cache, rng, TRAIN_SCENES, args.batch, args.translation_pairs, track_points)
        else:
            batch = make_pairs(cache, rng, TRAIN_SCENES, args.batch, args.max_shift, batch_kinds[turn], track_points)
        layers = model.aggregator(batch[0])
        loss, _ = train_tiny.camera_loss(model.camera_head(layers[model.config.depth - 1]), batch[1])
        if track_head is not None:
            tracking, _ = train_tiny.track_loss(*track_forward(model, track_head, layers, batch[2]), *batch[2:])
            loss = loss + args.track_weight * tracking
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            reports = []
            for kind, pairs in held_out.items():
                ratio, sign = read_out(model, *pairs)
                reports.append(f"{kind}: rotation L1 / identity's {ratio:.3f} yaw sign accuracy {sign:.2f}")
            if track_head is not None:
                error, still = track_read_out(model, track_head, held_out_tracks[0], *held_out_tracks[2:])
                reports.append(f"tracks: error {error:.2f} px (not moving: {still:.2f} px)")
            if held_out_moves is not None:
                false_turn, direction = move_read_out(model, *held_out_moves)
                reports.append(f"move: predicted turn {false_turn:.2f} deg (none), translation direction error "
                               f"{direction:.1f} deg")
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
