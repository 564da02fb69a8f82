#!/usr/bin/env python
"""One script for a lent GPU (issue 7, item 5): the W4A16 kernel's correctness and speed, then
end-to-end VGGT-1B (random weights) latency and peak memory.

  python scripts/gpu_check.py [--json out.json] [--skip-e2e] [--shapes 1024x3072,...] [--m 1,16,...]

With CUDA it
  1. builds the kernel for this GPU (or loads QVGGT_W4A16_LIBRARY),
  2. checks both kernel paths (fused small-M, dequantize + cuBLAS) against the dequantize-then-matmul
     reference on every VGGT shape and M, max error <= 1e-2 of the reference's output range,
  3. times them, cuBLAS FP16 (torch.addmm on the fp16 weight) and tinygemm (torch._weight_int4pack_mm,
     bf16 activations) and reports the speed ratios and the M where the dequant path starts winning
     (the value for kFusedMaxM in plugins/w4a16_gemm.cu),
  4. runs VGGT-1B at S = 1, 2, 8, 32 frames of 518x518 as released (fp32 weights, bf16 autocast, all
     24 block outputs kept), in FP16, and in W4A16 (paper plan, KernelLinear) and reports latency and
     peak memory.
Without CUDA it dry-runs what a CPU can: arguments, the shape tables, the kernel's CPU emulation
against the reference at small M, the kernel build and its dispatch table (where nvcc exists) and
the end-to-end plan, and says plainly that nothing was measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qvggt_export.errors import QVGGTError  # noqa: E402
from qvggt_export.kernels import binding  # noqa: E402
from qvggt_export.kernels.layout import dequantize_kernel_layout, to_kernel_layout  # noqa: E402
from qvggt_export.log import logger, setup_logging  # noqa: E402
from qvggt_export.quant.pack import pack_weight, unpack_weight  # noqa: E402

VGGT_SHAPES = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
               (2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)]
M_VALUES = [1, 16, 256, 1374, 2748, 10992, 43968]
FRAMES = [1, 2, 8, 32]
IMAGE_SIZE = 518
TOLERANCE = 1e-2        # max |error| / output range
TARGET_SMALL_M = (16, 3.0)      # speed >= 3x cuBLAS FP16 at M = 16
TARGET_LARGE_M = (1374, 0.9)    # speed >= 0.9x cuBLAS FP16 at M >= 1374


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in VGGT_SHAPES),
                        help="comma-separated KxN weight shapes")
    parser.add_argument("--m", default=",".join(map(str, M_VALUES)), help="comma-separated row counts M")
    parser.add_argument("--frames", default=",".join(map(str, FRAMES)), help="end-to-end frame counts S")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per kernel measurement")
    parser.add_argument("--skip-e2e", action="store_true", help="kernel checks only")
    parser.add_argument("--arch", default="90", help="dry run only: comma-separated SM architectures to build for")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args(argv)
    try:
        args.shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
        args.m = [int(v) for v in args.m.split(",")]
        args.frames = [int(v) for v in args.frames.split(",")]
        args.arch = [int(v) for v in args.arch.split(",")]
    except ValueError as error:
        parser.error(f"bad list: {error}")
    if any(len(s) != 2 for s in args.shapes):
        parser.error("shapes are KxN")
    return args


# ------------------------------------------------------------------------------------------------
# Kernel checks


def make_layer(k: int, n: int, device: torch.device, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) * 0.02
    packed, scales = pack_weight(weight)
    kernel_weight, kernel_scales = to_kernel_layout(packed, scales)
    bias = (torch.randn(n, generator=generator) * 0.1).to(torch.float16)
    return {"packed": packed.to(device), "scales": scales.to(device), "bias": bias.to(device),
            "kernel_weight": kernel_weight.to(device), "kernel_scales": kernel_scales.to(device),
            "weight_fp16": unpack_weight(packed, scales, dtype=torch.float16).to(device)}


def reference(x: torch.Tensor, layer: dict) -> torch.Tensor:
    """Dequantize-then-matmul in fp32 from the canonical format."""
    weight = unpack_weight(layer["packed"], layer["scales"], dtype=torch.float32)
    return x.float() @ weight.t() + layer["bias"].float()


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    span = float(ref.max() - ref.min()) or 1.0
    return float((y.float() - ref).abs().max()) / span


def time_ms(fn, iters: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def tinygemm(layer: dict, k: int, n: int):
    """torch's int4 weight-only GEMM (group 128, bf16 activations) on the same codes, or None."""
    try:
        packed = layer["packed"]
        even_high = (packed >> 4) | (packed << 4)  # tinygemm packs even k in the high nibble
        weight = torch._convert_weight_to_int4pack(even_high.contiguous(), 8)
        # w = (code - 8) * scale + zero, zero = 0
        scales_and_zeros = torch.stack([layer["scales"].t(), torch.zeros_like(layer["scales"].t())], dim=-1)
        scales_and_zeros = scales_and_zeros.to(torch.bfloat16).contiguous()
        return lambda x: torch._weight_int4pack_mm(x, weight, 128, scales_and_zeros)
    except (RuntimeError, AttributeError) as error:
        logger.info("tinygemm unavailable for %dx%d: %s", k, n, error)
        return None


