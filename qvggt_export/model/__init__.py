"""VGGT written here, module for module as released, so released checkpoints load strictly."""

from .config import VGGTConfig
from .loading import DEFAULT_MODEL, load_model, load_vggt, save_vggt
from .vggt import VGGT

__all__ = ["VGGT", "VGGTConfig", "load_model", "load_vggt", "save_vggt", "DEFAULT_MODEL"]
