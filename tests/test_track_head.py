"""The track head (model/track_head.py) and VGGT's tracking loss with its ground-truth tracks (train_tiny)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from qvggt_export.data import synthetic
from qvggt_export.model import VGGT
from qvggt_export.model import track_head
from qvggt_export.model.presets import TINY_TRACKER, tiny_config
from qvggt_export.model.track_head import CorrelationPyramid, TrackHead, Tracker, TrackerShape

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tiny, probe_shift = _script("train_tiny"), _script("probe_shift")


@pytest.mark.parametrize("dx,dy", [(2, 0), (-1, 3), (0, 0)])
def test_the_correlation_window_peaks_where_the_match_is(dx, dy):
    # View 1 is view 0 moved by (dx, dy) px; the query's own feature, correlated around the query's position in
    # view 1, is largest at window offset (dx, dy), sample i * (2r + 1) + j for offset (x, y) = (i - r, j - r).
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 14, 18, generator=g)
    moved = torch.roll(base, (dy, dx), (1, 2))
    pyramid = CorrelationPyramid(torch.stack([base, moved])[None], levels=2, radius=3)
    query = torch.tensor([[9.0, 7.0]])
    feature = base[:, 7, 9][None, None, None].expand(1, 2, 1, 16)
    window = pyramid.sample(feature, query[None, None].expand(1, 2, 1, 2))[0, 1, 0, :49]
    assert int(window.argmax()) == (dx + 3) * 7 + (dy + 3)
    np.testing.assert_allclose(float(window.max()), float(base[:, 7, 9].square().sum() / 4), rtol=1e-5)


def _shift_batch(g, n=8):
    base = torch.nn.functional.avg_pool2d(torch.randn(n, 16, 12, 16, generator=g), 3, 1, 1) * 3
    shift = torch.randint(-2, 3, (n, 2), generator=g)
    moved = torch.stack([torch.roll(b, (int(s[1]), int(s[0])), (1, 2)) for b, s in zip(base, shift)])
    queries = torch.rand(n, 16, 2, generator=g) * torch.tensor([9.0, 5.0]) + 3
    return torch.stack([base, moved], 1), queries, queries + shift[:, None].float()


def _trained_tracker_error(steps=120):
    torch.manual_seed(0)
    shape = TrackerShape(latent_dim=16, hidden=32, depth=1, heads=2, corr_levels=2, corr_radius=2, virtual_tracks=4,
                         stride=1)
    tracker = Tracker(shape)
    opt = torch.optim.Adam(tracker.parameters(), 3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        fmaps, queries, truth = _shift_batch(g)
        loss = sum((p[:, 1] - truth).abs().mean() for p in tracker(queries, fmaps, 3)[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    fmaps, queries, truth = _shift_batch(torch.Generator().manual_seed(99), 32)
    with torch.no_grad():
        predictions = tracker(queries, fmaps, 3)[0]
    for p in predictions:  # the query view's positions are the queries, at every iteration
        torch.testing.assert_close(p[:, 0], queries)
    return float((predictions[-1][:, 1] - truth).norm(dim=-1).mean()), float((queries - truth).norm(dim=-1).mean())


def test_the_tracker_learns_to_follow_a_shift_through_its_correlation(monkeypatch):
    # 120 steps on random feature maps shifted by up to 2 px: the tracks land within a fraction of the shift.
    error, still = _trained_tracker_error()
    assert error < 0.3 * still
    # With the correlation switched off (all samples zero) nothing tells the tracker where the match is.
    monkeypatch.setattr(CorrelationPyramid, "sample",
                        lambda self, features, coords: features.new_zeros(*coords.shape[:3], 2 * 25))
    blind, still = _trained_tracker_error()
    assert blind > 0.8 * still


def test_the_tracking_loss_reaches_the_aggregator():
    torch.manual_seed(0)
    model = VGGT(tiny_config(depth=2, intermediate_layer_idx=(0, 1, 0, 1), camera_trunk_depth=1))
    cfg = model.config
    head = TrackHead(2 * cfg.embed_dim, cfg.patch_size, cfg.dpt_out_channels, cfg.intermediate_layer_idx, TINY_TRACKER)
    images = torch.rand(2, 2, 3, 84, 112)
    layers = model.aggregator(images)
    queries = torch.rand(2, 8, 2) * torch.tensor([111.0, 83.0])
    tracks = queries[:, None].repeat(1, 2, 1, 1) + torch.tensor([3.0, -2.0])
    predictions, vis, conf = head(layers, 84, 112, model.aggregator.patch_start_idx, tracks[:, 0])
    assert len(predictions) == 4 and predictions[-1].shape == (2, 2, 8, 2) and vis.shape == conf.shape == (2, 2, 8)
    loss, parts = train_tiny.track_loss(predictions, vis, conf, tracks, torch.ones(2, 2, 8, dtype=torch.bool))
    loss.backward()
    grad = model.aggregator.frame_blocks[0].attn.qkv.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert parts["track"] > 0 and set(parts) == {"track", "vis", "conf"}


def test_the_tracking_loss_counts_positions_only_where_visible():
    tracks = torch.zeros(1, 2, 3, 2)
    visible = torch.tensor([[[True, True, True], [True, False, True]]])
    good = tracks.clone()
    good[0, 1, 1] = 50.0  # far off, but not visible: no position loss
    logits = torch.zeros(1, 2, 3)
    loss, parts = train_tiny.track_loss([good, good], logits, logits, tracks, visible)
    assert parts["track"] == 0.0
    off = good.clone()
    off[0, 1, 0, 0] = 2.0  # one visible coordinate 2 px off: |err| averaged over x, y and the 5 visible entries
    _, parts = train_tiny.track_loss([tracks, off], logits, logits, tracks, visible)
    assert parts["track"] == pytest.approx((0.8 * 0 + 1.0 * (2 / 2) / 5) / 2, rel=1e-6)


def test_ground_truth_tracks_land_on_the_same_surface_point():
    # Two views of a rendered scene: where a query is visible in view 1, view 1's colour there is view 0's at the
    # query; a shuffled pairing of the same pixels differs clearly.
    size = (84, 112)
    scene = synthetic.render_scene(5, 4, size, "pan")
    cached = ((scene.images * 255).round().astype(np.uint8), scene.depth, scene.extrinsics.astype(np.float64),
              scene.intrinsics.astype(np.float64), scene.valid)
    sample = train_tiny.make_sample(cached, np.array([1, 2]))
    rng = np.random.default_rng(0)
    tracks, visible = train_tiny.track_targets(*sample[1:4], *sample[4:6], 400, rng)
    assert tracks.shape == (2, 400, 2) and visible[0].all() and 0.3 < visible[1].mean() < 1.0
    x = np.rint(tracks[..., 0]).astype(int).clip(0, size[1] - 1)
    y = np.rint(tracks[..., 1]).astype(int).clip(0, size[0] - 1)
    first = sample[0][0][:, y[0], x[0]][:, visible[1]]
    second = sample[0][1][:, y[1], x[1]][:, visible[1]]
    error = np.median(np.abs(first - second))
    shuffled = np.median(np.abs(first - second[:, rng.permutation(second.shape[1])]))
    assert error < 0.3 * shuffled
    # Queries hidden behind nearer surfaces in view 1 (its own depth there well below the projected point's) exist
    # in this pair and are all marked not visible.
    z = (np.einsum("ij,nj->ni", sample[4][1][:, :3], sample[2][0][y[0], x[0]]) + sample[4][1][:, 3])[:, 2]
    inside = (tracks[1] >= 0).all(-1) & (tracks[1, :, 0] <= size[1] - 1) & (tracks[1, :, 1] <= size[0] - 1) & (z > 0)
    hidden = inside & (sample[1][1][y[1], x[1]] < 0.9 * z)
    assert hidden.any() and not (visible[1] & hidden).any()


@pytest.mark.parametrize("kind", ["shift", "warp"])
def test_analytic_pair_tracks_match_the_pair_images(kind):
    # Sampling view 1 at the tracks gives view 0 at the queries (where visible): exact for a whole-pixel shift,
    # within bilinear resampling error for a warp.
    rng = np.random.default_rng(1)
    image = (synthetic.render_scene(2, 1, probe_shift.IMAGE_SIZE).images[0] * 255).round().astype(np.uint8)
    if kind == "shift":
        pair, _, _ = probe_shift.shifted_pair(image, 9, 14)
        tracks, visible = probe_shift.shift_tracks(rng, 300, 9)
        tolerance = 1e-6
    else:
        K = np.array([[probe_shift.FOCAL, 0, 56], [0, probe_shift.FOCAL, 42], [0, 0, 1.0]])
        rotation = probe_shift.Rotation.from_euler("yxz", [8, -3, 2], degrees=True).as_matrix()
        pair, _, _ = probe_shift.rotated_pair(image, K, rotation)
        tracks, visible = probe_shift.warp_tracks(rng, 300, K, rotation)
        tolerance = 0.03
    assert visible[0].all() and 0.5 < visible[1].mean() < 1.0
    views = torch.from_numpy(pair)

    def colours(view, points):
        return track_head.sample_points(views[view][None], torch.from_numpy(points)[None].float())[0].numpy()

    first, second = colours(0, tracks[0][visible[1]]), colours(1, tracks[1][visible[1]])
    error = np.median(np.abs(first - second))
    assert error <= tolerance
    assert np.median(np.abs(first - colours(1, tracks[0][visible[1]]))) > 2 * max(error, 0.01)  # not moving


def test_probe_batches_carry_tracks_and_the_probe_reads_them_out(tmp_path, capsys):
    small = json.dumps({"depth": 2, "intermediate_layer_idx": [0, 1, 0, 1], "camera_trunk_depth": 1})
    probe_shift.main(["--config", small, "--steps", "2", "--batch", "2", "--eval-every", "2", "--max-shift", "14",
                      "--shift-unit", "14", "--track-weight", "0.05", "--track-points", "8",
                      "--cache-dir", str(tmp_path / "cache")])
    line, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step")]
    assert "; tracks: error " in line and "px (not moving: " in line
    cache = train_tiny.SceneCache(probe_shift.IMAGE_SIZE, str(tmp_path / "cache"), "arc")
    images, pose, tracks, visible = probe_shift.clip_pairs(cache, np.random.default_rng(0), [0, 1], 3, 2, 5)
    assert tracks.shape == (3, 2, 5, 2) and visible.shape == (3, 2, 5) and bool(visible[:, 0].all())
    with pytest.raises(SystemExit, match="--track-points >= 1"):
        probe_shift.main(["--track-weight", "0.05", "--track-points", "0"])
