"""The export spec (the VGGT facts come from arch.py, the one place that knows VGGT) and the user's export
options, as one flat description (optimum's OnnxConfig idea).

Everything else in export/ reads names, axes, opset and tolerances from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import arch
from ..errors import InputError

INPUT_NAME = arch.EXPORT_INPUT
OUTPUT_NAMES = arch.EXPORT_OUTPUTS
FRAME_AXIS = arch.EXPORT_FRAME_AXIS
FRAME_DIM = "S"
OPSET = arch.EXPORT_OPSET
DEFAULT_IMAGE_SIZE = (518, 518)
REL_TOL = arch.EXPORT_REL_TOL
PRECISIONS = ("fp32", "fp16", "w8a16", "w4a16")
FP32_MODULES = arch.EXPORT_FP32_MODULES
# Metadata keys of the exported model.
META_SPEC = "qvggt.export_spec"
META_PLAN = "qvggt.quant_plan"
META_PROVENANCE = "qvggt.quant_info"
META_CONFIG = "qvggt.model_config"


@dataclass(frozen=True)
class ExportConfig:
    precision: str = "fp32"  # fp32 | fp16 | w8a16 | w4a16 (the last two need a quantized model)
    image_size: tuple[int, int] = DEFAULT_IMAGE_SIZE
    min_frames: int = 1
    opt_frames: int = 4
    max_frames: int = 32
    # Activation dtype; None: fp32 for fp32, fp16 otherwise (W4A16 = fp16 activations).
    activations: str | None = None
    validate: bool = True

    @property
    def dtype(self) -> str:
        return self.activations or ("fp32" if self.precision == "fp32" else "fp16")

    def check(self, patch_size: int) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.activations not in (None, "fp32", "fp16"):
            raise InputError(f"activations must be fp32 or fp16, got {self.activations!r}")
        h, w = self.image_size
        if h <= 0 or w <= 0 or h % patch_size or w % patch_size:
            raise InputError(f"image size {h}x{w} must be positive multiples of the patch size {patch_size}")
        if not 1 <= self.min_frames <= self.opt_frames <= self.max_frames:
            raise InputError(f"need 1 <= min_frames <= opt_frames <= max_frames, got "
                             f"{self.min_frames}/{self.opt_frames}/{self.max_frames}")

    def to_dict(self) -> dict:
        """What the graph is (validation is not a property of the graph, so two exports that differ only
        in it stay byte-identical)."""
        fields = {k: v for k, v in asdict(self).items() if k != "validate"}
        return {**fields, "image_size": list(self.image_size), "dtype": self.dtype, "opset": OPSET,
                "input": INPUT_NAME, "outputs": list(OUTPUT_NAMES), "frame_axis": FRAME_AXIS}


