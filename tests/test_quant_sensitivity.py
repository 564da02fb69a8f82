"""The sensitivity analysis finds a planted fragile block; --plan auto protects it; the report resumes."""

import json

import torch

from quant_helpers import random_calibration, small_model
from qvggt_export import arch
from qvggt_export.io import write_cache_json
from qvggt_export.quant.calibration_run import calibrate
from qvggt_export.quant.plan import auto_plan

FRAGILE = "aggregator.global_blocks.1"


def _plant_fragile_block(model) -> None:
    """One huge weight per 128-group in every linear of FRAGILE: RTN's max-based scale then rounds all
    the other weights of the group to zero, so quantizing this block destroys its function."""
    with torch.no_grad():
        for t in arch.LINEAR_TYPES:
            w = model.get_submodule(f"{FRAGILE}.{t}").weight
            w.view(w.shape[0], -1, 128)[:, :, 0] = 40 * w.abs().max()
            w.view(w.shape[0], -1, 128)[:, :, 1] = -40 * w.abs().max()


def test_planted_fragile_block_ranks_first_and_auto_plan_protects_it(tmp_path):
    model = small_model()
    _plant_fragile_block(model)
    calib = random_calibration()
    result = calibrate(model, calib, tmp_path / "calib")
    blocks = result.sensitivity["blocks"]
    assert set(blocks) == {b.name for b in arch.quant_blocks(model)}
    assert max(blocks, key=lambda b: blocks[b]["score"]) == FRAGILE
    for head_error in ("camera_rot_deg", "depth_absrel", "point_rel"):
        assert head_error in blocks[FRAGILE]["fidelity"]
    assert set(result.sensitivity["linear_types"]) == set(arch.LINEAR_TYPES)
    assert (tmp_path / "calib" / "sensitivity.png").stat().st_size > 1000

    plan = auto_plan(model, result.sensitivity, protect=1)
    assert plan["protected_blocks"] == [FRAGILE]
    assert plan["layers"][f"{FRAGILE}.attn.qkv"] == "fp16"
    assert plan["layers"][f"{FRAGILE}.attn.proj"] == "w4a16"  # proj is quantized even when protected
    assert plan["layers"]["aggregator.frame_blocks.1.attn.qkv"] == "w4a16"


def test_sensitivity_report_resumes_from_a_partial_run(tmp_path):
    model = small_model()
    calib = random_calibration(scenes=1)
    first = calibrate(model, calib, tmp_path).sensitivity
    report_path = tmp_path / "sensitivity.json"
    partial = json.loads(report_path.read_text())
    kept = arch.quant_blocks(model)[0].name
    # A planted marker survives only if the rerun reuses the finished entry instead of recomputing it.
    partial["blocks"] = {kept: {**partial["blocks"][kept], "seconds": -1.0}}
    partial["complete"] = False
    partial.pop("qvggt_content_sha256")
    write_cache_json(report_path, partial)  # what a killed run leaves: a hashed partial report
    resumed = calibrate(model, calib, tmp_path).sensitivity
    assert resumed["blocks"][kept]["seconds"] == -1.0
    assert set(resumed["blocks"]) == set(first["blocks"]) and resumed["complete"]
