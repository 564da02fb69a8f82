"""PyTorch VGGT (full precision or quantized) -> ONNX with dynamic frames and `qvggt::W4A16MatMul` nodes.

Export-only changes live in `export_patches` (optimum's ModelPatcher idea): the model source stays as
it is, and every change is undone when the export is over.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .. import arch
from ..errors import CheckpointError, InputError, QVGGTError
from ..log import logger
from ..quant.linear import QuantLinear
from . import custom_op, spec
from .custom_op import translation_table, w4a16_matmul
from .lower import lower
from .onnx_io import EXTERNAL_DATA_THRESHOLD, load_onnx, save_onnx
from .runtime import ort_session
from .spec import ExportConfig


class ExportValidationError(QVGGTError):
    """The exported graph does not compute what the PyTorch model computes."""


def quant_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def check_plan(model: nn.Module) -> dict | None:
    """The model's plan, after checking that it describes the QuantLinear modules the model holds."""
    linears = quant_linears(model)
    plan = getattr(model, "quant_plan", None)
    if plan is None:
        if linears:
            raise CheckpointError(f"the model holds {len(linears)} quantized linears but no quantization plan")
        return None
    planned = {name: p for name, p in plan.get("layers", {}).items() if p != "fp16"}
    held = {name: m.precision for name, m in linears.items()}
    if planned != held:
        diff = sorted(set(planned.items()) ^ set(held.items()))
        raise CheckpointError(f"quantization plan and checkpoint disagree on {len(diff)} layer(s), e.g. "
                              f"{', '.join(f'{n}={p}' for n, p in diff[:3])}")
    return plan


