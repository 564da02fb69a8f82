"""`qvggt-export build`: calibrate -> quantize -> export -> lower -> compare -> engine.

Every stage writes its artifacts atomically and then a sidecar `.stages/<stage>.json` holding the hash
of its inputs + config and the hashes of its outputs. A rerun skips a stage whose sidecar matches and
whose outputs are unchanged on disk, so a killed build resumes at the first unfinished stage.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .errors import InputError, QVGGTError
from .io import (discard_cache, exclusive_lock, read_json_or_discard, remove_stale_temporaries, removed_on_error,
                 sha256_file, sha256_json, write_json)
from .log import logger
from .report import REPORT_NAME
from .vocabulary import FAST_PRESET
from .visualize import DEFAULT_CONF_PERCENTILE

STAGES_DIR = ".stages"
LOCK_FILE = "lock"  # in STAGES_DIR: held (flock) while a build runs in the folder
CALIB_DIR = "calib"


@dataclass
class BuildConfig:
    precision: str = "w4a16"  # fp16 | w8a16 | w4a16
    checkpoint: str | None = None  # None: the embedded vggt-tiny
    out: str | None = None  # None: engines/<model>-<precision>
    method: str = "qvggt"
    plan: str | None = None
    calib: str = "synthetic"
    calib_scenes: int = 4
    calib_frames: int = 4
    calib_size: tuple[int, int] | None = None  # calibration views; None: the model's native size
    image_size: tuple[int, int] | None = None  # the export's; None: the model's native size
    min_frames: int = 1
    opt_frames: int = 4
    max_frames: int = 32
    targets: tuple[str, ...] = ("ort", "qdq")
    backend: str | None = None  # None: whichever TensorRT imports; "none": no engine
    compare_scenes: int = 2
    compare_frames: int = 4
    device: str | None = None  # calibration and quantization: None = cuda when available, else cpu
    dtype: str | None = None  # their forward dtype: None = bf16 on CUDA, fp32 on the CPU
    fast: bool = False  # vocabulary.FAST_PRESET
    scope: str = "aggregator"  # the blocks the plan covers (arch.SCOPES)

    def check(self) -> None:
        if self.precision not in ("fp16", "w8a16", "w4a16"):
            raise InputError(f"--precision must be fp16, w8a16 or w4a16, got {self.precision!r}")
        from .quant.plan import check_scope

        check_scope(self.scope)


def _versions() -> dict:
    import onnx
    import torch

    return {"qvggt_export": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "python": platform.python_version()}


class Stages:
    """Sidecar bookkeeping: `run(name, inputs, outputs, fn)` runs fn() unless it is up to date."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ran: dict[str, str] = {}
        self.writer = True  # False on the non-main ranks of a torchrun build

    def _sidecar(self, name: str) -> Path:
        return self.root / STAGES_DIR / f"{name}.json"

    def _key(self, path: Path) -> str:
        """An output's name in the sidecar: its path under the build folder."""
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else path.name

    def _record(self, name: str) -> dict | None:
        sidecar = self._sidecar(name)
        record = read_json_or_discard(sidecar)
        if record is None:
            return None
        if not isinstance(record, dict) or not isinstance(record.get("outputs"), dict):
            discard_cache(sidecar, "not a stage record")
            return None
        return record

    def up_to_date(self, name: str, key: str, outputs: list[Path]) -> bool:
        """The sidecar's key matches and every output it recorded (the required `outputs` among them) is
        on disk with the hash it had when the stage wrote it."""
        record = self._record(name)
        if record is None or record.get("key") != key:
            return False
        recorded = record["outputs"]
        wanted = {n: self.root / n for n in recorded} | {self._key(p): p for p in outputs}
        for output, path in wanted.items():
            if not path.is_file() or output not in recorded:
                logger.info("[%s] %s is missing; rerunning the stage", name, path)
                return False
            if sha256_file(path) != recorded[output]:
                # Never left for the rerun to read (a cache among the outputs would be): removed here.
                logger.warning("[%s] %s is not what the stage wrote (damaged or edited); discarded, rerunning the "
                               "stage", name, path)
                if self.writer:
                    path.unlink(missing_ok=True)
                return False
        return True

    def run(self, name: str, inputs: dict, outputs: list[Path], fn, optional: tuple[Path, ...] = ()) -> bool:
        """True when the stage ran, False when it was skipped. `optional`: outputs the stage may write
        (caches, figures); those it wrote are hash-checked like `outputs` on the next run."""
        key = sha256_json(inputs)
        if self.up_to_date(name, key, outputs):
            logger.info("[%s] up to date, skipped", name)
            self.ran[name] = "skipped (up to date)"
            return False
        start = time.perf_counter()
        logger.info("[%s] running", name)
        fn()
        if not self.writer:
            return True
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise QVGGTError(f"stage {name} did not write {', '.join(missing)}")
        written = [*outputs, *(p for p in optional if p.is_file())]
        write_json(self._sidecar(name), {"key": key, "inputs": inputs, "versions": _versions(),
                                         "outputs": {self._key(p): sha256_file(p) for p in written}})
        self.ran[name] = f"ran in {time.perf_counter() - start:.1f} s"
        return True

    @property
    def finished_any(self) -> bool:
        """Some stage ran to its end in this build (its outputs are whole and recorded)."""
        return any(status.startswith("ran") for status in self.ran.values())


