"""VGGT checkpoints, full precision or quantized: the file format, finding, reading, writing and loading.

A source is a `.safetensors` / `.pt` file, a directory holding `model.safetensors` or `model.pt`
(and optionally `config.json`), an embedded model name (e.g. "vggt-tiny"), or a Hugging Face hub
id ("facebook/VGGT-1B", fetched with huggingface_hub when online).

Format: safetensors whose metadata holds the model config (`qvggt_config`) and the kind of
checkpoint (`qvggt_format`: "fp", or "quantized"; released files have no metadata and are "fp").
A quantized file holds the QuantLinear buffers (packed weights, scales, input scales), the CIC token
and, in its metadata, the plan, the method / calibration provenance and the shape of every quantized
layer, so that the model can be rebuilt before its state is loaded strictly.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .. import arch
from ..errors import CheckpointError
from ..io import save_safetensors
from ..log import logger
from ..quant.linear import QuantLinear
from .config import VGGTConfig
from .vggt import VGGT

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED = {"vggt-tiny": WEIGHTS_DIR / "vggt_tiny.safetensors"}
DEFAULT_MODEL = "vggt-tiny"
CHECKPOINT_NAMES = ("model.safetensors", "model.pt", "model.pth")

METADATA_CONFIG = "qvggt_config"
METADATA_FORMAT = "qvggt_format"
METADATA_PLAN = "qvggt_quant_plan"
METADATA_INFO = "qvggt_quant_info"
METADATA_LAYERS = "qvggt_quant_layers"
FORMAT_FP = "fp"
FORMAT_QUANTIZED = "quantized"


# ---------------------------------------------------------------------------------------- finding


def resolve_source(source: str | Path) -> Path:
    """Turns a user's checkpoint argument into a local file path."""
    text = str(source)
    if text in EMBEDDED:
        path = EMBEDDED[text]
        if not path.exists():
            raise CheckpointError(f"embedded model {text!r} is not in this install ({path} missing); "
                                  "train it with scripts/train_tiny.py or pass --checkpoint")
        return path
    path = Path(text).expanduser()
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds none of {', '.join(CHECKPOINT_NAMES)}")
    if path.is_file():
        return path
    if text.count("/") == 1 and not path.suffix and not text.startswith((".", "/")):
        return _download_from_hub(text)
    raise CheckpointError(f"checkpoint not found: {text}")


def _download_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise CheckpointError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed "
                              "(pip install 'qvggt-export[hub]'), or pass a local file") from None
    errors = []
    for name in CHECKPOINT_NAMES[:2]:
        try:
            return Path(hf_hub_download(repo_id, name))
        except Exception as exc:  # network, auth and missing-file errors all mean: try the next name
            errors.append(f"{name}: {type(exc).__name__}")
    raise CheckpointError(f"could not fetch {repo_id!r} from the hub ({'; '.join(errors)}); "
                          "offline? download the checkpoint elsewhere and pass its path")


# ---------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _open_safetensors(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from None


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a checkpoint file."""
    if path.suffix == ".safetensors":
        with _open_safetensors(path) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and unsafe-content errors all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return obj, {}


def read_checkpoint_metadata(path: Path) -> tuple[list[str], dict[str, str]]:
    """Tensor names and metadata of a safetensors file, without reading the tensors."""
    with _open_safetensors(path) as f:
        return list(f.keys()), f.metadata() or {}


def checkpoint_format(path: Path) -> str:
    """FORMAT_FP or FORMAT_QUANTIZED (only safetensors files carry a format; others are full precision)."""
    if path.suffix != ".safetensors":
        return FORMAT_FP
    return read_checkpoint_metadata(path)[1].get(METADATA_FORMAT, FORMAT_FP)


def config_for(path: Path, metadata: dict[str, str]) -> VGGTConfig:
    """The config in the metadata, else a config.json beside the file, else the VGGT-1B default."""
    if METADATA_CONFIG in metadata:
        return VGGTConfig(**json.loads(metadata[METADATA_CONFIG]))
    config_file = path.parent / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        return VGGTConfig(**data.get("config", data))
    return VGGTConfig()


# ---------------------------------------------------------------------------------------- writing


def _write(model: nn.Module, path: str | Path, metadata: dict[str, str]) -> Path:
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save_safetensors(state, path, metadata)


def save_vggt(model: VGGT, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Full-precision safetensors checkpoint with the config in its metadata, written atomically."""
    return _write(model, path, {METADATA_CONFIG: json.dumps(model.config.to_dict()), METADATA_FORMAT: FORMAT_FP,
                                **(extra_metadata or {})})


