#!/usr/bin/env python
"""The one check to run on a lent GPU: the W4A16 kernel (correctness, speed, sanitizers, the plugin's cuBLAS
call), VGGT-1B end to end, and the quantizer on CUDA. Written so that one window cannot be wasted.

  python scripts/gpu_check.py --out DIR            # on the GPU (about 5 minutes on an H100)
  python scripts/gpu_check.py --out DIR --dry-run  # every section on the CPU with tiny shapes (CI runs it)

Sections run in order, each in its own try and its own time box (--budget is split between them), and each
appends its rows to DIR/results.jsonl and one line to DIR/summary.txt as soon as it finishes; DIR/gpu_check.log
holds the log (tracebacks included) and DIR/sanitizer.log the compute-sanitizer reports. A section that
raises, or runs out of its box before measuring anything, is recorded as "could not run" and the next one
starts. docs/gpu.md says how to read the files.

Exit code: 0 every check correct, 1 a mismatch (a kernel, the plugin's cuBLAS call or a model disagrees
with its reference), 2 no mismatch but a section could not run.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import logging
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qvggt_export import arch  # noqa: E402
from qvggt_export.kernels import binding  # noqa: E402
from qvggt_export.kernels.layout import dequantize_kernel_layout, to_kernel_layout  # noqa: E402
from qvggt_export.log import logger, setup_logging  # noqa: E402
from qvggt_export.quant.pack import pack_weight, unpack_weight  # noqa: E402

# (K, N) of every W4A16 linear in VGGT-1B: aggregator and encoder blocks (qkv, proj, fc1, fc2) and the camera
# trunk at twice the width; then every combination of odd N and K the kernel's tiling must handle.
VGGT_SHAPES = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
               (2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)]
ODD_SHAPES = [(k, n) for k in (128, 384, 640) for n in (8, 136, 1000)]
# Single rows, the 16/32/64-row tiles and one past each, the camera trunk (M = S), up to 32 views at 518.
M_VALUES = [1, 2, 4, 8, 16, 17, 24, 32, 33, 48, 64, 65, 96, 128, 192, 256, 1374, 2748, 10992, 43968]
FRAMES = [1, 2, 8, 32]
IMAGE_SIZE = (518, 518)
KERNEL_TOLERANCE = 1e-2  # max |y - reference| / max |reference|: fp16 output, fp32 accumulation
MODEL_TOLERANCE = 5e-2   # kernel model vs its emulation, whole VGGT (fp16 activations through 72+ blocks)
SPEED_GOALS = {16: 3.0, 1374: 0.85}  # x cuBLAS fp16: at M = 16, and at every M >= 1374
# Seconds of each section's time box, as shares of --budget (the defaults sum to about 5 minutes).
BOXES = {"environment": 45, "kernel_correctness": 25, "kernel_speed": 40, "sanitizer": 40, "plugin_cublas": 5,
         "end_to_end": 60, "quantizer": 70, "reload": 15}
# The plugin's cuBLAS call (plugins/w4a16_plugin.cpp), as its source spells it; the check reproduces it.
PLUGIN_GEMM_CALL = ("mCublas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha, weightFp16, CUDA_R_16F, k, x, CUDA_R_16F, "
                    "k, &beta, y, CUDA_R_16F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT")
# cuBLAS enum values (cublas_api.h, library_types.h).
CUBLAS_OP_N, CUBLAS_OP_T, CUDA_R_16F, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT = 0, 1, 2, 68, -1

OK, MISMATCH, NOT_RUN = "ok", "mismatch", "could not run"


@dataclass
class Context:
    """What the sections share: the run's settings, its deadline per section, and the files they leave."""

    out: Path
    dry_run: bool
    device: torch.device
    shapes: list[tuple[int, int]]
    speed_shapes: list[tuple[int, int]]
    m_values: list[int]
    frames: list[int]
    image_size: tuple[int, int]
    budget_scale: float
    work: Path
    deadline: float = 0.0
    quantized_checkpoint: Path | None = None
    quantizer_image_size: tuple[int, int] = (224, 224)
    notes: list[str] = field(default_factory=list)

    def time_left(self) -> float:
        return self.deadline - time.monotonic()


class SectionResult:
    def __init__(self, status: str, summary: str, rows: list[dict] | None = None, data: dict | None = None):
        self.status, self.summary, self.rows, self.data = status, summary, rows or [], data or {}


# ------------------------------------------------------------------------------------------------
# Measuring


def synchronize(ctx: Context) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()


def device_time_ms(ctx: Context, fn, reps: int = 10) -> float:
    """Median time of fn on the device's own clock, L2 flushed before every rep: a 256 MB buffer is zeroed
    first, which also hides the host's launch latency behind GPU work (triton.testing.do_bench does this;
    the same loop by hand where Triton is missing). On the CPU (dry run): wall time, no GPU measurement."""
    if ctx.device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return flushed_event_time_ms(fn, reps)
        return float(do_bench(fn, warmup=3, rep=max(3, reps), return_mode="median"))
    times = []
    for _ in range(2 + reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[2:])


def flushed_event_time_ms(fn, reps: int) -> float:
    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.abs().max()) or 1.0
    return float((y.float() - reference.float()).abs().max()) / scale


# ------------------------------------------------------------------------------------------------
# Layers


