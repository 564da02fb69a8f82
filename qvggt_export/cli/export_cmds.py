"""Deployment commands: export, compare, engine, build, infer, bench (API: qvggt_export.export,
qvggt_export.compare, qvggt_export.build, qvggt_export.bench)."""

from __future__ import annotations

import sys

import click

from . import check_device, main
from .model_cmds import CHECKPOINT_HELP, CHECKPOINT_SOURCES, reconstruction_options
from ..vocabulary import fast_preset_help
from .quant_cmds import device_options, scope_option


# Counts and tolerances: click checks them, and the CLI group turns a bad value into one `error:` line.
COUNT = click.IntRange(min=1)
NON_NEGATIVE = click.FloatRange(min=0)


def _frame_options(fn):
    fn = click.option("--max-frames", default=32, show_default=True, type=COUNT, help="Largest number of views.")(fn)
    fn = click.option("--opt-frames", default=4, show_default=True, type=COUNT,
                      help="Views the engine is tuned for.")(fn)
    fn = click.option("--min-frames", default=1, show_default=True, type=COUNT, help="Smallest number of views.")(fn)
    fn = click.option("--image-size", default=None, metavar="HxW",
                      help="Fixed input size (default: the model's native size; 518x518 for VGGT-1B).")(fn)
    return fn


def _export_config(model, precision, image_size, min_frames, opt_frames, max_frames, activations=None,
                   validate=True):
    from ..data.images import parse_image_size
    from ..export.spec import ExportConfig

    size = parse_image_size(image_size) if image_size else model.config.default_image_size
    return ExportConfig(precision=precision, image_size=size, min_frames=min_frames, opt_frames=opt_frames,
                        max_frames=max_frames, activations=activations, validate=validate)


@main.command("export")
@click.option("--checkpoint", "-c", default=None, help=CHECKPOINT_HELP)
@click.option("--out", "-o", default="engines/model.onnx", show_default=True, type=click.Path(),
              help="Output .onnx (lowerings are written beside it as NAME.<target>.onnx).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "w8a16", "w4a16"]), default=None,
              help="Default: the checkpoint's (w4a16/w8a16 for quantized ones, else fp32).")
@click.option("--activations", type=click.Choice(["fp32", "fp16"]), default=None,
              help="Activation dtype (default fp32 for fp32, fp16 otherwise).")
@_frame_options
@click.option("--target", "targets", multiple=True, type=click.Choice(["ort", "qdq", "plugin"]),
              help="Also write these lowerings (repeatable).")
@click.option("--attention", type=click.Choice(["mha", "matmul", "opset23"]), default=None,
              help="How the lowerings write attention. Default per target: ort = mha (com.microsoft "
                   "MultiHeadAttention, memory linear in the views), qdq / plugin = matmul (MatMul -> Softmax -> "
                   "MatMul, what TensorRT 10.x fuses). opset23 (qdq / plugin): the ONNX Attention operator, for "
                   "TensorRT >= 10.14 and TensorRT-RTX (not TensorRT 10.3 / JetPack 6).")
@click.option("--no-validate", is_flag=True, help="Skip the ONNX Runtime vs PyTorch check.")
def export_cmd(checkpoint, out, precision, activations, image_size, min_frames, opt_frames, max_frames, targets,
               attention, no_validate):
    """ONNX of the full model (aggregator + camera, depth, point heads) with a dynamic number of views.

    Quantized linears become qvggt::W4A16MatMul nodes; the plan and provenance go in metadata_props."""
    from ..errors import InputError
    from ..export.lower import attention_form, write_lowering
    from ..export.onnx_export import export_onnx
    from ..model import load_model

    if attention and not targets:
        raise InputError("--attention applies to lowerings: give --target too")
    for target in targets:  # before the export, which takes minutes on VGGT-1B
        attention_form(target, attention)
    model = load_model(checkpoint)
    plan = getattr(model, "quant_plan", None)
    w8_layers = [name for name, p in (plan or {}).get("layers", {}).items() if p == "w8a16"]
    if "plugin" in targets and w8_layers:
        raise InputError(f"--target plugin: {len(w8_layers)} w8a16 layer(s) (e.g. {w8_layers[0]}), and the W4A16 "
                         "plugin runs 4-bit weights only; use --target qdq for w8a16 checkpoints")
    precision = precision or (plan["default_precision"] if plan else "fp32")
    config = _export_config(model, precision, image_size, min_frames, opt_frames, max_frames, activations,
                            not no_validate)
    path = export_onnx(model, out, config)
    click.echo(f"wrote {path}")
    for target in targets:
        click.echo(f"wrote {write_lowering(path, target, attention=attention)}")