def kernel_checks(args) -> list[dict]:
    device = torch.device("cuda")
    rows = []
    for index, (k, n) in enumerate(args.shapes):
        layer = make_layer(k, n, device, seed=index)
        tiny = tinygemm(layer, k, n)
        for m in args.m:
            x = torch.randn(m, k, device=device).to(torch.float16)
            ref = reference(x, layer)
            row = {"K": k, "N": n, "M": m}
            for path in ("fused", "dequant"):
                call = lambda p=path: binding.w4a16_matmul(x, layer["kernel_weight"], layer["kernel_scales"],
                                                           layer["bias"], path=p)
                row[f"error_{path}"] = relative_error(call(), ref)
                row[f"ms_{path}"] = time_ms(call, args.iters)
            row["auto_path"] = "fused" if binding.load_library().qvggt_w4a16_use_fused(m, n, k) else "dequant"
            row["ms_cublas_fp16"] = time_ms(lambda: torch.addmm(layer["bias"], x, layer["weight_fp16"].t()), args.iters)
            if tiny is not None:
                x_bf16 = x.to(torch.bfloat16)
                row["ms_tinygemm"] = time_ms(lambda: tiny(x_bf16), args.iters)
            best = min(row["ms_fused"], row["ms_dequant"])
            row["speedup_vs_cublas"] = row["ms_cublas_fp16"] / row[f"ms_{row['auto_path']}"]
            row["best_speedup_vs_cublas"] = row["ms_cublas_fp16"] / best
            if "ms_tinygemm" in row:
                row["speedup_vs_tinygemm"] = row["ms_tinygemm"] / row[f"ms_{row['auto_path']}"]
            row["correct"] = max(row["error_fused"], row["error_dequant"]) <= TOLERANCE
            rows.append(row)
            logger.info("K=%5d N=%5d M=%6d  err fused %.1e dequant %.1e  ms fused %.4f dequant %.4f cublas %.4f "
                        "tinygemm %s  auto=%s x%.2f vs cuBLAS%s", k, n, m, row["error_fused"], row["error_dequant"],
                        row["ms_fused"], row["ms_dequant"], row["ms_cublas_fp16"],
                        f"{row['ms_tinygemm']:.4f}" if "ms_tinygemm" in row else "n/a", row["auto_path"],
                        row["speedup_vs_cublas"],
                        f", x{row['speedup_vs_tinygemm']:.2f} vs tinygemm" if "speedup_vs_tinygemm" in row else "")
            del x, ref
        del layer
        torch.cuda.empty_cache()
    return rows


def summarize_kernel(rows: list[dict]) -> dict:
    crossover = {}
    for k, n in sorted({(r["K"], r["N"]) for r in rows}):
        shape_rows = sorted((r for r in rows if (r["K"], r["N"]) == (k, n)), key=lambda r: r["M"])
        dequant_wins = [r["M"] for r in shape_rows if r["ms_dequant"] < r["ms_fused"]]
        crossover[f"{k}x{n}"] = dequant_wins[0] if dequant_wins else None
        for r in shape_rows:  # judged on the faster path, i.e. with a measured threshold
            if r["M"] == TARGET_SMALL_M[0]:
                r["meets_speed_target"] = r["best_speedup_vs_cublas"] >= TARGET_SMALL_M[1]
            elif r["M"] >= TARGET_LARGE_M[0]:
                r["meets_speed_target"] = r["best_speedup_vs_cublas"] >= TARGET_LARGE_M[1]
    measured = [m for m in crossover.values() if m is not None]
    summary = {"all_correct": all(r["correct"] for r in rows), "dequant_path_wins_from_m": crossover,
               "suggested_fused_max_m": (min(measured) - 1) if measured else None,
               "speed_targets_met": all(r.get("meets_speed_target", True) for r in rows)}
    logger.info("correct on every shape and M: %s; speed targets met: %s", summary["all_correct"],
                summary["speed_targets_met"])
    logger.info("dequant path wins from M = %s; suggested kFusedMaxM = %s", crossover, summary["suggested_fused_max_m"])
    return summary


# ------------------------------------------------------------------------------------------------
# End to end


def vggt_variants():
    """name -> builder of a VGGT-1B (random weights) on the GPU, and the dtype its input takes."""
    from qvggt_export.kernels.linear import install_kernel_linears
    from qvggt_export.model.config import VGGTConfig
    from qvggt_export.model.vggt import VGGT
    from qvggt_export.quant.plan import paper_plan, quantized_layers

    def released():
        with torch.device("cuda"):
            model = VGGT(VGGTConfig(carry_track_head=False))
        model.aggregator.kept_layers = tuple(range(model.config.depth))  # the released code keeps all 24
        return model.eval()

    def fp16():
        with torch.device("cuda"):
            return VGGT(VGGTConfig(carry_track_head=False)).half().eval()

    def w4a16():
        model = fp16()
        names = [name for name, bits in quantized_layers(paper_plan(model)).items() if bits == 4]
        return install_kernel_linears(model, names)

    return {"released_fp32_bf16_autocast_all_outputs": (released, torch.float32, True),
            "fp16": (fp16, torch.float16, False), "w4a16": (w4a16, torch.float16, False)}


