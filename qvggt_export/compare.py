"""`qvggt-export compare`: Polygraphy's Comparator runs a candidate against a reference on real inputs,
and a geometry report (pose, depth, points) is added per scene.

Candidates and references: an ONNX file (ONNX Runtime; custom nodes are lowered to `ort` in memory),
a TensorRT engine (Polygraphy's TensorRT runner, where `tensorrt` imports), or a PyTorch model
(full precision or quantized). Tolerances are relative to each output's reference range, turned into
Polygraphy's per-output atol once the reference has run; unless the caller sets them (--rel-tol) they
follow what the two sides are (`tolerance_for`: the export spec's activation dtype), for `compare` and
`build` alike.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .export import spec
from .log import logger


@dataclass
class CompareConfig:
    rel_tol: dict[str, float] | None = None  # None: from what the candidate is (tolerance_for)
    error_stat: str = "max"  # Polygraphy check_error_stat: max | mean | median
    # Geometry thresholds (candidate vs reference predictions).
    max_rotation_deg: float = 1.0
    max_translation_deg: float = 2.0
    min_auc30: float = 90.0
    max_depth_abs_rel: float = 0.02
    max_point_error: float = 0.02
    scenes: int = 2
    frames: int = 4


def activations_of(source) -> tuple[str, str]:
    """(activation dtype, where it was read) of one side of a comparison: "fp32" or "fp16" (a key of
    spec.REL_TOL). An ONNX file: its export spec (and the lowering, named); an engine: its sidecar (what
    the ONNX it was built from recorded); a PyTorch model: its parameters' dtype."""
    if not isinstance(source, (str, Path)):
        import torch

        dtype = next((p.dtype for p in source.parameters() if p.is_floating_point()), torch.float32)
        return ("fp32" if dtype == torch.float32 else "fp16"), f"PyTorch {str(dtype).removeprefix('torch.')}"
    path = Path(source)
    if path.suffix == ".engine":
        from .export.engine import read_sidecar
        from .io import sha256_file

        info = read_sidecar(path)
        if info.get("activations") in spec.REL_TOL:
            return info["activations"], f"{path.name}: {info['activations']} activations in its sidecar"
        graph = path.with_suffix(".onnx")  # an older sidecar: the graph beside it, if it is the one built from
        if graph.is_file() and info.get("onnx_sha256") == sha256_file(graph):
            dtype, why = activations_of(graph)
            return dtype, f"{path.name}, built from {why}"
        return "fp32", f"{path.name}: activations not recorded in its sidecar, fp32 assumed"
    from .export.lower import META_TARGET
    from .export.onnx_io import load_onnx, model_metadata, recorded_export_spec

    graph = load_onnx(path, load_external_data=False)
    meta = model_metadata(graph)
    dtype = recorded_export_spec(graph).get("dtype")
    lowering = f", {meta[META_TARGET]} lowering" if META_TARGET in meta else ""
    if dtype not in spec.REL_TOL:
        return "fp32", f"{path.name}: no export spec{lowering}, fp32 assumed"
    return dtype, f"{path.name}: {dtype} activations in its export spec{lowering}"


def tolerance_for(candidate, reference) -> dict:
    """The relative tolerance per output of a comparison: the export spec's (spec.REL_TOL) for the least
    precise activations of the two sides, and why. The one rule `compare` and `build` use when no
    tolerance is given."""
    sides = [activations_of(candidate)]
    if isinstance(reference, (str, Path)):  # a PyTorch reference runs in fp32 (torch_runner)
        sides.append(activations_of(reference))
    dtype = "fp16" if any(d == "fp16" for d, _ in sides) else "fp32"
    return {"rel_tol": dict(spec.REL_TOL[dtype]), "activations": dtype,
            "source": "; ".join(why for _, why in sides)}