@main.command("compare")
@click.argument("candidate", type=click.Path())
@click.option("--reference", default="torch-quantized", show_default=True,
              help="'torch' (full-precision PyTorch of --checkpoint), 'torch-quantized' (the quantized "
                   "checkpoint in PyTorch) or another .onnx/.engine.")
@click.option("--checkpoint", "-c", default=None, help="Checkpoint for a PyTorch reference. " + CHECKPOINT_HELP)
@click.option("--images", multiple=True, type=click.Path(), help="Views of one scene (default: synthetic scenes).")
@click.option("--scenes", default=2, show_default=True, type=COUNT, help="Synthetic scenes.")
@click.option("--frames", default=4, show_default=True, type=COUNT, help="Views per synthetic scene.")
@click.option("--rel-tol", default=None, type=NON_NEGATIVE,
              help="Per-output tolerance, relative to the reference output's range (Polygraphy atol). Default: "
                   "the export spec's for the candidate's activations (1e-3 fp32, 3e-2 fp16), read from its "
                   "metadata; the report says which it used.")
@click.option("--error-stat", type=click.Choice(["max", "mean", "median"]), default="max", show_default=True)
@click.option("--max-rotation-deg", default=1.0, show_default=True, type=NON_NEGATIVE)
@click.option("--max-translation-deg", default=2.0, show_default=True, type=NON_NEGATIVE)
@click.option("--min-auc30", default=90.0, show_default=True, type=click.FloatRange(0, 100))
@click.option("--max-depth-abs-rel", default=0.02, show_default=True, type=NON_NEGATIVE)
@click.option("--max-point-error", default=0.02, show_default=True, type=NON_NEGATIVE, help="Mean point error / mean point norm.")
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="Write the JSON report here, and report.html (pictures and tables, one self-contained page) "
                   "beside it.")
def compare_cmd(candidate, reference, checkpoint, images, scenes, frames, rel_tol, error_stat, max_rotation_deg,
                max_translation_deg, min_auc30, max_depth_abs_rel, max_point_error, report):
    """Polygraphy comparison of CANDIDATE (.onnx or .engine) with a reference, plus a geometry report.

    Exit code 0 when every output is within tolerance and the geometry thresholds hold, 1 otherwise."""
    from ..compare import CompareConfig, compare, image_inputs, report_context, synthetic_inputs, write_reports
    from ..errors import InputError
    from ..export import spec

    config = CompareConfig(rel_tol=None if rel_tol is None else dict.fromkeys(spec.OUTPUT_NAMES, rel_tol),
                           error_stat=error_stat,
                           max_rotation_deg=max_rotation_deg, max_translation_deg=max_translation_deg,
                           min_auc30=min_auc30, max_depth_abs_rel=max_depth_abs_rel, max_point_error=max_point_error)
    from pathlib import Path

    from ..export.infer import recorded_size
    from ..visualize import check_writable

    if report:  # before the models run
        check_writable(report)

    image_size = recorded_size(Path(candidate))
    if image_size is None:
        raise InputError(f"{candidate} does not record its image size (not exported by qvggt-export?)")
    ref = _reference(reference, checkpoint)
    inputs = image_inputs(images, image_size) if images else synthetic_inputs(image_size, scenes, frames)
    outputs = []
    result = compare(candidate, ref, inputs, config, outputs_out=outputs)
    if report:
        write_reports(report, result, inputs, outputs, **report_context(candidate, ref, reference, checkpoint))
    click.echo(f"compare {'PASSED' if result['passed'] else 'FAILED'}")
    sys.exit(0 if result["passed"] else 1)


def _reference(reference: str, checkpoint: str | None):
    from ..errors import InputError
    from ..model import load_model

    if reference in ("torch", "torch-quantized"):
        model = load_model(checkpoint)
        quantized = getattr(model, "quant_plan", None) is not None
        if quantized != (reference == "torch-quantized"):
            raise InputError(f"--reference {reference} needs a {'quantized' if not quantized else 'full-precision'} "
                             f"--checkpoint")
        return model
    return reference


