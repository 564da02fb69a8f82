"""Scale check: calibrate + quantize VGGT-1B (random weights) on the CPU; prints stage timings.

Run under `/usr/bin/time -v` for peak memory. The full task-aware search and the sensitivity analysis
cost one forward pass of the calibration set per trial; their time is reported as an estimate from the
measured forward time unless --full is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from qvggt_export import arch
from qvggt_export.model import VGGT, VGGTConfig
from qvggt_export.model import load_model, save_quantized
from qvggt_export.quant.calibration_set import load_calibration
from qvggt_export.quant.calibration_run import calibrate
from qvggt_export.quant.objective import predict
from qvggt_export.quant.quantizer import QuantConfig, quantize_model, weight_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenes", type=int, default=2)
    parser.add_argument("--frames", type=int, default=2)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--full", action="store_true", help="also run sensitivity and the task-aware search")
    parser.add_argument("--out", default=None, help="where to write the quantized checkpoint (default: temp dir)")
    args = parser.parse_args()
    times = {}
    t = time.perf_counter()
    torch.manual_seed(0)
    model = VGGT(VGGTConfig(carry_track_head=False)).eval()
    torch.set_grad_enabled(False)
    times["build model"] = time.perf_counter() - t
    calib = load_calibration("synthetic", model, args.scenes, args.frames, (args.size, args.size))
    t = time.perf_counter()
    predict(model, calib)
    forward = times["one forward of the calibration set"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "vggt1b_w4.safetensors")
        t = time.perf_counter()
        calibration = calibrate(model, calib, Path(tmp) / "calib", sensitivity=args.full)
        times["calibrate"] = time.perf_counter() - t
        config = QuantConfig(method="qvggt", plan="auto" if args.full else "paper", task_aware=args.full)
        t = time.perf_counter()
        qmodel = quantize_model(model, calib, config, calibration=calibration)
        times["quantize"] = time.perf_counter() - t
        t = time.perf_counter()
        save_quantized(qmodel, out)
        reloaded = load_model(out)
        times["save + reload"] = time.perf_counter() - t
        images = calib.scenes[0].images[None]
        same = torch.equal(qmodel(images)["pose_enc"], reloaded(images)["pose_enc"])
        size_mb = out.stat().st_size / 1e6
    trials = len(arch.quant_blocks(model)) + len(arch.LINEAR_TYPES)
    groups = len(arch.quant_blocks(model)) * len(arch.SCALE_GROUPS)
    for k, v in times.items():
        print(f"{k:40s} {v:8.1f} s")
    print(f"{'quantized checkpoint':40s} {size_mb:8.1f} MB (reload identical: {same})")
    print(f"{'quantizable linear weights':40s} {weight_bytes(qmodel) / 1e6:8.1f} MB (fp16: {weight_bytes(model) / 1e6:.1f} MB)")
    if not args.full:
        print(f"estimate: sensitivity = {trials} forwards = {trials * forward / 60:.0f} min; "
              f"task-aware search (top-3) = {3 * groups} forwards = {3 * groups * forward / 60:.0f} min here")


if __name__ == "__main__":
    main()
