"""Builds the C++ TensorRT plugin (plugins/, CMake) against the TensorRT headers in ../shared/third_party
and the cuBLAS of the nvidia-cublas-cu12 wheel (.ci/run unpacks it into build/third_party); nothing is
downloaded here. Used by the compile test and the TensorRT-RTX load test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from qvggt_export.kernels.binding import PLUGIN_SOURCE_DIR, find_nvcc

ROOT = Path(__file__).parents[1]
TENSORRT_HEADERS = Path(os.environ.get("QVGGT_TENSORRT_HEADERS", ROOT.parent / "shared" / "third_party" / "tensorrt"))
CUBLAS_ROOT = Path(os.environ.get("CUBLAS_ROOT", ROOT / "build" / "third_party" / "cublas-wheel" / "nvidia" / "cublas"))
ARCH = "87"  # one architecture keeps the kernel compile short; the kernel test covers 87 and 90

_built: dict[str, Path] = {}


def missing_tools(version: str) -> str | None:
    """Why the plugin cannot be built here, or None."""
    if find_nvcc() is None or shutil.which("cmake") is None or shutil.which("g++") is None:
        return "nvcc, cmake or g++ is not installed"
    if not (TENSORRT_HEADERS / version / "include" / "NvInferRuntime.h").is_file():
        return f"no TensorRT {version} headers in {TENSORRT_HEADERS}"
    if not (CUBLAS_ROOT / "include" / "cublas_v2.h").is_file():
        return f"no cuBLAS headers in {CUBLAS_ROOT} (.ci/run unpacks the nvidia-cublas-cu12 wheel there)"
    return None


def build_plugin(version: str, build_dir: Path) -> Path:
    """libqvggt_plugins.so for TensorRT `version`'s headers (once per test session); raises with the
    compiler's output on any configure, compile or link error."""
    if version in _built:
        return _built[version]
    steps = [["cmake", "-S", str(PLUGIN_SOURCE_DIR), "-B", str(build_dir), f"-DCMAKE_CUDA_COMPILER={find_nvcc()}",
              f"-DCMAKE_CUDA_ARCHITECTURES={ARCH}", f"-DTENSORRT_ROOT={TENSORRT_HEADERS / version}",
              f"-DCUBLAS_ROOT={CUBLAS_ROOT}"],
             ["cmake", "--build", str(build_dir), "--target", "qvggt_plugins", "-j", "2"]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(step[:2])} failed for TensorRT {version}:\n"
                                 f"{(result.stdout + result.stderr)[-4000:]}")
    _built[version] = build_dir / "libqvggt_plugins.so"
    return _built[version]
