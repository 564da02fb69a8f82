"""One generic quantizer for every method: rtn | awq | gptq | qvggt.

The model is processed a block at a time in execution order (arch.quant_blocks). Per block, the scale
groups (arch.SCALE_GROUPS) are searched and folded, then the block's planned linears are fake-quantized
in place, so later blocks' task-loss evaluations see the already-quantized earlier ones. Packing into
QuantLinear modules is a separate last step that reuses the exact scales of the search.

QVGGT = AWQ-style scale search + mixed precision + token filtering + CIC + task-aware search; with all
four parts switched off it is AWQ.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import arch
from ..errors import InputError
from ..log import logger
from .calibration_set import CalibrationSet
from .calibration_run import Calibration, calibrate
from .cic import DEFAULT_COMPONENTS, cic_token
from .gptq import gptq_quantize
from .linear import QuantLinear
from .objective import check_finite, make_targets, predict, task_loss
from .plan import auto_plan, paper_plan, quantized_layers, read_plan_file, summarize, uniform_plan
from .scale import (apply_scale, candidate_scales, fake_quantize_with_scales, reconstruction_error, restore,
                    replace_module, snapshot)

METHODS = ("rtn", "awq", "gptq", "qvggt")


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
    grid: int = 11  # alphas 0, 1/(grid-1), ..., 1
    task_topk: int = 3  # alphas per scale group (best by reconstruction) scored by the task loss
    targets: str = "auto"  # "auto" (ground truth when the calibration set has it) | "fp"
    cic_components: int = DEFAULT_COMPONENTS

    def validate(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.grid < 2:
            raise InputError(f"--grid must be at least 2, got {self.grid}")
        if self.task_topk < 1:
            raise InputError(f"--task-topk must be at least 1, got {self.task_topk}")
        if self.targets not in ("auto", "fp"):
            raise InputError(f"--targets must be auto or fp, got {self.targets!r}")

    @property
    def parts(self) -> dict[str, bool]:
        """Which method components are in effect."""
        qvggt = self.method == "qvggt"
        return {"scale_search": self.method in ("awq", "qvggt"), "gptq": self.method == "gptq",
                "mixed": qvggt and self.mixed, "token_filter": qvggt and self.token_filter,
                "cic": qvggt and self.cic, "task_aware": qvggt and self.task_aware}


@dataclass
class QuantReport:
    plan_summary: str
    layers: dict[str, dict] = field(default_factory=dict)
    fp_task_loss: float | None = None
    final_task_loss: float | None = None
    seconds: float = 0.0


def plan_choice(config: QuantConfig) -> str:
    return config.plan or ("auto" if config.parts["mixed"] else "uniform")


def resolve_plan(model: nn.Module, config: QuantConfig, calibration: Calibration | None) -> dict:
    bits_precision = config.precision
    choice = plan_choice(config)
    if choice == "uniform":
        return uniform_plan(model, bits_precision)
    if choice == "paper":
        return paper_plan(model, bits_precision)
    if choice == "auto":
        if calibration is None or calibration.sensitivity is None:
            raise InputError("--plan auto needs the sensitivity analysis (calibrate without --no-sensitivity)")
        return auto_plan(model, calibration.sensitivity, config.protect, config.threshold, bits_precision)
    return read_plan_file(model, Path(choice))


class _Quantizer:
    def __init__(self, model: nn.Module, calib: CalibrationSet, calibration: Calibration, plan: dict,
                 config: QuantConfig, targets, report: QuantReport) -> None:
        self.model, self.calib, self.calibration = model, calib, calibration
        self.plan, self.config, self.targets, self.report = plan, config, targets, report
        self.bits = quantized_layers(plan)
        self.qscales: dict[str, Tensor] = {}

    def task_loss(self) -> float:
        return task_loss(predict(self.model, self.calib), self.targets)[0]

    def _fake_quantize(self, names) -> None:
        with torch.no_grad():
            for name in names:
                weight = self.model.get_submodule(name).weight
                wq, self.qscales[name] = fake_quantize_with_scales(weight, self.bits[name])
                weight.copy_(wq)

    def search_group(self, block: str, group: arch.ScaleGroup) -> None:
        layers = [f"{block}.{n}" for n in group.layers]
        if not all(n in self.bits for n in layers):
            return  # a full-precision layer gains nothing from scaling
        parts = self.config.parts
        stats = [self.calibration.stats.linears[n] for n in layers]
        absmean = sum(s.absmean_image if parts["token_filter"] else s.absmean_all for s in stats)
        alphas = [i / (self.config.grid - 1) for i in range(self.config.grid)]
        recon = {}
        for alpha in alphas:
            s = candidate_scales(absmean, alpha)
            recon[alpha] = sum(reconstruction_error(self.model.get_submodule(n).weight, (
                st.samples_image if parts["token_filter"] else st.samples_all).float(), s, self.bits[n])
                for n, st in zip(layers, stats)) / len(layers)
        scores = dict(recon)
        prev = f"{block}.{group.prev_op}"
        if parts["task_aware"]:
            scores = {}
            for alpha in sorted(recon, key=recon.get)[: self.config.task_topk]:
                saved = snapshot(self.model, [prev] + layers)
                apply_scale(self.model, prev, layers, group.fold, candidate_scales(absmean, alpha))
                self._fake_quantize(layers)
                scores[alpha] = self.task_loss() + recon[alpha]
                restore(self.model, saved)
        best = min(scores, key=scores.get)
        apply_scale(self.model, prev, layers, group.fold, candidate_scales(absmean, best))
        for n in layers:
            self.report.layers[n] = {"alpha": best, "recon": recon[best], "recon_alpha0": recon[0.0],
                                     "score": scores[best]}

    def gptq_block(self, block: str) -> None:
        layers = [f"{block}.{t}" for t in arch.LINEAR_TYPES if f"{block}.{t}" in self.bits]
        hessians: dict[str, Tensor] = {}

        def hook(name):
            def accumulate(module, args):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1]).cpu()
                hessians[name] = hessians.get(name, 0) + x.t() @ x
            return accumulate

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in layers]
        try:
            predict(self.model, self.calib)
        finally:
            for h in handles:
                h.remove()
        with torch.no_grad():
            for name in layers:
                weight = self.model.get_submodule(name).weight
                wq, self.qscales[name] = gptq_quantize(weight, hessians[name], self.bits[name])
                weight.copy_(wq.to(weight.dtype))
                self.report.layers[name] = {"method": "gptq"}

    def run(self) -> None:
        parts = self.config.parts
        for block in tqdm([b.name for b in arch.quant_blocks(self.model)], desc=f"quantize ({self.config.method})",
                          unit="block"):
            if parts["gptq"]:
                self.gptq_block(block)
                continue
            if parts["scale_search"]:
                for group in arch.SCALE_GROUPS:
                    self.search_group(block, group)
            self._fake_quantize([f"{block}.{t}" for t in arch.LINEAR_TYPES if f"{block}.{t}" in self.bits])

    def pack(self) -> None:
        for name, bits in self.bits.items():
            linear = self.model.get_submodule(name)
            replace_module(self.model, name, QuantLinear.from_linear(linear, bits, name=name,
                                                                      scales=self.qscales[name]))


@torch.no_grad()  # PTQ never needs gradients; keeps callers' grad mode untouched
def quantize_model(model_fp: nn.Module, calib: CalibrationSet, config: QuantConfig | None = None,
                   calibration: Calibration | None = None, calib_dir: str | Path | None = None) -> nn.Module:
    """Full-precision VGGT -> quantized copy (QuantLinear modules; `quant_plan` and `quant_info` set)."""
    config = config or QuantConfig()
    config.validate()
    start = time.perf_counter()
    parts = config.parts
    # A plan that does not need the sensitivity report is checked before any work or output.
    needs_sensitivity = plan_choice(config) == "auto"
    plan = None if needs_sensitivity else resolve_plan(model_fp, config, None)
    if calibration is None:
        calibration = calibrate(model_fp, calib, calib_dir, sensitivity=needs_sensitivity)
    plan = plan or resolve_plan(model_fp, config, calibration)
    model = copy.deepcopy(model_fp).float().eval()
    logger.info(summarize(plan))
    fp_preds = predict(model_fp, calib)
    check_finite(fp_preds, "the full-precision model")
    use_gt = config.targets == "auto" and calib.has_ground_truth
    targets = make_targets(calib, fp_preds, use_gt=use_gt)
    report = QuantReport(summarize(plan))
    cic = None
    if parts["cic"]:
        cic = cic_token(calibration.stats.camera_tokens, calibration.stats.patch_token_norm, config.cic_components)
        arch.set_extra_camera_tokens(model, cic.token.to(next(model.parameters()).device))
    quantizer = _Quantizer(model, calib, calibration, plan, config, targets, report)
    if parts["task_aware"]:
        report.fp_task_loss = task_loss(fp_preds, targets)[0]
    quantizer.run()
    quantizer.pack()
    check_finite(predict(model, calib), "the quantized model")
    report.seconds = time.perf_counter() - start
    model.quant_plan = plan
    model.quant_info = {
        "method": config.method, "parts": parts, "config": asdict(config), "calibration": calib.describe(),
        "calibration_identity": calibration.identity, "targets": "ground truth" if use_gt else "fp outputs",
        "cic": None if cic is None else {"k": cic.k, "patch_token_norm": cic.patch_token_norm,
                                         "camera_tokens": cic.num_tokens,
                                         "explained_variance": float(cic.explained_variance.sum())},
        "layers": report.layers, "seconds": report.seconds,
    }
    logger.info("quantized with %s in %.1f s", config.method, report.seconds)
    return model


def weight_bytes(model: nn.Module, quantizable_only: bool = True) -> int:
    """Bytes of the quantizable linears' weights as deployed: packed codes + fp16 scales for QuantLinear,
    fp16 for linears left in full precision."""
    total = 0
    names = set(arch.quantizable_linears(model))
    for name, module in model.named_modules():
        if quantizable_only and name not in names:
            continue
        if isinstance(module, QuantLinear):
            total += module.weight_bytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * 2
    return total
