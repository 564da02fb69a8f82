"""The model on the calibration scenes during calibration and quantization: device, dtype, and the block
cache.

`FullModelForward` is the plain path: every call runs the whole model on every scene. `BlockCache` is the
fast path (the pattern of AutoAWQ's quantizer): it keeps, per scene, the state entering the first block
that may still change, so a trial on block b re-runs only blocks b.. and the heads (a camera-trunk
block re-runs only the camera head, the dense heads' outputs are cached), and `advance` pushes the
cache through a block once it is final. Both give bit-identical predictions for the same weights (the
same modules on the same tensors, arch's block-wise execution); tests/test_block_cache.py holds the
cache to the plain path.

Weights stay the fp32 masters; the forward runs under autocast in `dtype` (fp32 disables it).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import arch
from ..errors import InputError
from .calibration_set import CalibScene

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """"cpu", "cuda", "cuda:N", or None (cuda when available, else cpu)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: this torch build or machine has no CUDA GPU")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """"fp32" | "bf16" | "fp16", or None (bf16 on CUDA, fp32 on the CPU)."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


@contextmanager
def autocast(device: torch.device, dtype: torch.dtype):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield


def _outputs(preds: dict[str, Tensor]) -> dict[str, Tensor]:
    """One scene's predictions as the losses read them: batch removed, float32, on the CPU."""
    return {k: preds[k][0].float().cpu() for group in arch.HEAD_GROUPS for k in arch.PREDICTION_KEYS[group]}


@dataclass
class LocalScene:
    index: int  # position in the whole calibration set (the order every reduction follows)
    scene: CalibScene


class FullModelForward:
    """Plain path: the whole model on every scene for every call."""

    def __init__(self, model: nn.Module, scenes: list[LocalScene], dtype: torch.dtype,
                 scope: str = arch.DEFAULT_SCOPE) -> None:
        self.model, self.scenes, self.dtype, self.scope = model, scenes, dtype, scope  # scope: arch.SCOPES
        self.device = next(model.parameters()).device
        self.current_scene: int | None = None  # global index of the scene being run (for hooks)
        # Block calls on one scene: pipeline blocks (all tokens of all views: the cost that matters) and
        # blocks inside a head (the camera trunk: one token a view, once per refinement iteration).
        self.block_forwards = 0
        self.head_block_forwards = 0
        self._counters = [model.get_submodule(b.name).register_forward_hook(self._counter(arch.is_pipeline_block(b)))
                          for b in arch.quant_blocks(model, scope)]

    def _counter(self, pipeline: bool):
        def count(*_) -> None:
            if self.current_scene is None:  # another forward hooked on the same model is running
                return
            if pipeline:
                self.block_forwards += 1
            else:
                self.head_block_forwards += 1
        return count

    def close(self) -> None:
        for handle in self._counters:
            handle.remove()
        self._counters = []

    def _images(self, local: LocalScene) -> Tensor:
        return local.scene.images.to(self.device)[None]

    def _heads(self, layers: dict[int, Tensor], image_hw: tuple[int, int], groups=arch.HEAD_GROUPS) -> dict:
        out = {}
        for group in groups:
            out.update(arch.run_head_group(self.model, group, layers, image_hw))
        return out

    @torch.no_grad()
    def predict(self) -> list[dict[str, Tensor]]:
        """Predictions of the model as it is now, per local scene."""
        outputs = []
        for local in self.scenes:
            self.current_scene = local.index
            images = self._images(local)
            with autocast(self.device, self.dtype):
                outputs.append(_outputs(self._heads(self.model.aggregator(images), tuple(images.shape[-2:]))))
        self.current_scene = None
        return outputs

    def exercise(self, block: arch.BlockSpec) -> None:
        """Runs at least `block` on every scene with its current inputs (for hooks that collect them)."""
        self.predict()

    def advance(self, block: arch.BlockSpec) -> None:
        """`block` is final from now on (the plain path has nothing to update)."""


