"""`calibrate` and `quantize` commands (the Python API is qvggt_export.quant)."""

from __future__ import annotations

from pathlib import Path

import click

from ..vocabulary import FAST_PRESET, SEARCH_GRID, TASK_TOPK, fast_preset_help
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


def scope_option(fn):
    return click.option("--scope", default="aggregator", show_default=True,
                        help="Blocks the plan covers: aggregator (frame/global blocks and the camera trunk, as the "
                             "paper) | aggregator+encoder (also the DINOv2 encoder's blocks) | all (every "
                             "quantizable linear; today the same blocks: the DPT heads hold no linear layers).")(fn)


def device_options(fn):
    fn = click.option("--dtype", default=None, type=click.Choice(["fp32", "bf16", "fp16"]),
                      help="Forward dtype of calibration and trials (weights stay fp32 masters). "
                           "Default: bf16 on CUDA, fp32 on the CPU.")(fn)
    fn = click.option("--device", default=None, metavar="cpu|cuda|cuda:N",
                      help="Where calibration and quantization run. Default: cuda when available, else cpu. "
                           "Under torchrun each rank takes cuda:LOCAL_RANK.")(fn)
    return fn


def resolve_run(device, dtype):
    """--device/--dtype -> (torch device, torch dtype, shard); joins torchrun's process group if any."""
    import os

    from ..quant.distributed import init_from_environment
    from ..quant.forward import resolve_device, resolve_dtype

    if device is None and "LOCAL_RANK" in os.environ:
        import torch

        device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
    resolved = resolve_device(device)
    return resolved, resolve_dtype(dtype, resolved), init_from_environment(resolved)


def _load(checkpoint, calib_source, calib_scenes, calib_frames, calib_size):
    from ..errors import CheckpointError
    from ..data.images import parse_image_size
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
@click.option("--no-sensitivity", is_flag=True, help="Skip the per-block sensitivity analysis.")
@scope_option
@device_options
def calibrate(checkpoint, calib_source, calib_scenes, calib_frames, calib_size, out_dir, no_sensitivity,
              scope, device, dtype):
    """Activation statistics, camera tokens and the per-block sensitivity report (cached, resumable;
    data-parallel under torchrun)."""
    from ..io import removed_on_error
    from ..quant.calibration_run import calibrate as run_calibrate
    from ..quant.distributed import leave_group
    from ..quant.plan import check_scope

    check_scope(scope)
    device, dtype, shard = resolve_run(device, dtype)
    model, calib = _load(checkpoint, calib_source, calib_scenes, calib_frames, calib_size)
    with removed_on_error(out_dir if shard.is_main else None):  # an error (not a kill) leaves no new folder
        result = run_calibrate(model.to(device), calib, out_dir, sensitivity=not no_sensitivity, dtype=dtype,
                               shard=shard, scope=scope)
    leave_group(shard)
    if result.sensitivity and shard.is_main:
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
@click.option("--grid", default=SEARCH_GRID, show_default=True, help="Scale-search alphas on [0, 1].")
@click.option("--task-topk", default=TASK_TOPK, show_default=True, help="Alphas per layer scored by the task loss.")
@click.option("--targets", default="auto", show_default=True,
              help="auto: ground truth when the calibration set has it; fp: FP model outputs.")
@click.option("--rounding", default=None, type=click.Choice(["rtn", "gptq"]),
              help="How scaled weights are rounded (default: the method's own; gptq for --method gptq).")
@click.option("--act-order", is_flag=True, help="GPTQ rounding: columns by decreasing Hessian diagonal.")
@click.option("--loss-weights", default=None, metavar="cam=W,depth=W,point=W,geo=W",
              help="Task-loss weights of the task-aware search (default: all 1, as the paper).")