@main.command("engine")
@click.argument("model", type=click.Path())
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx"]), default=None,
              help="Default: whichever TensorRT imports (standard first).")
@click.option("--out", "-o", default=None, type=click.Path(), help="Output .engine (default: MODEL with .engine).")
@click.option("--min-frames", type=COUNT, default=None, help="Profile minimum (default: the export's).")
@click.option("--opt-frames", type=COUNT, default=None)
@click.option("--max-frames", type=COUNT, default=None)
@click.option("--timing-cache", default=None, type=click.Path(), help="Timing cache file (read and updated).")
@click.option("--plugin-library", default=None, type=click.Path(),
              help="C++ W4A16 plugin (libqvggt_plugins.so) for `plugin` lowerings (default: the Python plugin).")
def engine_cmd(model, backend, out, min_frames, opt_frames, max_frames, timing_cache, plugin_library):
    """Build a TensorRT (Jetson, datacenter GPUs; build on the target) or TensorRT-RTX (RTX GPUs; builds
    anywhere, even on a CPU) engine from MODEL.onnx. `plugin` lowerings register the W4A16 plugin."""
    from pathlib import Path

    from ..errors import QVGGTError
    from ..export.engine import EngineConfig, build_engine, default_backend
    from ..export.onnx_io import load_onnx

    backend = backend or default_backend()
    if backend is None:
        raise QVGGTError("no TensorRT found: install tensorrt (on the target GPU / JetPack on a Jetson) or "
                         "`pip install 'qvggt-export[rtx]'` for TensorRT-RTX")
    load_onnx(model, load_external_data=False)  # one-line error for a missing or corrupt file
    out = out or str(Path(model).with_suffix(".engine"))
    info = build_engine(model, out, EngineConfig(backend=backend, min_frames=min_frames,
                                                 opt_frames=opt_frames, max_frames=max_frames,
                                                 timing_cache=timing_cache, plugin_library=plugin_library))
    click.echo(f"wrote {info['engine']} ({info['bytes'] / 1e6:.1f} MB, {backend})")


@main.command("build")
@click.option("--precision", type=click.Choice(["fp16", "w8a16", "w4a16"]), default="w4a16", show_default=True)
@click.option("--checkpoint", "-c", default=None, help="Full-precision checkpoint: " + CHECKPOINT_SOURCES)
@click.option("--calib", default="synthetic", show_default=True,
              help="'synthetic' or a folder of image folders (one per scene).")
@click.option("--calib-scenes", default=4, show_default=True, type=COUNT)
@click.option("--calib-frames", default=4, show_default=True, type=COUNT)
@click.option("--calib-size", default=None, metavar="HxW",
              help="Image size of the calibration views (default: the model's native size; smaller is cheaper).")
@click.option("--method", type=click.Choice(["qvggt", "awq", "gptq", "rtn"]), default="qvggt", show_default=True)
@click.option("--plan", default=None, help="auto | paper | uniform | plan file (default: the method's).")
@click.option("--out", "-o", default=None, type=click.Path(), help="Output folder (default engines/NAME-PRECISION).")
@_frame_options
@click.option("--backend", type=click.Choice(["tensorrt", "tensorrt-rtx", "none"]), default=None,
              help="Engine backend (default: whichever TensorRT imports; none: skip the engine).")
@click.option("--fast", is_flag=True, help=f"Quantizer preset for large models: {fast_preset_help()}.")
@scope_option
@device_options
def build_cmd(precision, checkpoint, calib, calib_scenes, calib_frames, calib_size, method, plan, out, image_size,
              min_frames, opt_frames, max_frames, backend, fast, scope, device, dtype):
    """calibrate -> quantize -> export -> lower -> compare -> engine, skipping up-to-date stages.

    With no arguments: the embedded vggt-tiny model, synthetic calibration, W4A16. Exit code 1 when the
    compare stage fails."""
    from ..build import BuildConfig, build
    from ..data.images import parse_image_size

    summary = build(BuildConfig(precision=precision, checkpoint=checkpoint, out=out, method=method, plan=plan,
                                calib=calib, calib_scenes=calib_scenes, calib_frames=calib_frames,
                                calib_size=parse_image_size(calib_size) if calib_size else None,
                                image_size=parse_image_size(image_size) if image_size else None,
                                min_frames=min_frames, opt_frames=opt_frames, max_frames=max_frames,
                                backend=backend, device=device, dtype=dtype, fast=fast, scope=scope))
    if not summary:
        return  # a non-main torchrun rank: rank 0 reports
    click.echo(f"build {'done' if summary['compare']['passed'] else 'done, but compare FAILED'}: {summary['out']}")
    sys.exit(0 if summary["compare"]["passed"] else 1)


