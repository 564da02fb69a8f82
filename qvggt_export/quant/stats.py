"""Activation statistics of the full-precision model on the calibration scenes (one forward pass).

Per quantizable linear: mean |x| per input channel over image (patch) tokens only and over all
tokens, max |x|, and a fixed-size sample of input rows of each kind (the layer-reconstruction data of
the scale search). Also the camera tokens the camera head consumes (for CIC) and the mean norm of the
patch tokens next to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm import tqdm

from .. import arch
from ..errors import QVGGTError
from .calibration_set import CalibrationSet

STAT_FIELDS = ("absmean_image", "absmean_all", "absmax", "samples_image", "samples_all")


@dataclass
class LinearStats:
    absmean_image: Tensor  # [K]
    absmean_all: Tensor  # [K]
    absmax: Tensor  # [K]
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


class _Accumulator:
    def __init__(self, k: int, rows_per_call: int, generator: torch.Generator) -> None:
        self.sum_image = torch.zeros(k, dtype=torch.float64)
        self.sum_all = torch.zeros(k, dtype=torch.float64)
        self.n_image = 0
        self.n_all = 0
        self.absmax = torch.zeros(k)
        self.samples_image: list[Tensor] = []
        self.samples_all: list[Tensor] = []
        self.rows_per_call = rows_per_call
        self.generator = generator

    def _sample(self, rows: Tensor) -> Tensor:
        if rows.shape[0] <= self.rows_per_call:
            return rows.clone()
        pick = torch.randperm(rows.shape[0], generator=self.generator)[: self.rows_per_call]
        return rows[pick.sort().values].clone()

    def add(self, rows: Tensor, is_image: Tensor) -> None:
        a = rows.abs().double()
        self.sum_all += a.sum(0)
        self.n_all += rows.shape[0]
        self.sum_image += a[is_image].sum(0)
        self.n_image += int(is_image.sum())
        self.absmax = torch.maximum(self.absmax, rows.abs().amax(0))
        self.samples_all.append(self._sample(rows))
        if is_image.any():
            self.samples_image.append(self._sample(rows[is_image]))

    def result(self) -> LinearStats:
        all_mean = (self.sum_all / max(self.n_all, 1)).float()
        # A block that never sees patch tokens (the camera trunk) has no image-only statistics: token
        # filtering does not apply there, so its image statistics are its all-token statistics.
        if self.n_image:
            image_mean, image_samples = (self.sum_image / self.n_image).float(), torch.cat(self.samples_image)
        else:
            image_mean, image_samples = all_mean, torch.cat(self.samples_all)
        return LinearStats(image_mean, all_mean, self.absmax, image_samples, torch.cat(self.samples_all))


@torch.no_grad()
def collect_stats(model: nn.Module, calib: CalibrationSet, samples_per_linear: int = 256,
                  seed: int = 0) -> ActivationStats:
    names = arch.quantizable_linears(model)
    generator = torch.Generator().manual_seed(seed)
    rows_per_call = max(1, -(-samples_per_linear // len(calib.scenes)))
    block_has_patches = {b.name: b.has_patch_tokens for b in arch.quant_blocks(model)}
    layout = {"tokens_per_frame": 0}
    accumulators: dict[str, _Accumulator] = {}
    camera_tokens: list[Tensor] = []
    patch_norms: list[Tensor] = []

    def linear_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            if not torch.isfinite(x).all():
                raise QVGGTError(f"NaN/Inf activations at the input of {name} during calibration; "
                                 "the checkpoint or the calibration images are broken")
            if block_has_patches[arch.block_of(name)]:
                is_image = arch.patch_token_mask(x, layout["tokens_per_frame"], arch.num_special_tokens(model))
            else:
                is_image = torch.zeros(x.shape[-2], dtype=torch.bool, device=x.device)
            rows = x.reshape(-1, x.shape[-1]).cpu()
            mask = is_image.expand(x.shape[:-1]).reshape(-1).cpu()
            acc = accumulators.setdefault(name, _Accumulator(x.shape[-1], rows_per_call, generator))
            acc.add(rows, mask)
        return hook

    def aggregator_hook(module: nn.Module, args: tuple, layers: dict[int, Tensor]) -> None:
        camera_tokens.append(arch.camera_head_input(layers, model).reshape(-1, layers[max(layers)].shape[-1]).float().cpu())
        patch_norms.append(arch.camera_head_patch_tokens(layers, model).float().norm(dim=-1).flatten().cpu())

    handles = [model.get_submodule(n).register_forward_pre_hook(linear_hook(n)) for n in names]
    handles.append(arch.aggregator(model).register_forward_hook(aggregator_hook))
    device = next(model.parameters()).device
    try:
        for scene in tqdm(calib.scenes, desc="activation statistics", unit="scene"):
            layout["tokens_per_frame"] = arch.tokens_per_frame(model, tuple(scene.images.shape[-2:]))
            model(scene.images.to(device)[None])
    finally:
        for h in handles:
            h.remove()
    cams = torch.cat(camera_tokens)
    if not torch.isfinite(cams).all():
        raise QVGGTError("NaN/Inf in the camera tokens during calibration")
    return ActivationStats({n: accumulators[n].result() for n in names}, cams, float(torch.cat(patch_norms).mean()))
