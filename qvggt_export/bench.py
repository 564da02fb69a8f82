"""`qvggt-export bench`: latency and peak memory per number of views, PyTorch and ONNX Runtime, full precision
vs W4A16, measured in one run on this machine and printed as ratios.

Every case (runtime x form) runs each frame count S in a process of its own, so each peak RSS is that case's
at that S alone; the RSS once the model is loaded (before the first forward) is recorded too, so the memory
above the weights can be followed as S grows. ONNX Runtime gets fp32 activations on the CPU (its fp16 CPU
kernels are few) and the `ort` lowering (MatMulNBits at accuracy_level 0, MultiHeadAttention);
`w4a16-unfused` is the same graph with every attention left as MatMul -> Softmax -> MatMul, i.e. what every
graph was before attention was fused.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .io import sha256_file
from .log import logger

# (runtime, form): the model each runs and how.
CASES = (("pytorch", "fp32"), ("pytorch", "bf16"), ("pytorch", "w4a16"),
         ("onnxruntime", "fp32"), ("onnxruntime", "w4a16"), ("onnxruntime", "w4a16-unfused"))
# ONNX graph per ONNX Runtime form: (exported precision, how the `ort` lowering writes attention).
ORT_GRAPHS = {"fp32": ("fp32", "mha"), "w4a16": ("w4a16", "mha"), "w4a16-unfused": ("w4a16", "matmul")}


@dataclass
class BenchConfig:
    checkpoint: str | None = None
    quantized: str | None = None
    random_depth: int | None = None  # instead of a checkpoint: VGGT-1B widths, this many blocks, random weights
    frames: tuple[int, ...] = (1, 2, 8)
    image_size: tuple[int, int] | None = None
    runs: int = 3
    threads: int | None = None
    workdir: str = "engines/bench"
    device: str = "cpu"  # PyTorch cases only; on cuda W4A16 runs the CUDA kernel (ONNX Runtime stays on the CPU)


def rtn_quantized(model):
    """Uniform W4A16 round-to-nearest copy: the bench measures the format, not the method."""
    import copy

    from .quant.linear import QuantLinear
    from .quant.plan import quantized_layers, uniform_plan
    from .quant.modules import replace_module

    q = copy.deepcopy(model)
    plan = uniform_plan(q, "w4a16")
    for name, bits in quantized_layers(plan).items():
        replace_module(q, name, QuantLinear.from_linear(q.get_submodule(name), bits, name=name))
    q.quant_plan, q.quant_info = plan, {"method": "rtn", "purpose": "bench"}
    return q.eval()


def _full_precision(config: BenchConfig):
    import torch

    from .model import VGGT, load_model
    from .model.presets import vggt1b_shallow_config

    if config.random_depth is None:
        return load_model(config.checkpoint)
    torch.manual_seed(0)
    return VGGT(vggt1b_shallow_config(config.random_depth)).eval()


def _prepare(config: BenchConfig) -> dict:
    """Checkpoints and ONNX files for the cases (ONNX reused when the model hash and settings match)."""
    from .export.lower import lower
    from .export.onnx_export import export_onnx
    from .export.onnx_io import load_onnx, save_proto
    from .export.spec import ExportConfig
    from .io import write_json
    from .model import load_model, save_quantized, save_vggt

    work = Path(config.workdir)
    fp = _full_precision(config)
    q = load_model(config.quantized) if config.quantized else rtn_quantized(fp)
    size = tuple(config.image_size or fp.config.default_image_size)
    checkpoints = {"fp32": work / "fp32.safetensors", "w4a16": work / "w4a16.safetensors"}
    save_vggt(fp, checkpoints["fp32"])
    save_quantized(q, checkpoints["w4a16"])
    exported = {}
    for precision, model in (("fp32", fp), ("w4a16", q)):
        onnx_path = work / f"{precision}.onnx"
        export = ExportConfig(precision=precision, activations="fp32", image_size=size, min_frames=1,
                              opt_frames=min(config.frames), max_frames=max(config.frames))
        stamp = work / f"{precision}.onnx.json"
        key = {"model": sha256_file(checkpoints[precision]), "export": export.to_dict()}
        if not (onnx_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key):
            export_onnx(model, onnx_path, export)
            write_json(stamp, key)
        exported[precision] = onnx_path
    paths = {"pytorch": {"fp32": checkpoints["fp32"], "bf16": checkpoints["fp32"], "w4a16": checkpoints["w4a16"]},
             "onnxruntime": {}}
    for form, (precision, attention) in ORT_GRAPHS.items():
        out = work / f"{form}.ort.onnx"
        save_proto(lower(load_onnx(exported[precision]), "ort", attention=attention), out)
        paths["onnxruntime"][form] = out
    return {"paths": {r: {f: str(p) for f, p in forms.items()} for r, forms in paths.items()},
            "image_size": list(size)}


def _measure(runtime: str, form: str, path: str, frames: int, image_size, runs: int, threads, device: str,
             queue) -> None:
    """Child process: one case at one frame count; reports its latency, its RSS once loaded and its peak."""
    import torch

    from .export import spec
    from .export.onnx_export import random_images

    if threads:
        torch.set_num_threads(threads)
    if runtime == "pytorch":
        from .export.onnx_export import GraphModule
        from .model import load_model

        dtype = torch.bfloat16 if form == "bf16" else torch.float32
        module = GraphModule(load_model(path, device).to(dtype), dtype).eval()
        on_gpu = torch.device(device).type == "cuda"

        def run(x):
            with torch.no_grad():
                module(torch.from_numpy(x).to(device))
            if on_gpu:
                torch.cuda.synchronize(device)
    else:
        from .export.runtime import ort_session

        session = ort_session(path, threads=threads)

        def run(x):
            session.run(None, {spec.INPUT_NAME: x})
    x = random_images(frames, tuple(image_size), seed=frames)
    loaded_mb = rss_mb("VmRSS")
    run(x)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    result = {"latency_s": float(np.median(times)), "loaded_rss_mb": loaded_mb, "peak_rss_mb": rss_mb("VmHWM")}
    if runtime == "pytorch" and torch.device(device).type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    queue.put(result)


def rss_mb(field: str) -> float:
    """This process's current (VmRSS) or peak (VmHWM) resident memory. ru_maxrss would not do for the peak:
    Linux carries it over from the parent through fork + exec, so every spawned case would report the
    parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs (macOS): best effort


