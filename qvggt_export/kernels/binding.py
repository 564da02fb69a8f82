"""PyTorch binding of the W4A16 kernel (plugins/w4a16_gemm.cu) through ctypes.

The shared library is compiled with nvcc on first use, for the GPU in use, and cached by the hash of
the sources and the target architectures (QVGGT_KERNEL_CACHE, default ~/.cache/qvggt_export/kernels).
QVGGT_W4A16_LIBRARY may point to a prebuilt library instead (e.g. the CMake target qvggt_w4a16).
The library links the CUDA runtime statically, so it loads without a GPU; only its launches need one.
It calls the same C functions as the TensorRT C++ plugin; the large-M GEMM after the dequantization
kernel is torch.addmm (cuBLAS) here, cublasGemmEx there.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from qvggt_export.errors import QVGGTError
from qvggt_export.kernels.layout import KERNEL_LAYOUT, TILE_N, check_kernel_shape, kernel_weight_shape
from qvggt_export.log import logger
from qvggt_export.quant.pack import GROUP_SIZE

PLUGIN_SOURCE_DIR = Path(__file__).resolve().parents[2] / "plugins"
KERNEL_SOURCES = ("w4a16_gemm.cu", "w4a16_gemm.cuh")
MIN_ARCH = 80  # mma.sync m16n8k16, cp.async, ldmatrix
PATHS = ("auto", "fused", "dequant")


def workspace_bytes(n: int, k: int) -> int:
    """Scratch one call needs (qvggt_w4a16_workspace_bytes): the dequantized fp16 weight."""
    return n * k * 2


# ------------------------------------------------------------------------------------------------
# Building


def find_nvcc() -> str | None:
    for candidate in (shutil.which("nvcc"), os.environ.get("CUDA_HOME") and f"{os.environ['CUDA_HOME']}/bin/nvcc",
                      "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def nvcc_command(nvcc: str, source: Path, output: Path, archs: list[int]) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart", "static",
            *gencode, "-o", str(output), str(source)]


def _source_digest(nvcc: str, archs: list[int]) -> str:
    digest = hashlib.sha256()
    for name in KERNEL_SOURCES:
        digest.update((PLUGIN_SOURCE_DIR / name).read_bytes())
    digest.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
    digest.update(",".join(map(str, archs)).encode())
    return digest.hexdigest()[:16]


def build_library(archs: list[int], output_dir: Path | None = None) -> Path:
    """Compile the kernel into a shared library for the given SM architectures (e.g. [87, 90])."""
    if not (PLUGIN_SOURCE_DIR / KERNEL_SOURCES[0]).is_file():
        raise QVGGTError(f"kernel sources not found in {PLUGIN_SOURCE_DIR}: install qvggt-export from a "
                         "source checkout (pip install -e .) or set QVGGT_W4A16_LIBRARY to a prebuilt library")
    nvcc = find_nvcc()
    if nvcc is None:
        raise QVGGTError("nvcc not found: install the CUDA toolkit (or set CUDA_HOME), "
                         "or set QVGGT_W4A16_LIBRARY to a prebuilt libqvggt_w4a16.so")
    cache = output_dir or Path(os.environ.get("QVGGT_KERNEL_CACHE", Path.home() / ".cache/qvggt_export/kernels"))
    cache.mkdir(parents=True, exist_ok=True)
    library = cache / f"libqvggt_w4a16_{_source_digest(nvcc, archs)}.so"
    if library.is_file():
        return library
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        partial = Path(scratch) / library.name
        command = nvcc_command(nvcc, PLUGIN_SOURCE_DIR / KERNEL_SOURCES[0], partial, archs)
        logger.info("compiling the W4A16 kernel for sm_%s", ",".join(map(str, archs)))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise QVGGTError(f"nvcc failed to compile the W4A16 kernel: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(partial, library)  # atomic: concurrent builders end with the same file
    return library


# ------------------------------------------------------------------------------------------------
# Loading


def open_library(path: Path) -> ctypes.CDLL:
    """Load a built library and declare its C interface; checks it was built for our layout."""
    lib = ctypes.CDLL(str(path))
    p, size, i32 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int
    lib.qvggt_w4a16_kernel_layout.restype = ctypes.c_char_p
    lib.qvggt_w4a16_kernel_layout.argtypes = []
    lib.qvggt_w4a16_workspace_bytes.restype = size
    lib.qvggt_w4a16_workspace_bytes.argtypes = [i32, i32]
    lib.qvggt_w4a16_use_fused.restype = i32
    lib.qvggt_w4a16_use_fused.argtypes = [i32, i32, i32]
    lib.qvggt_w4a16_fused.restype = i32
    lib.qvggt_w4a16_fused.argtypes = [p, p, p, p, p, i32, i32, i32, p, size, p]
    lib.qvggt_w4a16_dequantize.restype = i32
    lib.qvggt_w4a16_dequantize.argtypes = [p, p, p, i32, i32, p]
    lib.qvggt_w4a16_fill_bias.restype = i32
    lib.qvggt_w4a16_fill_bias.argtypes = [p, p, i32, i32, p]
    lib.qvggt_w4a16_error_string.restype = ctypes.c_char_p
    lib.qvggt_w4a16_error_string.argtypes = [i32]
    built_for = lib.qvggt_w4a16_kernel_layout().decode()
    if built_for != KERNEL_LAYOUT:
        raise QVGGTError(f"{path} implements layout {built_for!r}, this package packs {KERNEL_LAYOUT!r}: rebuild it")
    return lib


@functools.cache
def load_library() -> ctypes.CDLL:
    """The kernel library for the current GPU (built on first call)."""
    prebuilt = os.environ.get("QVGGT_W4A16_LIBRARY")
    if prebuilt:
        return open_library(Path(prebuilt))
    if not torch.cuda.is_available():
        raise QVGGTError("the W4A16 kernel needs a CUDA GPU and a CUDA build of PyTorch "
                         "(torch.cuda.is_available() is False)")
    major, minor = torch.cuda.get_device_capability()
    arch = 10 * major + minor
    if arch < MIN_ARCH:
        raise QVGGTError(f"the W4A16 kernel needs compute capability 8.0 or newer, this GPU is {major}.{minor}")
    return open_library(build_library([arch]))


def is_available() -> bool:
    """True where the kernel can run: a CUDA GPU (sm_80+) and a loadable or buildable library."""
    if not torch.cuda.is_available():
        return False
    try:
        load_library()
    except QVGGTError as error:
        logger.debug("W4A16 kernel unavailable: %s", error)
        return False
    return True


# ------------------------------------------------------------------------------------------------
# Calls


def _check(status: int, what: str) -> None:
    if status != 0:
        raise QVGGTError(f"W4A16 {what} failed: {load_library().qvggt_w4a16_error_string(status).decode()}")


def _expect(tensor: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple[int, ...], device: torch.device) -> None:
    if tensor.dtype != dtype or tuple(tensor.shape) != shape or tensor.device != device or not tensor.is_contiguous():
        raise QVGGTError(f"{name}: expected a contiguous {dtype} {shape} tensor on {device}, "
                         f"got {tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def dequantize(weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """kernel_v1 weight -> fp16 [N, K] on the GPU (the large-M path's dequantization kernel)."""
    n, k = weight.shape[0] * TILE_N, weight.shape[1] * GROUP_SIZE
    check_kernel_shape(n, k)
    device = weight.device
    _expect(weight, "weight", torch.int8, kernel_weight_shape(n, k), device)
    _expect(scales, "scales", torch.float16, (k // GROUP_SIZE, n), device)
    out = torch.empty(n, k, dtype=torch.float16, device=device) if out is None else out
    _expect(out, "out", torch.float16, (n, k), device)
    with torch.cuda.device(device):
        _check(load_library().qvggt_w4a16_dequantize(weight.data_ptr(), scales.data_ptr(), out.data_ptr(), n, k,
                                                       _stream(device)), "dequantize")
    return out


def w4a16_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 *, out: torch.Tensor | None = None, workspace: torch.Tensor | None = None,
                 path: str = "auto") -> torch.Tensor:
    """Y [M, N] = X [M, K] · dequant(W)ᵀ (+ bias), fp16 on the GPU; W, scales in kernel_v1.

    `out` and `workspace` (uint8, at least workspace_bytes(N, K)) let a caller such as the TensorRT
    plugin supply its own buffers; `path` forces "fused" or "dequant" (for measurements).
    """
    if path not in PATHS:
        raise QVGGTError(f"path must be one of {PATHS}, got {path!r}")
    if x.dim() != 2:
        raise QVGGTError(f"x: expected [M, K], got shape {tuple(x.shape)}")
    m, k = x.shape
    n = weight.shape[0] * TILE_N
    check_kernel_shape(n, k)
    device = x.device
    if device.type != "cuda":
        raise QVGGTError(f"w4a16_matmul runs on CUDA tensors, x is on {device}")
    _expect(x, "x", torch.float16, (m, k), device)
    _expect(weight, "weight", torch.int8, kernel_weight_shape(n, k), device)
    _expect(scales, "scales", torch.float16, (k // GROUP_SIZE, n), device)
    if bias is not None:
        _expect(bias, "bias", torch.float16, (n,), device)
    out = torch.empty(m, n, dtype=torch.float16, device=device) if out is None else out
    _expect(out, "out", torch.float16, (m, n), device)
    scratch = workspace_bytes(n, k)
    if workspace is None:
        workspace = torch.empty(scratch, dtype=torch.uint8, device=device)
    elif workspace.dtype != torch.uint8 or workspace.numel() < scratch or workspace.device != device:
        raise QVGGTError(f"workspace: expected uint8 with at least {scratch} bytes on {device}")

    lib = load_library()
    with torch.cuda.device(device):
        fused = lib.qvggt_w4a16_use_fused(m, n, k) == 1 if path == "auto" else path == "fused"
        if fused:
            _check(lib.qvggt_w4a16_fused(x.data_ptr(), weight.data_ptr(), scales.data_ptr(),
                                         None if bias is None else bias.data_ptr(), out.data_ptr(), m, n, k,
                                         workspace.data_ptr(), scratch, _stream(device)), "fused GEMM")
        else:
            weight_fp16 = dequantize(weight, scales, out=workspace[:scratch].view(torch.float16).view(n, k))
            if bias is None:
                torch.mm(x, weight_fp16.t(), out=out)
            else:
                torch.addmm(bias, x, weight_fp16.t(), out=out)
    return out
