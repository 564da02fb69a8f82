"""Faults during a run (docs/faults.md): damaged caches and stage outputs are verified and recomputed, a full
disk or memory and hostile images end in one `error:` line (exit 2) with nothing half-written left, two
builds into one folder exclude each other, a build killed at a random point in any stage resumes to the
bytes of an uninterrupted one, and `compare` takes its tolerance from what the candidate is.

One small quantized build (the module's `reference`, ~25 s) is made once; most tests damage a copy of it."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from qvggt_export.build import STAGES_DIR, BuildConfig, build
from qvggt_export.cli import main
from qvggt_export.errors import BusyError, ResourceError
from qvggt_export.io import TMP_SUFFIX, atomic_output, resource_error, write_json
from qvggt_export.log import logger
from qvggt_export.model import save_vggt

from export_helpers import IMAGE_SIZE, tiny_float_model

REPO = Path(__file__).resolve().parent.parent
# The artifacts every run of the same build promises byte for byte (at one intra-op thread, as here).
DETERMINISTIC = ("quantized.safetensors", "model.onnx", "model.qdq.onnx", "calib/stats.safetensors")
# A build of the given config in a fresh interpreter (what the kill and lock tests start and stop).
RUNNER = """
import json, sys
from qvggt_export.build import BuildConfig, build
from qvggt_export.log import setup_logging
setup_logging(False)
config = json.loads(sys.argv[1])
build(BuildConfig(**{**config, "image_size": tuple(config["image_size"]), "targets": tuple(config["targets"])}))
"""
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' OMP_NUM_THREADS=1: the same bytes (README, "same bytes")
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def logged_warnings():
    """The package's warning lines during the block."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.WARNING:
                records.append(record.getMessage())

    handler = Collect()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _config(checkpoint: Path, out: Path) -> BuildConfig:
    return BuildConfig(precision="w4a16", checkpoint=str(checkpoint), out=str(out), method="rtn", calib_scenes=1,
                       calib_frames=2, image_size=IMAGE_SIZE, min_frames=1, opt_frames=2, max_frames=4,
                       targets=("qdq",), backend="none", compare_scenes=1, compare_frames=2, device="cpu")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(config, folder) of one finished build, made in this process at one intra-op thread."""
    root = tmp_path_factory.mktemp("faults")
    checkpoint = save_vggt(tiny_float_model(), root / "tiny.safetensors")
    config = _config(checkpoint, root / "reference")
    with one_thread():
        summary = build(config)
    assert summary["compare"]["passed"]
    return config, root / "reference"


def _copy(reference, tmp_path: Path) -> tuple[BuildConfig, Path]:
    config, folder = reference
    out = tmp_path / "build"
    shutil.copytree(folder, out)
    return replace(config, out=str(out)), out


def _build(config: BuildConfig) -> dict:
    with one_thread():
        return build(config)


def _assert_same_artifacts(out: Path, reference_folder: Path) -> None:
    for name in DETERMINISTIC:
        assert (out / name).read_bytes() == (reference_folder / name).read_bytes(), name
    assert not list(out.rglob(f".*{TMP_SUFFIX}")), "temporary files left"


def _assert_up_to_date(config: BuildConfig) -> None:
    """Every stage's outputs on disk are the ones its sidecar recorded: a rerun skips them all."""
    summary = _build(config)
    assert all(status.startswith("skipped") for status in summary["stages"].values()), summary["stages"]


def _one_error_line(output: str, fragment: str) -> str:
    assert "Traceback" not in output, output
    errors = [line for line in output.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and output.strip().splitlines()[-1] == errors[0], output
    assert fragment in errors[0], output
    return errors[0]


def _run(args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


# ------------------------------------------------------------------------------ damaged files of a previous run


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 3)])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00\xffnot what was written\x89" * 7)


def _not_a_record(path: Path) -> None:
    path.write_text("[1, 2, 3]\n")


# (file the build reads from a previous run, damage, the stages that must run again)
DAMAGE = [
    ("calib/stats.safetensors", _truncate, {"calibrate+quantize"}),  # the case
    ("calib/stats.safetensors", _flip, {"calibrate+quantize"}),
    ("calib/manifest.json", _garbage, {"calibrate+quantize"}),
    ("quantized.safetensors", _flip, {"calibrate+quantize"}),
    ("quantized.safetensors", _truncate, {"calibrate+quantize"}),
    pytest.param("model.onnx", _truncate, {"export"}, marks=pytest.mark.slow),  # 16 s of tracing again
    ("model.qdq.onnx", _truncate, {"lower-qdq"}),
    ("model.qdq.onnx", _flip, {"lower-qdq"}),
    ("compare.json", _garbage, {"compare"}),
    ("report.html", _truncate, {"compare"}),
    (f"{STAGES_DIR}/calibrate+quantize.json", _truncate, {"calibrate+quantize"}),
    (f"{STAGES_DIR}/lower-qdq.json", _garbage, {"lower-qdq"}),
    (f"{STAGES_DIR}/compare.json", _not_a_record, {"compare"}),
]


