"""`qvggt-export bench`: latency and peak memory of PyTorch and ONNX Runtime, fp32 vs w4a16, measured in
one run on this machine and printed as ratios.

Each case (runtime x precision) runs in its own process, so its peak RSS is its own. ONNX Runtime gets
fp32 activations on the CPU (its fp16 CPU kernels are few); the W4A16 graph is the `ort` lowering
(MatMulNBits, accuracy_level 0: the weights are 4-bit, the arithmetic is the activations' dtype).
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

CASES = (("pytorch", "fp32"), ("pytorch", "w4a16"), ("onnxruntime", "fp32"), ("onnxruntime", "w4a16"))


@dataclass
class BenchConfig:
    checkpoint: str | None = None
    quantized: str | None = None
    frames: tuple[int, ...] = (1, 2, 8)
    image_size: tuple[int, int] | None = None
    runs: int = 3
    threads: int | None = None
    workdir: str = "engines/bench"
    device: str = "cpu"  # PyTorch cases only; on cuda W4A16 runs the CUDA kernel (ONNX Runtime stays on the CPU)


def _rtn_quantized(model):
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


def _prepare(config: BenchConfig) -> dict:
    """Checkpoints and ONNX files for the four cases (ONNX reused when the model hash matches)."""
    from .export.lower import write_lowering
    from .export.onnx_export import export_onnx
    from .export.spec import ExportConfig
    from .model import load_model
    from .model import save_quantized, save_vggt

    work = Path(config.workdir)
    fp = load_model(config.checkpoint)
    q = load_model(config.quantized) if config.quantized else _rtn_quantized(fp)
    size = tuple(config.image_size or fp.config.default_image_size)
    fp_ckpt, q_ckpt = work / "fp32.safetensors", work / "w4a16.safetensors"
    save_vggt(fp, fp_ckpt)
    save_quantized(q, q_ckpt)
    paths = {}
    for precision, model, ckpt in (("fp32", fp, fp_ckpt), ("w4a16", q, q_ckpt)):
        onnx_path = work / f"{precision}.onnx"
        export = ExportConfig(precision=precision, activations="fp32", image_size=size, min_frames=1,
                              opt_frames=min(config.frames), max_frames=max(config.frames))
        stamp = work / f"{precision}.onnx.json"
        key = {"model": sha256_file(ckpt), "export": export.to_dict()}
        if not (onnx_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == key):
            export_onnx(model, onnx_path, export)
            if precision == "w4a16":
                write_lowering(onnx_path, "ort", onnx_path)  # the runnable form replaces the custom-node one
            from .io import write_json

            write_json(stamp, key)
        paths[precision] = {"checkpoint": str(ckpt), "onnx": str(onnx_path)}
    return {"paths": paths, "image_size": list(size)}


def _measure(runtime: str, precision: str, paths: dict, frames, image_size, runs: int, threads, device: str,
             queue) -> None:
    """Child process: one case at every frame count; reports latencies and its peak RSS."""
    import torch

    from .export import spec
    from .export.onnx_export import random_images

    if threads:
        torch.set_num_threads(threads)
    if runtime == "pytorch":
        from .export.onnx_export import GraphModule
        from .model import load_model

        module = GraphModule(load_model(paths[precision]["checkpoint"], device), torch.float32).eval()
        on_gpu = torch.device(device).type == "cuda"

        def run(x):
            with torch.no_grad():
                module(torch.from_numpy(x).to(device))
            if on_gpu:
                torch.cuda.synchronize(device)
    else:
        from .export.runtime import ort_session

        session = ort_session(paths[precision]["onnx"], threads=threads)

        def run(x):
            session.run(None, {spec.INPUT_NAME: x})
    latencies = {}
    for s in frames:
        x = random_images(s, tuple(image_size), seed=s)
        run(x)  # warm-up
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - start)
        latencies[s] = float(np.median(times))
    result = {"latency_s": latencies, "peak_rss_mb": _peak_rss_mb()}
    if runtime == "pytorch" and torch.device(device).type == "cuda":
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    queue.put(result)


def _peak_rss_mb() -> float:
    """This process's own peak RSS. ru_maxrss would not do: Linux carries it over from the parent
    through fork + exec, so every spawned case would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs (macOS): best effort


def bench(config: BenchConfig) -> dict:
    prepared = _prepare(config)
    ctx = multiprocessing.get_context("spawn")
    results = {}
    for runtime, precision in CASES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(runtime, precision, prepared["paths"], config.frames,
                                                  prepared["image_size"], config.runs, config.threads, config.device,
                                                  queue))
        proc.start()
        result = queue.get()
        proc.join()
        results[f"{runtime}/{precision}"] = result
        logger.info("%s %s: %s, peak RSS %.0f MB", runtime, precision,
                    ", ".join(f"S={s} {t * 1e3:.1f} ms" for s, t in result["latency_s"].items()), result["peak_rss_mb"])
    files = {p: Path(v["onnx"]).stat().st_size for p, v in prepared["paths"].items()}
    quantized_part = _quantized_part_bytes(prepared["paths"]["w4a16"]["onnx"])
    ratios = {}
    for runtime in ("pytorch", "onnxruntime"):
        fp, q = results[f"{runtime}/fp32"], results[f"{runtime}/w4a16"]
        ratios[runtime] = {"speedup_w4a16_vs_fp32": {s: fp["latency_s"][s] / q["latency_s"][s] for s in config.frames},
                           "peak_rss_ratio_w4a16_vs_fp32": q["peak_rss_mb"] / fp["peak_rss_mb"]}
    ratios["onnxruntime_vs_pytorch_fp32"] = {s: results["pytorch/fp32"]["latency_s"][s]
                                             / results["onnxruntime/fp32"]["latency_s"][s] for s in config.frames}
    return {"config": asdict(config), "image_size": prepared["image_size"], "results": results,
            "onnx_bytes": files, "onnx_size_ratio_fp32_vs_w4a16": files["fp32"] / files["w4a16"],
            "quantized_part_bytes": quantized_part,
            "quantized_part_ratio": quantized_part["fp32"] / quantized_part["w4a16"], "ratios": ratios}


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
    lines = [f"image size {report['image_size'][0]}x{report['image_size'][1]}; median of "
             f"{report['config']['runs']} runs; latency in ms",
             f"{'case':<22}" + "".join(f"{'S=' + str(s):>10}" for s in frames) + f"{'peak RSS MB':>14}"]
    for case, r in report["results"].items():
        lines.append(f"{case:<22}" + "".join(f"{r['latency_s'][s] * 1e3:>10.1f}" for s in frames)
                     + f"{r['peak_rss_mb']:>14.0f}")
    for runtime in ("pytorch", "onnxruntime"):
        r = report["ratios"][runtime]
        lines.append(f"{runtime} w4a16 speed vs fp32: "
                     + ", ".join(f"S={s} {v:.2f}x" for s, v in r["speedup_w4a16_vs_fp32"].items())
                     + f"; peak RSS ratio {r['peak_rss_ratio_w4a16_vs_fp32']:.2f}")
    lines.append("onnxruntime fp32 speed vs pytorch fp32: "
                 + ", ".join(f"S={s} {v:.2f}x" for s, v in report["ratios"]["onnxruntime_vs_pytorch_fp32"].items()))
    lines.append(f"ONNX file size fp32 / w4a16: {report['onnx_size_ratio_fp32_vs_w4a16']:.2f}x (whole model), "
                 f"{report['quantized_part_ratio']:.2f}x (quantized linears)")
    return lines
