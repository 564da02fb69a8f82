"""Activation statistics of the full-precision model on the calibration scenes (one forward pass).

Per quantizable linear: mean |x| per input channel over image (patch) tokens only and over all tokens,
and a bounded sample of input rows of each kind (the layer-reconstruction data of the scale search).
Also the camera tokens the camera head consumes (for CIC) and the mean norm of the patch tokens next to
them.

Sums are accumulated on the model's device in fp32, per scene; only the sampled rows leave the device.
Scenes are combined in scene order and each scene samples its rows with its own seeded generator, so the
statistics are the same whether the scenes ran in one process or were sharded over ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import arch
from ..errors import QVGGTError
from .distributed import Shard, gather_in_order, sum_in_order
from .forward import FullModelForward, LocalScene

STAT_FIELDS = ("absmean_image", "absmean_all", "samples_image", "samples_all")


@dataclass
class LinearStats:
    absmean_image: Tensor  # [K]
    absmean_all: Tensor  # [K]
    samples_image: Tensor  # [M, K] input rows of patch tokens
    samples_all: Tensor  # [M, K] input rows of any token


@dataclass
class ActivationStats:
    linears: dict[str, LinearStats]
    camera_tokens: Tensor  # [N, 2C]: every calibration frame's camera token of the last block
    patch_token_norm: float  # mean L2 norm of the patch tokens of the last block

    def to_tensors(self) -> dict[str, Tensor]:
        out = {f"{name}/{f}": getattr(s, f).clone().contiguous() for name, s in self.linears.items() for f in STAT_FIELDS}
        out["cic/camera_tokens"] = self.camera_tokens.contiguous()
        out["cic/patch_token_norm"] = torch.tensor([self.patch_token_norm])
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "ActivationStats":
        names = sorted({k.rsplit("/", 1)[0] for k in tensors if not k.startswith("cic/")})
        linears = {n: LinearStats(*(tensors[f"{n}/{f}"] for f in STAT_FIELDS)) for n in names}
        return cls(linears, tensors["cic/camera_tokens"], float(tensors["cic/patch_token_norm"][0]))


class _SceneAccumulator:
    """One linear's statistics over one scene."""

    def __init__(self, k: int, device: torch.device, rows_per_call: int, generator: torch.Generator) -> None:
        self.sum_image = torch.zeros(k, device=device)
        self.sum_all = torch.zeros(k, device=device)
        self.n_image = 0
        self.n_all = 0
        self.samples_image: list[Tensor] = []
        self.samples_all: list[Tensor] = []
        self.rows_per_call = rows_per_call
        self.generator = generator

    def _sample(self, rows: Tensor) -> Tensor:
        if rows.shape[0] > self.rows_per_call:
            pick = torch.randperm(rows.shape[0], generator=self.generator)[: self.rows_per_call]
            rows = rows[pick.sort().values.to(rows.device)]
        return rows.float().cpu()

    def add(self, rows: Tensor, is_image: Tensor) -> None:
        a = rows.abs().float()
        self.sum_all += a.sum(0)
        self.n_all += rows.shape[0]
        self.sum_image += a[is_image].sum(0)
        self.n_image += int(is_image.sum())
        self.samples_all.append(self._sample(rows))
        if is_image.any():
            self.samples_image.append(self._sample(rows[is_image]))

    def portable(self) -> dict:
        """What the combination across scenes needs, samples on the CPU."""
        empty = torch.zeros(0, self.sum_all.shape[0])
        return {"n_image": self.n_image, "n_all": self.n_all,
                "samples_image": torch.cat(self.samples_image) if self.samples_image else empty,
                "samples_all": torch.cat(self.samples_all)}


def _combine(sums_image: Tensor, sums_all: Tensor, parts: list[dict]) -> LinearStats:
    n_all = sum(p["n_all"] for p in parts)
    n_image = sum(p["n_image"] for p in parts)
    all_mean = (sums_all / max(n_all, 1)).float().cpu()
    samples_all = torch.cat([p["samples_all"] for p in parts])
    # A block that never sees patch tokens (the camera trunk) has no image-only statistics: token
    # filtering does not apply there, so its image statistics are its all-token statistics.
    if n_image == 0:
        return LinearStats(all_mean, all_mean, samples_all, samples_all)
    return LinearStats((sums_image / n_image).float().cpu(), all_mean,
                       torch.cat([p["samples_image"] for p in parts]), samples_all)


@torch.no_grad()
def collect_stats(model: nn.Module, forward: FullModelForward, total_scenes: int, shard: Shard,
                  samples_per_linear: int = 256, seed: int = 0) -> ActivationStats:
    """Statistics over every calibration scene from one pass of `forward` over this rank's scenes."""
    names = arch.quantizable_linears(model)
    rows_per_call = max(1, -(-samples_per_linear // total_scenes))
    block_has_patches = {b.name: b.has_patch_tokens for b in arch.quant_blocks(model)}
    device = next(model.parameters()).device
    scenes = {local.index: local.scene for local in forward.scenes}
    per_scene: dict[int, dict[str, _SceneAccumulator]] = {i: {} for i in scenes}
    generators = {i: torch.Generator().manual_seed(seed * 1_000_003 + i) for i in scenes}
    camera_tokens: list[Tensor] = []
    patch_norms: list[Tensor] = []

    def linear_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise QVGGTError(f"NaN/Inf activations at the input of {name} during calibration; "
                                 "the checkpoint or the calibration images are broken")
            index = forward.current_scene
            if block_has_patches[arch.block_of(name)]:
                per_frame = arch.tokens_per_frame(model, tuple(scenes[index].images.shape[-2:]))
                is_image = arch.patch_token_mask(x, per_frame, arch.num_special_tokens(model))
            else:
                is_image = torch.zeros(x.shape[-2], dtype=torch.bool, device=x.device)
            accumulators = per_scene[index]
            if name not in accumulators:
                accumulators[name] = _SceneAccumulator(x.shape[-1], device, rows_per_call, generators[index])
            accumulators[name].add(x.reshape(-1, x.shape[-1]), is_image.expand(x.shape[:-1]).reshape(-1))
        return hook

    def aggregator_hook(module: nn.Module, args: tuple, layers: dict[int, Tensor]) -> None:
        camera_tokens.append(arch.camera_head_input(layers, model).reshape(-1, layers[max(layers)].shape[-1]).float().cpu())
        patch_norms.append(arch.camera_head_patch_tokens(layers, model).float().norm(dim=-1).flatten().cpu())

    handles = [model.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in names]
    handles.append(arch.aggregator(model).register_forward_hook(aggregator_hook))
    try:
        forward.predict()
    finally:
        for h in handles:
            h.remove()
    local = [per_scene[i] for i in sorted(per_scene)]
    portable = gather_in_order([{n: acc[n].portable() for n in names} for acc in local], shard, total_scenes)
    linears = {}
    for name in names:
        sums_image = sum_in_order([acc[name].sum_image for acc in local], shard, total_scenes)
        sums_all = sum_in_order([acc[name].sum_all for acc in local], shard, total_scenes)
        linears[name] = _combine(sums_image, sums_all, [p[name] for p in portable])
    cams = torch.cat(gather_in_order(camera_tokens, shard, total_scenes))
    if not torch.isfinite(cams).all():
        raise QVGGTError("NaN/Inf in the camera tokens during calibration")
    norms = torch.cat(gather_in_order(patch_norms, shard, total_scenes))
    return ActivationStats(linears, cams, float(norms.mean()))
