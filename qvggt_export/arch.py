"""Everything qvggt-export knows about the VGGT architecture, as data.

Generic code (quant/, export/) asks this module which blocks to quantize, how a block's linears share
inputs (scale groups), which modules stay full precision, and how tokens are laid out; it never names a
VGGT module path itself (docs/architecture.md: VGGT knowledge lives in one place).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------------
# Quantization spec

# The linears of a transformer block, in execution order. Names are relative to the block.
LINEAR_TYPES = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

# The least sensitive linear: quantized even inside a block the plan protects (QVGGT paper).
ALWAYS_QUANTIZED_IN_PROTECTED = ("attn.proj",)

# VGGT-1B paper default plan (0-based): these blocks keep FP16 except attn.proj.
PAPER_PROTECTED_BLOCKS = ("aggregator.frame_blocks.14", "aggregator.frame_blocks.17",
                          "aggregator.frame_blocks.23", "aggregator.global_blocks.23")
PAPER_DEPTH = 24
# The paper protects 4 of 48 aggregator blocks; `--plan auto` keeps that fraction by default.
PAPER_PROTECTED_FRACTION = 4 / 48

HEADS = ("camera", "depth", "point")

# Which blocks a plan may quantize. "aggregator": the frame/global blocks (what the paper quantizes) plus
# the camera trunk; "aggregator+encoder" adds the DINOv2 patch embed's blocks; "all" adds every other
# linear layer arch knows how to quantize. The DPT heads hold none (their 1x1 projections are Conv2d),
# so today "all" selects the same blocks as "aggregator+encoder".
SCOPES = ("aggregator", "aggregator+encoder", "all")
DEFAULT_SCOPE = "aggregator"
ENCODER_SCOPES = ("aggregator+encoder", "all")

# Block kind -> the module list holding those blocks (the short name "frame.14" is kind.index).
BLOCK_LISTS = {"encoder": "aggregator.patch_embed.blocks", "frame": "aggregator.frame_blocks",
               "global": "aggregator.global_blocks", "camera": "camera_head.trunk"}


@dataclass(frozen=True)
class BlockSpec:
    name: str  # dotted module name, e.g. "aggregator.frame_blocks.3"
    kind: str  # "encoder", "frame", "global" or "camera"
    index: int
    # Token filtering applies where the block sees a frame's special tokens (the aggregator's camera and
    # register tokens, the encoder's class and register tokens) next to its patches; the camera trunk
    # only ever sees camera tokens.
    has_patch_tokens: bool


@dataclass(frozen=True)
class ScaleGroup:
    """One AWQ scale group: `layers` read the output of `prev_op` (all names relative to the block).

    fold: how the inverse scale is applied exactly -
      "norm"       divide the LayerNorm's weight and bias by s,
      "last_rows"  divide the last len(s) output rows (weight and bias) of the linear prev_op by s: the
                   value rows of qkv; attention is linear in v and proj reads the heads concatenated
                   in v's channel order,
      "input"      no foldable op (GELU is not linear): an explicit multiply by 1/s on the input.
    objective: the module whose output the search compares with full precision (AutoAWQ's choice: the
      whole attention for qkv, the MLP for fc1, the linear itself where nothing else follows).
    clip: whether the weight-clipping search applies (AutoAWQ leaves q/k unclipped: attention logits
      amplify their errors; qkv holds them fused).
    """

    prev_op: str
    layers: tuple[str, ...]
    fold: str
    objective: str
    clip: bool = True


SCALE_GROUPS = (
    ScaleGroup("norm1", ("attn.qkv",), "norm", "attn", clip=False),
    ScaleGroup("attn.qkv", ("attn.proj",), "last_rows", "attn.proj"),
    ScaleGroup("norm2", ("mlp.fc1",), "norm", "mlp"),
    ScaleGroup("mlp.act", ("mlp.fc2",), "input", "mlp.fc2"),
)


def check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; expected one of {', '.join(SCOPES)}")


def encoder_depth(model: nn.Module) -> int:
    """Transformer blocks of the patch embed: DINOv2's, or 0 for the conv patchify."""
    return len(getattr(model.aggregator.patch_embed, "blocks", ()))


