"""The export spec: one flat description of the exported graph's interface (optimum's OnnxConfig idea)
and the user's export options.

Everything else in export/ reads names, axes, opset and tolerances from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import InputError

INPUT_NAME = "images"
# The VGGT prediction dict keys that become graph outputs, in graph order.
OUTPUT_NAMES = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
FRAME_AXIS = 1  # images [1, S, 3, H, W]; every output is [1, S, ...]
FRAME_DIM = "S"
# Opset 21: INT4 DequantizeLinear with block_size exists, and attention still decomposes into
# MatMul/Softmax (opset 23 would emit the Attention op, unverified with TensorRT's parser).
OPSET = 21
DEFAULT_IMAGE_SIZE = (518, 518)
# Validation tolerance per output: max |candidate - reference| / (reference max - min), for the
# fp32 graph and for fp16 graphs (compared with the fp32 PyTorch model).
REL_TOL = {"fp32": dict.fromkeys(OUTPUT_NAMES, 1e-3), "fp16": dict.fromkeys(OUTPUT_NAMES, 3e-2)}
PRECISIONS = ("fp32", "fp16", "w8a16", "w4a16")
# Modules that stay fp32 in fp16 graphs: the dense heads, as the released model runs them (autocast
# off); their exp / expm1 activations overflow fp16 (depth_conf = 1 + exp(x)).
FP32_MODULES = ("depth_head", "point_head")
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


def parse_image_size(text: str) -> tuple[int, int]:
    """"518", "518x518" or "294x518" -> (H, W)."""
    parts = text.lower().split("x")
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"image size must look like 518 or 294x518, got {text!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise InputError(f"image size must look like 518 or 294x518, got {text!r}")
    return values
