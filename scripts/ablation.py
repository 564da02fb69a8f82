"""Tables 1 and 3 of the QVGGT paper on our model: FP, RTN, AWQ, GPTQ and QVGGT with its parts
switched on one by one, plus the baselines run with QVGGT's own mixed-precision plan (equal bytes, so
the plan is not counted as a method's win) and QVGGT with GPTQ rounding, on a synthetic split
(synthetic-val: wide arcs; synthetic-video: video-like trajectories).

Columns: against ground truth (AUC@30, depth AbsRel, point Acc) and fidelity against the FP model's
own predictions (AUC@30 and mean rotation error with FP poses as reference, depth AbsRel and relative
point error vs FP outputs), plus the bytes of the quantizable linear weights.

    python scripts/ablation.py [--checkpoint vggt-tiny] [--split synthetic-val,synthetic-video] [--scenes 5]
    python scripts/ablation.py --random   # a random model of the vggt-tiny shape (fidelity only)
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qvggt_export.data.synthetic import SYNTHETIC_SETS, render_scene
from qvggt_export.geometry import pose_encoding_to_extri_intri
from qvggt_export.log import setup_logging
from qvggt_export.metrics import camera_pose_metrics, depth_metrics, pointmap_metrics
from qvggt_export.model import load_model
from qvggt_export.quant.calibration_set import load_calibration
from qvggt_export.quant.calibration_run import calibrate
from qvggt_export.quant.quantizer import QuantConfig, quantize_model, weight_bytes

VARIANTS = [
    ("RTN", QuantConfig(method="rtn")),
    ("AWQ", QuantConfig(method="awq")),
    ("GPTQ", QuantConfig(method="gptq")),
    ("AWQ, QVGGT plan", QuantConfig(method="awq", plan="auto")),
    ("GPTQ, QVGGT plan", QuantConfig(method="gptq", plan="auto")),
    ("QVGGT: + mixed precision", QuantConfig(token_filter=False, cic=False, task_aware=False)),
    ("QVGGT: + token filtering", QuantConfig(cic=False, task_aware=False)),
    ("QVGGT: + CIC", QuantConfig(task_aware=False)),
    ("QVGGT: + task-aware (full)", QuantConfig()),
    # Task loss against the FP model's own outputs instead of ground truth: what fidelity asks for.
    ("QVGGT: full, FP targets", QuantConfig(targets="fp")),
    ("QVGGT + GPTQ rounding", QuantConfig(rounding="gptq")),
    ("QVGGT + GPTQ rounding, FP targets", QuantConfig(rounding="gptq", targets="fp")),
    ("QVGGT + GPTQ rounding, no token filtering", QuantConfig(rounding="gptq", token_filter=False)),
    ("QVGGT + GPTQ rounding, no CIC", QuantConfig(rounding="gptq", cic=False)),
]


@torch.no_grad()
def predictions(model, scenes) -> list[dict[str, np.ndarray]]:
    out = []
    for scene in scenes:
        preds = model(torch.from_numpy(scene.images)[None])
        hw = scene.images.shape[-2:]
        extrinsics, _ = pose_encoding_to_extri_intri(preds["pose_enc"][0].double(), hw)
        out.append({"extrinsics": extrinsics.numpy(), "depth": preds["depth"][0, ..., 0].numpy(),
                    "points": preds["world_points"][0].numpy()})
    return out


def table_row(preds, fp, scenes) -> dict[str, float]:
    gt_pose = camera_pose_metrics([p["extrinsics"] for p in preds], [s.extrinsics for s in scenes])
    fp_pose = camera_pose_metrics([p["extrinsics"] for p in preds], [f["extrinsics"] for f in fp])
    depth_gt = np.mean([depth_metrics(p["depth"], s.depth, s.valid)["abs_rel"] for p, s in zip(preds, scenes)])
    depth_fp = np.mean([float(np.mean(np.abs(p["depth"] - f["depth"]) / np.abs(f["depth"]).clip(1e-8)))
                        for p, f in zip(preds, fp)])
    acc = np.mean([pointmap_metrics(p["points"], s.world_points, s.valid)["acc_mean"] for p, s in zip(preds, scenes)])
    point_fp = np.mean([float(np.linalg.norm(p["points"] - f["points"], axis=-1).mean()
                              / np.linalg.norm(f["points"], axis=-1).mean()) for p, f in zip(preds, fp)])
    return {"AUC@30": gt_pose["auc@30"], "AbsRel": depth_gt, "Acc": acc, "fid AUC@30": fp_pose["auc@30"],
            "fid rot°": fp_pose["rotation_error_deg"], "fid AbsRel": depth_fp, "fid pt": point_fp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="default: the embedded vggt-tiny")
    parser.add_argument("--random", action="store_true", help="random weights of the vggt-tiny shape")
    parser.add_argument("--split", default="synthetic-val,synthetic-video", help="comma-separated synthetic splits")
    parser.add_argument("--scenes", type=int, default=None, help="default: the whole split")
    parser.add_argument("--views", type=int, default=None, help="default: the split's")
    parser.add_argument("--only", default=None, help="semicolon-separated variant names to run (default: all)")
    parser.add_argument("--size", default=None, help="HxW of the val views (default: the model's training width, 4:3)")
    parser.add_argument("--calib-scenes", type=int, default=8)
    parser.add_argument("--calib-frames", type=int, default=4)
    parser.add_argument("--json", default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    wanted = {v.strip() for v in args.only.split(";")} if args.only else None
    unknown = (wanted or set()) - {name for name, _ in VARIANTS}
    if unknown:
        parser.error(f"--only: unknown variants {sorted(unknown)}")
    setup_logging()
    torch.set_grad_enabled(False)
    if args.random:
        from qvggt_export.model import VGGT
        from qvggt_export.model.presets import tiny_config

        torch.manual_seed(0)
        model = VGGT(tiny_config()).eval()
    else:
        model = load_model(args.checkpoint)
    size = tuple(int(v) for v in args.size.split("x")) if args.size else model.config.default_image_size
    splits = {}
    for name in args.split.split(","):
        if name not in SYNTHETIC_SETS:
            parser.error(f"--split: unknown split {name!r} (known: {', '.join(sorted(SYNTHETIC_SETS))})")
        spec = SYNTHETIC_SETS[name]
        views = args.views or spec.num_views
        splits[name] = [render_scene(seed, views, size, spec.trajectory).in_first_camera_frame()
                        for seed in spec.seeds[: args.scenes or len(spec.seeds)]]
    calib = load_calibration("synthetic", model, args.calib_scenes, args.calib_frames, size)
    calibration = calibrate(model, calib)
    fp = {name: predictions(model, scenes) for name, scenes in splits.items()}
    rows = {name: {"FP": {**table_row(fp[name], fp[name], scenes), "weight MB": weight_bytes(model) / 1e6, "s": 0.0}}
            for name, scenes in splits.items()}
    for variant, config in VARIANTS:
        if wanted is not None and variant not in wanted:
            continue
        start = time.perf_counter()
        qmodel = quantize_model(model, calib, config, calibration=calibration)
        seconds = time.perf_counter() - start
        for name, scenes in splits.items():
            rows[name][variant] = {**table_row(predictions(qmodel, scenes), fp[name], scenes),
                                   "weight MB": weight_bytes(qmodel) / 1e6, "s": seconds}
    label = "random vggt-tiny shape" if args.random else args.checkpoint or "vggt-tiny"
    for name, table in rows.items():
        columns = list(table["FP"])
        first = splits[name][0]
        print(f"\n{name}: {len(splits[name])} scenes x {first.images.shape[0]} views at {size[0]}x{size[1]}; "
              f"calibration {args.calib_scenes}x{args.calib_frames} synthetic; model {label}")
        print(f"| {'method':34s} | " + " | ".join(f"{c:>10s}" for c in columns) + " |")
        print("|" + "-" * 36 + "|" + "|".join("-" * 12 for _ in columns) + "|")
        for variant, row in table.items():
            print(f"| {variant:34s} | " + " | ".join(f"{row[c]:10.4g}" for c in columns) + " |")
    if args.json:
        from qvggt_export.io import write_json

        write_json(args.json, rows)

if __name__ == "__main__":
    main()
