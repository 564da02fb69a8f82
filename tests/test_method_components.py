"""Each QVGGT component does its job: every test here fails when the component it covers is a no-op.

Small models built in the tests (the embedded default model where trained weights matter), with planted
outliers where the phenomenon must exist (small models have no outlier special tokens of their own).
"""

from __future__ import annotations

import pytest
import torch

from qvggt_export import arch
from qvggt_export.model import load_model
from qvggt_export.quant.calibration_run import calibrate
from qvggt_export.quant.calibration_set import synthetic_calibration
from qvggt_export.quant.cic import cic_token
from qvggt_export.quant.quantizer import QuantConfig, quantize_model

from quant_helpers import small_calibration, small_model

ONLY_SCALES = dict(mixed=False, cic=False, task_aware=False, plan="uniform", grid=10)


def planted_outlier_model(magnitude: float = 60.0, channels: int = 8):
    """A small VGGT whose camera and register tokens carry outlier magnitudes on a few channels, as the
    paper reports for VGGT-1B."""
    model = small_model()
    with torch.no_grad():
        model.aggregator.camera_token[..., :channels] = magnitude
        model.aggregator.register_token[..., :channels] = -magnitude
    return model


def block_errors(model_fp, model_q, calib, image_only: bool = True) -> dict[str, float]:
    """Per pipeline block: ||block_q(x) - block_fp(x)||^2 / ||block_fp(x)||^2 on the FP block input x,
    over image tokens (the token-filtered reconstruction error)."""
    errors = {}
    blocks = [b for b in arch.quant_blocks(model_fp) if arch.is_pipeline_block(b)]
    with torch.no_grad():
        for scene in calib.scenes:
            images = scene.images[None]
            state = arch.begin_forward(model_fp, images)
            for block in blocks:
                ref = arch.forward_block(model_fp, block, state)
                out = arch.forward_block(model_q, block, state)
                mask = arch.image_token_mask(model_fp, block, ref.tokens, tuple(images.shape[-2:]))
                mask = mask if image_only else torch.ones_like(mask)
                diff = (out.tokens - ref.tokens)[..., mask, :].pow(2).sum()
                errors[block.name] = errors.get(block.name, 0.0) + float(diff / ref.tokens[..., mask, :].pow(2).sum())
                state = ref
    return errors


def test_token_filtering_excludes_planted_outliers_and_lowers_image_token_error():
    model, calib = planted_outlier_model(), small_calibration()
    calibration = calibrate(model, calib, sensitivity=False)
    stats = calibration.stats.linears["aggregator.frame_blocks.0.attn.qkv"]
    # The filtered statistics do not see the outlier channels; the all-token ones do.
    assert float(stats.absmean_all[:8].mean()) > 2.5 * float(stats.absmean_image[:8].mean())
    filtered = quantize_model(model, calib, QuantConfig(method="qvggt", token_filter=True, **ONLY_SCALES),
                              calibration=calibration)
    unfiltered = quantize_model(model, calib, QuantConfig(method="qvggt", token_filter=False, **ONLY_SCALES),
                                calibration=calibration)
    alphas = lambda q: {n: e["alpha"] for n, e in q.quant_info["layers"].items() if "alpha" in e}
    assert alphas(filtered) != alphas(unfiltered)
    err_f, err_u = block_errors(model, filtered, calib), block_errors(model, unfiltered, calib)
    assert sum(err_f.values()) < 0.9 * sum(err_u.values()), (err_f, err_u)


@pytest.fixture(scope="module")
def default_model_set():
    model = load_model(None)
    calib = synthetic_calibration(3, 3, model.config.default_image_size)
    return model, calib, calibrate(model, calib, sensitivity=False)


def test_task_aware_search_changes_choices_and_does_not_raise_the_task_loss(default_model_set):
    model, calib, calibration = default_model_set
    runs = {}
    for task_aware in (True, False):
        reports = []
        q = quantize_model(model, calib, QuantConfig(method="qvggt", mixed=False, cic=False, task_aware=task_aware,
                                                     plan="uniform", grid=10, task_topk=3),
                           calibration=calibration, report_out=reports)
        runs[task_aware] = (q.quant_info["layers"], reports[0])
    layers, report = runs[True]
    # Somewhere the task loss overruled the reconstruction-best alpha ...
    assert any(e["alpha"] != e["alpha_recon"] for e in layers.values() if "alpha" in e)
    # ... and the end result is no worse on the task loss than reconstruction alone.
    assert report.final_task_loss <= runs[False][1].final_task_loss