class GraphModule(nn.Module):
    """float32 images [1, S, 3, H, W] -> the spec's outputs as float32, whatever the compute dtype, so
    every precision variant has the same interface."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        preds = self.model(images.to(self.dtype))
        return tuple(preds[name].float() for name in spec.OUTPUT_NAMES)


def _quant_forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.input_scale is not None:  # the explicit AWQ inverse scale (before fc2): a plain Mul node
        x = x * self.input_scale.to(x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return w4a16_matmul(x, self.onnx_weight, self.scales, bias, self.in_features, self.out_features,
                        self.group_size, self.bits, self.export_name, self.export_block, self.precision)


@contextlib.contextmanager
def export_patches(model: nn.Module) -> Iterator[None]:
    """QuantLinear -> the custom op (with its weight as INT8); undone on exit."""
    patched = []
    try:
        for name, module in quant_linears(model).items():
            weight = module.qweight.view(torch.int8) if module.bits == 4 else module.qweight
            module.register_buffer("onnx_weight", weight.clone(), persistent=False)
            module.export_name = name
            try:
                module.export_block = arch.block_of(name)
            except ValueError:
                module.export_block = ""
            module.forward = _quant_forward.__get__(module)
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward, module.export_name, module.export_block
            del module._buffers["onnx_weight"]


def _cast_inputs(module: nn.Module, args: tuple) -> tuple:
    dtype = next(module.parameters(recurse=False)).dtype
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _fp16_copy(model: nn.Module) -> nn.Module:
    """fp16 copy with spec.FP32_MODULES in fp32; every module with its own float parameters casts its
    inputs to their dtype, which puts a Cast exactly at the fp16/fp32 boundaries."""
    half = copy.deepcopy(model).half()
    for name in spec.FP32_MODULES:
        half.get_submodule(name).float()
    for module in half.modules():
        own = list(module.parameters(recurse=False))
        # QuantLinear computes in its input's dtype by itself.
        if own and own[0].is_floating_point() and not isinstance(module, QuantLinear):
            module.register_forward_pre_hook(_cast_inputs)
    return half


@contextlib.contextmanager
def fixed_position_embedding(model: nn.Module, image_hw: tuple[int, int]) -> Iterator[None]:
    """The learned position embedding resized to the export's patch grid once, here, and held as a constant
    of the graph (the export size is fixed). Traced, the resize of a non-square grid is an antialiased bicubic
    Resize, which TensorRT's ONNX parser refuses ("Antialiasing is not supported"). Undone on exit."""
    owner = arch.position_embedding_owner(model)
    if owner is None:
        yield
        return
    grid = (image_hw[0] // model.config.patch_size, image_hw[1] // model.config.patch_size)
    if grid[0] * grid[1] == owner.pos_embed.shape[1] - 1 and grid[0] == grid[1]:  # the stored grid: no resize
        yield
        return
    with torch.no_grad():
        resized = owner.interpolate_pos_encoding(*grid, torch.float32)
    owner.register_buffer("onnx_pos_embed", resized, persistent=False)

    def interpolate_pos_encoding(grid_h: int, grid_w: int, dtype: torch.dtype) -> torch.Tensor:
        if (grid_h, grid_w) != grid:
            raise ValueError(f"the export's patch grid is {grid}, got {(grid_h, grid_w)}")
        return owner.onnx_pos_embed.to(dtype)

    owner.interpolate_pos_encoding = interpolate_pos_encoding
    try:
        yield
    finally:
        del owner.interpolate_pos_encoding
        del owner._buffers["onnx_pos_embed"]


def metadata(model: nn.Module, config: ExportConfig, plan: dict | None) -> dict[str, str]:
    meta = {spec.META_SPEC: json.dumps(config.to_dict(), sort_keys=True),
            spec.META_CONFIG: json.dumps(model.config.to_dict(), sort_keys=True)}
    if plan is not None:
        meta[spec.META_PLAN] = json.dumps(plan, sort_keys=True)
        meta[spec.META_PROVENANCE] = json.dumps(getattr(model, "quant_info", {}), sort_keys=True, default=str)
    return meta


def _check_precision(model: nn.Module, config: ExportConfig, plan: dict | None) -> None:
    quantized = bool(quant_linears(model))
    if config.precision in ("w4a16", "w8a16"):
        if not quantized:
            raise InputError(f"--precision {config.precision} needs a quantized checkpoint "
                             "(run `qvggt-export quantize` or `qvggt-export build`)")
        if plan.get("default_precision") != config.precision:
            raise InputError(f"the checkpoint is quantized to {plan.get('default_precision')}, "
                             f"not {config.precision}")
    elif quantized:
        raise InputError(f"--precision {config.precision} asks for a float graph, but the checkpoint is "
                         f"quantized ({plan.get('default_precision')}); pass --precision "
                         f"{plan.get('default_precision')}")


def export_onnx(model: nn.Module, path: str | os.PathLike, config: ExportConfig = ExportConfig()) -> Path:
    """Writes `path` (and `path`.data when the weights exceed 2 GB); validates against the PyTorch
    model unless config.validate is False."""
    path = Path(path)
    model = model.eval()
    config.check(model.config.patch_size)
    plan = check_plan(model)
    _check_precision(model, config, plan)
    dtype = torch.float16 if config.dtype == "fp16" else torch.float32
    graph_model = _fp16_copy(model) if dtype == torch.float16 else model
    h, w = config.image_size
    fixed_frames = config.min_frames == config.max_frames
    # Trace a dynamic frame axis with >= 2 frames: 1 would let torch.export specialise it to a constant.
    example = torch.rand(1, config.min_frames if fixed_frames else max(2, config.min_frames), 3, h, w)
    dynamic_shapes = None if fixed_frames else {"images": {spec.FRAME_AXIS: torch.export.Dim(
        spec.FRAME_DIM, min=config.min_frames, max=config.max_frames)}}
    start = time.perf_counter()
    with export_patches(graph_model), fixed_position_embedding(graph_model, (h, w)), torch.no_grad():
        program = torch.onnx.export(
            GraphModule(graph_model, dtype).eval(), (example,), None, dynamo=True, opset_version=spec.OPSET,
            input_names=[spec.INPUT_NAME], output_names=list(spec.OUTPUT_NAMES),
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=translation_table(), optimize=True, verbose=False)
    ir_model = program.model
    calls: dict[str, int] = {}
    for node in ir_model.graph:
        if node.domain == custom_op.DOMAIN:
            # Readable, stable and unique names: a layer run more than once (the camera trunk runs
            # once per refinement iteration) gets one node per call, sharing one weight.
            layer = node.attributes["qvggt_layer"].value
            node.name = layer if layer not in calls else f"{layer}:{calls[layer]}"
            calls[layer] = calls.get(layer, 0) + 1
    ir_model.metadata_props.update(metadata(model, config, plan))
    ir_model.producer_name = "qvggt-export"
    weight_bytes = sum(v.const_value.nbytes for v in ir_model.graph.initializers.values()
                       if v.const_value is not None)
    def write(tmp: Path) -> None:
        program.save(tmp, external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
        logger.info("exported %s (%s, %d custom nodes) in %.1f s", path, config.precision,
                    sum(n.domain == custom_op.DOMAIN for n in ir_model.graph), time.perf_counter() - start)
        if config.validate:  # before the file takes its name: a graph that fails leaves nothing behind
            validate_export(model, tmp, config)

    save_onnx(write, path)
    return path


def random_images(frames: int, image_size: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((1, frames, 3, *image_size), dtype=np.float32)


def torch_outputs(model: nn.Module, images: np.ndarray) -> dict[str, np.ndarray]:
    with torch.no_grad():
        outs = GraphModule(model, torch.float32)(torch.from_numpy(images))
    return {name: out.numpy() for name, out in zip(spec.OUTPUT_NAMES, outs)}


def relative_errors(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, float]:
    """max |out - ref| / (ref max - ref min) per output."""
    errors = {}
    for name, ref in reference.items():
        span = float(ref.max() - ref.min()) or 1.0
        errors[name] = float(np.abs(outputs[name].astype(np.float32) - ref).max()) / span
    return errors


def validate_export(model: nn.Module, path: Path, config: ExportConfig) -> dict[str, dict[str, float]]:
    """ONNX Runtime vs the PyTorch model at the smallest and the optimal frame count (custom nodes
    are run through the `ort` lowering, the only form ONNX Runtime can execute)."""
    onnx_model = lower(load_onnx(path), "ort")
    session = ort_session(onnx_model)
    tolerance = spec.REL_TOL[config.dtype]
    report = {}
    for frames in sorted({config.min_frames, config.opt_frames}):
        images = random_images(frames, config.image_size, seed=frames)
        got = dict(zip(spec.OUTPUT_NAMES, session.run(list(spec.OUTPUT_NAMES), {spec.INPUT_NAME: images})))
        errors = relative_errors(got, torch_outputs(model, images))
        report[f"S={frames}"] = errors
        bad = {k: v for k, v in errors.items() if not v <= tolerance[k]}
        if bad:
            raise ExportValidationError(f"{path.name}: ONNX Runtime differs from PyTorch at S={frames}: " + ", ".join(
                f"{k} {v:.2e} > {tolerance[k]:.0e}" for k, v in bad.items()))
    logger.info("validated %s against PyTorch: worst relative error %.2e", path.name,
                max(max(e.values()) for e in report.values()))
    return report