def make_layer(k: int, n: int, device: torch.device, seed: int) -> dict:
    """One random W4 layer in the canonical format, the kernel layout and dequantized fp16/fp32."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.02
    packed, scales = pack_weight(weight)
    kernel_weight, kernel_scales = to_kernel_layout(packed, scales)
    bias = (torch.randn(n, generator=generator) * 0.1).to(torch.float16)
    return {"packed": packed.to(device), "scales": scales.to(device), "bias": bias.to(device),
            "kernel_weight": kernel_weight.to(device), "kernel_scales": kernel_scales.to(device),
            "weight_fp16": unpack_weight(packed, scales, dtype=torch.float16).to(device),
            "weight_fp32": unpack_weight(packed, scales, dtype=torch.float32).to(device)}


def reference(x: torch.Tensor, layer: dict) -> torch.Tensor:
    """fp32 matmul of the same dequantized weight (TF32 off)."""
    return x.float() @ layer["weight_fp32"].t() + layer["bias"].float()


def kernel_call(ctx: Context, x: torch.Tensor, layer: dict, path: str):
    """The kernel on a GPU; on the CPU its exact dequantization emulation (kernels/layout.py)."""
    if ctx.device.type == "cuda":
        return lambda: binding.w4a16_matmul(x, layer["kernel_weight"], layer["kernel_scales"], layer["bias"], path=path)
    emulated = dequantize_kernel_layout(layer["kernel_weight"], layer["kernel_scales"]).float()
    return lambda: (x.float() @ emulated.t() + layer["bias"].float()).to(torch.float16)


def tinygemm(layer: dict):
    """torch's int4 weight-only GEMM (tinygemm, bf16 activations, group 128) on the same codes: w = (q - 8) * s."""
    packed = layer["packed"]
    if packed.device.type != "cuda":
        raise RuntimeError("tinygemm (torch._weight_int4pack_mm) is CUDA only here")
    # tinygemm packs the even k in the high nibble; ours has it in the low one.
    weight = torch._convert_weight_to_int4pack((packed >> 4) | (packed << 4), 8)
    zeros = torch.zeros_like(layer["scales"].t())
    scales_and_zeros = torch.stack([layer["scales"].t(), zeros], dim=-1).to(torch.bfloat16).contiguous()
    return lambda x: torch._weight_int4pack_mm(x, weight, 128, scales_and_zeros) + layer["bias"].to(torch.bfloat16)


# ------------------------------------------------------------------------------------------------
# Sections


def environment(ctx: Context) -> SectionResult:
    data = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": sys.version.split()[0], "dry_run": ctx.dry_run}
    for module in ("triton", "cupy", "onnxruntime"):
        try:
            data[module] = __import__(module).__version__
        except Exception as error:  # noqa: BLE001 - an optional tool: record why it is missing
            data[module] = f"missing ({type(error).__name__})"
    nvcc = binding.find_nvcc()
    data["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1] \
        if nvcc else None
    data["compute_sanitizer"] = find_sanitizer()
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        data.update(gpu=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 2**30, 1), peak_bandwidth_gbs=peak_bandwidth_gbs())
        start = time.monotonic()
        library = binding.load_library()
        data["kernel_build_s"] = round(time.monotonic() - start, 1)
    else:
        data["gpu"] = None
        # The CPU can still compile the kernel for an H100 and read its dispatch table.
        try:
            library = binding.open_library(binding.build_library([90]))
        except Exception as error:  # noqa: BLE001 - nvcc missing on this CPU machine
            library = None
            data["kernel_build"] = f"skipped: {error}"
    if library is not None:
        data["fused_max_m_in_library"] = max(m for m in range(1, 4097) if library.qvggt_w4a16_use_fused(m, 1024, 1024))
    summary = (f"{data.get('gpu') or 'CPU (dry run)'}, torch {data['torch']}, cuda {data['cuda']}, triton "
               f"{data['triton']}, cupy {data['cupy']}, nvcc {'yes' if nvcc else 'no'}, compute-sanitizer "
               f"{'yes' if data['compute_sanitizer'] else 'no'}")
    return SectionResult(OK, summary, data=data)


def peak_bandwidth_gbs() -> float | None:
    """DRAM peak from the device's memory clock and bus width (double data rate), where torch reports them."""
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", None), getattr(props, "memory_bus_width", None)
    return round(2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, 0) if clock_khz and bus_bits else None