def save_quantized(model: nn.Module, path: str | Path) -> Path:
    """Quantized checkpoint of a model that `quant.quantizer.quantize_model` made, written atomically."""
    layers = {name: {"bits": m.bits, "group_size": m.group_size, "in_features": m.in_features,
                     "out_features": m.out_features, "bias": m.bias is not None,
                     "input_scale": m.input_scale is not None}
              for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    return _write(model, path, {
        METADATA_FORMAT: FORMAT_QUANTIZED, METADATA_CONFIG: json.dumps(model.config.to_dict()),
        METADATA_PLAN: json.dumps(model.quant_plan), METADATA_INFO: json.dumps(model.quant_info, default=str),
        METADATA_LAYERS: json.dumps(layers)})


# ---------------------------------------------------------------------------------------- loading


def load_vggt(source: str | Path, config: VGGTConfig | None = None) -> VGGT:
    """A full-precision checkpoint -> VGGT in eval mode (strict key matching, released key names)."""
    path = resolve_source(source)
    state, metadata = read_checkpoint(path)
    if metadata.get(METADATA_FORMAT, FORMAT_FP) != FORMAT_FP:
        raise CheckpointError(f"{path} is a {metadata[METADATA_FORMAT]} checkpoint; load it with load_model()")
    model = VGGT(config or config_for(path, metadata))
    try:
        model.load_state_dict(state, strict=True)
    except KeyError as exc:
        raise CheckpointError(f"{path} does not match the model config: {exc.args[0]}") from None
    except RuntimeError as exc:  # shape mismatches
        lines = [l.strip() for l in str(exc).splitlines() if "size mismatch" in l]
        detail = "; ".join(lines[:3]) or str(exc).splitlines()[0]
        raise CheckpointError(f"{path} does not match the model config: {detail}") from None
    logger.debug("loaded %s (%d parameters)", path, model.num_parameters())
    return model.eval()


def load_quantized(path: str | Path) -> VGGT:
    """A quantized checkpoint -> VGGT with its QuantLinear layers, CIC token, plan and provenance."""
    path = Path(path)
    state, metadata = read_checkpoint(path)
    if metadata.get(METADATA_FORMAT) != FORMAT_QUANTIZED:
        raise CheckpointError(f"{path} is not a quantized qvggt checkpoint")
    try:
        config = VGGTConfig(**json.loads(metadata[METADATA_CONFIG]))
        layers = json.loads(metadata[METADATA_LAYERS])
        plan, info = json.loads(metadata[METADATA_PLAN]), json.loads(metadata[METADATA_INFO])
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: quantized checkpoint metadata is missing or malformed ({exc})") from None
    model = VGGT(config)
    for name, layer in layers.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path}: quantized layer {name} does not exist in the model config") from None
        model.set_submodule(name, QuantLinear(layer["in_features"], layer["out_features"], layer["bits"],
                                              layer["group_size"], layer["bias"], layer["input_scale"], name))
    if arch.EXTRA_CAMERA_TOKENS_KEY in state:
        arch.set_extra_camera_tokens(model, torch.zeros_like(state[arch.EXTRA_CAMERA_TOKENS_KEY]))
    try:
        model.load_state_dict(state, strict=True)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match its own quantization metadata: "
                              f"{str(exc).splitlines()[0][:300]}") from None
    model.quant_plan, model.quant_info = plan, info
    return model.eval()


def load_model(source: str | Path | None = None, device: str = "cpu") -> VGGT:
    """Any checkpoint the CLI accepts (full precision or quantized) -> model in eval mode on `device`.

    None means the embedded default model. On CUDA, 4-bit layers run the W4A16 kernel.
    """
    path = resolve_source(DEFAULT_MODEL if source is None else source)
    model = load_quantized(path) if checkpoint_format(path) == FORMAT_QUANTIZED else load_vggt(path)
    model = model.to(device).eval()
    if torch.device(device).type == "cuda":
        use_gpu_kernels(model)
    return model


def use_gpu_kernels(model: nn.Module) -> int:
    """Runs every 4-bit QuantLinear through the W4A16 CUDA kernel; returns how many were swapped."""
    from ..kernels import is_available
    from ..kernels.linear import install_kernel_linears

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bits == 4]
    if names and not is_available():
        logger.warning("W4A16 CUDA kernel unavailable (nvcc or GPU missing): %d quantized linears run the "
                       "dequantize-then-matmul reference", len(names))
        return 0
    install_kernel_linears(model, names)
    logger.info("W4A16 CUDA kernel runs %d quantized linears", len(names))
    return len(names)
