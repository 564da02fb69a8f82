"""Linear probe: is the relative rotation between two views decodable from a checkpoint's aggregator?

For pairs (view 0, view k) of training-range video clips, features of the last aggregator layer (view k's
camera token, both views' mean patch tokens and their mean difference) are fitted to the ground-truth relative
rotation (axis-angle, degrees) by ridge regression on one set of scenes and scored on held-out ones (the
dev seeds of scripts/train_tiny.py and more). `--pixels` fits coarse pixels of both views instead (a 6 x 8
colour grid each): a control of what the images alone give a linear model. A model that has formed
cross-view correspondences should beat both the constant predictor and the pixel control by far.

    python scripts/probe_pose.py CHECKPOINT [--pixels] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from qvggt_export.errors import QVGGTError
from qvggt_export.model.checkpoint import load_vggt

_spec = importlib.util.spec_from_file_location("train_tiny", Path(__file__).with_name("train_tiny.py"))
train_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_tiny)

PAIRED_VIEWS = (2, 5, 8)  # view k of each pair (0, k): short, middle and long baselines of a clip


def pair_features(model, cache, seeds, pixels: bool):
    features, rotations = [], []
    start = model.aggregator.patch_start_idx
    for seed in seeds:
        scene = cache.get(seed)
        for k in PAIRED_VIEWS:
            images, _, _, _, extrinsics, _ = train_tiny.make_sample(scene, np.array([0, k]))
            images = torch.from_numpy(images)
            if pixels:
                f = F.adaptive_avg_pool2d(images, (6, 8)).reshape(-1)
            else:
                with torch.no_grad():
                    last = model.aggregator(images[None])[model.config.depth - 1][0]  # [views, tokens, 2C]
                patches = last[:, start:]
                f = torch.cat([last[1, 0], patches[1].mean(0), patches[0].mean(0), (patches[1] - patches[0]).mean(0)])
            features.append(f.numpy())
            rotations.append(np.degrees(Rotation.from_matrix(extrinsics[1, :3, :3]).as_rotvec()))
    return np.array(features), np.array(rotations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--pixels", action="store_true", help="fit coarse pixels instead (the control)")
    parser.add_argument("--cache-dir", default="", help="train_tiny's scene cache (renders on the fly without)")
    parser.add_argument("--train-scenes", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        model = load_vggt(args.checkpoint).eval()
    except (QVGGTError, OSError, ValueError) as exc:
        sys.exit(f"error: {exc}")
    cache = train_tiny.SceneCache(model.config.default_image_size, args.cache_dir, "video")
    fit_seeds = range(0, 2 * args.train_scenes, 2)
    held_out = list(train_tiny.DEV_SEEDS) + list(range(2 * args.train_scenes, 2 * args.train_scenes + 40, 2))
    x_fit, y_fit = pair_features(model, cache, fit_seeds, args.pixels)
    x_test, y_test = pair_features(model, cache, held_out, args.pixels)
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    a, b = (x_fit - mean) / std, (x_test - mean) / std
    constant = np.linalg.norm(y_fit.mean(0) - y_test, axis=1).mean()
    print(f"{len(x_fit)} fitting pairs, {len(x_test)} held-out pairs, {a.shape[1]} features")
    for ridge in (100.0, 1000.0, 10000.0):
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ (y_fit - y_fit.mean(0)))
        pred = b @ w + y_fit.mean(0)
        r2 = 1 - ((pred - y_test) ** 2).sum(0) / ((y_test - y_test.mean(0)) ** 2).sum(0)
        error = np.linalg.norm(pred - y_test, axis=1).mean()
        print(f"ridge {ridge:g}: held-out R2 per axis {np.round(r2, 3)}, mean error {error:.2f} deg "
              f"(constant predictor {constant:.2f} deg)")


if __name__ == "__main__":
    main()
