"""Scale folding is exact in float; GPTQ beats round-to-nearest on its own objective."""

import torch

from quant_helpers import small_model
from qvggt_export import arch
from qvggt_export.quant.gptq import gptq_quantize
from qvggt_export.quant.linear import PrescaledLinear
from qvggt_export.quant.pack import quantize
from qvggt_export.quant.scale import apply_scale, fake_quantize_with_scales


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def test_folding_scales_without_quantizing_leaves_outputs_unchanged():
    model = small_model()
    images = torch.rand(1, 3, 3, 28, 42, generator=torch.Generator().manual_seed(1))
    before = model(images)
    g = torch.Generator().manual_seed(2)
    for block in arch.quant_blocks(model):
        for group in arch.SCALE_GROUPS:
            k = model.get_submodule(f"{block.name}.{group.layers[0]}").in_features
            # Scales far from 1 (0.1 .. 10) so that a wrong fold could not hide in rounding noise.
            s = torch.exp(torch.empty(k).uniform_(-2.3, 2.3, generator=g))
            apply_scale(model, f"{block.name}.{group.prev_op}", [f"{block.name}.{n}" for n in group.layers],
                        group.fold, s)
    after = model(images)
    assert isinstance(model.get_submodule("aggregator.frame_blocks.0.mlp.fc2"), PrescaledLinear)
    changed = model.get_submodule("aggregator.global_blocks.1.norm1").weight
    assert not torch.allclose(changed, torch.ones_like(changed))  # the folds really touched the model
    for key in ("pose_enc", "depth", "world_points", "depth_conf"):
        assert _relative(after[key], before[key]) < 1e-5, key


def test_gptq_output_lies_on_its_scale_grid_and_beats_rtn_on_the_calibration_inputs():
    torch.manual_seed(0)
    # Correlated inputs (as activations are): GPTQ's error feedback exploits the correlation.
    x = torch.randn(2048, 16) @ torch.randn(16, 256) + 0.1 * torch.randn(2048, 256)
    weight = torch.randn(64, 256)
    hessian = x.t() @ x
    wq, scales = gptq_quantize(weight, hessian, bits=4)
    codes, rescales = quantize(wq, 4, scales=scales)
    assert torch.equal(rescales, scales)
    assert torch.equal(codes.float() * scales.float().repeat_interleave(128, dim=1), wq)
    rtn, _ = fake_quantize_with_scales(weight, 4)
    gptq_err = ((wq - weight) @ x.t()).pow(2).sum()
    rtn_err = ((rtn - weight) @ x.t()).pow(2).sum()
    assert gptq_err < 0.7 * rtn_err
