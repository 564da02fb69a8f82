"""Scale check: full QVGGT on VGGT-1B (random weights), block-cached vs the whole model per trial, in one run.

Prints, for each path: wall time, block-forwards (calibration incl. sensitivity, quantization) and peak
memory, then the ratios, and a projection of the cached run at 16 scenes x 8 views at 518 on one GPU.
The projection multiplies the block-forwards the run counts (they scale with the number of scenes, not
the image size) by each block-forward's FLOPs at 518 and divides by an assumed sustained bf16 throughput
(--gpu-tflops, default 250 for an H100-class GPU): an estimate, not a measurement.

    python scripts/scale_1b.py                       # VGGT-1B, 1 scene x 2 views at 28x42, both paths
    python scripts/scale_1b.py --depth 6 --paths cached   # quicker look at a shallower model
    python scripts/scale_1b.py --checkpoint vggt-tiny      # the default model at its default calibration
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from qvggt_export import arch
from qvggt_export.model import VGGT, VGGTConfig, load_model
from qvggt_export.model.presets import vggt1b_shallow_config
from qvggt_export.quant.calibration_set import load_calibration
from qvggt_export.quant.quantizer import QuantConfig, quantize_model
from qvggt_export.vocabulary import FAST_PRESET


def block_flops(model: VGGT, tokens: int) -> float:
    """Multiply-adds x 2 of one aggregator block on `tokens` tokens (linears + attention scores/values)."""
    block = model.aggregator.frame_blocks[0]
    linear = sum(m.in_features * m.out_features for m in block.modules() if isinstance(m, torch.nn.Linear))
    dim = block.attn.qkv.in_features
    return 2.0 * tokens * linear + 4.0 * tokens * tokens * dim


def run(make_model, config: QuantConfig, calib) -> dict:
    model = make_model()
    start = time.perf_counter()
    reports = []
    quantize_model(model, calib, config, inplace=True, report_out=reports)
    report = reports[0]
    return {"seconds": time.perf_counter() - start, "block_forwards": report.block_forwards,
            "stage_seconds": report.seconds, "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=None, help="default 1 (VGGT-1B) / 8 (checkpoint)")
    parser.add_argument("--frames", type=int, default=None, help="default 2 (VGGT-1B) / 4 (checkpoint)")
    parser.add_argument("--size", default=None, help="HxW of the calibration views (default: 28x42 for VGGT-1B, "
                                                     "the model's native size for a checkpoint)")
    parser.add_argument("--depth", type=int, default=None, help="aggregator depth (default: VGGT-1B's 24)")
    parser.add_argument("--paths", default="cached,full", help="cached, full, or both")
    parser.add_argument("--fast", action="store_true", help="the --fast preset")
    parser.add_argument("--gpu-tflops", type=float, default=250.0)
    parser.add_argument("--checkpoint", default=None,
                        help="a real checkpoint instead of random VGGT-1B weights ('vggt-tiny': the default model, "
                             "at its default calibration of 8 scenes x 4 views unless --scenes/--frames say otherwise)")
    args = parser.parse_args()
    model_config = vggt1b_shallow_config(args.depth) if args.depth else VGGTConfig(carry_track_head=False)
    torch.set_grad_enabled(False)
    args.scenes = args.scenes or (8 if args.checkpoint else 1)
    args.frames = args.frames or (4 if args.checkpoint else 2)
    if not args.checkpoint and not args.size:
        args.size = "28x42"
    def make_model():
        if args.checkpoint:
            return load_model(args.checkpoint)
        torch.manual_seed(0)
        return VGGT(model_config).eval()

    model = make_model()
    size = tuple(int(v) for v in args.size.split("x")) if args.size else model.config.default_image_size
    calib = load_calibration("synthetic", model, args.scenes, args.frames, size)
    results = {}
    for path in args.paths.split(","):
        config = QuantConfig(method="qvggt", plan="auto", block_cache=path == "cached", device="cpu", dtype="fp32",
                             **(FAST_PRESET if args.fast else {}))
        results[path] = run(make_model, config, calib)
        print(path, json.dumps(results[path]))
    for path, r in results.items():
        total = sum(r["block_forwards"].values())
        print(f"{path:7s} wall {r['seconds']:8.1f} s   block-forwards {total:7d} "
              f"({', '.join(f'{k} {v}' for k, v in r['block_forwards'].items())})   peak RSS {r['peak_rss_gb']:.1f} GB")
    if {"cached", "full"} <= results.keys():
        c, f = results["cached"], results["full"]
        print(f"cached / full: wall {c['seconds'] / f['seconds']:.2f}x, block-forwards "
              f"{sum(c['block_forwards'].values()) / sum(f['block_forwards'].values()):.2f}x")
    if "cached" in results:
        per_scene = sum(results["cached"]["block_forwards"].values()) / args.scenes
        tokens = 8 * (arch.tokens_per_frame(model, (518, 518)))
        seconds = per_scene * 16 * block_flops(model, tokens) / (args.gpu_tflops * 1e12)
        print(f"projection, 16 scenes x 8 views at 518, one GPU at {args.gpu_tflops:.0f} TFLOP/s sustained: "
              f"{per_scene * 16:.0f} block-forwards, {seconds / 60:.1f} min of block compute "
              "(heads, scale search and GPTQ/packing not included)")


if __name__ == "__main__":
    main()
