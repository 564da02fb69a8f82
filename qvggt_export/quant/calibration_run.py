"""The `calibrate` stage: activation statistics, camera tokens and the sensitivity report, cached in a
run directory and reused (or resumed) when the model and calibration data are unchanged.

Directory layout:
  manifest.json        identity (model and calibration hashes, settings) and versions
  stats.safetensors    per-linear activation statistics, camera tokens, patch-token norm
  sensitivity.json     per-block and per-linear-type errors against the FP model
  sensitivity.png      the same as a figure
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..io import atomic_output, sha256_json, write_json
from ..log import logger
from .calibration_set import CalibrationSet
from .objective import check_finite, make_targets, predict
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


def model_fingerprint(model: nn.Module) -> str:
    """Cheap content hash of a model: config plus per-tensor shape and sums (one pass over weights)."""
    with torch.no_grad():
        parts = [[k, list(v.shape), float(v.double().sum()), float(v.double().abs().sum())]
                 for k, v in model.state_dict().items() if v is not None]
    return sha256_json({"config": getattr(model, "config", None).to_dict(), "tensors": parts})


@torch.no_grad()  # PTQ never needs gradients; keeps callers' grad mode untouched
def calibrate(model: nn.Module, calib: CalibrationSet, out_dir: str | Path | None = None,
              samples_per_linear: int = 256, sensitivity: bool = True, bits: int = 4) -> Calibration:
    """Runs (or reuses from `out_dir`) the statistics and sensitivity analysis of `model` on `calib`."""
    model = model.eval()
    identity = {"model": model_fingerprint(model), "calibration": calib.fingerprint(),
                "samples_per_linear": samples_per_linear, "bits": bits}
    directory = Path(out_dir) if out_dir is not None else None
    stats = _cached_stats(directory, identity)
    if stats is None:
        stats = collect_stats(model, calib, samples_per_linear)
        if directory is not None:
            from safetensors.torch import save_file

            with atomic_output(directory / STATS_FILE) as tmp:
                save_file(stats.to_tensors(), str(tmp), metadata={"identity": json.dumps(identity, sort_keys=True)})
    report = None
    if sensitivity:
        fp_preds = predict(model, calib)
        check_finite(fp_preds, "the full-precision model")
        fp_targets = make_targets(calib, fp_preds, use_gt=False)
        report_path = (directory / SENSITIVITY_FILE) if directory is not None else None
        if report_path is None:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                report = sensitivity_analysis(model, calib, fp_preds, fp_targets, Path(tmp) / SENSITIVITY_FILE,
                                              identity, bits)
        else:
            report = sensitivity_analysis(model, calib, fp_preds, fp_targets, report_path, identity, bits)
            save_figure(report, directory / FIGURE_FILE)
    if directory is not None:
        write_json(directory / MANIFEST_FILE, {"identity": identity, "calibration": calib.describe(),
                                               "qvggt_export": __version__, "torch": torch.__version__,
                                               "files": [STATS_FILE] + ([SENSITIVITY_FILE, FIGURE_FILE] if report else [])})
        logger.info("calibration written to %s", directory)
    return Calibration(stats, report, identity, directory)


def _cached_stats(directory: Path | None, identity: dict) -> ActivationStats | None:
    if directory is None or not (directory / STATS_FILE).is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(directory / STATS_FILE), framework="pt") as f:
        if json.loads((f.metadata() or {}).get("identity", "null")) != identity:
            logger.info("calibration statistics in %s are for another model or data; recomputing", directory)
            return None
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    logger.info("reusing activation statistics from %s", directory / STATS_FILE)
    return ActivationStats.from_tensors(tensors)