def _damage_id(case) -> str:
    name, damage, _ = case.values if hasattr(case, "values") else case
    return f"{name}-{damage.__name__[1:]}"


@pytest.mark.parametrize("name, damage, rerun", DAMAGE, ids=[_damage_id(case) for case in DAMAGE])
def test_a_damaged_file_of_a_previous_run_is_redone_never_used(reference, tmp_path, name, damage, rerun):
    config, out = _copy(reference, tmp_path)
    damage(out / name)
    with logged_warnings() as warnings:
        summary = _build(config)
    assert {stage for stage, status in summary["stages"].items() if status.startswith("ran")} == rerun
    assert warnings and all(Path(name).name in w for w in warnings), warnings
    _assert_same_artifacts(out, reference[1])
    assert summary["compare"]["passed"]


@pytest.mark.parametrize("damage", [_truncate, _flip, _garbage])
def test_damaged_statistics_are_recomputed_when_quantize_reruns(tmp_path, damage):
    """The issue's second step: statistics damaged, then a setting changed so that quantize reruns: they are
    discarded with one warning and recomputed, never read (no SafetensorError)."""
    from quant_helpers import small_calibration, small_model
    from qvggt_export.quant.quantizer import QuantConfig, quantize_model

    model, calib = small_model(), small_calibration(scenes=1)
    with one_thread():
        quantize_model(model, calib, QuantConfig(method="rtn"), calib_dir=tmp_path)
        stats = (tmp_path / "stats.safetensors").read_bytes()
        damage(tmp_path / "stats.safetensors")
        with logged_warnings() as warnings:
            quantize_model(model, calib, QuantConfig(method="awq", grid=3), calib_dir=tmp_path)
    assert len(warnings) == 1 and "stats.safetensors is damaged" in warnings[0], warnings
    assert (tmp_path / "stats.safetensors").read_bytes() == stats


def test_damaged_sensitivity_report_is_discarded_and_recomputed(tmp_path):
    from quant_helpers import random_calibration, small_model
    from qvggt_export.quant.calibration_run import calibrate

    model, calib = small_model(), random_calibration(scenes=1)
    with one_thread():
        first = calibrate(model, calib, tmp_path).sensitivity
        for damage in (_truncate, _flip, _garbage):
            damage(tmp_path / "sensitivity.json")
            with logged_warnings() as warnings:
                again = calibrate(model, calib, tmp_path).sensitivity
            assert len(warnings) == 1 and "sensitivity.json is damaged" in warnings[0], warnings
            assert {k: v["score"] for k, v in again["blocks"].items()} == {
                k: v["score"] for k, v in first["blocks"].items()}
            assert list(again["blocks"]) == list(first["blocks"])  # trial order, as the figure draws it


class _Killed(RuntimeError):
    pass


@pytest.mark.parametrize("damage", ["progress-garbage", "block-truncated", "block-flipped", "block-missing"])
def test_damaged_quantize_resume_state_is_not_used(tmp_path, monkeypatch, damage):
    from quant_helpers import small_calibration, small_model
    from qvggt_export.model import save_quantized
    from qvggt_export.quant.progress import PROGRESS_FILE, QuantizeProgress
    from qvggt_export.quant.quantizer import QuantConfig, quantize_model

    model, calib = small_model(), small_calibration()
    config = QuantConfig(method="awq", grid=3)
    with one_thread():
        reference = save_quantized(quantize_model(model, calib, config, calib_dir=tmp_path / "ref"),
                                   tmp_path / "reference.safetensors")
        original, saved = QuantizeProgress.save_block, []

        def save_then_die(self, model, block, scales, entries):
            original(self, model, block, scales, entries)
            saved.append((self.directory, block))
            if len(saved) == 3:
                raise _Killed(block)

        monkeypatch.setattr(QuantizeProgress, "save_block", save_then_die)
        with pytest.raises(_Killed):
            quantize_model(model, calib, config, calib_dir=tmp_path / "calib")
        monkeypatch.setattr(QuantizeProgress, "save_block", original)
        directory, block = saved[1]
        target = directory / (PROGRESS_FILE if damage.startswith("progress") else f"{block}.safetensors")
        {"progress-garbage": _garbage, "block-truncated": _truncate, "block-flipped": _flip,
         "block-missing": Path.unlink}[damage](target)
        reports = []
        with logged_warnings() as warnings:
            resumed = quantize_model(model, calib, config, calib_dir=tmp_path / "calib", report_out=reports)
    named = block if damage.startswith("block") else PROGRESS_FILE
    assert len(warnings) == 1 and named in warnings[0], warnings
    assert reports[0].resumed_blocks == (0 if damage.startswith("progress") else 2)
    assert save_quantized(resumed, tmp_path / "resumed.safetensors").read_bytes() == reference.read_bytes()