def _source_hash(checkpoint: str | None) -> tuple[Path, str]:
    from .model.checkpoint import DEFAULT_MODEL, resolve_source

    path = resolve_source(checkpoint or DEFAULT_MODEL)
    return path, sha256_file(path)


def build(config: BuildConfig) -> dict:
    """Runs the pipeline; returns the summary (also written to OUT/summary.json).

    One build at a time per folder (a lock in OUT/.stages: a second one fails at once with BusyError).
    A build that fails with an error removes the folder if it created it and no stage finished, and an
    unfinished stage's calibration folder if the stage created it; temporary files go in any case."""
    config.check()
    source, source_sha = _source_hash(config.checkpoint)
    name = Path(config.checkpoint).stem if config.checkpoint else "vggt-tiny"
    root = Path(config.out or f"engines/{name}-{config.precision}")
    stages = Stages(root)
    shard = None
    if config.precision != "fp16":
        from .quant.distributed import init_from_environment
        from .quant.forward import resolve_device

        shard = init_from_environment(resolve_device(config.device))
        stages.writer = shard.is_main
    if not stages.writer:  # the other ranks of a torchrun build lend their share of the calibration work
        return _build(config, stages, source, source_sha, shard)
    root_is_new = not root.exists()
    with exclusive_lock(root / STAGES_DIR / LOCK_FILE, f"build folder {root}"):
        calib_dir = root / CALIB_DIR
        stale = remove_stale_temporaries(root, root / STAGES_DIR, calib_dir, *calib_dir.glob("quantize-*"))
        if stale:
            logger.info("removed %d temporary file(s) that a killed build left in %s", len(stale), root)
        try:
            return _build(config, stages, source, source_sha, shard)
        except Exception:
            if root_is_new and not stages.finished_any:
                shutil.rmtree(root, ignore_errors=True)
            raise


