"""Checkpoint resolution, reading and writing for VGGT models.

A source is a `.safetensors` / `.pt` file, a directory holding `model.safetensors` or `model.pt`
(and optionally `config.json`), an embedded model name (e.g. "vggt-tiny"), or a Hugging Face hub
id ("facebook/VGGT-1B", fetched with huggingface_hub when online).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..io import atomic_output
from ..log import logger
from .config import VGGTConfig
from .vggt import VGGT

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
EMBEDDED = {"vggt-tiny": WEIGHTS_DIR / "vggt_tiny.safetensors"}
DEFAULT_MODEL = "vggt-tiny"
CHECKPOINT_NAMES = ("model.safetensors", "model.pt", "model.pth")
METADATA_CONFIG = "qvggt_config"
METADATA_FORMAT = "qvggt_format"


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


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and (safetensors) metadata of a checkpoint file."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                return {k: f.get_tensor(k) for k in f.keys()}, metadata
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from None
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


def config_for(path: Path, metadata: dict[str, str]) -> VGGTConfig:
    if METADATA_CONFIG in metadata:
        return VGGTConfig(**json.loads(metadata[METADATA_CONFIG]))
    config_file = path.parent / "config.json"
    if config_file.is_file():
        data = json.loads(config_file.read_text())
        return VGGTConfig(**data.get("config", data))
    return VGGTConfig()


def build_from_state_dict(state: dict[str, torch.Tensor], cfg: VGGTConfig, origin: str) -> VGGT:
    model = VGGT(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except KeyError as exc:
        raise CheckpointError(f"{origin} does not match the model config: {exc.args[0]}") from None
    except RuntimeError as exc:  # shape mismatches
        lines = [l.strip() for l in str(exc).splitlines() if "size mismatch" in l]
        detail = "; ".join(lines[:3]) or str(exc).splitlines()[0]
        raise CheckpointError(f"{origin} does not match the model config: {detail}") from None
    return model.eval()


def load_vggt(source: str | Path, config: VGGTConfig | None = None) -> VGGT:
    path = resolve_source(source)
    state, metadata = read_checkpoint(path)
    if metadata.get(METADATA_FORMAT, "fp") != "fp":
        raise CheckpointError(f"{path} is a {metadata[METADATA_FORMAT]} checkpoint; load it with load_model()")
    cfg = config or config_for(path, metadata)
    model = build_from_state_dict(state, cfg, str(path))
    logger.debug("loaded %s (%d parameters)", path, model.num_parameters())
    return model


def load_model(source: str | Path | None = None, device: str = "cpu") -> torch.nn.Module:
    """Any checkpoint the CLI accepts (full precision or quantized) -> model in eval mode on `device`.

    None means the embedded default model.
    """
    path = resolve_source(DEFAULT_MODEL if source is None else source)
    metadata = {}
    if path.suffix == ".safetensors":
        _, metadata = read_checkpoint_metadata(path)
    if metadata.get(METADATA_FORMAT, "fp") == "quantized":
        from ..quant.checkpoint import load_quantized

        model = load_quantized(path)
    else:
        model = load_vggt(path)
    model = model.to(device).eval()
    if torch.device(device).type == "cuda":
        use_gpu_kernels(model)
    return model


def use_gpu_kernels(model: torch.nn.Module) -> int:
    """Runs every 4-bit QuantLinear through the W4A16 CUDA kernel; returns how many were swapped."""
    from ..kernels import is_available
    from ..kernels.linear import install_kernel_linears
    from ..quant.linear import QuantLinear

    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.bits == 4]
    if names and not is_available():
        logger.warning("W4A16 CUDA kernel unavailable (nvcc or GPU missing): %d quantized linears run the "
                       "dequantize-then-matmul reference", len(names))
        return 0
    install_kernel_linears(model, names)
    logger.info("W4A16 CUDA kernel runs %d quantized linears", len(names))
    return len(names)


def read_checkpoint_metadata(path: Path) -> tuple[list[str], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors checkpoint ({exc})") from None


def save_vggt(model: VGGT, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Full-precision safetensors checkpoint with the config in its metadata, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    metadata = {METADATA_CONFIG: json.dumps(model.config.to_dict()), METADATA_FORMAT: "fp",
                **(extra_metadata or {})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path
