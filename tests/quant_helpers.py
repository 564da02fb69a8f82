"""Small random VGGTs and calibration scenes shared by the tests/test_quant_*.py modules."""

from __future__ import annotations

import torch

from qvggt_export.model import VGGT, VGGTConfig
from qvggt_export.quant.calibration_set import CalibrationSet, CalibScene, synthetic_calibration

# The CPUs here are shared by several jobs; one thread avoids oversubscription stalls (30x slower).
torch.set_num_threads(1)

# Width 128 keeps every quantized K a multiple of the 128-group (qkv/proj/fc1 128, fc2 512, trunk 256/1024).
SMALL = dict(img_size=42, embed_dim=128, depth=3, num_heads=4, patch_embed="conv", camera_num_heads=4,
             camera_trunk_depth=2, dpt_features=16, dpt_out_channels=(16, 16, 32, 32),
             intermediate_layer_idx=(0, 1, 2, 2), carry_track_head=False)


def small_model(seed: int = 0, **overrides) -> VGGT:
    torch.manual_seed(seed)
    model = VGGT(VGGTConfig(**{**SMALL, **overrides})).eval()
    # Released layer-scale init (0.01) makes every block nearly an identity; larger gammas let
    # quantization errors reach the heads, as in a trained model.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.fill_(0.5)
    return model


def small_calibration(scenes: int = 2, frames: int = 2, size=(28, 42)) -> CalibrationSet:
    return synthetic_calibration(scenes, frames, size)


def random_calibration(scenes: int = 2, frames: int = 2, size=(28, 42), seed: int = 0) -> CalibrationSet:
    """Scenes without ground truth (like an image folder)."""
    g = torch.Generator().manual_seed(seed)
    return CalibrationSet([CalibScene(f"random:{i}", torch.rand(frames, 3, *size, generator=g)) for i in range(scenes)],
                          "random")


def trial_matches_plain_path(model, plain, cached, edited) -> tuple[int, int]:
    """RTN-quantizes `edited`'s mlp.fc1 as a trial would, asserts the block cache predicts bit-identically
    to the plain path, undoes the edit; returns the block-forwards each path spent on the trial."""
    from qvggt_export.quant.modules import restore, snapshot
    from qvggt_export.quant.scale import fake_quantize_with_scales

    saved = snapshot(model, [edited.name])
    with torch.no_grad():
        weight = model.get_submodule(f"{edited.name}.mlp.fc1").weight
        weight.copy_(fake_quantize_with_scales(weight, 4)[0])
    plain_before, cached_before = plain.block_forwards, cached.block_forwards
    for a, b in zip(plain.predict(), cached.predict()):
        assert all(torch.equal(a[k], b[k]) for k in a), edited.name
    restore(model, saved)
    return plain.block_forwards - plain_before, cached.block_forwards - cached_before