def _build(config: BuildConfig, stages: Stages, source: Path, source_sha: str, shard) -> dict:
    from .export.lower import lowered_path, write_lowering
    from .export.onnx_export import export_onnx
    from .compare import file_bytes
    from .export.spec import ExportConfig
    from .model import load_model
    from .model.summary import checkpoint_summary
    from .quant.calibration_run import FIGURE_FILE

    root = stages.root
    quantized = config.precision != "fp16"
    qpath, calib_dir, onnx_path = root / "quantized.safetensors", root / CALIB_DIR, root / "model.onnx"
    model_fp = None

    def fp_model():
        nonlocal model_fp
        if model_fp is None:
            model_fp = load_model(str(source))
            if getattr(model_fp, "quant_plan", None) is not None:
                raise InputError(f"{source} is already quantized: build takes the full-precision checkpoint")
        return model_fp

    if quantized:
        from .quant.calibration_run import MANIFEST_FILE, SENSITIVITY_FILE, STATS_FILE
        from .quant.calibration_set import load_calibration
        from .quant.distributed import leave_group
        from .quant.forward import resolve_device

        calib = load_calibration(config.calib, fp_model(), config.calib_scenes, config.calib_frames,
                                 config.calib_size)
        qconfig = _quant_config(config, resolve_device(config.device))
        # Everything the checkpoint depends on: the model file, the calibration pixels, every quantization
        # setting, the package version (which also fixes the synthetic renderer).
        quant_inputs = {"checkpoint": source_sha, "calibration": calib.fingerprint(), "quant": asdict(qconfig),
                        "qvggt_export": __version__}
        # The calibration files are outputs too: a damaged one reruns the stage (which then recomputes it).
        calib_files = tuple(calib_dir / f for f in (STATS_FILE, SENSITIVITY_FILE, FIGURE_FILE, MANIFEST_FILE))
        stages.run("calibrate+quantize", quant_inputs, [qpath],
                   lambda: _quantize(fp_model(), calib, qconfig, calib_dir, qpath, shard.is_main),
                   optional=calib_files)
        leave_group(shard)  # the ranks' shared work ends here: rank 0 goes on alone
        if not shard.is_main:
            return {}  # the other ranks only lend their share of the calibration work
        model_source, model_sha = qpath, sha256_file(qpath)
    else:
        model_source, model_sha = source, source_sha
    model_fp = None  # quantized in place by now: the report loads the checkpoint afresh
    deployed = load_model(str(model_source))
    image_size = config.image_size or deployed.config.default_image_size
    export_config = ExportConfig(precision=config.precision, image_size=tuple(image_size),
                                 min_frames=config.min_frames, opt_frames=config.opt_frames,
                                 max_frames=config.max_frames)
    stages.run("export", {"model": model_sha, "export": export_config.to_dict()}, [onnx_path],
               lambda: export_onnx(deployed, onnx_path, export_config))
    onnx_sha = sha256_file(onnx_path)
    lowered = {}
    for target in config.targets if quantized else ():
        out = lowered_path(onnx_path, target)
        stages.run(f"lower-{target}", {"onnx": onnx_sha, "target": target}, [out],
                   lambda out=out, target=target: write_lowering(onnx_path, target, out))
        lowered[target] = out
    candidate = lowered.get("qdq") or lowered.get("ort") or onnx_path
    compare_path, report_path = root / "compare.json", root / REPORT_NAME
    files = {p.name: file_bytes(p) for p in [*([qpath] if quantized else []), onnx_path, *lowered.values()]}
    part_bytes = checkpoint_summary(str(model_source))["deployable_bytes"]
    figure = calib_dir / FIGURE_FILE
    report_context = {"files": files, "part_bytes": part_bytes, "part_bytes_source": f" of {model_source.name}",
                      "plan": getattr(deployed, "quant_plan", None), "reference_name": f"PyTorch, {model_source.name}",
                      "sensitivity_png": figure if quantized and figure.is_file() else None,
                      "sensitivity_note": f"not available: no {figure}" + ("" if quantized else
                                                                           " (an fp16 build calibrates nothing)")}
    # report.html is drawn by the compare stage from its run: a lost report reruns the stage.
    report_inputs = {"full_precision": source_sha, "files": files, "conf_percentile": DEFAULT_CONF_PERCENTILE,
                     "sensitivity": sha256_file(figure) if report_context["sensitivity_png"] else None,
                     "qvggt_export": __version__}
    candidate_sha = sha256_file(candidate)  # for compare and engine (1.4 GB for VGGT-1B: hashed once)
    stages.run("compare", {"candidate": candidate_sha, "reference": model_sha,
                           "scenes": config.compare_scenes, "frames": config.compare_frames,
                           "report": report_inputs}, [compare_path, report_path],
               lambda: _compare(candidate, deployed, source if quantized else None, image_size, config, compare_path,
                                report_context))
    compare_report = json.loads(compare_path.read_text())
    engine = _engine_stage(stages, candidate, candidate_sha, config)
    summary = _summary(root, config, stages, files, compare_report, engine, part_bytes, report_path)
    write_json(root / "summary.json", summary)
    return summary


def _quant_config(config: BuildConfig, device):
    from .quant.quantizer import QuantConfig

    return QuantConfig(method=config.method, plan=config.plan, precision=config.precision, device=str(device),
                       dtype=config.dtype, scope=config.scope, **(FAST_PRESET if config.fast else {}))