def test_awq_qvggt_and_gptq_reconstruct_every_block_better_than_rtn(default_model_set):
    model, calib, calibration = default_model_set
    errors = {}
    for method in ("rtn", "awq", "qvggt", "gptq"):
        config = QuantConfig(method=method, mixed=False, cic=False, task_aware=False, plan="uniform")
        errors[method] = block_errors(model, quantize_model(model, calib, config, calibration=calibration), calib)
    for method in ("awq", "qvggt", "gptq"):
        worse = [b for b in errors["rtn"] if errors[method][b] >= errors["rtn"][b]]
        assert not worse, f"{method} not below RTN on {worse}"


def test_scale_search_under_gptq_rounding_reconstructs_better_than_gptq_alone(default_model_set):
    """With --rounding gptq the scale candidates are scored after GPTQ rounding (no scaling, i.e. plain GPTQ,
    is one of them), so the searched scales can only help GPTQ; scored after RTN rounding they do not."""
    model, calib, calibration = default_model_set
    errors = {}
    for name, config in (("gptq", QuantConfig(method="gptq", plan="uniform")),
                         ("scales+gptq", QuantConfig(method="qvggt", rounding="gptq", **ONLY_SCALES))):
        errors[name] = block_errors(model, quantize_model(model, calib, config, calibration=calibration), calib)
    # Summed over blocks (single blocks can trade: each scale group is scored on its own module's output).
    total = {k: sum(v.values()) for k, v in errors.items()}
    assert total["scales+gptq"] < 0.98 * total["gptq"], total


def test_cic_token_is_eq_5_to_8_the_rescaled_mean_camera_token():
    torch.manual_seed(0)
    tokens = 5 * torch.randn(64) + torch.randn(40, 64)
    cic = cic_token(tokens, patch_token_norm=3.5, components=32)
    assert cic.k == 32 and torch.allclose(cic.components @ cic.components.t(), torch.eye(32), atol=1e-5)
    # Centred projections average to zero: eqs. 6-7 reconstruct the mean token; eq. 8 sets its norm.
    mean = tokens.double().mean(0)
    expected = (mean / mean.norm() * 3.5).float()
    torch.testing.assert_close(cic.token[0], expected, rtol=1e-5, atol=1e-5)


def test_cic_token_changes_the_camera_output_and_its_scale_does_not():
    model, calib = small_model(), small_calibration()
    images = calib.scenes[0].images[None]
    calibration = calibrate(model, calib, sensitivity=False)
    cic = cic_token(calibration.stats.camera_tokens, calibration.stats.patch_token_norm)
    with torch.no_grad():
        without = model(images)["pose_enc"]
        arch.set_extra_camera_tokens(model, cic.token)
        with_token = model(images)["pose_enc"]
        arch.set_extra_camera_tokens(model, cic.token * 10)
        rescaled = model(images)["pose_enc"]
        arch.set_extra_camera_tokens(model, None)
    assert (with_token - without).abs().max() > 1e-4  # the trunk attends to the token
    # The camera head's LayerNorm right after the append makes eq. 8's rescaling a no-op.
    torch.testing.assert_close(rescaled, with_token, rtol=1e-4, atol=1e-5)


def test_exported_graph_holds_the_cic_token_as_a_constant(tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from qvggt_export.export.onnx_export import export_onnx
    from qvggt_export.export.spec import ExportConfig

    model, calib = small_model(), small_calibration()
    q = quantize_model(model, calib, QuantConfig(method="qvggt", mixed=False, task_aware=False, plan="uniform", grid=4))
    token = arch.extra_camera_tokens(q).numpy()
    path = export_onnx(q, tmp_path / "m.onnx", ExportConfig(precision="w4a16", image_size=(28, 42), min_frames=1,
                                                          opt_frames=2, max_frames=4))
    graph = onnx.load(str(path)).graph
    constants = [numpy_helper.to_array(t) for t in graph.initializer]
    constants += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant" for a in n.attribute
                  if a.name == "value"]
    # The exporter may fold the token into a [1, 1, D] constant in the graph's activation dtype (fp16 here).
    assert any(c.size == token.size and np.array_equal(c.reshape(-1), token.reshape(-1).astype(c.dtype))
               for c in constants)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_rounding_beats_rtn_and_lies_on_its_packed_grid(act_order):
    from qvggt_export.quant.gptq import gptq_quantize
    from qvggt_export.quant.pack import dequantize, quantize
    from qvggt_export.quant.scale import fake_quantize_with_scales

    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(512, 256) * torch.linspace(0.1, 3, 256)  # uneven channel energies: act-order has work
    wq, scales = gptq_quantize(w, x.t() @ x, act_order=act_order)
    rtn, _ = fake_quantize_with_scales(w, 4)
    error = lambda v: float(((x @ (v - w).t()) ** 2).sum())
    assert error(wq) < 0.9 * error(rtn)
    q, s16 = quantize(wq, 4, scales=scales.float())  # packing against the returned scales is exact
    assert torch.equal(dequantize(q, s16), wq)
