"""VGGT written here, module for module as released, so released checkpoints load strictly; and its
checkpoints (full precision or quantized, model.checkpoint)."""

from .checkpoint import DEFAULT_MODEL, load_model, load_quantized, load_vggt, save_quantized, save_vggt
from .config import VGGTConfig
from .vggt import VGGT

__all__ = ["VGGT", "VGGTConfig", "load_model", "load_quantized", "load_vggt", "save_quantized", "save_vggt",
           "DEFAULT_MODEL"]