def position_embedding_owner(model: nn.Module) -> nn.Module | None:
    """The module whose `interpolate_pos_encoding(grid_h, grid_w, dtype)` resizes a learned position embedding
    to the image's patch grid (DINOv2's patch embed), or None (the conv patchify has none)."""
    owner = model.aggregator.patch_embed
    return owner if hasattr(owner, "interpolate_pos_encoding") else None


def quant_blocks(model: nn.Module, scope: str = DEFAULT_SCOPE) -> list[BlockSpec]:
    """The blocks of `scope` whose linears a plan may quantize, in execution order (the encoder's blocks,
    frame/global interleaved, then the camera trunk)."""
    check_scope(scope)
    blocks = []
    if scope in ENCODER_SCOPES:
        blocks += [BlockSpec(f"{BLOCK_LISTS['encoder']}.{i}", "encoder", i, True) for i in range(encoder_depth(model))]
    for i in range(len(model.aggregator.frame_blocks)):
        blocks.append(BlockSpec(f"{BLOCK_LISTS['frame']}.{i}", "frame", i, True))
        blocks.append(BlockSpec(f"{BLOCK_LISTS['global']}.{i}", "global", i, True))
    for i in range(len(model.camera_head.trunk)):
        blocks.append(BlockSpec(f"{BLOCK_LISTS['camera']}.{i}", "camera", i, False))
    return blocks


def aggregator_blocks(model: nn.Module) -> list[BlockSpec]:
    return [b for b in quant_blocks(model) if b.kind in ("frame", "global")]


def block_of(linear_name: str) -> str:
    """"aggregator.frame_blocks.3.mlp.fc2" -> "aggregator.frame_blocks.3"."""
    for t in LINEAR_TYPES:
        if linear_name.endswith("." + t):
            return linear_name[: -len(t) - 1]
    raise ValueError(f"{linear_name!r} is not a block linear")


def linear_type(linear_name: str) -> str:
    return linear_name[len(block_of(linear_name)) + 1:]


def quantizable_linears(model: nn.Module, scope: str = DEFAULT_SCOPE) -> list[str]:
    """Dotted names of the linears a plan of `scope` may quantize, in execution order."""
    return [f"{b.name}.{t}" for b in quant_blocks(model, scope) for t in LINEAR_TYPES]


def resolve_block_name(model: nn.Module, text: str, scope: str = DEFAULT_SCOPE) -> str | None:
    """A user's block reference -> full block name, or None if `scope` has no such block.

    Accepts full names ("aggregator.frame_blocks.14") and short ones ("encoder.3", "frame.14",
    "global.23", "camera.0").
    """
    kind, _, index = text.rpartition(".")
    name = f"{BLOCK_LISTS[kind]}.{index}" if kind in BLOCK_LISTS else text
    return name if name in {b.name for b in quant_blocks(model, scope)} else None


def block_label(name: str) -> str:
    """Compact label of a block for figures: E3 (encoder), F14, G23, C0."""
    for kind, prefix in BLOCK_LISTS.items():
        if name.startswith(prefix + "."):
            return kind[0].upper() + name[len(prefix) + 1:]
    return name


def paper_protected_blocks(model: nn.Module) -> tuple[str, ...] | None:
    """The paper's protected blocks, or None when the model is not 24 blocks deep (not VGGT-1B)."""
    return PAPER_PROTECTED_BLOCKS if len(model.aggregator.frame_blocks) == PAPER_DEPTH else None


# ---------------------------------------------------------------------------------------------------
# Token layout and what the heads read


def num_special_tokens(model: nn.Module) -> int:
    """Camera token + register tokens at the start of every frame (token indices 0..4 in VGGT-1B)."""
    return model.aggregator.patch_start_idx


