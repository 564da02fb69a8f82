"""The CUDA sources compile for Jetson Orin (sm_87) and H100 (sm_90); no GPU is needed or used."""

import shutil
import subprocess
from pathlib import Path

import pytest

from qvggt_export.kernels.binding import PLUGIN_SOURCE_DIR, build_library, find_nvcc, open_library, workspace_bytes
from qvggt_export.kernels.layout import KERNEL_LAYOUT

from plugin_build import TENSORRT_HEADERS, build_plugin, missing_tools

ARCHS = [87, 90]
VGGT_SHAPES = [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024),
               (2048, 6144), (2048, 2048), (2048, 8192), (8192, 2048)]

pytestmark = pytest.mark.skipif(find_nvcc() is None, reason="nvcc (the CUDA toolkit) is not installed")


@pytest.fixture(scope="module")
def kernel_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels")


def test_kernel_library_builds_for_sm87_and_sm90_and_agrees_with_the_python_side(kernel_cache):
    library = build_library(ARCHS, output_dir=kernel_cache)
    assert library.is_file()

    cuobjdump = Path(find_nvcc()).with_name("cuobjdump")
    if cuobjdump.is_file():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(library)], capture_output=True, text=True).stdout
        assert all(f"sm_{arch}" in listing for arch in ARCHS), listing

    # the CUDA runtime is linked statically: the library loads and its host functions run without a GPU
    lib = open_library(library)
    assert lib.qvggt_w4a16_kernel_layout().decode() == KERNEL_LAYOUT
    for k, n in VGGT_SHAPES:
        assert lib.qvggt_w4a16_workspace_bytes(n, k) == workspace_bytes(n, k)
    assert lib.qvggt_w4a16_use_fused(1, 1024, 1024) == 1
    assert lib.qvggt_w4a16_use_fused(43968, 1024, 1024) == 0

    rebuilt = build_library(ARCHS, output_dir=kernel_cache)
    assert rebuilt == library  # cached by source hash


# TensorRT of JetPack 6 (Jetson Orin) and the newest; 10.13 is measured by hand (docs/deploy.md).
TENSORRT_VERSIONS = ["10.3", "11.1"]


@pytest.mark.slow  # ~15 s per version on 2 busy cores
@pytest.mark.parametrize("version", TENSORRT_VERSIONS)
def test_cpp_plugin_compiles_links_and_runs_its_interfaces_against_tensorrt_headers(version, tmp_path_factory):
    reason = missing_tools(version)
    if reason:
        pytest.skip(reason=reason)
    build_dir = tmp_path_factory.mktemp(f"plugin-trt{version}")
    library = build_plugin(version, build_dir)
    # Linked for real: every symbol resolves against its libraries (cudart, cuBLAS, libstdc++) except
    # the TensorRT entry point that the process loading a plugin provides.
    relocations = subprocess.run(["ldd", "-r", str(library)], capture_output=True, text=True)
    assert "not found" not in relocations.stdout, relocations.stdout
    unresolved = sorted(line.split()[2] for line in (relocations.stdout + relocations.stderr).splitlines()
                        if line.startswith("undefined symbol:"))
    assert unresolved == ["getPluginRegistry"], relocations.stdout + relocations.stderr
    # The plugin's TensorRT interfaces, driven by a small C++ program compiled against the same headers.
    harness = build_dir / "plugin_harness"
    # nvcc as the driver: it adds the CUDA include folder that NvInferRuntimeBase.h needs.
    compile_harness = subprocess.run(
        [find_nvcc(), "-std=c++17", "-isystem", str(TENSORRT_HEADERS / version / "include"), f"-I{PLUGIN_SOURCE_DIR}",
         str(Path(__file__).with_name("plugin_harness.cpp")), "-o", str(harness), f"-L{build_dir}", "-lqvggt_plugins",
         "-Xlinker", f"-rpath,{build_dir}", "-Xlinker", "--allow-shlib-undefined"], capture_output=True, text=True)
    assert compile_harness.returncode == 0, compile_harness.stderr[-4000:]
    run = subprocess.run([str(harness)], capture_output=True, text=True)
    assert run.returncode == 0 and "harness passed" in run.stdout, run.stdout + run.stderr


@pytest.mark.slow  # 20-25 s on 2 busy cores
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_builds_the_kernel_library_without_tensorrt(tmp_path):
    configure = subprocess.run(["cmake", "-S", str(PLUGIN_SOURCE_DIR), "-B", str(tmp_path),
                                f"-DCMAKE_CUDA_COMPILER={find_nvcc()}", "-DCMAKE_CUDA_ARCHITECTURES=87;90",
                                "-DTENSORRT_ROOT=", "-DTENSORRT_INCLUDE_DIR=", "-DTENSORRT_LIBRARY="],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path), "--target", "qvggt_w4a16", "-j", "2"],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    lib = open_library(tmp_path / "libqvggt_w4a16.so")
    assert lib.qvggt_w4a16_workspace_bytes(2048, 8192) == workspace_bytes(2048, 8192)
