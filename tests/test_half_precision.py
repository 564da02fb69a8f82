"""Half precision on the CPU: the model (full precision and quantized, every head) cast to fp16 and bf16
agrees with its fp32 self, and the quantizer runs its forwards in fp16 and bf16.

Tolerances are the worst |half - fp32| over an output, relative to that output's largest fp32 magnitude
(random models' confidences span a few percent, so their range is no scale); measured on these models
(torch 2.13, CPU): fp16 <= 2e-3, bf16 <= 1.3e-2. The bars leave about 4x room.
"""

from __future__ import annotations

import pytest
import torch

from export_helpers import tiny_quantized_model
from qvggt_export.model import load_model
from qvggt_export.quant.linear import QuantLinear
from quant_helpers import small_calibration, small_model

OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
HALVES = pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])


def relative_errors(half: dict, full: dict) -> dict[str, float]:
    errors = {}
    for key in (k for k in OUTPUTS if k in full):
        scale = float(full[key].abs().max()) or 1.0
        errors[key] = float((half[key].float() - full[key]).abs().max()) / scale
    return errors


def predictions(model, images, dtype, **kwargs):
    with torch.no_grad():
        return model.to(dtype)(images.to(dtype), **kwargs)


@HALVES
def test_default_model_in_half_precision(dtype):
    torch.manual_seed(0)
    images = torch.rand(1, 3, 3, 84, 112)
    full = predictions(load_model("vggt-tiny"), images, torch.float32)
    half = predictions(load_model("vggt-tiny"), images, dtype)
    assert all(half[key].dtype == dtype for key in OUTPUTS)  # computed in half, not silently upcast
    errors = relative_errors(half, full)
    assert max(errors.values()) <= REL_TOL[dtype], errors
    assert max(errors.values()) > 0  # really computed in half precision


@HALVES
def test_dense_heads_in_chunks_in_half_precision(dtype):
    """The released memory bound (frames in chunks) takes the same half-precision path."""
    model = load_model("vggt-tiny").to(dtype).eval()
    with torch.no_grad():
        layers = model.aggregator(torch.rand(1, 3, 3, 84, 112).to(dtype))
        whole = model.predict_dense(layers, 84, 112)
        chunked = model.predict_dense(layers, 84, 112, frames_chunk_size=2)
    assert all(chunked[key].dtype == dtype for key in whole)
    # Not bit-exact: the convolutions' half-precision kernels depend on the batch (measured <= 1 ulp).
    errors = relative_errors(chunked, whole)
    assert max(errors.values()) <= 2 * torch.finfo(dtype).eps, errors


@HALVES
def test_quantized_model_in_half_precision(dtype):
    torch.manual_seed(1)
    images = torch.rand(1, 2, 3, 28, 518)
    reference = tiny_quantized_model()
    full = predictions(reference, images, torch.float32)
    half_model = tiny_quantized_model().to(dtype)
    for name, module in half_model.named_modules():
        if isinstance(module, QuantLinear):  # the packed format survives the cast bit for bit
            original = reference.get_submodule(name)
            assert module.scales.dtype == torch.float16
            assert torch.equal(module.scales, original.scales) and torch.equal(module.qweight, original.qweight)
    half = predictions(half_model, images, dtype)
    errors = relative_errors(half, full)
    assert max(errors.values()) <= REL_TOL[dtype], errors


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_quantizer_forwards_in_half_precision(dtype):
    """`quantize --dtype fp16|bf16` on the CPU: the search runs under autocast in that dtype (its choices
    are not the fp32 run's bytes) and its model is as faithful to full precision as the fp32 run's."""
    from qvggt_export.quant.quantizer import QuantConfig, quantize_model

    calib = small_calibration()
    images = calib.scenes[0].images[None]
    with torch.no_grad():
        fp = small_model()(images)

    def quantized(run_dtype):
        model = quantize_model(small_model(), calib, QuantConfig(dtype=run_dtype, grid=4, task_topk=2, device="cpu"),
                               inplace=True)
        with torch.no_grad():
            return model, model(images)

    model32, preds32 = quantized("fp32")
    model16, preds16 = quantized(dtype)
    state32, state16 = model32.state_dict(), model16.state_dict()
    assert any(not torch.equal(state32[k], state16[k]) for k in state32)
    error32 = max(relative_errors(preds32, fp).values())
    error16 = max(relative_errors(preds16, fp).values())
    assert error16 <= 1.5 * error32 + 1e-3, (error16, error32)


@HALVES
def test_kernel_linear_model_in_half_precision(dtype):
    """The GPU path's modules (KernelLinear, here on its CPU emulation) keep the fp16 the kernel reads."""
    from qvggt_export.kernels.linear import KernelLinear, install_kernel_linears

    torch.manual_seed(2)
    images = torch.rand(1, 2, 3, 28, 518)
    model = tiny_quantized_model()
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bits == 4]
    full = predictions(install_kernel_linears(tiny_quantized_model(), names), images, torch.float32)
    half_model = install_kernel_linears(model, names).to(dtype)
    kernels = [m for m in half_model.modules() if isinstance(m, KernelLinear)]
    assert kernels and all(m.scales.dtype == m.bias.dtype == torch.float16 for m in kernels)
    errors = relative_errors(predictions(half_model, images, dtype), full)
    assert max(errors.values()) <= REL_TOL[dtype], errors


@HALVES
def test_dinov2_encoder_model_in_half_precision(dtype):
    """The released architecture's DINOv2 patch embedding (interpolated position embedding, non-square)."""
    from qvggt_export.model import VGGT, VGGTConfig

    config = VGGTConfig(img_size=56, embed_dim=128, depth=2, num_heads=2, camera_num_heads=2, camera_trunk_depth=1,
                        dpt_features=16, dpt_out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 0, 1, 1),
                        carry_track_head=False, dinov2_depth=2, dinov2_num_heads=2)
    torch.manual_seed(3)
    model = VGGT(config).eval()
    images = torch.rand(1, 2, 3, 56, 70)
    full = predictions(model, images, torch.float32)
    half = predictions(model, images, dtype)
    errors = relative_errors(half, full)
    assert max(errors.values()) <= REL_TOL[dtype], errors
