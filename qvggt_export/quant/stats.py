"""Activation statistics of the full-precision model on the calibration scenes (one forward pass).

Per quantizable linear: mean |x| per input channel over image (patch) tokens only and over all tokens
(the activation side of the scale search). Also the camera tokens the camera head consumes (for CIC) and the mean norm of the patch tokens next to
them.

Sums are accumulated on the model's device in fp32, per scene (no activation copies), and combined in
scene order, so the statistics are the same whether the scenes ran in one process or were sharded over
ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import arch
from ..errors import QVGGTError
from .distributed import Shard, gather_in_order, sum_in_order
from .forward import FullModelForward

STAT_FIELDS = ("absmean_image", "absmean_all")


@dataclass
class LinearStats:
    absmean_image: Tensor  # [K]
    absmean_all: Tensor  # [K]


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

    def __init__(self, k: int, device: torch.device) -> None:
        self.sum_image = torch.zeros(k, device=device)
        self.sum_all = torch.zeros(k, device=device)
        self.n_image = 0
        self.n_all = 0

    def add(self, rows: Tensor, is_image: Tensor) -> None:
        a = rows.abs().float()
        self.sum_all += a.sum(0)
        self.n_all += rows.shape[0]
        self.sum_image += a[is_image].sum(0)
        self.n_image += int(is_image.sum())


def _combine(sums_image: Tensor, sums_all: Tensor, n_image: int, n_all: int) -> LinearStats:
    all_mean = (sums_all / max(n_all, 1)).float().cpu()
    # A block that never sees patch tokens (the camera trunk) has no image-only statistics: token
    # filtering does not apply there, so its image statistics are its all-token statistics.
    if n_image == 0:
        return LinearStats(all_mean, all_mean)
    return LinearStats((sums_image / n_image).float().cpu(), all_mean)


@torch.no_grad()
def collect_stats(model: nn.Module, forward: FullModelForward, total_scenes: int, shard: Shard) -> ActivationStats:
    """Statistics over every calibration scene from one pass of `forward` over this rank's scenes."""
    names = arch.quantizable_linears(model, forward.scope)
    blocks = {b.name: b for b in arch.quant_blocks(model, forward.scope)}
    device = next(model.parameters()).device
    scenes = {local.index: local.scene for local in forward.scenes}
    per_scene: dict[int, dict[str, _SceneAccumulator]] = {i: {} for i in scenes}
    camera_tokens: list[Tensor] = []
    patch_norms: list[Tensor] = []

    def linear_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if not torch.isfinite(x).all():
                raise QVGGTError(f"NaN/Inf activations at the input of {name} during calibration; "
                                 "the checkpoint or the calibration images are broken")
            index = forward.current_scene
            is_image = arch.image_token_mask(model, blocks[arch.block_of(name)], x, tuple(scenes[index].images.shape[-2:]))
            accumulators = per_scene[index]
            if name not in accumulators:
                accumulators[name] = _SceneAccumulator(x.shape[-1], device)
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
    # Token counts of every linear in one exchange (small ints); the sums scene by scene, in scene order.
    counts = gather_in_order([{n: (acc[n].n_image, acc[n].n_all) for n in names} for acc in local], shard,
                             total_scenes)
    linears = {}
    for name in names:
        sums_image = sum_in_order([acc[name].sum_image for acc in local], shard, total_scenes)
        sums_all = sum_in_order([acc[name].sum_all for acc in local], shard, total_scenes)
        linears[name] = _combine(sums_image, sums_all, sum(c[name][0] for c in counts),
                                 sum(c[name][1] for c in counts))
    cams = torch.cat(gather_in_order(camera_tokens, shard, total_scenes))
    if not torch.isfinite(cams).all():
        raise QVGGTError("NaN/Inf in the camera tokens during calibration")
    norms = torch.cat(gather_in_order(patch_norms, shard, total_scenes))
    return ActivationStats(linears, cams, float(norms.mean()))
