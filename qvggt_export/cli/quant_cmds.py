"""`calibrate` and `quantize` commands (the Python API is qvggt_export.quant)."""

from __future__ import annotations

from pathlib import Path

import click

from . import main


def calibration_options(fn):
    fn = click.option("--calib-size", default=None, metavar="HxW",
                      help="Image size of calibration views (default: the model's native size).")(fn)
    fn = click.option("--calib-frames", default=4, show_default=True, help="Views per calibration scene.")(fn)
    fn = click.option("--calib-scenes", default=8, show_default=True, help="Number of calibration scenes.")(fn)
    fn = click.option("--calib", "calib_source", default="synthetic", show_default=True,
                      help="'synthetic' (scenes with ground truth) or a folder of image folders (one per scene).")(fn)
    fn = click.option("--checkpoint", default=None, help="Full-precision checkpoint (default: embedded vggt-tiny).")(fn)
    return fn


def _load(checkpoint, calib_source, calib_scenes, calib_frames, calib_size):
    from ..errors import CheckpointError
    from ..export.spec import parse_image_size
    from ..model import load_model
    from ..quant.calibration_set import load_calibration

    model = load_model(checkpoint)
    if getattr(model, "quant_plan", None) is not None:
        raise CheckpointError("the checkpoint is already quantized; give the full-precision one")
    size = parse_image_size(calib_size) if calib_size else None
    calib = load_calibration(calib_source, model, calib_scenes, calib_frames, size)
    return model, calib


@main.command()
@calibration_options
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Calibration directory.")
@click.option("--samples", default=256, show_default=True, help="Input rows kept per linear for the search.")
@click.option("--no-sensitivity", is_flag=True, help="Skip the per-block sensitivity analysis.")
def calibrate(checkpoint, calib_source, calib_scenes, calib_frames, calib_size, out_dir, samples, no_sensitivity):
    """Activation statistics, camera tokens and the per-block sensitivity report (cached, resumable)."""
    from ..quant.calibration_run import calibrate as run_calibrate

    model, calib = _load(checkpoint, calib_source, calib_scenes, calib_frames, calib_size)
    result = run_calibrate(model, calib, out_dir, samples, sensitivity=not no_sensitivity)
    if result.sensitivity:
        worst = sorted(result.sensitivity["blocks"].items(), key=lambda kv: kv[1]["score"], reverse=True)[:5]
        click.echo("most sensitive blocks: " + ", ".join(f"{name} ({e['score']:.3g})" for name, e in worst))


@main.command()
@calibration_options
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="Quantized checkpoint (.safetensors); the plan and report go beside it as .json.")
@click.option("--method", default="qvggt", show_default=True, help="rtn | awq | gptq | qvggt")
@click.option("--plan", default=None,
              help="auto | paper | uniform | FILE (JSON/YAML). Default: auto for qvggt, uniform otherwise.")
@click.option("--protect", type=int, default=None, help="--plan auto: number of blocks kept FP16.")
@click.option("--threshold", type=float, default=None, help="--plan auto: protect blocks scoring above this.")
@click.option("--precision", default="w4a16", show_default=True, help="w4a16 | w8a16")
@click.option("--calib-dir", default=None, type=click.Path(file_okay=False),
              help="Calibration directory to reuse or fill (default: OUT without suffix + '_calib').")
@click.option("--no-mixed", is_flag=True, help="QVGGT without mixed precision.")
@click.option("--no-token-filter", is_flag=True, help="QVGGT with scale statistics from all tokens.")
@click.option("--no-cic", is_flag=True, help="QVGGT without the camera information compensation token.")
@click.option("--no-task-aware", is_flag=True, help="QVGGT scale search by layer reconstruction only.")
@click.option("--grid", default=11, show_default=True, help="Scale-search alphas on [0, 1].")
@click.option("--task-topk", default=3, show_default=True, help="Alphas per layer scored by the task loss.")
@click.option("--targets", default="auto", show_default=True,
              help="auto: ground truth when the calibration set has it; fp: FP model outputs.")
def quantize(checkpoint, calib_source, calib_scenes, calib_frames, calib_size, out_path, method, plan, protect,
             threshold, precision, calib_dir, no_mixed, no_token_filter, no_cic, no_task_aware, grid, task_topk,
             targets):
    """Quantize a VGGT checkpoint to W4A16 (QVGGT or a baseline) and write a quantized checkpoint."""
    from ..io import write_json
    from ..model import save_quantized
    from ..quant.quantizer import QuantConfig, quantize_model, weight_bytes

    config = QuantConfig(method=method, mixed=not no_mixed, token_filter=not no_token_filter, cic=not no_cic,
                         task_aware=not no_task_aware, plan=plan, protect=protect, threshold=threshold,
                         precision=precision, grid=grid, task_topk=task_topk, targets=targets)
    config.validate()  # before the (slow) model and data loading
    model, calib = _load(checkpoint, calib_source, calib_scenes, calib_frames, calib_size)
    out_path = Path(out_path)
    calib_dir = Path(calib_dir) if calib_dir else out_path.with_name(out_path.stem + "_calib")
    qmodel = quantize_model(model, calib, config, calib_dir=calib_dir)
    save_quantized(qmodel, out_path)
    sidecar = out_path.with_suffix(".json")
    write_json(sidecar, {"plan": qmodel.quant_plan, "quant_info": qmodel.quant_info,
                         "weight_bytes": {"quantized": weight_bytes(qmodel), "fp16": weight_bytes(model)}})
    click.echo(f"wrote {out_path} and {sidecar}")