def tokens_per_frame(model: nn.Module, image_hw: tuple[int, int]) -> int:
    p = model.config.patch_size
    return num_special_tokens(model) + (image_hw[0] // p) * (image_hw[1] // p)


def token_layout(model: nn.Module, kind: str, image_hw: tuple[int, int]) -> tuple[int, int]:
    """(tokens per frame, special tokens at the start of each frame) of the sequences a block of `kind`
    sees: the encoder's class + register tokens before its patches, or the aggregator's camera +
    register tokens."""
    p = model.config.patch_size
    patches = (image_hw[0] // p) * (image_hw[1] // p)
    if kind == "encoder":
        special = 1 + model.aggregator.patch_embed.num_register_tokens
        return special + patches, special
    return tokens_per_frame(model, image_hw), num_special_tokens(model)


def patch_token_mask(x: Tensor, tokens_per_frame: int, num_special: int) -> Tensor:
    """Boolean mask over x's token axis (dim -2) selecting patch tokens.

    Frame blocks see [B*S, P, C] and global blocks [B, S*P, C]; in both the position of a token within
    its frame is (token index mod P).
    """
    import torch

    positions = torch.arange(x.shape[-2], device=x.device) % tokens_per_frame
    return positions >= num_special


def image_token_mask(model: nn.Module, block: BlockSpec, x: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Boolean mask over x's token axis (dim -2) selecting the image (patch) tokens of a block's input or
    output; all False where the block sees no patch tokens (token filtering does not apply there)."""
    import torch

    if not block.has_patch_tokens:
        return torch.zeros(x.shape[-2], dtype=torch.bool, device=x.device)
    return patch_token_mask(x, *token_layout(model, block.kind, image_hw))


def heads_reading(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Aggregator block indices whose outputs each head reads."""
    cfg = model.config
    return {"camera": (cfg.depth - 1,), "depth": tuple(cfg.intermediate_layer_idx),
            "point": tuple(cfg.intermediate_layer_idx)}


def camera_head_input(layers: dict[int, Tensor], model: nn.Module) -> Tensor:
    """The tokens the camera head consumes: each frame's camera token of the last block [B, S, 2C]."""
    return layers[model.config.depth - 1][:, :, 0]


def camera_head_patch_tokens(layers: dict[int, Tensor], model: nn.Module) -> Tensor:
    """Patch tokens of the last block [B, S, P - special, 2C] (CIC matches their norm)."""
    return layers[model.config.depth - 1][:, :, num_special_tokens(model):]


def set_extra_camera_tokens(model: nn.Module, tokens: Tensor | None) -> None:
    """Appends constant tokens [K, 2C] to the camera head's sequence (the CIC token), or removes them."""
    model.camera_head.extra_tokens = tokens


def extra_camera_tokens(model: nn.Module) -> Tensor | None:
    return model.camera_head.extra_tokens


def aggregator(model: nn.Module) -> nn.Module:
    """The module whose output is {block index: tokens} (hooked to collect camera and patch tokens)."""
    return model.aggregator


# State-dict key of the CIC token (a quantized checkpoint carries it when CIC was used).
EXTRA_CAMERA_TOKENS_KEY = "camera_head.extra_tokens"


# ---------------------------------------------------------------------------------------------------
# Block-wise execution (the quantizer's block cache, quant/forward.py)
#
# The encoder (DINOv2 patch embed), frame and global blocks form a pipeline: each maps the state entering
# it to the state entering the next (an EncoderState through the encoder, then an AggregatorState), so a
# cache of one state per scene lets a trial re-run only the blocks from the one it changed; the cache
# starts at the first pipeline block of the scope. The camera trunk blocks live inside the camera head (run once per refinement iteration):
# a trial there re-runs the camera head alone on the cached last layer; the dense heads' outputs do
# not depend on it.

PIPELINE_KINDS = ("encoder", "frame", "global")
# The heads as the quantizer evaluates them: "camera" -> pose, "dense" -> depth and point maps.
HEAD_GROUPS = ("camera", "dense")
PREDICTION_KEYS = {"camera": ("pose_enc",), "dense": ("depth", "depth_conf", "world_points", "world_points_conf")}
# Frames per dense-head call during calibration and quantization (the released code's bound).
DENSE_FRAMES_CHUNK = 8


def is_pipeline_block(block: BlockSpec) -> bool:
    return block.kind in PIPELINE_KINDS


def begin_forward(model: nn.Module, images: Tensor, first: BlockSpec | None = None):
    """images [B, S, 3, H, W] -> the state entering pipeline block `first`: an encoder state when it is
    an encoder block, else the aggregator state entering frame block 0 (the encoder run whole)."""
    if first is not None and first.kind == "encoder":
        return model.aggregator.begin_encoder(images)
    return model.aggregator.begin(images)


def forward_block(model: nn.Module, block: BlockSpec, state):
    """The state entering `block` -> the state entering the next pipeline block (the last encoder block
    returns the aggregator state entering frame block 0)."""
    if block.kind == "encoder":
        state = model.aggregator.run_encoder_block(block.index, state)
        return model.aggregator.end_encoder(state) if block.index == encoder_depth(model) - 1 else state
    if block.kind == "frame":
        return model.aggregator.run_frame_block(block.index, state)
    if block.kind == "global":
        return model.aggregator.run_global_block(block.index, state)
    raise ValueError(f"{block.name} is not a pipeline block")


def final_layers(state) -> dict[int, Tensor]:
    """The kept layers the heads read, once the state has passed every pipeline block."""
    return state.kept


def run_head_group(model: nn.Module, group: str, layers: dict[int, Tensor], image_hw: tuple[int, int]) -> dict:
    if group == "camera":
        return {"pose_enc": model.predict_camera(layers)["pose_enc"]}
    if group == "dense":
        return model.predict_dense(layers, *image_hw, frames_chunk_size=DENSE_FRAMES_CHUNK)
    raise ValueError(f"unknown head group {group!r}")


# ---------------------------------------------------------------------------------------------------
# Deployable parts (what `info` and the build summary break the weight bytes down by)

# Part -> state-dict prefixes, most specific first (the encoder lives inside the aggregator).
DEPLOYED_PARTS = {"encoder": ("aggregator.patch_embed.",), "aggregator": ("aggregator.",),
                  "camera_head": ("camera_head.",), "dpt": ("depth_head.", "point_head.")}
# Carried by released checkpoints but never run or exported.
NOT_DEPLOYED = ("track_head.",)


def deployed_part(tensor_name: str) -> str | None:
    """The part a state-dict tensor belongs to, or None when it is not deployed."""
    if tensor_name.startswith(NOT_DEPLOYED):
        return None
    return next((part for part, prefixes in DEPLOYED_PARTS.items() if tensor_name.startswith(prefixes)), "other")


# ---------------------------------------------------------------------------------------------------
# Export spec (the export engineer's section; qvggt_export/export/spec.py builds ExportConfig on it)

EXPORT_INPUT = "images"  # [1, S, 3, H, W] float32 in [0, 1]
# The VGGT prediction dict keys that become graph outputs, in graph order; all [1, S, ...].
EXPORT_OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
EXPORT_FRAME_AXIS = 1
# Opset 21: INT4 DequantizeLinear with block_size exists, and attention still decomposes into
# MatMul/Softmax (opset 23 would emit the Attention op, unverified with TensorRT's parser).
EXPORT_OPSET = 21
# Validation tolerance per output: max |onnx - torch| / (torch max - min), fp32 and fp16 graphs
# (fp16 graphs are compared with the fp32 PyTorch model).
EXPORT_REL_TOL = {"fp32": dict.fromkeys(EXPORT_OUTPUTS, 1e-3), "fp16": dict.fromkeys(EXPORT_OUTPUTS, 3e-2)}
# Modules that stay fp32 in fp16 graphs: the dense heads, as the released model runs them (autocast
# off); their exp / expm1 activations overflow fp16 (depth_conf = 1 + exp(x)).
EXPORT_FP32_MODULES = ("depth_head", "point_head")
