"""One engine builder for standard TensorRT (`tensorrt`: Jetson, datacenter GPUs, built on the target)
and TensorRT for RTX (`tensorrt_rtx`: same API, desktop RTX GPUs, builds ahead of time even on a CPU).

Both are optional and imported lazily; a missing one is a one-line error naming what to install.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, QVGGTError
from ..io import atomic_output, discard_cache, make_dirs, remove_empty_dirs, sha256_file, write_json
from ..log import logger

MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
INSTALL_HINTS = {
    "tensorrt": "standard TensorRT is not installed: on a Jetson use JetPack's python3-libnvinfer, on a GPU "
                "machine `pip install 'qvggt-export[tensorrt]'`; or pass --backend tensorrt-rtx",
    "tensorrt-rtx": "TensorRT for RTX is not installed: `pip install 'qvggt-export[rtx]'`",
}
# TensorRT-RTX engines run on these GPUs (compute capability); building on a CPU needs them named.
RTX_COMPUTE_CAPABILITIES = ("SM80", "SM86", "SM89", "SM120")


class BackendMissing(QVGGTError):
    pass


def import_backend(backend: str):
    if backend not in MODULES:
        raise QVGGTError(f"unknown backend {backend!r}; choose one of {', '.join(MODULES)}")
    try:
        return importlib.import_module(MODULES[backend])
    except ImportError:
        raise BackendMissing(INSTALL_HINTS[backend]) from None


def default_backend() -> str | None:
    """Whichever TensorRT imports, standard first (it is what runs on Jetson and datacenter GPUs)."""
    for backend in MODULES:
        try:
            import_backend(backend)
            return backend
        except BackendMissing:
            continue
    return None


def register_plugins(trt, library: str | Path | None = None) -> None:
    """The W4A16MatMul plugin creator (needed only by engines of the `plugin` lowering): from the C++
    plugin library (plugins/, `libqvggt_plugins.so`) when given, else the Python plugin."""
    try:
        from . import trt_plugin
    except ImportError as exc:
        raise QVGGTError(f"the W4A16 TensorRT plugin is not available in this install ({exc})") from None
    if library is None:
        trt_plugin.register_plugin(trt)
        return
    if not Path(library).is_file():
        raise QVGGTError(f"plugin library not found: {library} (build it from plugins/ with CMake)")
    if trt.__name__ == "tensorrt_rtx":
        # The same parser trap as for the Python plugin: without it any plugin node aborts the process.
        trt_plugin.ensure_rtx_parser_can_load_runtime()
    if not trt.get_plugin_registry().load_library(str(library)):
        raise QVGGTError(f"{trt.__name__} could not load {library} (see the log above; its CUDA runtime and "
                         "cuBLAS libraries must be loadable)")


@dataclass
class EngineConfig:
    backend: str = "tensorrt-rtx"
    min_frames: int | None = None  # None: from the model's export spec
    opt_frames: int | None = None
    max_frames: int | None = None
    timing_cache: str | None = None
    workspace_gib: float = 4.0
    plugin_library: str | None = None  # C++ plugin (.so); None: the Python plugin


def _frames(onnx_path: Path, config: EngineConfig) -> tuple[tuple[int, int, int], tuple[int, int], str | None]:
    """The profile's frame counts, the input size and the activation dtype (None: not recorded)."""
    from .onnx_io import load_onnx, recorded_export_spec

    model = load_onnx(onnx_path, load_external_data=False)
    export = recorded_export_spec(model)
    frames = (config.min_frames or export.get("min_frames", 1), config.opt_frames or export.get("opt_frames", 4),
              config.max_frames or export.get("max_frames", 32))
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    image_size = tuple(export.get("image_size", dims[-2:]))
    return frames, image_size, export.get("dtype")


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(f"{engine_path}.json")


def read_sidecar(engine_path: str | Path) -> dict:
    """The sidecar `build_engine` writes beside an engine; a one-line error when it is missing or damaged."""
    sidecar = sidecar_path(engine_path)
    if not sidecar.is_file():
        raise InputError(f"{engine_path}: missing {sidecar.name} (engines built by `qvggt-export engine` have one)")
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{sidecar} is damaged ({type(exc).__name__}); rebuild the engine") from None
    if not isinstance(info, dict) or not {"image_size", "frames", "backend"} <= set(info):
        raise InputError(f"{sidecar} is damaged (not an engine sidecar); rebuild the engine")
    return info