def _quantize(model_fp, calib, qconfig, calib_dir: Path, qpath: Path, writer: bool) -> None:
    from .model import save_quantized
    from .quant.quantizer import quantize_model

    reports = []
    # Failing with an error (a full disk, say) removes the calibration folder if this stage made it.
    with removed_on_error(calib_dir if writer else None):
        qmodel = quantize_model(model_fp, calib, qconfig, calib_dir=calib_dir, inplace=True, report_out=reports)
        if writer:
            save_quantized(qmodel, qpath)
            reports[0].progress.clear()


def _compare(candidate: Path, reference, fp_source: Path | None, image_size, config: BuildConfig, out: Path,
             context: dict) -> None:
    """compare.json and report.html. The report draws the full-precision model (`fp_source`; None: the
    reference is full precision already) against the candidate, on the compare run's inputs."""
    import torch

    from .compare import CompareConfig, compare, synthetic_inputs, write_reports
    from .export import spec
    from .inference import run_model
    from .model import load_model

    inputs = synthetic_inputs(tuple(image_size), config.compare_scenes, config.compare_frames)
    outputs = []
    # The tolerance follows the candidate's metadata (compare.tolerance_for), as a standalone `compare` does.
    report = compare(candidate, reference, inputs, CompareConfig(error_stat="max"), outputs_out=outputs)
    fp_outputs, labels = None, ("full precision (PyTorch)", f"{config.precision} ({candidate.name})")
    if fp_source is not None:
        fp = load_model(str(fp_source))
        fp_outputs = []
        for feed in inputs:
            preds = run_model(fp, torch.from_numpy(feed[spec.INPUT_NAME][0]))
            fp_outputs.append({name: preds[name][None] for name in spec.OUTPUT_NAMES})
        del fp
    write_reports(out, report, inputs, outputs, labels, fp_outputs,
                  title=f"qvggt-export build: {out.parent.name}", **context)


def _engine_stage(stages: Stages, onnx_path: Path, onnx_sha: str, config: BuildConfig) -> dict:
    from .export.engine import BackendMissing, EngineConfig, build_engine, default_backend, sidecar_path

    backend = config.backend or default_backend()
    if backend in (None, "none"):
        return {"built": False, "reason": "no TensorRT installed here (pip install 'qvggt-export[rtx]' for "
                                          "TensorRT-RTX, or build on the target with `qvggt-export engine`)"}
    engine_path = onnx_path.with_suffix(".engine")
    try:
        stages.run(f"engine-{backend}", {"onnx": onnx_sha, "backend": backend},
                   [engine_path, sidecar_path(engine_path)],
                   lambda: build_engine(onnx_path, engine_path, EngineConfig(backend=backend)))
    except BackendMissing as exc:
        return {"built": False, "reason": str(exc)}
    return {"built": True, "path": str(engine_path), "backend": backend, "bytes": engine_path.stat().st_size}


def _summary(root, config, stages, files, compare_report, engine, part_bytes, report_path) -> dict:
    from .model.summary import format_deployable_bytes

    summary = {"out": str(root), "config": asdict(config), "stages": stages.ran, "files": files,
               "compare": {"passed": compare_report["passed"], "candidate": compare_report["candidate"],
                           "worst_relative_error": max(max(s["relative_error"].values())
                                                      for s in compare_report["scenes"])},
               "engine": engine, "deployable_bytes": part_bytes, "report": str(report_path)}
    logger.info("build summary (%s):", root)
    for stage, status in stages.ran.items():
        logger.info("  %-22s %s", stage, status)
    for fname, nbytes in files.items():
        logger.info("  %-22s %.2f MB", fname, nbytes / 1e6)
    logger.info("  deployable weights (scope %s):", config.scope)
    for line in format_deployable_bytes(summary["deployable_bytes"]):
        logger.info("  %s", line)
    logger.info("  compare                %s (worst relative error %.2e)",
                "PASSED" if compare_report["passed"] else "FAILED", summary["compare"]["worst_relative_error"])
    logger.info("  engine                 %s", engine.get("path") or f"not built: {engine['reason']}")
    logger.info("  report                 %s", report_path)
    return summary