def kernel_correctness(ctx: Context) -> SectionResult:
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, worst = [], 0.0
    for index, (k, n) in enumerate(ctx.shapes):
        layer = make_layer(k, n, ctx.device, seed=index)
        try:
            tiny = tinygemm(layer)
        except Exception as error:  # noqa: BLE001 - a baseline only; recorded
            tiny, tiny_error = None, f"{type(error).__name__}: {error}"
        for m in ctx.m_values:
            if ctx.time_left() <= 0:
                ctx.notes.append(f"kernel_correctness: time box reached at K={k} N={n} M={m}")
                break
            x = torch.randn(m, k, device=ctx.device).to(torch.float16)
            expected = reference(x, layer)
            row = {"K": k, "N": n, "M": m}
            for path in ("fused", "dequant"):
                row[f"error_{path}"] = relative_error(kernel_call(ctx, x, layer, path)(), expected)
            if tiny is not None:
                x_bf16 = x.to(torch.bfloat16)
                row["error_tinygemm"] = relative_error(tiny(x_bf16), reference(x_bf16, layer))
            else:
                row["tinygemm"] = tiny_error
            row["correct"] = max(row["error_fused"], row["error_dequant"]) <= KERNEL_TOLERANCE
            worst = max(worst, row["error_fused"], row["error_dequant"])
            rows.append(row)
            del x, expected
        if ctx.device.type == "cuda":
            del layer
            torch.cuda.empty_cache()
    if not rows:
        return SectionResult(NOT_RUN, "no case ran inside the time box")
    bad = [r for r in rows if not r["correct"]]
    tiny_bad = [r for r in rows if r.get("error_tinygemm", 0) > KERNEL_TOLERANCE]
    status = MISMATCH if bad else OK
    summary = (f"{len(rows)} cases ({len({(r['K'], r['N']) for r in rows})} shapes x M), worst error {worst:.1e} "
               f"(limit {KERNEL_TOLERANCE:.0e}); {len(bad)} wrong"
               + (f"; first wrong: {bad[0]}" if bad else "")
               + (f"; tinygemm wrong in {len(tiny_bad)} cases (excluded from speed ratios)" if tiny_bad else ""))
    return SectionResult(status, summary, rows)


def kernel_speed(ctx: Context) -> SectionResult:
    rows = []
    for index, (k, n) in enumerate(ctx.speed_shapes):
        layer = make_layer(k, n, ctx.device, seed=index)
        try:
            tiny = tinygemm(layer)
        except Exception:  # noqa: BLE001 - CUDA only; the correctness section recorded why
            tiny = None
        weight_bytes = n * k // 2 + n * (k // 128) * 2
        for m in ctx.m_values:
            if ctx.time_left() <= 0:
                ctx.notes.append(f"kernel_speed: time box reached at K={k} N={n} M={m}")
                break
            x = torch.randn(m, k, device=ctx.device).to(torch.float16)
            row = {"K": k, "N": n, "M": m}
            for path in ("fused", "dequant"):
                row[f"ms_{path}"] = device_time_ms(ctx, kernel_call(ctx, x, layer, path))
            row["ms_cublas_fp16"] = device_time_ms(ctx, lambda: torch.addmm(layer["bias"], x, layer["weight_fp16"].t())
                                                   if ctx.device.type == "cuda" else x.float() @ layer["weight_fp32"].t())
            if tiny is not None:
                x_bf16 = x.to(torch.bfloat16)
                if relative_error(tiny(x_bf16), reference(x_bf16, layer)) <= KERNEL_TOLERANCE:
                    row["ms_tinygemm"] = device_time_ms(ctx, lambda: tiny(x_bf16))
            best = min(row["ms_fused"], row["ms_dequant"])
            row["best_path"] = "fused" if row["ms_fused"] <= row["ms_dequant"] else "dequant"
            row["speedup_vs_cublas"] = row["ms_cublas_fp16"] / best
            if "ms_tinygemm" in row:
                row["speedup_vs_tinygemm"] = row["ms_tinygemm"] / best
            moved = weight_bytes + 2 * m * (k + n)
            row["GB/s"] = moved / (best * 1e-3) / 1e9
            row["TFLOP/s"] = 2.0 * m * n * k / (best * 1e-3) / 1e12
            rows.append(row)
        if ctx.device.type == "cuda":
            out = torch.empty(n, k, dtype=torch.float16, device=ctx.device)
            ms = device_time_ms(ctx, lambda: binding.dequantize(layer["kernel_weight"], layer["kernel_scales"], out=out))
            rows.append({"K": k, "N": n, "dequantize_ms": ms,
                         "dequantize_GB/s": (weight_bytes + n * k * 2) / (ms * 1e-3) / 1e9})
            del layer
            torch.cuda.empty_cache()
    gemm_rows = [r for r in rows if "M" in r]
    if not gemm_rows:
        return SectionResult(NOT_RUN, "no case ran inside the time box")
    data = speed_summary(ctx, rows)
    label = "" if ctx.device.type == "cuda" else " [CPU wall times of the emulation: not a GPU measurement]"
    summary = (f"{len(gemm_rows)} cases; suggested kFusedMaxM {data['suggested_fused_max_m']}; "
               f"x cuBLAS fp16 at M=16: {data['speedup_at_16']}; worst at M>=1374: {data['worst_speedup_large_m']}; "
               f"goals met: {data['goals_met']}; dequantize {data['dequantize_GB/s']} GB/s of peak "
               f"{data['peak_bandwidth_gbs']}{label}")
    return SectionResult(OK, summary, rows, data)