class BlockCache(FullModelForward):
    """Fast path: per-scene states at the first block that may still change (see the module docstring)."""

    def __init__(self, model: nn.Module, scenes: list[LocalScene], dtype: torch.dtype,
                 scope: str = arch.DEFAULT_SCOPE) -> None:
        super().__init__(model, scenes, dtype, scope)
        self.pipeline = [b for b in arch.quant_blocks(model, scope) if arch.is_pipeline_block(b)]
        self.position = 0  # index in self.pipeline of the next block the states enter
        with torch.no_grad(), autocast(self.device, dtype):
            self.states = [arch.begin_forward(model, self._images(s), self.pipeline[0]) for s in scenes]
        self.dense: list[dict] | None = None  # dense-head outputs once every pipeline block is final
        self.pending = 0  # blocks advanced through but not yet run (run lazily: a method with no trials pays nothing)

    def _check_position(self, block: arch.BlockSpec) -> None:
        self._catch_up()
        if arch.is_pipeline_block(block):
            expected = self.pipeline[self.position].name if self.position < len(self.pipeline) else None
            if block.name != expected:
                raise RuntimeError(f"block cache is at {expected}, not at {block.name}")
        elif self.position < len(self.pipeline):
            raise RuntimeError(f"{block.name} runs inside a head; the block cache is still at "
                               f"{self.pipeline[self.position].name}")

    def _final_layers(self, local_position: int) -> dict[int, Tensor]:
        state = self.states[local_position]
        for block in self.pipeline[self.position:]:
            state = arch.forward_block(self.model, block, state)
        return arch.final_layers(state)

    @torch.no_grad()
    def predict(self) -> list[dict[str, Tensor]]:
        self._catch_up()
        outputs = []
        for i, local in enumerate(self.scenes):
            self.current_scene = local.index
            hw = tuple(local.scene.images.shape[-2:])
            with autocast(self.device, self.dtype):
                layers = self._final_layers(i)
                if self.dense is None:
                    outputs.append(_outputs(self._heads(layers, hw)))
                else:
                    preds = {**self._heads(layers, hw, ("camera",)), **self.dense[i]}
                    outputs.append(_outputs(preds))
        self.current_scene = None
        return outputs

    @torch.no_grad()
    def exercise(self, block: arch.BlockSpec) -> None:
        self._check_position(block)
        for i, local in enumerate(self.scenes):
            self.current_scene = local.index
            with autocast(self.device, self.dtype):
                if arch.is_pipeline_block(block):
                    arch.forward_block(self.model, block, self.states[i])
                else:
                    self._heads(self._final_layers(i), tuple(local.scene.images.shape[-2:]), ("camera",))
        self.current_scene = None

    def advance(self, block: arch.BlockSpec) -> None:
        if not arch.is_pipeline_block(block):
            self._check_position(block)
            return
        ahead = self.position + self.pending
        if ahead >= len(self.pipeline) or self.pipeline[ahead].name != block.name:
            raise RuntimeError(f"block cache cannot advance through {block.name} from its position")
        self.pending += 1

    @torch.no_grad()
    def _catch_up(self) -> None:
        if not self.pending:
            return
        with autocast(self.device, self.dtype):
            for i, local in enumerate(self.scenes):
                self.current_scene = local.index
                for block in self.pipeline[self.position:self.position + self.pending]:
                    self.states[i] = arch.forward_block(self.model, block, self.states[i])
            self.current_scene = None
            self.position += self.pending
            self.pending = 0
            if self.position == len(self.pipeline):
                self.dense = [arch.run_head_group(self.model, "dense", arch.final_layers(state),
                                                  tuple(local.scene.images.shape[-2:]))
                              for state, local in zip(self.states, self.scenes)]


def make_forward(model: nn.Module, scenes: list[LocalScene], dtype: torch.dtype, cached: bool = True,
                 scope: str = arch.DEFAULT_SCOPE) -> FullModelForward:
    return (BlockCache if cached else FullModelForward)(model, scenes, dtype, scope)