# ------------------------------------------------------------------------------ a full disk


def test_resource_errors_are_recognised():
    from safetensors import SafetensorError

    assert "no space left" in str(resource_error(OSError(errno.ENOSPC, "No space left on device")))
    assert "quota" in str(resource_error(OSError(errno.EDQUOT, "Disk quota exceeded")))
    assert "size limit" in str(resource_error(SafetensorError("Error while serializing: I/O error: File too large "
                                                              "(os error 27)")))
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried "
                       "to allocate 400000000000 bytes. Error code 12 (Cannot allocate memory)")
    assert "out of memory" in str(resource_error(oom, "running 9 views"))
    assert "out of memory" in str(resource_error(MemoryError()))
    assert "out of memory" in str(resource_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to "
                                                                           "allocate 2.00 GiB")))
    for other in (OSError(errno.ENOENT, "missing"), RuntimeError("shape mismatch"), ValueError("x")):
        assert resource_error(other) is None


def test_the_cli_turns_any_full_disk_into_one_line(tmp_path, monkeypatch):
    """A full disk outside the package's writers (a library's own file) still ends in one line, exit 2."""
    import qvggt_export.predict as predict

    def save(path, predictions):
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/somebody-elses.cache")

    monkeypatch.setattr(predict, "save_predictions", save)
    code, output = _run(["predict", "--scene", "synthetic:3", "--views", "2", "--out", tmp_path / "p.npz"])
    assert code == 2
    _one_error_line(output, "error: no space left on device (/tmp/somebody-elses.cache); free some space")


def test_a_full_disk_in_any_writer_leaves_nothing(tmp_path):
    """atomic_output (every artifact but ONNX files) and save_onnx: a write that fails for lack of space is a
    ResourceError naming the file; no temporary file, and no folder made for it, is left."""
    from qvggt_export.export.onnx_io import save_onnx

    target = tmp_path / "new" / "deeper" / "artifact.bin"
    with pytest.raises(ResourceError, match=r"no space left on device writing .*artifact.bin"):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    def write(tmp):
        tmp.write_bytes(b"half a model")
        tmp.with_name(tmp.name + ".data").write_bytes(b"weights")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ResourceError, match="no space left on device writing"):
        save_onnx(write, target.with_suffix(".onnx"))
    assert list(tmp_path.iterdir()) == []


FSIZE_SNIPPET = """
import resource, signal, sys
import numpy as np, onnx
from onnx import helper, numpy_helper
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from qvggt_export.errors import ResourceError
from qvggt_export.export.onnx_io import save_proto
weight = numpy_helper.from_array(np.zeros((500, 500), np.float32), "w")
graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [500, 500])], [weight])
try:
    save_proto(helper.make_model(graph), __import__("pathlib").Path(sys.argv[1]))
except ResourceError as exc:
    print(exc)
"""


def test_a_file_size_limit_while_saving_onnx_is_one_error(tmp_path):
    """The kernel's limit (RLIMIT_FSIZE: EFBIG) on onnx.save inside save_onnx."""
    result = subprocess.run([sys.executable, "-c", FSIZE_SNIPPET, str(tmp_path / "out" / "model.onnx")],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert result.returncode == 0 and "file size limit exceeded writing" in result.stdout, result.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


def _limit_file_size(nbytes: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))
    return apply