def speed_summary(ctx: Context, rows: list[dict]) -> dict:
    """The M from which the dequantize + cuBLAS path wins per shape, kFusedMaxM (the largest measured M below
    every shape's crossover), and the speed goals judged on the faster path."""
    gemm = [r for r in rows if "M" in r]
    first_dequant_win = {}
    for k, n in sorted({(r["K"], r["N"]) for r in gemm}):
        wins = [r["M"] for r in sorted(gemm, key=lambda r: r["M"]) if (r["K"], r["N"]) == (k, n)
                and r["best_path"] == "dequant"]
        first_dequant_win[f"{k}x{n}"] = wins[0] if wins else None
    crossings = [m for m in first_dequant_win.values() if m is not None]
    below = [m for m in ctx.m_values if not crossings or m < min(crossings)]
    at_16 = [r["speedup_vs_cublas"] for r in gemm if r["M"] == 16]
    large = [r["speedup_vs_cublas"] for r in gemm if r["M"] >= 1374]
    dequant = [r["dequantize_GB/s"] for r in rows if "dequantize_GB/s" in r]
    return {"dequant_path_wins_from_m": first_dequant_win, "suggested_fused_max_m": max(below) if below else None,
            "speedup_at_16": round(min(at_16), 2) if at_16 else None,
            "worst_speedup_large_m": round(min(large), 2) if large else None,
            "goals_met": bool(at_16 and large and min(at_16) >= SPEED_GOALS[16] and min(large) >= SPEED_GOALS[1374]),
            "dequantize_GB/s": round(statistics.median(dequant)) if dequant else None,
            "peak_bandwidth_gbs": peak_bandwidth_gbs() if ctx.device.type == "cuda" else None}