def torch_runner(model, name: str = "pytorch"):
    """A PyTorch model as a Polygraphy runner on the CPU (Polygraphy's PytRunner moves inputs to CUDA)."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    from .export.onnx_export import GraphModule

    class TorchRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="pytorch-runner")
            self.module = GraphModule(model, torch.float32).eval()

        def activate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return TensorMetadata().add(spec.INPUT_NAME, np.float32, (1, "S", 3, "H", "W"))

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                outs = self.module(torch.from_numpy(feed_dict[spec.INPUT_NAME]))
            self.inference_time = time.perf_counter() - start
            return OrderedDict((n, o.numpy()) for n, o in zip(spec.OUTPUT_NAMES, outs))

        def deactivate_impl(self):
            pass

    return TorchRunner()


def onnx_runner(path: str | Path, name: str | None = None):
    """ONNX Runtime runner with W4A16 semantics (accuracy_level 0); custom nodes lowered to `ort`."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from .export.lower import lower
    from .export.onnx_io import load_onnx
    from .export.runtime import has_custom_nodes, ort_session

    path = Path(path)
    model = load_onnx(path) if has_custom_nodes(path) else None
    session = ort_session(lower(model, "ort") if model is not None else path)
    return OnnxrtRunner(session, name=name or f"onnxrt:{path.name}")


def engine_runner(path: str | Path):
    """Polygraphy's TensorRT runner (standard TensorRT: Polygraphy imports `tensorrt` itself)."""
    from .export.engine import import_backend, read_sidecar, register_plugins

    path = Path(path)
    trt = import_backend("tensorrt")
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    if read_sidecar(path).get("plugin"):
        register_plugins(trt)
    return TrtRunner(EngineFromBytes(path.read_bytes()), name=f"tensorrt:{path.name}")


def runner_for(source, name: str | None = None):
    """A path (.onnx / .engine) or a torch model -> Polygraphy runner."""
    if not isinstance(source, (str, Path)):
        return torch_runner(source, name or "pytorch")
    path = Path(source)
    if path.suffix == ".engine":
        return engine_runner(path)
    if path.suffix == ".onnx":
        return onnx_runner(path, name)
    raise InputError(f"cannot compare {path}: expected an .onnx or .engine file")


def synthetic_inputs(image_size: tuple[int, int], scenes: int, frames: int) -> list[dict[str, np.ndarray]]:
    from .data.synthetic import VAL_SEEDS, render_scene

    return [{spec.INPUT_NAME: render_scene(seed, frames, image_size).images[None]}
            for seed in list(VAL_SEEDS)[:scenes]]


def image_inputs(paths, image_size: tuple[int, int] | None) -> list[dict[str, np.ndarray]]:
    from .data.images import load_and_preprocess_images

    # Preprocessed to the model's fixed size (data.images: crop / pad to exactly that size).
    images = load_and_preprocess_images([str(p) for p in paths], size=image_size).numpy()
    return [{spec.INPUT_NAME: images[None].astype(np.float32)}]