def test_quantize_into_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """The issue's case: the checkpoint does not fit (a file-size limit, enforced by the kernel: 8 MB), the
    calibration folder beside it (statistics, per-block resume state, at most 3.2 MB a file) did. Wide DPT heads
    (not quantized) make the checkpoint 18 MB."""
    from export_helpers import TINY
    from qvggt_export.model import VGGT, VGGTConfig

    torch.manual_seed(0)
    model = VGGT(VGGTConfig(**{**TINY, "dpt_features": 64, "dpt_out_channels": (64, 128, 256, 256)})).eval()
    checkpoint = save_vggt(model, tmp_path / "wide-heads.safetensors")
    limit = 8_000_000
    out = tmp_path / "out" / "q.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "qvggt_export.cli", "quantize", "--checkpoint", checkpoint, "--method", "rtn",
         "--calib-scenes", "1", "--calib-frames", "2", "--calib-size", "28x518", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=ENV, preexec_fn=_limit_file_size(limit),
        restore_signals=False)
    assert result.returncode == 2, result.stderr[-3000:]
    _one_error_line(result.stderr, f"file size limit exceeded writing {out}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wide-heads.safetensors"]  # no out/, nor out/q_calib


def _fail_each_write_once(monkeypatch, root: Path) -> list[str]:
    """Every artifact write under `root` (they all end in os.replace: io.atomic_output, onnx_io.save_onnx) fails
    with ENOSPC the first time its destination comes up; returns the destinations failed so far."""
    failed: list[str] = []
    real = os.replace

    def replace_or_fail(src, dst, *args, **kwargs):
        if str(dst).startswith(str(root)) and str(dst) not in failed:
            failed.append(str(dst))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace_or_fail)
    return failed


@pytest.mark.slow
def test_a_full_disk_at_each_write_of_a_build(reference, tmp_path, monkeypatch):
    """Each write of a build fails once, in turn, each time in a new run: every run ends in a ResourceError that
    names the file, nothing temporary is left, and the run after the last failure finishes the build with the
    reference's bytes. (The export, 16 s of tracing, is kept: its writer is save_onnx, tested above.)"""
    config, out = _copy(reference, tmp_path)
    for path in list(out.iterdir()):
        if path.name not in ("model.onnx", STAGES_DIR):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for sidecar in (out / STAGES_DIR).iterdir():
        if sidecar.name != "export.json":
            sidecar.unlink()
    failed = _fail_each_write_once(monkeypatch, out)
    for attempt in range(40):
        try:
            summary = _build(config)
            break
        except ResourceError as exc:
            assert f"no space left on device writing {failed[-1]}" in str(exc)
            assert not list(out.rglob(f".*{TMP_SUFFIX}")), failed[-1]
    else:
        pytest.fail(f"no build finished after {attempt + 1} full disks")
    monkeypatch.undo()
    names = {Path(f).relative_to(out).as_posix() for f in failed}
    assert {"calib/stats.safetensors", "quantized.safetensors", "model.qdq.onnx", "compare.json", "report.html",
            "summary.json", f"{STAGES_DIR}/compare.json"} <= names, names
    assert summary["compare"]["passed"]
    _assert_same_artifacts(out, reference[1])
    _assert_up_to_date(config)


def test_a_build_that_fails_before_any_stage_leaves_no_folder(reference, tmp_path, monkeypatch):
    config = replace(reference[0], out=str(tmp_path / "fresh"))
    _fail_each_write_once(monkeypatch, tmp_path / "fresh")
    with pytest.raises(ResourceError, match="stats.safetensors"):
        _build(config)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------ hostile images, memory