@main.command("infer")
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "-o", default="preds.npz", show_default=True, type=click.Path(), help="Output .npz.")
@click.option("--mode", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
              help="Preprocessing, as `predict`.")
@click.option("--image-size", default=None, metavar="HxW",
              help="Preprocess to this size (default: the size MODEL was exported at).")
@click.option("--plugin-library", default=None, type=click.Path(),
              help="C++ W4A16 plugin (libqvggt_plugins.so) for engines that use it (default: the Python plugin).")
@reconstruction_options()
def infer_cmd(model, images, out, mode, image_size, plugin_library, ply, glb, conf_percentile):
    """Run MODEL (.onnx in ONNX Runtime, or a TensorRT / TensorRT-RTX .engine) on IMAGES (views of one
    scene), preprocessed to MODEL's input size; writes the same predictions as `predict` (extrinsic and
    intrinsic included)."""
    from ..export.infer import infer
    from ..data.images import parse_image_size
    from ..visualize import ReconstructionOutputs

    infer(model, images, out, mode, plugin_library, parse_image_size(image_size) if image_size else None,
          ReconstructionOutputs(ply, glb, conf_percentile))
    click.echo(f"wrote {out}")


def _frame_list(text: str) -> tuple[int, ...]:
    try:
        frames = tuple(int(part) for part in text.split(","))
    except ValueError:
        frames = ()
    if not frames or min(frames) < 1:
        raise click.BadParameter(f"must be positive integers separated by commas, like 1,2,8; got {text!r}")
    return frames


@main.command("bench")
@click.option("--checkpoint", "-c", default=None, help="Full-precision checkpoint: " + CHECKPOINT_SOURCES)
@click.option("--quantized", "-q", default=None, type=click.Path(),
              help="Its W4A16 checkpoint (default: RTN-quantize the checkpoint here).")
@click.option("--random-depth", default=None, type=click.IntRange(1, 24), metavar="N",
              help="Instead of a checkpoint: VGGT-1B's widths with N aggregator and N encoder blocks, random weights "
                   "(its memory and speed per block and token at a fraction of the time).")
@click.option("--frames", default="1,2,8", show_default=True, callback=lambda ctx, param, value: _frame_list(value),
              help="Numbers of views, comma-separated.")
@click.option("--image-size", default=None, metavar="HxW", help="Default: the model's native size.")
@click.option("--runs", default=3, show_default=True, type=COUNT, help="Timed runs per case (after one warm-up).")
@click.option("--threads", default=None, type=COUNT, help="Intra-op threads (default: all cores).")
@click.option("--workdir", default="engines/bench", show_default=True, type=click.Path(),
              help="Where the ONNX files of the benchmark go (reused when up to date).")
@click.option("--report", default=None, type=click.Path(), help="Write the JSON report here.")
@click.option("--device", default="cpu", show_default=True, callback=check_device,
              help="cpu or cuda for the PyTorch cases (cuda: W4A16 through the CUDA kernel).")
def bench_cmd(checkpoint, quantized, random_depth, frames, image_size, runs, threads, workdir, report, device):
    """Latency and peak memory per number of views of PyTorch (fp32, bf16, w4a16) and ONNX Runtime (fp32,
    w4a16, w4a16 with unfused attention), one process per case and S, printed as ratios."""
    from ..bench import BenchConfig, bench, format_table
    from ..data.images import check_size
    from ..errors import InputError
    from ..data.images import parse_image_size
    from ..io import write_json

    if random_depth is not None and (checkpoint or quantized):
        raise InputError("--random-depth builds a random model: give it without --checkpoint / --quantized")
    result = bench(BenchConfig(checkpoint=checkpoint, quantized=quantized, random_depth=random_depth, frames=frames,
                               image_size=check_size(parse_image_size(image_size)) if image_size else None, runs=runs,
                               threads=threads, workdir=workdir, device=device))
    for line in format_table(result):
        click.echo(line)
    if report:
        write_json(report, result)
