"""A small quantized VGGT for the export tests (real QuantLinear packing, random weights)."""

from __future__ import annotations

import torch

from qvggt_export import arch
from qvggt_export.model import VGGT, VGGTConfig
from qvggt_export.quant.linear import QuantLinear
from qvggt_export.quant.plan import build_plan, quantized_layers
from qvggt_export.quant.modules import replace_module

# 518 wide: what the released preprocessing ("crop") makes of a 2:37 image, so `infer` can be tested
# on image files; 2 patch rows keep it fast.
IMAGE_SIZE = (28, 518)
# Few blocks keep the torch.export trace short; widths are multiples of the 128-group.
TINY = dict(embed_dim=128, depth=2, num_heads=2, patch_embed="conv", camera_num_heads=2, camera_trunk_depth=1,
            dpt_features=16, dpt_out_channels=(8, 16, 32, 32), intermediate_layer_idx=(0, 0, 1, 1),
            carry_track_head=False)


def tiny_float_model(seed: int = 0) -> VGGT:
    torch.manual_seed(seed)
    return VGGT(VGGTConfig(**TINY)).eval()


def tiny_quantized_model(seed: int = 0, precision: str = "w4a16") -> VGGT:
    """RTN-quantized per a plan that protects one block (so fp and quantized linears both occur),
    with an fc2 input scale and a CIC token, as the QVGGT method produces them."""
    model = tiny_float_model(seed)
    plan = build_plan(model, ["frame.1"], precision, "test")
    for name, bits in quantized_layers(plan).items():
        q = QuantLinear.from_linear(model.get_submodule(name), bits, name=name)
        if name.endswith("mlp.fc2"):
            q.register_buffer("input_scale", torch.rand(q.in_features) + 0.5)
        replace_module(model, name, q)
    arch.set_extra_camera_tokens(model, torch.randn(1, 2 * TINY["embed_dim"]))
    model.quant_plan = plan
    model.quant_info = {"method": "rtn", "test": True}
    return model.eval()


_EXPORTS: dict = {}


def exported_tiny(tmp_path_factory):
    """(quantized model, its fp32-activation W4A16 ONNX), exported once per test session: the torch.export
    trace dominates the export tests' time."""
    from qvggt_export.export.onnx_export import export_onnx
    from qvggt_export.export.spec import ExportConfig

    key = str(tmp_path_factory.getbasetemp())
    if key not in _EXPORTS:
        model = tiny_quantized_model()
        path = tmp_path_factory.mktemp("export") / "model.onnx"
        # validate=True (the default): the export itself checks ORT against PyTorch at S=1 and S=4.
        export_onnx(model, path, ExportConfig(precision="w4a16", activations="fp32", image_size=IMAGE_SIZE,
                                              min_frames=1, opt_frames=4, max_frames=8))
        _EXPORTS[key] = (model, path)
    return _EXPORTS[key]
