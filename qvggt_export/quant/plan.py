"""Mixed-precision plans: which linear gets which precision.

A plan is a JSON-serialisable dict keyed by dotted linear name:

    {"format": 1, "source": "auto|paper|uniform|file:PATH", "default_precision": "w4a16",
     "protected_blocks": [...], "layers": {"aggregator.frame_blocks.0.attn.qkv": "w4a16", ...}}

Protected blocks keep every linear in full precision ("fp16") except the always-quantized types
(attn.proj). A user's plan file (JSON or YAML) lists `protected_blocks` (full or short names such as
"frame.14"), and optionally `precision` and per-layer overrides `layers: {name: fp16|w4a16|w8a16}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from .. import arch
from ..errors import InputError

PRECISIONS = ("fp16", "w4a16", "w8a16")
PLAN_FILE_KEYS = {"protected_blocks", "precision", "layers"}


def _resolve_blocks(model: nn.Module, names) -> list[str]:
    resolved, unknown = [], []
    for text in names:
        name = arch.resolve_block_name(model, str(text))
        (resolved if name else unknown).append(name or str(text))
    if unknown:
        n = len(arch.aggregator_blocks(model)) // 2
        raise InputError(f"plan names block(s) that do not exist in this model: {', '.join(unknown)} "
                         f"(it has frame/global blocks 0..{n - 1} and camera trunk blocks "
                         f"0..{len(arch.quant_blocks(model)) - 2 * n - 1})")
    return list(dict.fromkeys(resolved))


def build_plan(model: nn.Module, protected_blocks=(), precision: str = "w4a16", source: str = "uniform",
               overrides: dict[str, str] | None = None, criterion: dict | None = None) -> dict:
    if precision not in PRECISIONS[1:]:
        raise InputError(f"plan precision must be w4a16 or w8a16, got {precision!r}")
    protected = _resolve_blocks(model, protected_blocks)
    layers = {}
    for name in arch.quantizable_linears(model):
        keep_fp = arch.block_of(name) in protected and arch.linear_type(name) not in arch.ALWAYS_QUANTIZED_IN_PROTECTED
        layers[name] = "fp16" if keep_fp else precision
    for name, value in (overrides or {}).items():
        if name not in layers:
            raise InputError(f"plan names a layer that is not a quantizable linear of this model: {name}")
        if value not in PRECISIONS:
            raise InputError(f"plan gives {name} precision {value!r}; expected one of {', '.join(PRECISIONS)}")
        layers[name] = value
    plan = {"format": 1, "source": source, "default_precision": precision, "protected_blocks": protected,
            "layers": layers}
    if criterion:
        plan["criterion"] = criterion
    return plan


def uniform_plan(model: nn.Module, precision: str = "w4a16") -> dict:
    return build_plan(model, (), precision, "uniform")


def paper_plan(model: nn.Module, precision: str = "w4a16") -> dict:
    blocks = arch.paper_protected_blocks(model)
    if blocks is None:
        raise InputError(f"--plan paper is the VGGT-1B plan ({arch.PAPER_DEPTH} blocks); this model has "
                         f"{len(arch.aggregator_blocks(model)) // 2}: use --plan auto or a plan file")
    return build_plan(model, blocks, precision, "paper")


def default_protect_count(model: nn.Module) -> int:
    """The paper's share of protected aggregator blocks (4 of 48), at least one."""
    return max(1, math.ceil(arch.PAPER_PROTECTED_FRACTION * len(arch.aggregator_blocks(model)) - 1e-9))


def auto_plan(model: nn.Module, sensitivity: dict, protect: int | None = None, threshold: float | None = None,
              precision: str = "w4a16") -> dict:
    """Protects the blocks whose RTN quantization hurts the task loss most: the `protect` worst ones,
    or every block whose loss increase exceeds `threshold`."""
    scores = {name: entry["score"] for name, entry in sensitivity["blocks"].items()}
    unknown = [n for n in scores if arch.resolve_block_name(model, n) is None]
    if unknown:
        raise InputError(f"sensitivity report does not match this model (blocks {', '.join(unknown[:3])})")
    ranked = sorted(scores, key=scores.get, reverse=True)
    if threshold is not None:
        chosen = [n for n in ranked if scores[n] > threshold]
        criterion = {"threshold": threshold}
    else:
        k = default_protect_count(model) if protect is None else protect
        if k < 0:
            raise InputError(f"--protect must be >= 0, got {k}")
        chosen = ranked[:k]
        criterion = {"protect": k}
    criterion["score"] = sensitivity.get("score", "task loss increase")
    return build_plan(model, chosen, precision, "auto", criterion=criterion)


def read_plan_file(model: nn.Module, path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"plan file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # JSON and YAML parsers raise different types; all mean a malformed file
        raise InputError(f"plan file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"plan file {path} must hold a mapping with 'protected_blocks'")
    if "layers" in data and "format" in data:  # a plan written by us: take its per-layer map as is
        return build_plan(model, data.get("protected_blocks", ()), data.get("default_precision", "w4a16"),
                          f"file:{path.name}", overrides=data["layers"])
    extra = set(data) - PLAN_FILE_KEYS
    if extra:
        raise InputError(f"plan file {path} has unknown key(s) {', '.join(sorted(extra))}; "
                         f"expected {', '.join(sorted(PLAN_FILE_KEYS))}")
    return build_plan(model, data.get("protected_blocks") or (), data.get("precision", "w4a16"),
                      f"file:{path.name}", overrides=data.get("layers"))


def quantized_layers(plan: dict) -> dict[str, int]:
    """Linear name -> bits, for the layers the plan quantizes."""
    return {name: 4 if p == "w4a16" else 8 for name, p in plan["layers"].items() if p != "fp16"}


def summarize(plan: dict) -> str:
    counts = {p: sum(v == p for v in plan["layers"].values()) for p in PRECISIONS}
    protected = ", ".join(plan["protected_blocks"]) or "none"
    return (f"plan {plan['source']}: {counts['w4a16']} w4a16, {counts['w8a16']} w8a16, {counts['fp16']} fp16 "
            f"linears; protected blocks: {protected}")