def _bomb_png(path: Path, width: int, height: int) -> Path:
    """A PNG declaring width x height 1-bit pixels: kilobytes on disk. Its rows are all there when there are
    fewer than a million of them; otherwise 16 (a decompression bomb needs only its header)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + (width + 7) // 8) * (height if width * height < 10**7 else 16))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size, fragment", [((40_000, 40_000), "declares 1600 megapixels"),
                                            ((11_000, 10_000), "declares 110 megapixels"),
                                            ((20, 200_000), "aspect ratio is too extreme")])
def test_hostile_images_are_one_line(tmp_path, monkeypatch, size, fragment):
    monkeypatch.chdir(tmp_path)
    image = _bomb_png(tmp_path / "view.png", *size)
    code, output = _run(["predict", image, "--out", tmp_path / "p.npz"])
    assert code == 2
    _one_error_line(output, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["view.png"]


def test_more_views_than_memory_is_one_line_before_the_forward(tmp_path, monkeypatch):
    import qvggt_export.inference as inference

    monkeypatch.setattr(inference, "available_memory", lambda device: 1_000_000)
    code, output = _run(["predict", "--scene", "synthetic:3", "--views", "4", "--out", tmp_path / "p.npz"])
    assert code == 2
    _one_error_line(output, "4 views of")
    assert "GB is free on cpu; use fewer views" in output and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("exc", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried "
                                                             "to allocate 123456789 bytes")])
def test_running_out_of_memory_in_the_forward_is_one_line(tmp_path, monkeypatch, exc):
    from qvggt_export.model.vggt import VGGT

    def forward(self, images):
        raise exc

    monkeypatch.setattr(VGGT, "forward", forward)
    code, output = _run(["predict", "--scene", "synthetic:3", "--views", "2", "--out", tmp_path / "p.npz"])
    assert code == 2
    _one_error_line(output, "out of memory running 2 views")
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_in_onnx_runtime_is_one_line(reference, tmp_path, monkeypatch):
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    import qvggt_export.export.runtime as runtime

    class Session:
        def run(self, names, feed):
            raise RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                                   "running MatMul node. Failed to allocate memory for requested buffer of size 123")

    monkeypatch.setattr(runtime, "ort_session", lambda model: Session())
    views = []
    for i in range(2):
        views.append(tmp_path / f"view{i}.png")
        Image.new("RGB", (1036, 56), (40 * i, 90, 200)).save(views[-1])
    code, output = _run(["infer", reference[1] / "model.qdq.onnx", *views, "--out", tmp_path / "p.npz"])
    assert code == 2
    _one_error_line(output, "out of memory running 2 views of 28x518 through model.qdq.onnx")
    assert not (tmp_path / "p.npz").exists()


# ------------------------------------------------------------------------------ engines


def test_a_damaged_engine_sidecar_is_one_line(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"not an engine")
    view = tmp_path / "view.png"
    Image.new("RGB", (64, 48)).save(view)
    for damage in (_garbage, _not_a_record):
        damage(tmp_path / "model.engine.json")
        code, output = _run(["infer", engine, view, "--out", tmp_path / "p.npz"])
        assert code == 2
        _one_error_line(output, "model.engine.json is damaged")
    assert not (tmp_path / "p.npz").exists()


# ------------------------------------------------------------------------------ two builds, one folder


def _start(config: BuildConfig) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, json.dumps(asdict(config))], env=ENV,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, bufsize=1)


def _wait_for(proc: subprocess.Popen, text: str, log: list[str]) -> bool:
    """Reads the build's log until `text` appears (True) or the process ends (False)."""
    for line in proc.stderr:
        log.append(line)
        if text in line:
            return True
    return False


def test_a_second_build_into_the_same_folder_fails_at_once(reference, tmp_path):
    config, out = _copy(reference, tmp_path)
    (out / STAGES_DIR / "calibrate+quantize.json").unlink()  # the first build reruns that stage (seconds)
    first, log = _start(config), []
    try:
        assert _wait_for(first, "[calibrate+quantize] running", log), "".join(log)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        with pytest.raises(BusyError, match=rf"build folder {out} is in use by another process \(pid {first.pid}\)"):
            _build(config)
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # the second one touched nothing
        code, output = _run(["build", "--out", out])
        assert code == 2
        _one_error_line(output, "is in use by another process")
        log += first.stderr.readlines()
    finally:
        first.wait(timeout=300)
    assert first.returncode == 0, "".join(log)
    _assert_same_artifacts(out, reference[1])
    _assert_up_to_date(config)


# ------------------------------------------------------------------------------ kills


def test_temporary_files_a_kill_left_are_removed_by_the_next_build(reference, tmp_path):
    config, out = _copy(reference, tmp_path)
    (out / f".model.onnx.k1ll3d{TMP_SUFFIX}").mkdir()  # save_onnx's folder
    (out / f".model.onnx.k1ll3d{TMP_SUFFIX}" / "model.onnx").write_bytes(b"half")
    (out / "calib" / f".stats.safetensors.k1ll3d{TMP_SUFFIX}").write_bytes(b"half")  # atomic_output's file
    (out / "notes.tmp").write_text("the user's")
    _assert_up_to_date(config)
    assert not list(out.rglob(f".*{TMP_SUFFIX}")) and (out / "notes.tmp").read_text() == "the user's"


