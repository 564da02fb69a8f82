"""Sensitivity analysis: RTN-quantize one linear type across all blocks, then one block, at a time, and
measure each head's error against the full-precision model.

The score of an entry is the increase of the task loss L (objective.py) with the FP model's own
outputs as targets: a fidelity measure that does not depend on how good the model is. Trials run on the
block cache (quant/forward.py): a block's trial re-runs only the blocks from it on. Results are written
after every entry, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .. import arch
from ..io import read_cache_json, write_cache_json
from ..log import logger
from .distributed import Shard, gather_in_order
from .forward import FullModelForward
from .modules import restore, snapshot
from .objective import Targets, gathered_task_loss, mean_fidelity, scene_fidelity
from .scale import fake_quantize_with_scales

SCORE = "task loss increase vs FP outputs (RTN W4 g128)"


@torch.no_grad()
def _rtn_trial(model: nn.Module, linears: list[str], bits: int, forward: FullModelForward):
    saved = snapshot(model, linears)
    try:
        for name in linears:
            weight = model.get_submodule(name).weight
            weight.copy_(fake_quantize_with_scales(weight, bits)[0])
        return forward.predict()
    finally:
        restore(model, saved)


def sensitivity_analysis(model: nn.Module, forward: FullModelForward, fp_preds: list, fp_targets: list[Targets],
                         shard: Shard, total_scenes: int, path: Path | None, identity: dict, bits: int = 4) -> dict:
    """Fills (or resumes) the report at `path` (rank 0 writes it); `identity` (model and calibration hashes)
    decides whether a cached partial report belongs to this run. `forward` must be at the first block."""
    report = None
    # A damaged report is discarded (one warning) and the analysis starts afresh (io.read_cache_json).
    cached = read_cache_json(path) if path is not None else None
    if cached is not None:
        if cached.get("identity") == identity:
            report = cached
            logger.info("sensitivity: resuming %s (%d blocks, %d types done)", path, len(cached["blocks"]),
                        len(cached["linear_types"]))
    if report is None:
        base, parts = gathered_task_loss(fp_preds, fp_targets, shard, total_scenes)
        report = {"identity": identity, "score": SCORE, "scope": forward.scope, "complete": False,
                  "fp": {"task_loss": base, "parts": parts},
                  "heads": {h: list(v) for h, v in arch.heads_reading(model).items()},
                  "blocks": {}, "linear_types": {}}
    base = report["fp"]["task_loss"]
    all_linears = arch.quantizable_linears(model, forward.scope)
    # Linear types first: their trials touch every block, so they run while the cache is at the start.
    jobs = [("linear_types", t, [n for n in all_linears if arch.linear_type(n) == t], None) for t in arch.LINEAR_TYPES]
    jobs += [("blocks", b.name, [f"{b.name}.{t}" for t in arch.LINEAR_TYPES], b) for b in arch.quant_blocks(model, forward.scope)]
    todo = sum(job[1] not in report[job[0]] for job in jobs)
    with tqdm(total=todo, desc="sensitivity", unit="trial", disable=not shard.is_main) as bar:
        for section, key, linears, block in jobs:
            if key not in report[section]:
                start = time.perf_counter()
                preds = _rtn_trial(model, linears, bits, forward)
                loss, parts = gathered_task_loss(preds, fp_targets, shard, total_scenes)
                per_scene = gather_in_order([scene_fidelity(p, r) for p, r in zip(preds, fp_preds)], shard, total_scenes)
                report[section][key] = {"score": loss - base, "task_loss": loss, "parts": parts,
                                        "fidelity": mean_fidelity(per_scene), "seconds": time.perf_counter() - start}
                if path is not None and shard.is_main:
                    write_cache_json(path, report)
                bar.update()
            if block is not None:
                forward.advance(block)  # the block stays full precision: later trials see it as FP
    report["complete"] = True
    # Entries in trial order (a report read back from disk has its keys sorted): the figure's axis order.
    for section in ("linear_types", "blocks"):
        report[section] = {key: report[section][key] for sec, key, _, _ in jobs if sec == section}
    if path is not None and shard.is_main:
        write_cache_json(path, report)
    return report
def save_figure(report: dict, path: Path) -> Path:
    """PNG: per-block heat map of each head's error and the score, and bars per linear type."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..io import atomic_output

    blocks = list(report["blocks"])
    metrics = ["score", "camera_rot_deg", "camera_trans", "depth_absrel", "point_rel"]
    values = np.array([[report["blocks"][b]["score"] if m == "score" else report["blocks"][b]["fidelity"][m]
                        for b in blocks] for m in metrics])
    # Each row scaled to its own maximum: the metrics have different units.
    shown = values / np.maximum(np.abs(values).max(axis=1, keepdims=True), 1e-12)
    short = [arch.block_label(b) for b in blocks]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.32 * len(blocks)), 6.5),
                             gridspec_kw={"height_ratios": [1.3, 1]})
    im = axes[0].imshow(shown, aspect="auto", cmap="magma")
    axes[0].set_yticks(range(len(metrics)), metrics)
    axes[0].set_xticks(range(len(blocks)), short, rotation=90, fontsize=7)
    axes[0].set_title(f"RTN one block at a time: error vs FP (each row / its max); scope "
                      f"{report.get('scope', arch.DEFAULT_SCOPE)}")
    fig.colorbar(im, ax=axes[0], fraction=0.02)
    types = list(report["linear_types"])
    axes[1].bar(types, [report["linear_types"][t]["score"] for t in types], color="tab:blue")
    axes[1].set_ylabel("task loss increase")
    axes[1].set_title("RTN one linear type at a time (all blocks)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
