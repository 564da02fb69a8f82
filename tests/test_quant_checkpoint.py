"""The quantized checkpoint reloading to identical outputs."""

import torch

from quant_helpers import small_calibration, small_model
from qvggt_export import arch
from qvggt_export.model import load_model, save_quantized
from qvggt_export.quant.linear import QuantLinear
from qvggt_export.quant.quantizer import QuantConfig, quantize_model


def test_quantized_checkpoint_reloads_to_identical_outputs(tmp_path):
    model = small_model()
    with torch.no_grad():
        # An outlier channel at every fc2 input (as trained transformers have), so that the scale
        # search picks non-trivial scales and the explicit fc2 input multiply is exercised.
        for block in arch.quant_blocks(model):
            model.get_submodule(f"{block.name}.mlp.fc1").bias[5] = 30.0
    calib = small_calibration()
    config = QuantConfig(method="qvggt", plan="uniform", task_topk=1, grid=3)
    qmodel = quantize_model(model, calib, config)
    # The QVGGT parts really are in the model: CIC token, packed layers, explicit fc2 input scales.
    assert arch.extra_camera_tokens(qmodel).shape == (1, 2 * model.config.embed_dim)
    fc2 = qmodel.get_submodule("aggregator.frame_blocks.0.mlp.fc2")
    assert isinstance(fc2, QuantLinear) and fc2.input_scale is not None
    assert qmodel.quant_info["cic"]["k"] == 4  # 2 scenes x 2 frames: fewer tokens than 32 components

    path = save_quantized(qmodel, tmp_path / "q.safetensors")
    reloaded = load_model(path)
    images = calib.scenes[0].images[None]
    with torch.no_grad():
        expected, got = qmodel(images), reloaded(images)
    for key in ("pose_enc", "depth", "world_points", "world_points_conf"):
        assert torch.equal(expected[key], got[key]), key
    assert reloaded.quant_plan == qmodel.quant_plan
    assert reloaded.quant_info["method"] == "qvggt"
    assert reloaded.quant_info["calibration"]["source"] == "synthetic"
    n_quant = sum(isinstance(m, QuantLinear) for m in reloaded.modules())
    assert n_quant == len(arch.quantizable_linears(model))
