"""Mixed-precision plans: which linear gets which precision.

A plan is a JSON-serialisable dict keyed by dotted linear name:

    {"format": 1, "source": "auto|paper|uniform|file:PATH", "scope": "aggregator", "default_precision": "w4a16",
     "protected_blocks": [...], "layers": {"aggregator.frame_blocks.0.attn.qkv": "w4a16", ...}}

`scope` (arch.SCOPES) says which blocks the plan covers: `layers` lists every linear of those blocks;
the linears of other blocks stay full precision and are not listed. A plan without a scope (written
before scopes existed) is the default scope.

Protected blocks keep every linear in full precision ("fp16") except the always-quantized types
(attn.proj). A user's plan file (JSON or YAML) lists `protected_blocks` (full or short names such as
"frame.14", "encoder.3"), and optionally `precision`, `scope` and per-layer overrides
`layers: {name: fp16|w4a16|w8a16}`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch import nn

from .. import arch
from ..errors import InputError

PRECISIONS = ("fp16", "w4a16", "w8a16")
PLAN_FILE_KEYS = {"protected_blocks", "precision", "layers", "scope"}


def check_scope(scope: str) -> None:
    if scope not in arch.SCOPES:
        raise InputError(f"--scope must be one of {', '.join(arch.SCOPES)}, got {scope!r}")


def plan_scope(plan: dict) -> str:
    return plan.get("scope", arch.DEFAULT_SCOPE)


def _blocks_in_scope(model: nn.Module, scope: str) -> str:
    """"encoder blocks 0..23, frame blocks 0..23, ..." for error messages."""
    counts: dict[str, int] = {}
    for block in arch.quant_blocks(model, scope):
        counts[block.kind] = counts.get(block.kind, 0) + 1
    return ", ".join(f"{kind} blocks 0..{n - 1}" for kind, n in counts.items())


def _resolve_blocks(model: nn.Module, names, scope: str) -> list[str]:
    resolved, unknown = [], []
    for text in names:
        name = arch.resolve_block_name(model, str(text), scope)
        (resolved if name else unknown).append(name or str(text))
    if unknown:
        raise InputError(f"plan names block(s) that are not in scope {scope} of this model: {', '.join(unknown)} "
                         f"(it has {_blocks_in_scope(model, scope)})")
    return list(dict.fromkeys(resolved))


def build_plan(model: nn.Module, protected_blocks=(), precision: str = "w4a16", source: str = "uniform",
               overrides: dict[str, str] | None = None, criterion: dict | None = None,
               scope: str = arch.DEFAULT_SCOPE) -> dict:
    if precision not in PRECISIONS[1:]:
        raise InputError(f"plan precision must be w4a16 or w8a16, got {precision!r}")
    check_scope(scope)
    protected = _resolve_blocks(model, protected_blocks, scope)
    layers = {}
    for name in arch.quantizable_linears(model, scope):
        keep_fp = arch.block_of(name) in protected and arch.linear_type(name) not in arch.ALWAYS_QUANTIZED_IN_PROTECTED
        layers[name] = "fp16" if keep_fp else precision
    for name, value in (overrides or {}).items():
        if name not in layers:
            raise InputError(f"plan names a layer that is not a quantizable linear of scope {scope} of this "
                             f"model: {name}")
        if value not in PRECISIONS:
            raise InputError(f"plan gives {name} precision {value!r}; expected one of {', '.join(PRECISIONS)}")
        layers[name] = value
    plan = {"format": 1, "source": source, "scope": scope, "default_precision": precision,
            "protected_blocks": protected, "layers": layers}
    if criterion:
        plan["criterion"] = criterion
    return plan


def uniform_plan(model: nn.Module, precision: str = "w4a16", scope: str = arch.DEFAULT_SCOPE) -> dict:
    return build_plan(model, (), precision, "uniform", scope=scope)


def paper_plan(model: nn.Module, precision: str = "w4a16", scope: str = arch.DEFAULT_SCOPE) -> dict:
    """The paper's protected aggregator blocks; the other blocks of `scope` (the encoder's) all quantized."""
    blocks = arch.paper_protected_blocks(model)
    if blocks is None:
        raise InputError(f"--plan paper is the VGGT-1B plan ({arch.PAPER_DEPTH} blocks); this model has "
                         f"{len(arch.aggregator_blocks(model)) // 2}: use --plan auto or a plan file")
    return build_plan(model, blocks, precision, "paper", scope=scope)


def default_protect_count(model: nn.Module) -> int:
    """The paper's share of protected aggregator blocks (4 of 48), at least one."""
    return max(1, math.ceil(arch.PAPER_PROTECTED_FRACTION * len(arch.aggregator_blocks(model)) - 1e-9))


def auto_plan(model: nn.Module, sensitivity: dict, protect: int | None = None, threshold: float | None = None,
              precision: str = "w4a16", scope: str = arch.DEFAULT_SCOPE) -> dict:
    """Protects the blocks whose RTN quantization hurts the task loss most: the `protect` worst ones,
    or every block whose loss increase exceeds `threshold`. Every block of `scope` is ranked (encoder
    blocks next to aggregator blocks); the default count is the paper's share of the aggregator blocks."""
    check_scope(scope)
    report_scope = plan_scope(sensitivity)
    if report_scope != scope:
        raise InputError(f"the sensitivity report ranks the blocks of scope {report_scope}, not {scope}; "
                         f"calibrate with --scope {scope}")
    scores = {name: entry["score"] for name, entry in sensitivity["blocks"].items()}
    unknown = [n for n in scores if arch.resolve_block_name(model, n, scope) is None]
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
    return build_plan(model, chosen, precision, "auto", criterion=criterion, scope=scope)


def read_plan_file(model: nn.Module, path: Path, scope: str = arch.DEFAULT_SCOPE) -> dict:
    """A plan file for the blocks of `scope`; a file that states another scope is refused."""
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
    file_scope = plan_scope(data)
    if file_scope != scope:
        raise InputError(f"plan file {path} is for scope {file_scope}; pass --scope {file_scope}")
    if "layers" in data and "format" in data:  # a plan written by us: take its per-layer map as is
        return build_plan(model, data.get("protected_blocks", ()), data.get("default_precision", "w4a16"),
                          f"file:{path.name}", overrides=data["layers"], scope=scope)
    extra = set(data) - PLAN_FILE_KEYS
    if extra:
        raise InputError(f"plan file {path} has unknown key(s) {', '.join(sorted(extra))}; "
                         f"expected {', '.join(sorted(PLAN_FILE_KEYS))}")
    return build_plan(model, data.get("protected_blocks") or (), data.get("precision", "w4a16"),
                      f"file:{path.name}", overrides=data.get("layers"), scope=scope)


def quantized_layers(plan: dict) -> dict[str, int]:
    """Linear name -> bits, for the layers the plan quantizes."""
    return {name: 4 if p == "w4a16" else 8 for name, p in plan["layers"].items() if p != "fp16"}


def summarize(plan: dict) -> str:
    counts = {p: sum(v == p for v in plan["layers"].values()) for p in PRECISIONS}
    protected = ", ".join(plan["protected_blocks"]) or "none"
    return (f"plan {plan['source']} (scope {plan_scope(plan)}): {counts['w4a16']} w4a16, {counts['w8a16']} w8a16, "
            f"{counts['fp16']} fp16 linears; protected blocks: {protected}")
