"""Camera information compensation (CIC): one constant token appended to the camera head's sequence.

The paper's construction (docs/method.md, eqs. 5-8), followed as written: from the N camera tokens the
calibration frames feed the camera head, centre them on their mean mu (eq. 5), take the top K = 32
principal directions B of the centred tokens, project (eq. 6), average the projections p = mean_i B(x_i - mu)
and reconstruct t = mu + B^T p (eq. 7), then rescale t to the mean norm of the patch tokens beside them (eq. 8).

Two facts of this construction, kept visible rather than "fixed":
- The projections of centred tokens average to zero, so eqs. 6-7 give exactly the mean camera token mu
  (up to float rounding); K and the PCA only matter through `explained_variance`, a diagnostic.
- The token is appended before the camera head's LayerNorm (`token_norm`), which removes its scale, so
  the rescaling of eq. 8 does not change the model's output (tests/test_method_components.py checks both).
The trunk attends across the frames and this token; its own prediction is dropped.
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
    components: Tensor  # [K, D] orthonormal principal directions (rows) of the centred tokens
    explained_variance: Tensor  # [K] fraction of the centred tokens' variance along each direction
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
    mean = x.mean(dim=0)  # eq. 5
    centred = x - mean
    k = min(components, *x.shape)
    if k < components:
        logger.warning("CIC: only %d camera tokens of width %d; keeping K=%d components instead of %d",
                       x.shape[0], x.shape[1], k, components)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    basis = vh[:k]
    mean_projection = (centred @ basis.t()).mean(dim=0)  # eq. 6: zero up to rounding
    token = mean + mean_projection @ basis  # eq. 7: the mean camera token
    token = token / token.norm().clamp_min(1e-12) * patch_token_norm  # eq. 8
    energy = sv.pow(2)
    return CICToken(token.float()[None], basis.float(), (energy[:k] / energy.sum().clamp_min(1e-30)).float(),
                    float(patch_token_norm), x.shape[0])
