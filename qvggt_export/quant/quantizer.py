"""One generic quantizer for every method, as a pipeline of named steps:

  plan -> calibration (statistics, sensitivity) -> targets (the FP predictions) -> CIC token
  -> per block, in execution order: search scales -> round -> save progress -> advance the block cache
  -> pack into QuantLinear modules -> check -> report

What a method does is data (`Method`): whether it searches AWQ scales, how it rounds (RTN or GPTQ), and
which QVGGT components it may switch on. QVGGT = AWQ-style scale search + mixed precision + token
filtering + CIC + task-aware search; with all four switched off it is AWQ. A new method is one more
`Method` entry (docs/method.md, "Adding a quantization method").

Trials run on the block cache (quant/forward.py): a reconstruction candidate needs only the layer's
sampled inputs, a task-aware candidate re-runs only the blocks from the current one and the heads.
Weights are always the fp32 masters; the forward runs in QuantConfig.dtype on QuantConfig.device.
"""

from __future__ import annotations

import copy
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import __version__, arch
from ..errors import InputError
from ..log import logger
from ..vocabulary import SEARCH_GRID, TASK_TOPK
from .calibration_run import Calibration, calibrate, local_scenes
from .calibration_set import CalibrationSet
from .cic import DEFAULT_COMPONENTS, cic_token
from .distributed import Shard, current_shard, gather_in_order, sum_in_order
from .forward import DTYPES, FullModelForward, autocast, make_forward, resolve_device, resolve_dtype
from .gptq import gptq_quantize
from .linear import QuantLinear
from .modules import replace_module, restore, snapshot
from .objective import LOSS_WEIGHTS, Targets, check_finite, gathered_task_loss, make_targets
from .plan import auto_plan, check_scope, paper_plan, quantized_layers, read_plan_file, summarize, uniform_plan
from .progress import QuantizeProgress
from .pack import group_scales
from .scale import (apply_scale, candidate_scales, clip_search, fake_quantize_with_scales, scaled_round_trip,
                    weight_channel_mean)

COMPONENTS = ("mixed", "token_filter", "cic", "task_aware")
ROUNDINGS = ("rtn", "gptq")
UNSCALED = "none"  # the no-scaling candidate of the search under GPTQ rounding (report: alpha "none")


@dataclass(frozen=True)
class Method:
    name: str
    scale_search: bool  # AWQ-style per-channel scales, searched per scale group (arch.SCALE_GROUPS)
    clip: bool  # AutoAWQ's weight-clipping search after the scales (RTN rounding only)
    rounding: str  # default rounding of the (scaled) weights: "rtn" | "gptq"
    components: tuple[str, ...]  # QVGGT components this method may switch on
    summary: str


METHODS = {m.name: m for m in (
    Method("rtn", False, False, "rtn", (), "round to nearest, group-wise symmetric"),
    Method("awq", True, True, "rtn", (), "AutoAWQ: duo scales searched on the output of the module they feed, "
                                         "weight clipping, then RTN"),
    Method("gptq", False, False, "gptq", (), "GPTQ rounding with error feedback through the inverse Hessian"),
    Method("qvggt", True, True, "rtn", COMPONENTS, "AWQ + mixed precision, token filtering, CIC and the "
                                                   "task-aware search"),
)}


