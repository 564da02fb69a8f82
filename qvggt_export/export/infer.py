"""`qvggt-export infer`: a deployed model (.onnx in ONNX Runtime, .engine in TensorRT / TensorRT-RTX) on
one scene's views, with `predict`'s preprocessing and outputs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import InputError, QVGGTError
from ..io import resource_error
from ..log import logger
from ..visualize import ReconstructionOutputs
from . import spec


def _check_size(images: np.ndarray, image_size, frames: tuple[int, int] | None, model: Path) -> None:
    if tuple(images.shape[-2:]) != tuple(image_size):
        raise InputError(f"images preprocess to {images.shape[-2]}x{images.shape[-1]}, but {model.name} is fixed "
                         f"to {image_size[0]}x{image_size[1]} (drop --image-size, or export the model with "
                         f"--image-size {images.shape[-2]}x{images.shape[-1]})")
    if frames and not frames[0] <= images.shape[0] <= frames[1]:
        raise InputError(f"{model.name} takes {frames[0]}..{frames[1]} views, got {images.shape[0]}")


def recorded_size(model: Path) -> tuple[int, int] | None:
    """The fixed (H, W) an exported .onnx (its metadata, else its input shape) or a built .engine (its
    sidecar) takes."""
    from .engine import read_sidecar
    from .onnx_io import load_onnx, recorded_export_spec

    if model.suffix == ".engine":
        return tuple(read_sidecar(model)["image_size"])
    onnx_model = load_onnx(model, load_external_data=False)
    export = recorded_export_spec(onnx_model)
    if "image_size" in export:
        return tuple(export["image_size"])
    dims = [d.dim_value for d in onnx_model.graph.input[0].type.tensor_type.shape.dim[-2:]]
    return tuple(dims) if len(dims) == 2 and all(dims) else None


def run_onnx(path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    from .lower import lower
    from .onnx_io import load_onnx, recorded_export_spec
    from .runtime import has_custom_nodes, ort_session

    export = recorded_export_spec(load_onnx(path, load_external_data=False))
    if "image_size" in export:
        _check_size(images, export["image_size"], (export["min_frames"], export["max_frames"]), path)
    from onnxruntime.capi.onnxruntime_pybind11_state import RuntimeException

    session = ort_session(lower(load_onnx(path), "ort") if has_custom_nodes(path) else path)
    try:
        outs = session.run(list(spec.OUTPUT_NAMES), {spec.INPUT_NAME: images[None].astype(np.float32)})
    except (RuntimeException, MemoryError) as exc:  # ONNX Runtime's allocation failures: one line
        error = resource_error(exc, f"running {images.shape[0]} views of {images.shape[-2]}x{images.shape[-1]} "
                                    f"through {path.name}")
        if error is None:
            raise
        raise error from None
    return dict(zip(spec.OUTPUT_NAMES, outs))


def run_engine(path: Path, images: np.ndarray, plugin_library: str | None = None) -> dict[str, np.ndarray]:
    """TensorRT / TensorRT-RTX Python runtime on CUDA memory owned by torch."""
    import torch

    from .engine import import_backend, read_sidecar, register_plugins

    info = read_sidecar(path)
    _check_size(images, info["image_size"], (info["frames"][0], info["frames"][2]), path)
    trt = import_backend(info["backend"])
    if info.get("plugin"):
        register_plugins(trt, plugin_library)
    if not torch.cuda.is_available():
        raise QVGGTError(f"{path.name} is a TensorRT engine and needs a CUDA GPU; run the .onnx here instead")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise InputError(f"{path} cannot be deserialized by {info['backend']} {trt.__version__} on this GPU")
    context = engine.create_execution_context()
    x = torch.from_numpy(images[None].astype(np.float32)).cuda()
    context.set_input_shape(spec.INPUT_NAME, tuple(x.shape))
    context.set_tensor_address(spec.INPUT_NAME, x.data_ptr())
    outputs = {}
    for name in spec.OUTPUT_NAMES:
        shape = tuple(context.get_tensor_shape(name))
        outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
        context.set_tensor_address(name, outputs[name].data_ptr())
    stream = torch.cuda.current_stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise QVGGTError(f"{info['backend']} failed to run {path}")
    stream.synchronize()
    return {k: v.cpu().numpy() for k, v in outputs.items()}


def infer(model: str | Path, image_paths, out: str | Path, mode: str = "crop",
          plugin_library: str | None = None, image_size: tuple[int, int] | None = None,
          reconstruction: ReconstructionOutputs | None = None) -> dict[str, np.ndarray]:
    """Views preprocessed to the model's recorded input size (`image_size` overrides it), as `predict`
    does for a checkpoint's native size; `reconstruction`: also a PLY / GLB of the scene."""
    from ..data.images import load_and_preprocess_images
    from ..inference import graph_predictions
    from ..predict import save_predictions

    model = Path(model)
    if model.suffix not in (".onnx", ".engine"):
        raise InputError(f"{model}: expected an .onnx or .engine file")
    if not model.is_file():
        raise InputError(f"model not found: {model}")
    if Path(out).suffix != ".npz":
        raise InputError(f"output must be an .npz file, got {out}")
    reconstruction = reconstruction or ReconstructionOutputs()
    reconstruction.check()
    images = load_and_preprocess_images([str(p) for p in image_paths], mode=mode,
                                        size=image_size or recorded_size(model)).numpy()
    start = time.perf_counter()
    raw = run_onnx(model, images) if model.suffix == ".onnx" else run_engine(model, images, plugin_library)
    logger.info("%d views of %dx%d through %s in %.2f s", images.shape[0], images.shape[-2], images.shape[-1],
                model.name, time.perf_counter() - start)
    preds = graph_predictions(raw)  # batch dim removed, cameras decoded, as `predict`
    save_predictions(out, preds)
    reconstruction.write(preds, images)
    return preds