@click.option("--fast", is_flag=True, help=f"Preset for large models: {fast_preset_help()}.")
@scope_option
@device_options
def quantize(checkpoint, calib_source, calib_scenes, calib_frames, calib_size, out_path, method, plan, protect,
             threshold, precision, calib_dir, no_mixed, no_token_filter, no_cic, no_task_aware, grid, task_topk,
             targets, rounding, act_order, loss_weights, fast, scope, device, dtype):
    """Quantize a VGGT checkpoint to W4A16 (QVGGT or a baseline) and write a quantized checkpoint.

    Resumable: a killed run continues at the next unfinished block (state in the calibration directory).
    Data-parallel: `torchrun --nproc-per-node N $(which qvggt-export) quantize ...` shards the calibration
    scenes over the ranks; the checkpoint is byte-identical to one process."""
    from ..errors import QVGGTError
    from ..io import removed_on_error, write_json
    from ..model import save_quantized
    from ..quant.distributed import leave_group
    from ..quant.quantizer import QuantConfig, quantize_model, weight_bytes

    settings = dict(grid=grid, task_topk=task_topk)
    if fast:
        settings.update(FAST_PRESET)
    config = QuantConfig(method=method, mixed=not no_mixed, token_filter=not no_token_filter, cic=not no_cic,
                         task_aware=not no_task_aware, plan=plan, protect=protect, threshold=threshold,
                         precision=precision, targets=targets, rounding=rounding, act_order=act_order, dtype=dtype,
                         scope=scope,
                         **settings, **({"loss_weights": parse_loss_weights(loss_weights)} if loss_weights else {}))
    config.validate()  # before the (slow) model and data loading
    resolved, _, shard = resolve_run(device, dtype)
    config.device = str(resolved)
    model, calib = _load(checkpoint, calib_source, calib_scenes, calib_frames, calib_size)
    fp16_bytes = weight_bytes(model, scope=scope)
    out_path = Path(out_path)
    calib_dir = Path(calib_dir) if calib_dir else out_path.with_name(out_path.stem + "_calib")
    sidecar = out_path.with_suffix(".json")
    reports = []
    # An error (a full disk, say; not a kill, which resumes) removes the folders this command made: the
    # calibration folder (unless --calib-dir names an existing one) and the output's.
    with removed_on_error(*((out_path.parent, calib_dir) if shard.is_main else ())):
        qmodel = quantize_model(model, calib, config, calib_dir=calib_dir, inplace=True, report_out=reports)
        if not shard.is_main:
            leave_group(shard)
            return
        save_quantized(qmodel, out_path)
        report = reports[0]
        try:  # the checkpoint and its sidecar go together
            write_json(sidecar, {"plan": qmodel.quant_plan, "quant_info": qmodel.quant_info,
                                 "weight_bytes": {"quantized": weight_bytes(qmodel, scope=scope), "fp16": fp16_bytes},
                                 "run": run_summary(report, shard)})
        except QVGGTError:
            for path in (out_path, sidecar):
                path.unlink(missing_ok=True)
            raise
        report.progress.clear()
    leave_group(shard)
    click.echo(f"wrote {out_path} and {sidecar}")


def parse_loss_weights(text: str) -> dict[str, float]:
    from ..errors import InputError
    from ..quant.objective import LOSS_WEIGHTS

    weights = dict(LOSS_WEIGHTS)
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--loss-weights: {item!r} is not NAME=NUMBER") from None
        if name.strip() not in LOSS_WEIGHTS:
            raise InputError(f"--loss-weights: unknown part {name.strip()!r}; the parts are {', '.join(LOSS_WEIGHTS)}")
    return weights


def run_summary(report, shard) -> dict:
    """The run's bookkeeping for the sidecar (timings vary run to run, so they stay out of the checkpoint).
    `intra_op_threads`: per process; the checkpoint's bytes depend on it (README)."""
    import torch

    return {"intra_op_threads": torch.get_num_threads(), "seconds": report.seconds, "block_forwards": report.block_forwards, "peak_rss_gb": report.peak_rss_gb,
            "peak_cuda_gb": report.peak_cuda_gb, "resumed_blocks": report.resumed_blocks, "processes": shard.world,
            "fp_task_loss": report.fp_task_loss, "final_task_loss": report.final_task_loss}