def find_sanitizer() -> str | None:
    nvcc = binding.find_nvcc()
    candidates = [shutil.which("compute-sanitizer")]
    if nvcc:
        candidates.append(str(Path(nvcc).parent / "compute-sanitizer"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def sanitizer_cases(device: str) -> int:
    """A few small launches of every kernel entry point (the subprocess compute-sanitizer watches)."""
    ctx = Context(out=Path("."), dry_run=device == "cpu", device=torch.device(device), shapes=[], speed_shapes=[],
                  m_values=[], frames=[], image_size=(0, 0), budget_scale=1.0, work=Path("."))
    worst = 0.0
    for k, n in [(128, 8), (384, 136), (640, 1000)]:
        layer = make_layer(k, n, ctx.device, seed=k + n)
        for m in (1, 17, 33, 65):
            x = torch.randn(m, k, device=ctx.device).to(torch.float16)
            for path in ("fused", "dequant"):
                worst = max(worst, relative_error(kernel_call(ctx, x, layer, path)(), reference(x, layer)))
        if ctx.device.type == "cuda":
            y = torch.empty(4, n, dtype=torch.float16, device=ctx.device)
            check_status(binding.load_library().qvggt_w4a16_fill_bias(layer["bias"].data_ptr(), y.data_ptr(), 4, n,
                                                                      torch.cuda.current_stream().cuda_stream))
    synchronize(ctx)
    print(f"sanitizer cases: worst error {worst:.1e}")
    return 0 if worst <= KERNEL_TOLERANCE else 1


def check_status(status: int) -> None:
    if status != 0:
        raise RuntimeError(binding.load_library().qvggt_w4a16_error_string(status).decode())


def sanitizer(ctx: Context) -> SectionResult:
    """memcheck, racecheck and synccheck at once (three subprocesses), each on our kernels only."""
    case = [sys.executable, str(Path(__file__).resolve()), "--sanitizer-cases", ctx.device.type]
    tool = find_sanitizer()
    if ctx.device.type != "cuda" or tool is None:
        # Dry run (or no tool): the same cases without the sanitizer, so the subprocess itself is checked.
        result = subprocess.run(case, capture_output=True, text=True, timeout=max(10, ctx.time_left()))
        (ctx.out / "sanitizer.log").write_text(result.stdout + result.stderr)
        if result.returncode != 0:
            return SectionResult(MISMATCH if result.returncode == 1 else NOT_RUN,
                                 f"sanitizer cases failed without a sanitizer (exit {result.returncode})")
        why = "no GPU (dry run)" if ctx.device.type != "cuda" else "compute-sanitizer not found"
        status = OK if ctx.device.type != "cuda" else NOT_RUN
        return SectionResult(status, f"{why}: the cases ran without it ({result.stdout.strip()})")
    runs = {}
    for name in ("memcheck", "racecheck", "synccheck"):
        command = [tool, "--tool", name, "--error-exitcode", "3", *case]
        runs[name] = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows, log = [], []
    for name, process in runs.items():
        try:
            output, _ = process.communicate(timeout=max(5, ctx.time_left()))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            rows.append({"tool": name, "exit": None, "result": "timed out"})
        else:
            errors = re.search(r"ERROR SUMMARY: (\d+) error", output)
            rows.append({"tool": name, "exit": process.returncode,
                         "errors": int(errors.group(1)) if errors else None})
        log.append(f"===== {name}\n{output}")
    (ctx.out / "sanitizer.log").write_text("\n".join(log))
    found = [r for r in rows if r.get("errors") or r.get("exit") in (1, 3)]
    not_run = [r for r in rows if r.get("errors") is None and r not in found]
    status = MISMATCH if found else NOT_RUN if not_run else OK
    return SectionResult(status, "; ".join(f"{r['tool']}: {r.get('errors', r.get('result'))} errors, exit "
                                          f"{r['exit']}" for r in rows), rows)


def plugin_gemm_arguments() -> str:
    """The argument list of the plugin's cublasGemmEx call, whitespace-normalised, read from its source."""
    source = (ROOT / "plugins" / "w4a16_plugin.cpp").read_text()
    call = re.search(r"cublasGemmEx\((.*?)\);", source, re.S)
    if call is None:
        raise RuntimeError("plugins/w4a16_plugin.cpp has no cublasGemmEx call")
    return re.sub(r"\s+", " ", call.group(1)).strip()


def column_major_gemm(transa: int, transb: int, m: int, n: int, k: int, alpha: float, a: np.ndarray, lda: int,
                      b: np.ndarray, ldb: int, beta: float, c: np.ndarray, ldc: int) -> None:
    """cublasGemmEx's semantics on flat host buffers: C = alpha op(A) op(B) + beta C, all column-major."""
    def matrix(buffer, rows, cols, ld):
        return buffer[: ld * cols].reshape(cols, ld).T[:rows].astype(np.float32)

    op_a = matrix(a, k, m, lda).T if transa == CUBLAS_OP_T else matrix(a, m, k, lda)
    op_b = matrix(b, n, k, ldb).T if transb == CUBLAS_OP_T else matrix(b, k, n, ldb)
    result = alpha * op_a @ op_b + beta * matrix(c, m, n, ldc)
    view = c[: ldc * n].reshape(n, ldc).T
    view[:m] = result.astype(c.dtype)


def cublas_library():
    """libcublas as torch loaded it (a CUDA build of torch ships it)."""
    torch.ones(2, 2, device="cuda") @ torch.ones(2, 2, device="cuda")  # loads cuBLAS
    for name in ("libcublas.so.13", "libcublas.so.12", "libcublas.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    for path in Path(torch.__file__).parents[1].glob("nvidia/cublas*/lib/libcublas.so*"):
        return ctypes.CDLL(str(path))
    raise RuntimeError("libcublas not found beside torch")


def plugin_cublas(ctx: Context) -> SectionResult:
    """The plugin's large-M path: fill_bias(y), then cublasGemmEx with beta = 1 on the dequantized weight,
    with the exact arguments of plugins/w4a16_plugin.cpp, against Y = X W^T + b."""
    found = plugin_gemm_arguments()
    if found != PLUGIN_GEMM_CALL:
        return SectionResult(NOT_RUN, f"the plugin's cublasGemmEx call changed; update PLUGIN_GEMM_CALL: {found}")
    rows = []
    for k, n, m in [(128, 8, 1), (384, 136, 65), (1024, 3072, 300)]:
        layer = make_layer(k, n, torch.device("cpu"), seed=m)
        x = torch.randn(m, k).to(torch.float16)
        expected = reference(x, layer)
        # Host emulation of the call's argument logic (column-major views of the row-major buffers).
        y = np.tile(layer["bias"].numpy(), m)  # fill_bias: every row of y = bias
        column_major_gemm(CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, 1.0, layer["weight_fp16"].numpy().ravel(), k,
                          x.numpy().ravel(), k, 1.0, y, n)
        row = {"K": k, "N": n, "M": m, "error_emulated": relative_error(torch.from_numpy(y.reshape(m, n)), expected)}
        if ctx.device.type == "cuda":
            row["error_gpu"] = relative_error(gpu_plugin_gemm(layer, x), expected)
        rows.append(row)
    worst = max(max(r.get("error_gpu", 0), r["error_emulated"]) for r in rows)
    where = "host emulation and the GPU" if ctx.device.type == "cuda" else "host emulation only (dry run)"
    return SectionResult(OK if worst <= KERNEL_TOLERANCE else MISMATCH,
                         f"fill_bias + cublasGemmEx(beta=1) as the plugin calls it, {where}: worst error {worst:.1e}",
                         rows)


def gpu_plugin_gemm(layer: dict, x: torch.Tensor) -> torch.Tensor:
    lib, kernels = cublas_library(), binding.load_library()
    m, k = x.shape
    n = layer["bias"].numel()
    device = torch.device("cuda")
    kernel_weight, kernel_scales = layer["kernel_weight"].to(device), layer["kernel_scales"].to(device)
    weight_fp16 = binding.dequantize(kernel_weight, kernel_scales)
    x, bias = x.to(device), layer["bias"].to(device)
    y = torch.empty(m, n, dtype=torch.float16, device=device)
    stream = torch.cuda.current_stream().cuda_stream
    check_status(kernels.qvggt_w4a16_fill_bias(bias.data_ptr(), y.data_ptr(), m, n, stream))
    handle = ctypes.c_void_p()
    assert lib.cublasCreate_v2(ctypes.byref(handle)) == 0
    try:
        assert lib.cublasSetStream_v2(handle, ctypes.c_void_p(stream)) == 0
        alpha, beta = ctypes.c_float(1.0), ctypes.c_float(1.0)
        i, p = ctypes.c_int, ctypes.c_void_p
        status = lib.cublasGemmEx(handle, i(CUBLAS_OP_T), i(CUBLAS_OP_N), i(n), i(m), i(k), ctypes.byref(alpha),
                                  p(weight_fp16.data_ptr()), i(CUDA_R_16F), i(k), p(x.data_ptr()), i(CUDA_R_16F), i(k),
                                  ctypes.byref(beta), p(y.data_ptr()), i(CUDA_R_16F), i(n), i(CUBLAS_COMPUTE_32F),
                                  i(CUBLAS_GEMM_DEFAULT))
        torch.cuda.synchronize()
        if status != 0:
            raise RuntimeError(f"cublasGemmEx returned {status}")
    finally:
        lib.cublasDestroy_v2(handle)
    return y.cpu()


# ------------------------------------------------------------------------------------------------
# End to end and the quantizer


def model_config(ctx: Context) -> dict:
    """VGGT-1B on a GPU; a VGGT small enough for the CPU in a dry run (widths multiples of the 128-group)."""
    if ctx.device.type == "cuda":
        return {"carry_track_head": False}
    return dict(img_size=42, embed_dim=128, depth=2, num_heads=2, patch_embed="conv", camera_num_heads=2,
                camera_trunk_depth=1, dpt_features=16, dpt_out_channels=(8, 16, 32, 32),
                intermediate_layer_idx=(0, 0, 1, 1), carry_track_head=False)


def random_w4a16(model: torch.nn.Module) -> torch.nn.Module:
    """The paper plan's 4-bit linears (a uniform plan for the dry run's small model) as QuantLinear,
    round-to-nearest on the model's device (random weights: what is measured is speed, memory, and the
    kernel against its emulation)."""
    from qvggt_export.quant.linear import QuantLinear
    from qvggt_export.quant.modules import replace_module
    from qvggt_export.quant.plan import build_plan, paper_plan, quantized_layers

    plan = paper_plan(model) if arch.paper_protected_blocks(model) is not None else build_plan(model)
    for name, bits in quantized_layers(plan).items():
        linear = model.get_submodule(name)
        q = QuantLinear(linear.in_features, linear.out_features, bits, bias=linear.bias is not None, name=name)
        packed, scales = pack_weight(linear.weight.detach().float(), bits)
        q.qweight, q.scales = packed, scales
        if linear.bias is not None:
            q.bias = linear.bias.detach().float()
        replace_module(model, name, q.to(linear.weight.device))
    model.quant_plan, model.quant_info = plan, {"method": "rtn", "source": "gpu_check.py, random weights"}
    return model


def end_to_end(ctx: Context) -> SectionResult:
    """VGGT(-1B) in fp16, bf16 and W4A16 (kernel linears) at each S: latency and peak memory; and the kernel
    model against its emulation (the same codes through dequantize-then-matmul) at S = 2."""
    from qvggt_export.kernels.linear import install_kernel_linears
    from qvggt_export.model import VGGT, VGGTConfig
    from qvggt_export.model.checkpoint import use_gpu_kernels
    from qvggt_export.quant.linear import QuantLinear

    torch.manual_seed(0)
    with torch.device(ctx.device):
        base = VGGT(VGGTConfig(**model_config(ctx))).eval()
    half = torch.float16 if ctx.device.type == "cuda" else torch.bfloat16  # fp16 convolutions are slow on CPUs
    emulated = random_w4a16(copy.deepcopy(base).to(half))
    kernel_model = copy.deepcopy(emulated)
    if ctx.device.type == "cuda":
        swapped = use_gpu_kernels(kernel_model)
    else:  # KernelLinear's exact CPU emulation of the kernel
        names = [n for n, m in kernel_model.named_modules() if isinstance(m, QuantLinear) and m.bits == 4]
        install_kernel_linears(kernel_model, names)
        swapped = len(names)
    images = torch.rand(1, 2, 3, *ctx.image_size, device=ctx.device, dtype=half)
    with torch.inference_mode():
        got, want = kernel_model(images), emulated(images)
    errors = {k: relative_error(got[k], want[k]) for k in ("pose_enc", "depth", "world_points")}
    rows = [{"check": "kernel model vs emulation", "S": 2, "swapped_linears": swapped, **errors}]
    models = {("fp16" if half == torch.float16 else "bf16"): base.to(half), "w4a16": kernel_model}
    if ctx.device.type == "cuda":
        models["bf16"] = copy.deepcopy(models["fp16"]).to(torch.bfloat16)
    del emulated, base, got, want
    out_of_memory = set()
    for s in ctx.frames:  # every model at one S before the next S, so a time box cuts the largest S only
        for name, model in models.items():
            if ctx.time_left() <= 0:
                ctx.notes.append(f"end_to_end: time box reached before {name} S={s}")
                break
            if name not in out_of_memory:
                rows.append(measure_forward(ctx, model, name, s))
                if rows[-1].get("result") == "OOM":
                    out_of_memory.add(name)
    reference_name = next(iter(models))
    by = {(r.get("model"), r.get("S")): r for r in rows}
    ratios = []
    for s in ctx.frames:
        full, w4 = by.get((reference_name, s)), by.get(("w4a16", s))
        if full and w4 and full.get("peak_mb") and w4.get("peak_mb"):
            ratios.append(f"S={s}: latency {w4['ms'] / full['ms']:.2f}x, peak {w4['peak_mb'] / full['peak_mb']:.2f}x")
    worst = max(errors.values())
    failed = [r for r in rows if r.get("result") not in (None, "OOM")]
    status = MISMATCH if worst > MODEL_TOLERANCE else NOT_RUN if failed or len(rows) == 1 else OK
    return SectionResult(status, f"kernel model vs emulation at S=2: worst {worst:.1e} (limit {MODEL_TOLERANCE:.0e}); "
                                 f"W4A16 vs {reference_name}: {'; '.join(ratios) or 'no pair measured'}"
                                 + (f"; {len(failed)} runs failed" if failed else ""), rows)


def measure_forward(ctx: Context, model, name: str, s: int) -> dict:
    """Latency (median of 3 after a warm-up) and peak memory as if this model were alone on the device: its
    weights plus the peak above what was resident before the forward (the other models stay loaded)."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    weights_mb = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2**20
    row = {"model": name, "S": s, "image": f"{ctx.image_size[0]}x{ctx.image_size[1]}", "weights_mb": round(weights_mb)}
    images = torch.rand(1, s, 3, *ctx.image_size, device=ctx.device, dtype=dtype)
    try:
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                model(images)  # warm-up
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                times = []
                for _ in range(3):
                    start.record()
                    model(images)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
            row["ms"] = statistics.median(times)
            row["peak_mb"] = round(weights_mb + (torch.cuda.max_memory_allocated() - resident) / 2**20)
        else:  # dry run: wall time of one forward, and the process's peak RSS (no per-model memory on the CPU)
            with torch.inference_mode():
                start = time.perf_counter()
                model(images)
            row["ms"] = (time.perf_counter() - start) * 1e3
            row["peak_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    except torch.cuda.OutOfMemoryError:
        row["result"] = "OOM"
    except Exception as error:  # noqa: BLE001 - recorded; the section reports it could not run
        row["result"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        logger.error("end_to_end %s S=%d:\n%s", name, s, traceback.format_exc())
    return row


def quantizer(ctx: Context) -> SectionResult:
    """`qvggt-export quantize --fast` on random VGGT(-1B) weights, in a subprocess killed at the time box."""
    from qvggt_export.model import VGGT, VGGTConfig, save_vggt

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scale_1b import block_flops

    torch.manual_seed(0)
    with torch.device(ctx.device):  # random init of 1.2 B parameters is seconds on a GPU, a minute on a CPU
        model = VGGT(VGGTConfig(**model_config(ctx))).eval()
    checkpoint = save_vggt(model, ctx.work / "random.safetensors")
    del model
    out = ctx.work / "quantized.safetensors"
    size = ctx.quantizer_image_size
    scenes, frames = (1, 2)
    command = [sys.executable, "-m", "qvggt_export.cli", "quantize", "--checkpoint", str(checkpoint), "--fast",
               "--device", ctx.device.type, "--calib-scenes", str(scenes), "--calib-frames", str(frames),
               "--calib-size", f"{size[0]}x{size[1]}", "--out", str(out)]
    logger.info("quantizer: %s", " ".join(command))
    start = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=max(10, ctx.time_left()), cwd=ROOT)
    except subprocess.TimeoutExpired as expired:
        tail = (expired.stderr or b"")[-2000:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        progress = re.findall(r"quantize \([a-z]+\):\s+\d+%\|[^|]*\|\s*(\d+/\d+)", tail)
        return SectionResult(NOT_RUN, f"timed out after {time.monotonic() - start:.0f} s at block "
                                      f"{progress[-1] if progress else '?'}", data={"stderr_tail": tail})
    wall = time.monotonic() - start
    if result.returncode != 0:
        logger.error("quantizer stderr:\n%s", result.stderr[-4000:])
        return SectionResult(NOT_RUN, f"quantize exited {result.returncode}: {result.stderr.strip().splitlines()[-1:]}")
    run = json.loads(out.with_suffix(".json").read_text())["run"]
    with torch.device("meta"):
        model = VGGT(VGGTConfig(**model_config(ctx)))
    tokens = frames * arch.tokens_per_frame(model, size)
    forwards = sum(run["block_forwards"].values())
    flops = forwards * block_flops(model, tokens)
    ctx.quantized_checkpoint = out
    data = {"wall_s": round(wall, 1), "stage_seconds": run["seconds"], "block_forwards": run["block_forwards"],
            "block_tflop": float(f"{flops / 1e12:.3g}"), "peak_cuda_gb": run["peak_cuda_gb"],
            "peak_rss_gb": round(run["peak_rss_gb"], 2),
            "calibration": f"{scenes} scene x {frames} views at {size[0]}x{size[1]}"}
    return SectionResult(OK, f"--fast in {wall:.0f} s wall, {forwards} block-forwards ({data['block_tflop']} TFLOP of "
                             f"block compute), peak CUDA {run['peak_cuda_gb']} GB, peak RSS {data['peak_rss_gb']} GB",
                         data=data)


def reload(ctx: Context) -> SectionResult:
    """The quantizer's checkpoint through load_model(device=...): kernels swapped in, outputs against the
    dequantize-then-matmul model of the same file."""
    from qvggt_export.kernels.linear import KernelLinear, install_kernel_linears
    from qvggt_export.model import load_model
    from qvggt_export.quant.linear import QuantLinear

    from qvggt_export.model import VGGT, VGGTConfig, save_quantized

    source = "the quantizer's"
    if ctx.quantized_checkpoint is None:  # cut at its box: a round-to-nearest checkpoint of the same model
        torch.manual_seed(0)
        with torch.device(ctx.device):
            model = VGGT(VGGTConfig(**model_config(ctx))).eval()
        ctx.quantized_checkpoint = save_quantized(random_w4a16(model), ctx.work / "rtn.safetensors")
        del model
        source = "an RTN (the quantizer did not finish)"
    model = load_model(ctx.quantized_checkpoint, device=str(ctx.device))
    if ctx.device.type != "cuda":  # the CPU emulation of the swap load_model makes on CUDA
        install_kernel_linears(model, [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bits == 4])
    kernels = sum(isinstance(m, KernelLinear) for m in model.modules())
    emulated = load_model(ctx.quantized_checkpoint).to(ctx.device)
    images = torch.rand(1, 2, 3, *ctx.quantizer_image_size, device=ctx.device)
    with torch.inference_mode():
        got, want = model(images), emulated(images)
    errors = {k: relative_error(got[k], want[k]) for k in ("pose_enc", "depth", "world_points")}
    worst = max(errors.values())
    status = OK if kernels and worst <= MODEL_TOLERANCE else MISMATCH
    return SectionResult(status, f"{source} checkpoint: {kernels} KernelLinear after load_model; vs "
                                 f"dequantize-then-matmul: worst {worst:.1e} (limit {MODEL_TOLERANCE:.0e})",
                         [{"kernel_linears": kernels, "checkpoint": source, **errors}])


SECTIONS = {"environment": environment, "kernel_correctness": kernel_correctness, "kernel_speed": kernel_speed,
            "sanitizer": sanitizer, "plugin_cublas": plugin_cublas, "end_to_end": end_to_end,
            "quantizer": quantizer, "reload": reload}


# ------------------------------------------------------------------------------------------------
# Running


def record(ctx: Context, name: str, result: SectionResult, seconds: float) -> None:
    """Append the section's rows and its summary line now (fsync'd), so a killed run keeps what it measured."""
    line = {"section": name, "status": result.status, "seconds": round(seconds, 1), "summary": result.summary,
            "data": result.data, "rows": result.rows}
    for path, text in ((ctx.out / "results.jsonl", json.dumps(line, default=str)),
                       (ctx.out / "summary.txt", f"{name:18s} {result.status:13s} {seconds:6.1f} s  {result.summary}")):
        with open(path, "a") as handle:
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    logger.info("%-18s %-13s %6.1f s  %s", name, result.status, seconds, result.summary)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Exit code: 0 all correct, 1 a mismatch, 2 a section could not run.")
    parser.add_argument("--out", type=Path, help="folder for results.jsonl, summary.txt, gpu_check.log, sanitizer.log")
    parser.add_argument("--dry-run", action="store_true", help="every section on the CPU with tiny shapes")
    parser.add_argument("--budget", type=float, default=float(sum(BOXES.values())),
                        help="seconds for all sections together, split in the proportions of BOXES (default %(default)s)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset, in order")
    parser.add_argument("--sanitizer-cases", metavar="DEVICE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sanitizer_cases is None and args.out is None:
        parser.error("--out is required")
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.budget <= 0:
        parser.error("--budget must be positive")
    return args


def make_context(args, work: Path) -> Context:
    on_gpu = torch.cuda.is_available() and not args.dry_run
    if on_gpu:
        return Context(out=args.out, dry_run=False, device=torch.device("cuda"), shapes=VGGT_SHAPES + ODD_SHAPES,
                       speed_shapes=VGGT_SHAPES, m_values=M_VALUES, frames=FRAMES, image_size=IMAGE_SIZE,
                       budget_scale=args.budget / sum(BOXES.values()), work=work)
    return Context(out=args.out, dry_run=True, device=torch.device("cpu"), shapes=[(1024, 3072)] + ODD_SHAPES[:2],
                   speed_shapes=[(1024, 1024), (128, 136)], m_values=[1, 16, 17, 65, 1374], frames=[1, 2],
                   image_size=(28, 42), budget_scale=args.budget / sum(BOXES.values()), work=work,
                   quantizer_image_size=(28, 42))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sanitizer_cases:
        return sanitizer_cases(args.sanitizer_cases)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("results.jsonl", "summary.txt", "sanitizer.log"):
        (args.out / name).unlink(missing_ok=True)
    setup_logging()
    handler = logging.FileHandler(args.out / "gpu_check.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    statuses = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = make_context(args, Path(work))
        if ctx.dry_run:
            logger.info("DRY RUN on the CPU (%s): every section with tiny shapes; nothing here is a GPU measurement",
                        "forced" if args.dry_run else "no CUDA GPU")
        for name in args.sections.split(","):
            start = time.monotonic()
            ctx.deadline = start + BOXES[name] * ctx.budget_scale
            try:
                result = SECTIONS[name](ctx)
            except Exception as error:  # noqa: BLE001 - one section's failure must not end the run
                logger.error("%s raised:\n%s", name, traceback.format_exc())
                result = SectionResult(NOT_RUN, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
            record(ctx, name, result, time.monotonic() - start)
            statuses.append(result.status)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
        if ctx.notes:
            record(ctx, "notes", SectionResult(OK, "; ".join(ctx.notes)), 0.0)
    code = 1 if MISMATCH in statuses else 2 if NOT_RUN in statuses else 0
    logger.info("gpu_check: exit %d (%s)", code, {0: "all correct", 1: "a mismatch", 2: "a section could not run"}[code])
    return code


if __name__ == "__main__":
    sys.exit(main())