def end_to_end(frames: list[int]) -> list[dict]:
    rows = []
    for name, (build, dtype, autocast) in vggt_variants().items():
        model = build()
        weights_mb = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers())) / 2**20
        for s in frames:
            images = torch.rand(1, s, 3, IMAGE_SIZE, IMAGE_SIZE, device="cuda", dtype=dtype)

            def run():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    model(images)

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                latency = time_ms(run, iters=3)
                peak_mb = torch.cuda.max_memory_allocated() / 2**20
            except torch.cuda.OutOfMemoryError:
                latency, peak_mb = None, None
            rows.append({"model": name, "S": s, "latency_ms": latency, "peak_memory_mb": peak_mb,
                         "weights_mb": weights_mb})
            logger.info("%-42s S=%2d  latency %s ms  peak %s MiB  (weights %.0f MiB)", name, s,
                        "OOM" if latency is None else f"{latency:.1f}", "OOM" if peak_mb is None else f"{peak_mb:.0f}",
                        weights_mb)
        del model
        torch.cuda.empty_cache()
    by = {(r["model"], r["S"]): r for r in rows}
    for s in frames:
        released, w4 = by.get(("released_fp32_bf16_autocast_all_outputs", s)), by.get(("w4a16", s))
        if released and w4 and released["latency_ms"] and w4["latency_ms"]:
            logger.info("S=%d: W4A16 latency %.2fx and peak memory %.2fx of the released recipe", s,
                        w4["latency_ms"] / released["latency_ms"], w4["peak_memory_mb"] / released["peak_memory_mb"])
    return rows


# ------------------------------------------------------------------------------------------------
# Dry run (no CUDA)


def dry_run(args) -> int:
    logger.info("CUDA is not available (torch %s, cuda build: %s): DRY RUN, nothing below is a GPU measurement.",
                torch.__version__, torch.version.cuda)
    for k, n in args.shapes:
        logger.info("shape K=%5d N=%5d  fp16 weight %6.2f MiB  w4a16 %5.2f MiB (+ scales)  workspace %6.2f MiB",
                    k, n, k * n * 2 / 2**20, k * n / 2 / 2**20, binding.workspace_bytes(n, k) / 2**20)
    # the kernel's arithmetic, emulated on the CPU, against the canonical reference
    small_m = [m for m in args.m if m <= 16] or [1]
    worst = 0.0
    for index, (k, n) in enumerate(args.shapes):
        layer = make_layer(k, n, torch.device("cpu"), seed=index)
        emulated = dequantize_kernel_layout(layer["kernel_weight"], layer["kernel_scales"]).float()
        for m in small_m:
            x = torch.randn(m, k).to(torch.float16)
            worst = max(worst, relative_error(x.float() @ emulated.t() + layer["bias"].float(), reference(x, layer)))
    logger.info("CPU emulation of the kernel's dequantization vs reference at M=%s: max error %.1e of the output "
                "range (limit %.0e)", small_m, worst, TOLERANCE)
    try:
        library = binding.open_library(binding.build_library(args.arch))
        table = {m: "fused" if library.qvggt_w4a16_use_fused(m, 1024, 1024) else "dequant+cuBLAS" for m in args.m}
        logger.info("kernel library builds for sm_%s; dispatch by M (default threshold, unmeasured): %s",
                    ",".join(map(str, args.arch)), table)
    except QVGGTError as error:
        logger.info("kernel build skipped: %s", error)
    if not args.skip_e2e:
        from qvggt_export.model.config import VGGTConfig
        from qvggt_export.model.vggt import VGGT
        from qvggt_export.quant.plan import paper_plan, quantized_layers

        with torch.device("meta"):
            model = VGGT(VGGTConfig(carry_track_head=False))
        layers = quantized_layers(paper_plan(model))
        logger.info("end to end would run %s at S=%s, %dx%d; W4A16 replaces %d linears by KernelLinear",
                    list(vggt_variants()), args.frames, IMAGE_SIZE, IMAGE_SIZE, sum(b == 4 for b in layers.values()))
    ok = worst <= TOLERANCE
    logger.info("dry run %s; run this script on a CUDA GPU for the measurements.", "passed" if ok else "FAILED")
    return 0 if ok else 1


def main(argv=None) -> int:
    setup_logging()
    args = parse_args(argv)
    if not torch.cuda.is_available():
        return dry_run(args)
    properties = torch.cuda.get_device_properties(0)
    results = {"gpu": properties.name, "capability": f"{properties.major}.{properties.minor}",
               "date": datetime.date.today().isoformat(), "torch": torch.__version__}
    logger.info("%s (sm_%d%d), %s, torch %s", properties.name, properties.major, properties.minor, results["date"],
                torch.__version__)
    binding.load_library()
    results["kernel"] = kernel_checks(args)
    results["kernel_summary"] = summarize_kernel(results["kernel"])
    if not args.skip_e2e:
        results["end_to_end"] = end_to_end(args.frames)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0 if results["kernel_summary"]["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