def _timing_cache(builder_config, path: Path):
    """The timing cache at `path` (empty when there is none); a damaged one is discarded with one warning."""
    data = path.read_bytes() if path.is_file() else b""
    try:
        cache = builder_config.create_timing_cache(data)
    except (RuntimeError, TypeError, ValueError) as exc:  # what the bindings raise for bytes they reject
        cache = None
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
    else:
        reason = "rejected by TensorRT"
    if cache is None and data:
        discard_cache(path, reason)
        cache = builder_config.create_timing_cache(b"")
    return cache


def build_engine(onnx_path: str | Path, engine_path: str | Path, config: EngineConfig = EngineConfig()) -> dict:
    """Parses the ONNX (every node must parse), builds a serialized engine with an optimization profile
    over the frame axis, writes it atomically; returns a summary."""
    trt = import_backend(config.backend)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    created = make_dirs(engine_path.parent)  # fail before a build that can take minutes
    try:
        return _build(trt, onnx_path, engine_path, config)
    except Exception:
        remove_empty_dirs(created)  # a failed build leaves no folder it made
        raise


def _build(trt, onnx_path: Path, engine_path: Path, config: EngineConfig) -> dict:
    from .runtime import has_custom_nodes

    if has_custom_nodes(onnx_path):
        register_plugins(trt, config.plugin_library)
    (s_min, s_opt, s_max), (h, w), activations = _frames(onnx_path, config)
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    # Strongly typed for both backends: every tensor keeps its ONNX type (fp16 activations, the INT8
    # plugin weight, INT4 DequantizeLinear), where a weakly typed network may pick other precisions or
    # refuse the INT8 weight constant. TensorRT-RTX networks are always strongly typed.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    start = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)).splitlines()[0] for i in range(min(parser.num_errors, 3)))
        raise QVGGTError(f"{config.backend} cannot parse {onnx_path}: {errors}")
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(config.workspace_gib * (1 << 30)))
    if config.backend == "tensorrt-rtx":
        # Ahead-of-time build (works without a GPU): name the GPU generations the engine targets.
        caps = [getattr(trt.ComputeCapability, c) for c in RTX_COMPUTE_CAPABILITIES if hasattr(trt.ComputeCapability, c)]
        builder_config.num_compute_capabilities = len(caps)
        for i, cap in enumerate(caps):
            builder_config.set_compute_capability(cap, i)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, (1, s_min, 3, h, w), (1, s_opt, 3, h, w), (1, s_max, 3, h, w))
    builder_config.add_optimization_profile(profile)
    # TensorRT-RTX picks kernels at runtime (its timing cache calls are no-ops): only standard TensorRT
    # gets one.
    cache_path = Path(config.timing_cache) if config.timing_cache and config.backend == "tensorrt" else None
    if cache_path:
        builder_config.set_timing_cache(_timing_cache(builder_config, cache_path), ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise QVGGTError(f"{config.backend} failed to build an engine from {onnx_path} (see the log above)")
    engine_bytes = bytes(serialized)
    info = {"engine": str(engine_path), "backend": config.backend, "backend_version": trt.__version__,
            "bytes": len(engine_bytes), "layers_parsed": network.num_layers, "frames": [s_min, s_opt, s_max],
            "image_size": [h, w], "activations": activations, "plugin": has_custom_nodes(onnx_path),
            "strongly_typed": True, "onnx_sha256": sha256_file(onnx_path), "seconds": round(time.perf_counter() - start, 2)}
    # The sidecar tells `infer` and `compare` the engine's input size, activations and whether it needs the
    # plugin. Engine and sidecar go together: a sidecar that cannot be written (a full disk) takes the new
    # engine and the old sidecar with it; an engine that cannot be written leaves the old pair as it was.
    with atomic_output(engine_path) as tmp:
        tmp.write_bytes(engine_bytes)
    try:
        write_json(sidecar_path(engine_path), info)
    except QVGGTError:
        for path in (engine_path, sidecar_path(engine_path)):
            path.unlink(missing_ok=True)
        raise
    if cache_path:
        with atomic_output(cache_path) as tmp:
            tmp.write_bytes(bytes(builder_config.get_timing_cache().serialize()))
    logger.info("built %s with %s (%d network layers, %.1f MB) in %.1f s", engine_path, config.backend,
                network.num_layers, info["bytes"] / 1e6, info["seconds"])
    return info
