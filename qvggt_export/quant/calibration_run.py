"""The `calibrate` stage: activation statistics, camera tokens and the sensitivity report, cached in a
run directory and reused (or resumed) when the model, the calibration data and the settings are unchanged.

Directory layout:
  manifest.json        identity (content hashes of model and calibration, settings) and versions
  stats.safetensors    per-linear activation statistics, camera tokens, patch-token norm
  sensitivity.json     per-linear-type and per-block errors against the FP model
  sensitivity.png      the same as a figure
Rank 0 alone writes; every rank computes its shard of the scenes (quant/distributed.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__, arch
from ..io import load_cache_tensors, save_cache_tensors, sha256_json, sha256_tensors, write_json
from ..log import logger
from .calibration_set import CalibrationSet
from .distributed import Shard, barrier, current_shard
from .forward import LocalScene, make_forward
from .objective import check_finite, make_targets
from .sensitivity import save_figure, sensitivity_analysis
from .stats import ActivationStats, collect_stats

STATS_FILE = "stats.safetensors"
SENSITIVITY_FILE = "sensitivity.json"
FIGURE_FILE = "sensitivity.png"
MANIFEST_FILE = "manifest.json"


@dataclass
class Calibration:
    stats: ActivationStats
    sensitivity: dict | None
    identity: dict
    directory: Path | None
    block_forwards: int = 0  # spent by this run (0 when everything came from the cache)


def model_fingerprint(model: nn.Module) -> str:
    """Content hash of a model: its config and every byte of every tensor."""
    return sha256_json({"config": getattr(model, "config", None).to_dict(),
                        "tensors": sha256_tensors((k, v) for k, v in model.state_dict().items() if v is not None)})


def local_scenes(calib: CalibrationSet, shard: Shard) -> list[LocalScene]:
    return [LocalScene(i, calib.scenes[i]) for i in shard.indices(len(calib.scenes))]


@torch.no_grad()  # PTQ never needs gradients; keeps callers' grad mode untouched
def calibrate(model: nn.Module, calib: CalibrationSet, out_dir: str | Path | None = None,
              sensitivity: bool = True, bits: int = 4,
              dtype: torch.dtype = torch.float32, cached: bool = True, shard: Shard | None = None,
              scope: str = arch.DEFAULT_SCOPE) -> Calibration:
    """Runs (or reuses from `out_dir`) the statistics and sensitivity analysis of `model` (on its device,
    forward in `dtype`) on `calib` for the blocks of `scope` (arch.SCOPES); `cached` selects the block
    cache for the sensitivity trials."""
    model = model.eval()
    shard = shard or current_shard()
    identity = {"model": model_fingerprint(model), "calibration": calib.fingerprint(),
                "bits": bits, "dtype": str(dtype), "scope": scope,
                "qvggt_export": __version__}
    directory = Path(out_dir) if out_dir is not None else None
    scenes = local_scenes(calib, shard)
    total = len(calib.scenes)
    stats = _cached_stats(directory, identity)
    spent = 0
    if stats is None:
        forward = make_forward(model, scenes, dtype, cached=False, scope=scope)
        try:
            stats = collect_stats(model, forward, total, shard)
            spent += forward.block_forwards
        finally:
            forward.close()
        if directory is not None and shard.is_main:
            save_cache_tensors(stats.to_tensors(), directory / STATS_FILE,
                               {"identity": json.dumps(identity, sort_keys=True)})
    report = None
    if sensitivity:
        forward = make_forward(model, scenes, dtype, cached, scope)
        try:
            fp_preds = forward.predict()
            check_finite(fp_preds, "the full-precision model")
            fp_targets = make_targets([s.scene for s in scenes], fp_preds, use_gt=False)
            report_path = (directory / SENSITIVITY_FILE) if directory is not None else None
            report = sensitivity_analysis(model, forward, fp_preds, fp_targets, shard, total, report_path, identity,
                                          bits)
            spent += forward.block_forwards
            logger.info("sensitivity: %d block-forwards (%s)", forward.block_forwards,
                        "block cache" if cached else "full model per trial")
        finally:
            forward.close()
        if directory is not None and shard.is_main:
            save_figure(report, directory / FIGURE_FILE)
    if directory is not None and shard.is_main:
        write_json(directory / MANIFEST_FILE, {"identity": identity, "calibration": calib.describe(),
                                               "qvggt_export": __version__, "torch": torch.__version__,
                                               "files": [STATS_FILE] + ([SENSITIVITY_FILE, FIGURE_FILE] if report else [])})
        logger.info("calibration written to %s", directory)
    barrier(shard)
    return Calibration(stats, report, identity, directory, spent)


def _cached_stats(directory: Path | None, identity: dict) -> ActivationStats | None:
    """The statistics cached in `directory` for `identity`; None (recompute) when there are none, when they
    are for another run, or when the file is damaged (discarded with one warning: io.load_cache_tensors)."""
    loaded = None if directory is None else load_cache_tensors(directory / STATS_FILE)
    if loaded is None:
        return None
    tensors, metadata = loaded
    if json.loads(metadata.get("identity", "null")) != identity:
        logger.info("calibration statistics in %s are for another model, data or settings; recomputing", directory)
        return None
    logger.info("reusing activation statistics from %s", directory / STATS_FILE)
    return ActivationStats.from_tensors(tensors)