@pytest.mark.slow
def test_a_build_killed_in_each_stage_resumes_to_the_same_bytes(reference, tmp_path):
    """SIGKILL at a random point (seeded) inside each stage in turn, a new process each time; the last run
    finishes, and the artifacts are the uninterrupted build's, byte for byte."""
    config = replace(reference[0], out=str(tmp_path / "build"))
    rng = random.Random(33)
    # (stage, longest delay after it starts): each stage's own span on this 2-core CPU, about.
    plan = [("calibrate+quantize", 2.5), ("export", 12.0), ("lower-qdq", 0.2), ("compare", 1.5)]
    kills = []
    for stage, longest in plan:
        proc, log = _start(config), []
        if _wait_for(proc, f"[{stage}] running", log):
            delay = rng.uniform(0.0, longest)
            time.sleep(delay)
            proc.kill()
            kills.append((stage, round(delay, 2)))
        proc.communicate(timeout=300)
    assert len(kills) >= 2, kills  # a faster machine may finish a short stage before its kill comes
    proc, log = _start(config), []
    _, rest = proc.communicate(timeout=300)
    assert proc.returncode == 0, rest[-3000:]
    _assert_same_artifacts(tmp_path / "build", reference[1])
    _assert_up_to_date(config)


# ------------------------------------------------------------------------------ compare's tolerance


def test_compare_takes_the_tolerance_of_what_the_candidate_is(reference, tmp_path):
    """The issue's case: a standalone compare of the build's qdq graph (fp16 activations) uses the fp16
    tolerance, as `build` does; an fp32-activation graph gets the fp32 one; --rel-tol overrides, and the
    report says which was used."""
    from qvggt_export.export import spec

    _, out = reference
    built = json.loads((out / "compare.json").read_text())["tolerance"]
    assert built["rel_tol"] == spec.REL_TOL["fp16"] and "fp16 activations in its export spec, qdq lowering" in \
        built["source"]
    report = tmp_path / "compare.json"
    args = ["compare", out / "model.qdq.onnx", "-c", out / "quantized.safetensors", "--scenes", "1", "--frames", "2",
            "--report", report]
    code, output = _run(args)
    assert code == 0, output
    assert json.loads(report.read_text())["tolerance"] == built
    assert "tolerance: 0.03 relative to each output's range (model.qdq.onnx: fp16 activations" in output
    code, output = _run([*args, "--rel-tol", "1e-9"])
    assert code == 1 and json.loads(report.read_text())["tolerance"]["source"] == "given (--rel-tol)"

    import onnx
    from onnx import helper

    from qvggt_export.compare import tolerance_for

    def graph(path, metadata):  # what tolerance_for reads of a graph: its metadata
        y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
        model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["y0"], ["y"])], "g",
                                                    [helper.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, [1])],
                                                    [y]))
        for key, value in metadata.items():
            model.metadata_props.add(key=key, value=value)
        onnx.save(model, path)
        return path

    fp32_graph = graph(tmp_path / "fp32.onnx", {spec.META_SPEC: json.dumps({"dtype": "fp32"})})
    chosen = tolerance_for(fp32_graph, torch.nn.Linear(2, 2))
    assert chosen["rel_tol"] == spec.REL_TOL["fp32"] and chosen["source"] == "fp32.onnx: fp32 activations in its export spec"
    assert tolerance_for(fp32_graph, out / "model.qdq.onnx")["activations"] == "fp16"  # the less precise side
    unknown = tolerance_for(graph(tmp_path / "foreign.onnx", {}), torch.nn.Linear(2, 2))
    assert unknown["activations"] == "fp32" and "no export spec, fp32 assumed" in unknown["source"]

    # An engine: its sidecar says; an older sidecar: the graph beside it, if its hash is the one built from.
    from qvggt_export.io import sha256_file

    engine = tmp_path / "model.qdq.engine"
    engine.write_bytes(b"engine")
    sidecar = {"image_size": list(IMAGE_SIZE), "frames": [1, 2, 4], "backend": "tensorrt-rtx"}
    write_json(tmp_path / "model.qdq.engine.json", {**sidecar, "activations": "fp16"})
    assert tolerance_for(engine, torch.nn.Linear(2, 2))["source"] == "model.qdq.engine: fp16 activations in its sidecar"
    shutil.copy(out / "model.qdq.onnx", tmp_path / "model.qdq.onnx")
    write_json(tmp_path / "model.qdq.engine.json", {**sidecar, "onnx_sha256": sha256_file(out / "model.qdq.onnx")})
    assert tolerance_for(engine, torch.nn.Linear(2, 2))["activations"] == "fp16"
    write_json(tmp_path / "model.qdq.engine.json", {**sidecar, "onnx_sha256": "another graph"})
    assert tolerance_for(engine, torch.nn.Linear(2, 2))["activations"] == "fp32"