def bench(config: BenchConfig) -> dict:
    prepared = _prepare(config)
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for runtime, form in CASES:
        per_s = {}
        for s in config.frames:
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(runtime, form, prepared["paths"][runtime][form], s,
                                                      prepared["image_size"], config.runs, config.threads,
                                                      config.device, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0 or queue.empty():  # killed (out of memory) or failed: recorded, not fatal
                per_s[s] = {"failed": f"exit code {proc.exitcode}"}
            else:
                per_s[s] = queue.get()
            logger.info("%s %s S=%d: %s", runtime, form, s, per_s[s])
        results[f"{runtime}/{form}"] = per_s
    return {"config": asdict(config), "image_size": prepared["image_size"], "results": results,
            "ratios": _ratios(results, config.frames), **_sizes(prepared["paths"])}


def _ratios(results: dict, frames) -> dict:
    def value(case, s, key):
        return results[case][s].get(key)

    def above_weights(case, s):
        peak, loaded = value(case, s, "peak_rss_mb"), value(case, s, "loaded_rss_mb")
        return None if peak is None else peak - loaded

    def ratio(a, b):
        return None if a is None or b in (None, 0) else a / b

    ratios = {"speedup_w4a16_vs_fp32": {runtime: {s: ratio(value(f"{runtime}/fp32", s, "latency_s"),
                                                           value(f"{runtime}/w4a16", s, "latency_s")) for s in frames}
                                        for runtime in ("pytorch", "onnxruntime")},
              "onnxruntime_vs_pytorch_fp32": {s: ratio(value("pytorch/fp32", s, "latency_s"),
                                                       value("onnxruntime/fp32", s, "latency_s")) for s in frames},
              "fused_vs_unfused_attention_peak_rss": {s: ratio(value("onnxruntime/w4a16", s, "peak_rss_mb"),
                                                               value("onnxruntime/w4a16-unfused", s, "peak_rss_mb"))
                                                      for s in frames},
              "fused_vs_unfused_attention_latency": {s: ratio(value("onnxruntime/w4a16", s, "latency_s"),
                                                              value("onnxruntime/w4a16-unfused", s, "latency_s"))
                                                     for s in frames}}
    doublings = [(a, b) for a, b in zip(frames, frames[1:]) if b == 2 * a]
    ratios["memory_above_weights_per_doubling"] = {
        case: {f"{a}->{b}": ratio(above_weights(case, b), above_weights(case, a)) for a, b in doublings}
        for case in results}
    return ratios


def _sizes(paths: dict) -> dict:
    onnx_bytes = {form: Path(p).stat().st_size for form, p in paths["onnxruntime"].items()}
    quantized_part = _quantized_part_bytes(paths["onnxruntime"]["w4a16"])
    return {"onnx_bytes": onnx_bytes, "onnx_size_ratio_fp32_vs_w4a16": onnx_bytes["fp32"] / onnx_bytes["w4a16"],
            "quantized_part_bytes": quantized_part,
            "quantized_part_ratio": quantized_part["fp32"] / quantized_part["w4a16"]}


def _quantized_part_bytes(ort_onnx: str) -> dict[str, int]:
    """Bytes of the quantized linears' weights: as stored in the W4A16 graph (packed codes + scales of
    each distinct MatMulNBits weight), and as the same weights take in fp32 (K * N * 4)."""
    import onnx

    model = onnx.load(ort_onnx)
    sizes = {t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    seen, packed, fp32 = set(), 0, 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.input[1] not in seen:
            seen.add(node.input[1])
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            packed += sizes[node.input[1]] + sizes[node.input[2]]
            fp32 += attrs["K"] * attrs["N"] * 4
    return {"w4a16": packed, "fp32": fp32}


def format_table(report: dict) -> list[str]:
    frames = report["config"]["frames"]
    results = report["results"]

    def cell(case, s, key, scale, fmt):
        r = results[case][s]
        return f"{'failed':>10}" if "failed" in r else f"{r[key] * scale:>10{fmt}}"

    header = f"{'case':<28}" + "".join(f"{'S=' + str(s):>10}" for s in frames)
    lines = [f"image size {report['image_size'][0]}x{report['image_size'][1]}; median of {report['config']['runs']} "
             "runs; one process per case and S", "latency (ms)", header]
    lines += [f"{case:<28}" + "".join(cell(case, s, "latency_s", 1e3, ".1f") for s in frames) for case in results]
    lines += ["peak RSS (MB) / RSS once loaded (MB)", header]
    for case in results:
        lines.append(f"{case:<28}" + "".join(cell(case, s, "peak_rss_mb", 1, ".0f") for s in frames))
        lines.append(f"{'  loaded':<28}" + "".join(cell(case, s, "loaded_rss_mb", 1, ".0f") for s in frames))
    ratios = report["ratios"]

    def listing(values: dict) -> str:
        return ", ".join(f"S={s} {v:.2f}x" if v is not None else f"S={s} n/a" for s, v in values.items())

    for runtime, values in ratios["speedup_w4a16_vs_fp32"].items():
        lines.append(f"{runtime} w4a16 speed vs fp32: {listing(values)}")
    lines.append(f"onnxruntime fp32 speed vs pytorch fp32: {listing(ratios['onnxruntime_vs_pytorch_fp32'])}")
    lines.append("onnxruntime w4a16 peak RSS, fused / unfused attention: "
                 f"{listing(ratios['fused_vs_unfused_attention_peak_rss'])}")
    lines.append("onnxruntime w4a16 latency, fused / unfused attention: "
                 f"{listing(ratios['fused_vs_unfused_attention_latency'])}")
    for case, growth in ratios["memory_above_weights_per_doubling"].items():
        if growth:
            lines.append(f"{case} memory above the loaded model per doubling of S: "
                         + ", ".join(f"{k} {v:.2f}x" if v is not None else f"{k} n/a" for k, v in growth.items()))
    lines.append(f"ONNX file size fp32 / w4a16: {report['onnx_size_ratio_fp32_vs_w4a16']:.2f}x (whole model), "
                 f"{report['quantized_part_ratio']:.2f}x (quantized linears)")
    return lines
