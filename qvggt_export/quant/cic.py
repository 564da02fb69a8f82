"""Camera information compensation (CIC): one constant token appended to the camera head's sequence.

From the camera tokens the calibration frames feed the camera head: PCA (top K = 32 principal
directions of the uncentred tokens, so that the dominant shared direction is kept), the mean of the
tokens' projections onto them reconstructed as one token, rescaled to the mean norm of the patch
tokens beside them. The trunk attends across the frames and this token; its own prediction is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError
from ..log import logger

DEFAULT_COMPONENTS = 32


@dataclass
class CICToken:
    token: Tensor  # [1, D]
    components: Tensor  # [K, D] orthonormal principal directions (rows)
    explained_variance: Tensor  # [K] fraction of the tokens' energy along each direction
    patch_token_norm: float
    num_tokens: int  # how many camera tokens the PCA saw

    @property
    def k(self) -> int:
        return self.components.shape[0]


def cic_token(camera_tokens: Tensor, patch_token_norm: float, components: int = DEFAULT_COMPONENTS) -> CICToken:
    """camera_tokens [N, D] -> the CIC token and its provenance."""
    if camera_tokens.dim() != 2 or camera_tokens.shape[0] == 0:
        raise InputError("CIC needs at least one camera token from the calibration set")
    if not torch.isfinite(camera_tokens).all() or not patch_token_norm == patch_token_norm:
        raise InputError("CIC: camera tokens or patch-token norm contain NaN/Inf")
    x = camera_tokens.double()
    k = min(components, *x.shape)
    if k < components:
        logger.warning("CIC: only %d camera tokens of width %d; keeping K=%d components instead of %d",
                       x.shape[0], x.shape[1], k, components)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    basis = vh[:k]
    mean_projection = (x @ basis.t()).mean(dim=0)
    token = mean_projection @ basis
    token = token / token.norm().clamp_min(1e-12) * patch_token_norm
    energy = sv.pow(2)
    return CICToken(token.float()[None], basis.float(), (energy[:k] / energy.sum()).float(), float(patch_token_norm),
                    x.shape[0])