def geometry_report(candidate: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """Candidate predictions measured against the reference's as if they were ground truth."""
    import torch

    from .geometry import pose_encoding_to_extri_intri
    from .metrics import camera_pose_metrics, depth_metrics

    hw = candidate["depth"].shape[2:4]
    extrinsics = [pose_encoding_to_extri_intri(torch.from_numpy(p["pose_enc"]).float(), hw)[0][0].numpy()
                  for p in (candidate, reference)]
    pose = camera_pose_metrics(extrinsics[0], extrinsics[1])
    depth_ref = reference["depth"][0, ..., 0]
    depth = depth_metrics(candidate["depth"][0, ..., 0], depth_ref, np.isfinite(depth_ref) & (depth_ref > 0))
    ref_points, points = reference["world_points"][0], candidate["world_points"][0]
    scale = float(np.linalg.norm(ref_points, axis=-1).mean()) or 1.0
    return {"rotation_error_deg": pose["rotation_error_deg"], "translation_error_deg": pose["translation_error_deg"],
            "auc@30": pose["auc@30"], "depth_abs_rel": depth["abs_rel"],
            "point_error": float(np.linalg.norm(points - ref_points, axis=-1).mean()) / scale}


def _geometry_failures(report: dict[str, float], config: CompareConfig) -> list[str]:
    checks = [("rotation_error_deg", "<=", config.max_rotation_deg),
              ("translation_error_deg", "<=", config.max_translation_deg),
              ("auc@30", ">=", config.min_auc30), ("depth_abs_rel", "<=", config.max_depth_abs_rel),
              ("point_error", "<=", config.max_point_error)]
    failures = []
    for key, op, limit in checks:
        value = report[key]
        if np.isnan(value):  # a single frame has no pose pairs: nothing to check
            continue
        ok = value <= limit if op == "<=" else value >= limit
        if not ok:
            failures.append(f"{key} {value:.4g} (limit {op} {limit:g})")
    return failures


def _polygraphy_outputs(accuracy, atol: dict[str, float]) -> dict[str, dict]:
    """Polygraphy's verdict and error statistics per output, over all scenes. `accuracy`: what
    Comparator.compare_accuracy returns, one AccuracyResult (runner pair -> iterations) or, from Polygraphy
    0.50 on, a list of them (one per comparison function)."""
    results = [accuracy] if hasattr(accuracy, "values") else list(accuracy)
    iterations = [it for result in results for pair in result.values() for it in pair]
    per_output = {}
    for name in spec.OUTPUT_NAMES:
        results = [it[name] for it in iterations if name in it]
        if results:
            per_output[name] = {"passed": all(bool(r) for r in results), "atol": atol.get(name),
                                "max_absdiff": max(r.max_absdiff for r in results),
                                "mean_absdiff": float(np.mean([r.mean_absdiff for r in results]))}
    return per_output


def compare(candidate, reference, inputs: list[dict[str, np.ndarray]], config: CompareConfig = CompareConfig(),
            outputs_out: list | None = None) -> dict:
    """Runs both on `inputs`; returns a JSON-able report with `passed` (Polygraphy accuracy and the
    geometry thresholds). `outputs_out`, when given, receives per scene {"candidate": outputs,
    "reference": outputs} (the graphs' arrays, batch of one), what report.html draws."""
    from polygraphy.comparator import Comparator, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    from .export.onnx_export import relative_errors

    G_LOGGER.module_severity = G_LOGGER.WARNING
    runners = [runner_for(candidate, "candidate"), runner_for(reference, "reference")]
    tolerance = (tolerance_for(candidate, reference) if config.rel_tol is None else
                 {"rel_tol": dict(config.rel_tol), "activations": None, "source": "given (--rel-tol)"})
    logger.info("tolerance: %s relative to each output's range (%s)",
                ", ".join(f"{v:g}" for v in sorted(set(tolerance["rel_tol"].values()))), tolerance["source"])
    results = Comparator.run(runners, data_loader=inputs)
    ref_iters = results[1][1]
    atol = {}
    for name, rel in tolerance["rel_tol"].items():
        span = max(float(it[name].max() - it[name].min()) for it in ref_iters)
        atol[name] = rel * (span or 1.0)
    accuracy = Comparator.compare_accuracy(
        results, compare_func=SimpleCompareFunc(atol=atol, rtol=0.0, check_error_stat=config.error_stat))
    polygraphy_passed = bool(accuracy)
    per_output = _polygraphy_outputs(accuracy, atol)
    scenes = []
    for i, (cand, ref) in enumerate(zip(results[0][1], ref_iters)):
        cand = {k: np.asarray(cand[k]) for k in spec.OUTPUT_NAMES}
        ref = {k: np.asarray(ref[k]) for k in spec.OUTPUT_NAMES}
        geometry = geometry_report(cand, ref)
        scenes.append({"scene": i, "relative_error": relative_errors(cand, ref), "geometry": geometry,
                       "geometry_failures": _geometry_failures(geometry, config)})
        if outputs_out is not None:
            outputs_out.append({"candidate": cand, "reference": ref})
    geometry_passed = not any(s["geometry_failures"] for s in scenes)
    report = {"candidate": str(candidate) if isinstance(candidate, (str, Path)) else "pytorch",
              "reference": str(reference) if isinstance(reference, (str, Path)) else "pytorch",
              "polygraphy_passed": polygraphy_passed, "geometry_passed": geometry_passed,
              "passed": polygraphy_passed and geometry_passed, "tolerance": tolerance, "atol": atol,
              "error_stat": config.error_stat,
              "polygraphy_outputs": per_output, "scenes": scenes}
    for s in scenes:
        g = s["geometry"]
        logger.info("scene %d: max rel err %.2e | rot %.3f deg, trans %.3f deg, AUC@30 %.1f, depth AbsRel %.4f, "
                    "point err %.4f", s["scene"], max(s["relative_error"].values()), g["rotation_error_deg"],
                    g["translation_error_deg"], g["auc@30"], g["depth_abs_rel"], g["point_error"])
    logger.info("compare %s: Polygraphy %s, geometry %s", "PASSED" if report["passed"] else "FAILED",
                "passed" if polygraphy_passed else "failed", "passed" if geometry_passed else "failed")
    return report


def write_reports(json_path: str | Path, result: dict, inputs: list[dict[str, np.ndarray]], outputs: list[dict],
                  labels: tuple[str, str], fp_outputs: list[dict] | None = None, **context) -> tuple[Path, Path]:
    """compare.json at `json_path` and report.html beside it (report.REPORT_NAME).

    `outputs`: what `compare(..., outputs_out=)` collected. `fp_outputs`: per scene, the full-precision
    model's outputs (graph form, batch of one) on the same inputs, drawn in place of the run's reference
    and measured against the candidate in a table of its own (`build`, whose reference is the quantized
    PyTorch model). `context`: report.ReportData's optional fields (plan, sensitivity_png, part_bytes, files)."""
    from .inference import graph_predictions
    from .io import write_json
    from .report import REPORT_NAME, ReportData, ReportScene, write_report

    json_path = Path(json_path)
    drawn = fp_outputs if fp_outputs is not None else [o["reference"] for o in outputs]
    scenes = [ReportScene(images=feed[spec.INPUT_NAME][0], reference=graph_predictions(ref),
                          candidate=graph_predictions(o["candidate"]))
              for feed, ref, o in zip(inputs, drawn, outputs)]
    drawn_geometry = None if fp_outputs is None else [geometry_report(o["candidate"], fp)
                                                      for o, fp in zip(outputs, fp_outputs)]
    html_path = write_report(json_path.with_name(REPORT_NAME),
                             ReportData(compare=result, scenes=scenes, labels=labels, drawn_geometry=drawn_geometry,
                                        **context))
    write_json(json_path, result)
    return json_path, html_path


def report_context(candidate: str | Path, reference, reference_name: str, checkpoint: str | None) -> dict:
    """write_reports' labels and context for a standalone `compare`: the plan (the PyTorch reference's or
    the candidate's ONNX metadata), weight bytes of the reference checkpoint, the candidate's file size."""
    import json

    from .model.checkpoint import DEFAULT_MODEL

    candidate, source = Path(candidate), checkpoint or DEFAULT_MODEL
    labels = {"torch": "full precision (PyTorch)", "torch-quantized": "quantized (PyTorch)"}
    context = {"labels": (labels.get(reference_name, Path(reference_name).name), candidate.name),
               "reference_name": f"{labels[reference_name]}, {source}" if reference_name in labels else reference_name,
               "sensitivity_note": "not available: a standalone compare has no calibration folder (`build` "
                                   "draws calib/sensitivity.png here)",
               "files": {candidate.name: file_bytes(candidate)}}
    plan = getattr(reference, "quant_plan", None)
    if plan is None and candidate.suffix == ".onnx":
        from .export.onnx_io import load_onnx, model_metadata

        meta = model_metadata(load_onnx(candidate, load_external_data=False))
        plan = json.loads(meta[spec.META_PLAN]) if spec.META_PLAN in meta else None
    context["plan"] = plan
    if not isinstance(reference, (str, Path)):
        from .model.summary import checkpoint_summary

        context["part_bytes"] = checkpoint_summary(source)["deployable_bytes"]
        context["part_bytes_source"] = f" of {source}"
    return context


def file_bytes(path: Path) -> int:
    """A model file with its external data (NAME.data), if any."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)