@dataclass
class QuantConfig:
    method: str = "qvggt"
    mixed: bool = True
    token_filter: bool = True
    cic: bool = True
    task_aware: bool = True
    plan: str | None = None  # "auto" | "paper" | "uniform" | path; None: auto for qvggt+mixed, else uniform
    protect: int | None = None
    threshold: float | None = None
    precision: str = "w4a16"
    grid: int = SEARCH_GRID  # alphas 0, 1/grid, ..., (grid-1)/grid
    task_topk: int = TASK_TOPK  # alphas per scale group (best by reconstruction) scored by the task loss
    targets: str = "auto"  # "auto" (ground truth when the calibration set has it) | "fp"
    cic_components: int = DEFAULT_COMPONENTS
    rounding: str | None = None  # None: the method's own
    act_order: bool = False  # GPTQ rounding: columns in order of decreasing Hessian diagonal
    clip_rows: int = 4096  # input rows per linear for the clipping search, sampled across scenes
    loss_weights: dict[str, float] = field(default_factory=lambda: dict(LOSS_WEIGHTS))
    device: str | None = None  # None: cuda when available, else cpu
    dtype: str | None = None  # forward dtype; None: bf16 on CUDA, fp32 on the CPU
    block_cache: bool = True  # False: every trial runs the whole model (the reference path)
    scope: str = arch.DEFAULT_SCOPE  # which blocks the plan covers: arch.SCOPES

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.grid < 2:
            raise InputError(f"--grid must be at least 2, got {self.grid}")
        if self.task_topk < 1:
            raise InputError(f"--task-topk must be at least 1, got {self.task_topk}")
        if self.targets not in ("auto", "fp"):
            raise InputError(f"--targets must be auto or fp, got {self.targets!r}")
        if self.rounding is not None and self.rounding not in ROUNDINGS:
            raise InputError(f"--rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if set(self.loss_weights) != set(LOSS_WEIGHTS) or any(w < 0 for w in self.loss_weights.values()):
            raise InputError(f"loss weights must give each of {', '.join(LOSS_WEIGHTS)} a weight >= 0")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check_scope(self.scope)

    @property
    def parts(self) -> dict:
        """Which method steps and components are in effect."""
        method = METHODS[self.method]
        on = {c: c in method.components and getattr(self, c) for c in COMPONENTS}
        rounding = self.rounding or method.rounding
        return {"scale_search": method.scale_search, "clip": method.clip and rounding == "rtn", "rounding": rounding,
                **on}


@dataclass
class QuantReport:
    """Bookkeeping of one run (not part of the checkpoint, whose bytes depend only on the result)."""

    plan_summary: str
    layers: dict[str, dict] = field(default_factory=dict)
    fp_task_loss: float | None = None
    final_task_loss: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per stage
    block_forwards: dict[str, int] = field(default_factory=dict)  # per stage
    peak_rss_gb: float = 0.0
    peak_cuda_gb: float | None = None
    resumed_blocks: int = 0
    progress: QuantizeProgress | None = None  # the per-block state; clear() it once the checkpoint is saved


def plan_choice(config: QuantConfig) -> str:
    return config.plan or ("auto" if config.parts["mixed"] else "uniform")


def resolve_plan(model: nn.Module, config: QuantConfig, calibration: Calibration | None) -> dict:
    choice = plan_choice(config)
    if choice == "uniform":
        return uniform_plan(model, config.precision, config.scope)
    if choice == "paper":
        return paper_plan(model, config.precision, config.scope)
    if choice == "auto":
        if calibration is None or calibration.sensitivity is None:
            raise InputError("--plan auto needs the sensitivity analysis (calibrate without --no-sensitivity)")
        return auto_plan(model, calibration.sensitivity, config.protect, config.threshold, config.precision,
                         config.scope)
    return read_plan_file(model, Path(choice), config.scope)


class BlockQuantizer:
    """The per-block steps: scale search per scale group, rounding, on the block cache."""

    def __init__(self, model: nn.Module, forward: FullModelForward, calibration: Calibration, plan: dict,
                 config: QuantConfig, targets: list[Targets], shard: Shard, total_scenes: int) -> None:
        self.model, self.forward, self.calibration = model, forward, calibration
        self.config, self.targets, self.shard, self.total = config, targets, shard, total_scenes
        self.parts = config.parts
        self.bits = quantized_layers(plan)
        self.qscales: dict[str, Tensor] = {}
        self.entries: dict[str, dict] = {}
        self.chosen_scales: dict[str, Tensor] = {}  # per linear: the scale its group settled on
        self.clip_scales: dict[str, Tensor] = {}  # per linear: group scales after the clipping search
        self.calls: dict = {}
        self.rows: dict = {}
        self.hessians: dict[str, Tensor] = {}  # GPTQ rounding: per planned linear, sum x x^T of its (filtered) inputs
        self.calib_scenes = {local.index: local.scene for local in forward.scenes}

    def planned(self, block: str) -> list[str]:
        return [f"{block}.{t}" for t in arch.LINEAR_TYPES if f"{block}.{t}" in self.bits]

    def task_loss(self) -> float:
        return gathered_task_loss(self.forward.predict(), self.targets, self.shard, self.total,
                                  self.config.loss_weights)[0]

    @torch.no_grad()
    def round_scaled(self, names: list[str], scales: dict[str, Tensor]) -> None:
        """Rounds the (already scaled) weights of `names` in place with the method's rounding; `scales`:
        the scale each weight was multiplied by (GPTQ needs it for the Hessian of the weight's input)."""
        for name in names:
            weight = self.model.get_submodule(name).weight
            if self.parts["rounding"] == "gptq":
                wq, self.qscales[name] = self.gptq(name, weight, scales.get(name))
                self.entries.setdefault(name, {})["rounding"] = "gptq"
            else:
                wq, self.qscales[name] = fake_quantize_with_scales(weight, self.bits[name],
                                                                   scales=self.clip_scales.get(name))
            weight.copy_(wq.to(weight.dtype))

    def capture(self, block: arch.BlockSpec) -> None:
        """One exercise of the block: each scale group's objective-module calls (inputs, FP output, image-token
        mask) and each planned linear's sampled input rows, per local scene."""
        groups = arch.SCALE_GROUPS
        self.calls = {g.objective: {} for g in groups}
        self.rows = {n: {} for n in self.planned(block.name)}
        gptq = self.parts["rounding"] == "gptq"
        hessians: dict[str, dict[int, Tensor]] = {n: {} for n in self.rows}
        per_call = max(1, -(-self.config.clip_rows // self.total))
        generators = {i: torch.Generator().manual_seed(1_000_003 * self.block_index(block) + i) for i in self.calib_scenes}

        def mask_for(x: Tensor, scene: int) -> Tensor:
            return self.token_mask(block, x, scene)

        def module_hook(name):
            def hook(module, args, kwargs, output):
                scene = self.forward.current_scene
                self.calls[name].setdefault(scene, []).append((args, kwargs, output.detach(), mask_for(output, scene)))
            return hook

        def linear_hook(name):
            def hook(module, args):
                x, scene = args[0].detach(), self.forward.current_scene
                rows = x[..., mask_for(x, scene), :].reshape(-1, x.shape[-1])
                if gptq:
                    _accumulate(hessians[name], scene, rows.float())
                if rows.shape[0] > per_call:
                    pick = torch.randperm(rows.shape[0], generator=generators[scene])[:per_call]
                    rows = rows[pick.sort().values.to(rows.device)]
                self.rows[name].setdefault(scene, []).append(rows.float())
            return hook

        block_module = self.model.get_submodule(block.name)
        handles = [block_module.get_submodule(g.objective).register_forward_hook(module_hook(g.objective),
                                                                              with_kwargs=True) for g in groups]
        handles += [self.model.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in self.rows]
        try:
            self.forward.exercise(block)
        finally:
            for h in handles:
                h.remove()
        self.hessians = {n: self.reduce_hessian(h) for n, h in hessians.items()} if gptq else {}

    def reduce_hessian(self, per_scene: dict[int, Tensor]) -> Tensor:
        return sum_in_order([per_scene[i] for i in sorted(per_scene)], self.shard, self.total)

    def round_trip(self, name: str, weight: Tensor, s: Tensor) -> Tensor:
        """What linear `name` computes after scaling by s and rounding with the method's rounding, on its
        original input: Q(W diag(s)) diag(s)^-1. Under GPTQ the Hessian of the scaled weight's input x / s is
        diag(s)^-1 H diag(s)^-1, so each scale candidate is scored with the rounding that will ship."""
        if self.parts["rounding"] != "gptq":
            return scaled_round_trip(weight, s, self.bits[name])
        wq, _ = self.gptq(name, weight.float() * s[None, :], s)
        return (wq / s[None, :]).to(weight.dtype)

    def gptq(self, name: str, weight: Tensor, s: Tensor | None) -> tuple[Tensor, Tensor]:
        """GPTQ of a weight that sees inputs x / s (s None: x), from the captured Hessian of x."""
        hessian = self.hessians[name]
        if s is not None:
            s = s.to(hessian.device).float()
            hessian = hessian / (s[:, None] * s[None, :])
        return gptq_quantize(weight, hessian, self.bits[name], act_order=self.config.act_order)

    def token_mask(self, block: arch.BlockSpec, x: Tensor, scene: int) -> Tensor:
        """The tokens (dim -2 of x) the search and the Hessians use: image tokens under token filtering,
        else all (also where a block sees no patch tokens: nothing to filter there)."""
        if not self.parts["token_filter"]:
            return torch.ones(x.shape[-2], dtype=torch.bool, device=x.device)
        hw = tuple(self.calib_scenes[scene].images.shape[-2:])
        mask = arch.image_token_mask(self.model, block, x, hw)
        return mask if mask.any() else torch.ones_like(mask)

    def block_index(self, block: arch.BlockSpec) -> int:
        return [b.name for b in arch.quant_blocks(self.model, self.config.scope)].index(block.name)

    def sample_rows(self, name: str) -> Tensor:
        """The linear's sampled input rows over every scene (scene order)."""
        local = [torch.cat(self.rows[name][i]).cpu() for i in sorted(self.rows[name])]
        return torch.cat(gather_in_order(local, self.shard, self.total)).to(next(self.model.parameters()).device)

    @torch.no_grad()
    def module_error(self, block: arch.BlockSpec, group: arch.ScaleGroup) -> float:
        """Relative error ||y - y_fp||^2 / ||y_fp||^2 of the group's objective module on its captured inputs
        (image tokens only under token filtering), over every scene."""
        module = self.model.get_submodule(f"{block.name}.{group.objective}")
        local = []
        for scene in sorted(self.calls[group.objective]):
            err = ref = 0  # device tensors after the first call: one host sync per scene, not per call
            for args, kwargs, out, mask in self.calls[group.objective][scene]:
                with autocast(self.forward.device, self.forward.dtype):
                    y = module(*args, **kwargs)
                target = out.float()[..., mask, :]
                err = err + (y.float()[..., mask, :] - target).pow(2).sum()
                ref = ref + target.pow(2).sum()
            local.append((float(err), float(ref)))
        parts = gather_in_order(local, self.shard, self.total)
        return sum(e for e, _ in parts) / max(sum(r for _, r in parts), 1e-20)

    def search_group(self, block: arch.BlockSpec, group: arch.ScaleGroup) -> None:
        layers = [f"{block.name}.{n}" for n in group.layers]
        if not all(n in self.bits for n in layers):
            return  # a full-precision layer gains nothing from scaling
        filtered = self.parts["token_filter"]
        stats = [self.calibration.stats.linears[n] for n in layers]
        x_mean = sum(s.absmean_image if filtered else s.absmean_all for s in stats)
        w_mean = weight_channel_mean([self.model.get_submodule(n).weight for n in layers])
        device = self.model.get_submodule(layers[0]).weight.device
        candidates = {i / self.config.grid: candidate_scales(x_mean, i / self.config.grid, w_mean).to(device)
                      for i in range(self.config.grid)}
        if self.parts["rounding"] == "gptq":
            # GPTQ's error feedback already does part of what scales do: no scaling (plain GPTQ) stays a
            # candidate, so the search can only improve on it. (AutoAWQ's grid has none: duo alpha 0 is 1 / w.)
            candidates[UNSCALED] = torch.ones_like(x_mean, device=device)
        recon = {}
        originals = {n: self.model.get_submodule(n).weight.detach().clone() for n in layers}
        for label, s in candidates.items():
            with torch.no_grad():
                for n in layers:
                    self.model.get_submodule(n).weight.copy_(self.round_trip(n, originals[n], s))
            recon[label] = self.module_error(block, group)
        with torch.no_grad():
            for n in layers:
                self.model.get_submodule(n).weight.copy_(originals[n])
        scores = dict(recon)
        prev = f"{block.name}.{group.prev_op}"
        if self.parts["task_aware"]:
            scores = {}
            for label in sorted(recon, key=recon.get)[: self.config.task_topk]:
                saved = snapshot(self.model, [prev] + layers)
                self.round_scaled(layers, self.scale_group(block, group, layers, label, candidates[label]))
                scores[label] = self.task_loss() + recon[label]
                restore(self.model, saved)
        best = min(scores, key=scores.get)
        self.chosen_scales.update(self.scale_group(block, group, layers, best, candidates[best]))
        for n in layers:
            self.entries[n] = {"alpha": best, "alpha_recon": min(recon, key=recon.get), "recon": recon[best],
                               "recon_alpha0": recon[0.0], "score": scores[best]}

    def scale_group(self, block: arch.BlockSpec, group: arch.ScaleGroup, layers: list[str], label,
                    s: Tensor) -> dict[str, Tensor]:
        """Folds scale s into the group's linears (and its inverse into the op before); returns the scale
        per linear. Unscaled: nothing to fold, {}."""
        if label == UNSCALED:
            return {}
        apply_scale(self.model, f"{block.name}.{group.prev_op}", layers, group.fold, s)
        return {n: s for n in layers}

    def clip(self, block: arch.BlockSpec) -> None:
        """AutoAWQ's clipping search on each planned linear of a clippable group, on its (scaled) inputs."""
        clippable = {f"{block.name}.{n}" for g in arch.SCALE_GROUPS if g.clip for n in g.layers}
        for name in self.planned(block.name):
            if name not in clippable:
                continue
            weight = self.model.get_submodule(name).weight
            x = self.sample_rows(name)
            if name in self.chosen_scales:
                x = x / self.chosen_scales[name].to(x.device)[None, :]
            self.clip_scales[name] = clip_search(weight, x, self.bits[name])
            ratio = self.clip_scales[name] / group_scales(weight, self.bits[name])
            self.entries.setdefault(name, {})["clip_mean_ratio"] = float(ratio.mean())

    def round(self, block: arch.BlockSpec) -> None:
        """The block's final rounding. GPTQ's Hessians come from the scale-search capture when there was
        one (so the rounding is exactly the one the search scored), else from one exercise of the block."""
        layers = self.planned(block.name)
        if self.parts["rounding"] == "gptq" and not self.hessians:
            self.capture_hessians(block, layers)
        self.round_scaled(layers, self.chosen_scales)
        self.hessians = {}

    def capture_hessians(self, block: arch.BlockSpec, layers: list[str]) -> None:
        per_scene: dict[str, dict[int, Tensor]] = {n: {} for n in layers}

        def hook(name):
            def accumulate(module, args):
                x, scene = args[0].detach().float(), self.forward.current_scene
                _accumulate(per_scene[name], scene, x[..., self.token_mask(block, x, scene), :].reshape(-1, x.shape[-1]))
            return accumulate

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
        try:
            self.forward.exercise(block)
        finally:
            for h in handles:
                h.remove()
        self.hessians = {n: self.reduce_hessian(per_scene[n]) for n in layers}

    def quantize_block(self, block: arch.BlockSpec) -> dict[str, dict]:
        """Runs the method's steps on one block; returns the block's report entries."""
        self.entries = {}
        if self.parts["scale_search"]:
            self.capture(block)
            for group in arch.SCALE_GROUPS:
                self.search_group(block, group)
            if self.parts["clip"]:
                self.clip(block)
            self.calls, self.rows = {}, {}  # the block's captured activations are no longer needed
        self.round(block)
        return dict(self.entries)

    def pack(self) -> None:
        for name, bits in self.bits.items():
            linear = self.model.get_submodule(name)
            replace_module(self.model, name, QuantLinear.from_linear(linear, bits, name=name, scales=self.qscales[name]))


def _accumulate(per_scene: dict[int, Tensor], scene: int, rows: Tensor) -> None:
    h = rows.t() @ rows
    per_scene[scene] = per_scene[scene] + h if scene in per_scene else h


def _peak_memory(device: torch.device) -> tuple[float, float | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return rss, cuda


@torch.no_grad()  # PTQ never needs gradients; keeps callers' grad mode untouched
def quantize_model(model_fp: nn.Module, calib: CalibrationSet, config: QuantConfig | None = None,
                   calibration: Calibration | None = None, calib_dir: str | Path | None = None,
                   inplace: bool = False, report_out: list | None = None) -> nn.Module:
    """Full-precision VGGT -> quantized model (QuantLinear modules; `quant_plan` and `quant_info` set).

    `inplace` quantizes `model_fp` itself (one fp32 copy of the model in memory); otherwise a copy.
    With `calib_dir`, the calibration and the per-block progress live there and a killed run resumes.
    `report_out`, if given, receives the QuantReport (timings, block-forwards, peak memory)."""
    config = config or QuantConfig()
    config.validate()
    clock = time.perf_counter()
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    shard = current_shard()
    parts = config.parts
    # A plan that does not need the sensitivity report is checked before any work or output.
    needs_sensitivity = plan_choice(config) == "auto"
    plan = None if needs_sensitivity else resolve_plan(model_fp, config, None)
    model = (model_fp if inplace else copy.deepcopy(model_fp)).float().eval().to(device)
    report = QuantReport("")
    if calibration is None:
        calibration = calibrate(model, calib, calib_dir, sensitivity=needs_sensitivity, dtype=dtype,
                                cached=config.block_cache, shard=shard, scope=config.scope)
        report.block_forwards["calibrate"] = calibration.block_forwards
        report.seconds["calibrate"] = time.perf_counter() - clock
    plan = plan or resolve_plan(model, config, calibration)
    missing = [n for n in quantized_layers(plan) if n not in calibration.stats.linears]
    if missing:
        raise InputError(f"the calibration has no statistics for {len(missing)} planned layer(s) (e.g. {missing[0]}): "
                         f"it was made for another scope or model; recalibrate with --scope {config.scope}")
    report.plan_summary = summarize(plan)
    logger.info(report.plan_summary)
    scenes = local_scenes(calib, shard)
    total = len(calib.scenes)
    forward = make_forward(model, scenes, dtype, config.block_cache, config.scope)
    try:
        stage = time.perf_counter()
        fp_preds = forward.predict()
        check_finite(fp_preds, "the full-precision model")
        use_gt = config.targets == "auto" and calib.has_ground_truth
        targets = make_targets([s.scene for s in scenes], fp_preds, use_gt=use_gt)
        report.fp_task_loss = gathered_task_loss(fp_preds, targets, shard, total, config.loss_weights)[0]
        cic = None
        if parts["cic"]:
            cic = cic_token(calibration.stats.camera_tokens, calibration.stats.patch_token_norm, config.cic_components)
            arch.set_extra_camera_tokens(model, cic.token.to(device))
        report.seconds["targets"] = time.perf_counter() - stage
        stage, forwards_before = time.perf_counter(), forward.block_forwards
        progress = QuantizeProgress(calib_dir, {"calibration": calibration.identity, "plan": plan,
                                                "config": asdict(config), "qvggt_export": __version__},
                                    writer=shard.is_main)
        quantizer = BlockQuantizer(model, forward, calibration, plan, config, targets, shard, total)
        blocks = arch.quant_blocks(model, config.scope)
        for block in tqdm(blocks, desc=f"quantize ({config.method})", unit="block", disable=not shard.is_main):
            # A saved block whose file is damaged or missing is quantized again (load_block gives None).
            saved = progress.load_block(model, block.name) if progress.is_done(block.name) else None
            if saved is not None:
                quantizer.qscales.update(saved)
                report.resumed_blocks += 1
            else:
                entries = quantizer.quantize_block(block)
                progress.save_block(model, block.name, {n: quantizer.qscales[n] for n in quantizer.planned(block.name)},
                                    entries)
            report.layers.update(progress.done[block.name])
            forward.advance(block)
        report.seconds["blocks"] = time.perf_counter() - stage
        stage = time.perf_counter()
        quantizer.pack()
        final = forward.predict()
        check_finite(final, "the quantized model")
        report.block_forwards["quantize"] = forward.block_forwards - forwards_before  # trials, cache, final check
        report.final_task_loss = gathered_task_loss(final, targets, shard, total, config.loss_weights)[0]
        report.seconds["pack+check"] = time.perf_counter() - stage
    finally:
        forward.close()
    report.seconds["total"] = time.perf_counter() - clock
    report.peak_rss_gb, report.peak_cuda_gb = _peak_memory(device)
    model.quant_plan = plan
    model.quant_info = {
        "method": config.method, "parts": parts, "config": asdict(config), "calibration": calib.describe(),
        "calibration_identity": calibration.identity, "targets": "ground truth" if use_gt else "fp outputs",
        "cic": None if cic is None else {"k": cic.k, "patch_token_norm": cic.patch_token_norm,
                                         "camera_tokens": cic.num_tokens,
                                         "explained_variance": float(cic.explained_variance.sum())},
        "layers": report.layers,
    }
    report.progress = progress
    _log_report(report, config, shard)
    if report_out is not None:
        report_out.append(report)
    return model


def _log_report(report: QuantReport, config: QuantConfig, shard: Shard) -> None:
    if not shard.is_main:
        return
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    forwards = ", ".join(f"{k} {v}" for k, v in report.block_forwards.items())
    cuda = "" if report.peak_cuda_gb is None else f", CUDA peak {report.peak_cuda_gb:.2f} GB"
    logger.info("quantized with %s: %s; block-forwards: %s; peak RSS %.2f GB%s%s", config.method, stages,
                forwards, report.peak_rss_gb, cuda,
                f"; resumed {report.resumed_blocks} block(s)" if report.resumed_blocks else "")


def weight_bytes(model: nn.Module, quantizable_only: bool = True, scope: str = arch.DEFAULT_SCOPE) -> int:
    """Bytes of the quantizable linears' (of `scope`) weights as deployed: packed codes + fp16 scales for
    QuantLinear, fp16 for linears left in full precision."""
    total = 0
    names = set(arch.quantizable_linears(model, scope))
    for name, module in model.named_modules():
        if quantizable_only and name not in names:
            continue
        if isinstance(module, QuantLinear):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * 2
    return total
