"""Camera head (iterative refinement) and DPT dense heads, with the released module names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import Block, Mlp


def inverse_log_transform(y: Tensor) -> Tensor:
    return torch.sign(y) * torch.expm1(torch.abs(y))


def activate_pose(pose_enc: Tensor) -> Tensor:
    """Released camera activations: translation and quaternion linear, field of view ReLU."""
    return torch.cat([pose_enc[..., :7], F.relu(pose_enc[..., 7:])], dim=-1)


def activate_head(out: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """[N, C, H, W] -> (values [N, H, W, C-1], confidence [N, H, W]) with the 'expp1' confidence."""
    fmap = out.permute(0, 2, 3, 1)
    values, conf = fmap[..., :-1], fmap[..., -1]
    if activation == "inv_log":
        values = inverse_log_transform(values)
    elif activation == "exp":
        values = torch.exp(values)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    return values, 1 + conf.exp()


class CameraHead(nn.Module):
    """Predicts the 9-number pose encoding from each frame's camera token of the last block.

    `extra_tokens` (optional buffer [K, C]) are appended to the per-frame camera tokens before the
    trunk; the trunk attends across them and their predictions are dropped. QVGGT's camera
    information compensation (CIC) token uses this.
    """

    target_dim = 9

    def __init__(self, dim_in: int, trunk_depth: int = 4, num_heads: int = 16, mlp_ratio: float = 4.0,
                 init_values: float = 0.01) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            *[Block(dim_in, num_heads, mlp_ratio, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, self.target_dim))
        self.embed_pose = nn.Linear(self.target_dim, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, self.target_dim)
        self.register_buffer("extra_tokens", None)

    def forward(self, last_tokens: Tensor, num_iterations: int = 4) -> list[Tensor]:
        """last_tokens: [B, S, P, C] of the last aggregator block -> list of [B, S, 9] per iteration."""
        camera_tokens = last_tokens[:, :, 0]
        B, S, _ = camera_tokens.shape
        if self.extra_tokens is not None:
            extra = self.extra_tokens.to(camera_tokens.dtype)[None].expand(B, -1, -1)
            camera_tokens = torch.cat([camera_tokens, extra], dim=1)
        pose_tokens = self.token_norm(camera_tokens)
        pose_enc = None
        outputs = []
        for _ in range(num_iterations):
            if pose_enc is None:
                module_input = self.embed_pose(self.empty_pose_tokens.expand(B, pose_tokens.shape[1], -1))
            else:
                module_input = self.embed_pose(pose_enc.detach())
            shift, scale, gate = self.poseLN_modulation(module_input).chunk(3, dim=-1)
            modulated = gate * (self.adaln_norm(pose_tokens) * (1 + scale) + shift) + pose_tokens
            delta = self.pose_branch(self.trunk_norm(self.trunk(modulated)))
            pose_enc = delta if pose_enc is None else pose_enc + delta
            outputs.append(activate_pose(pose_enc)[:, :S])
        return outputs


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        # The released unit uses an in-place ReLU on its input, so the skip adds relu(x), not x.
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    def __init__(self, features: int, has_residual: bool = True) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.has_residual = has_residual
        if has_residual:
            self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, x: Tensor, skip: Tensor | None = None, size: tuple[int, int] | None = None) -> Tensor:
        if self.has_residual:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        size = size if size is not None else (x.shape[-2] * 2, x.shape[-1] * 2)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


def uv_grid(width: int, height: int, aspect_ratio: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[height, width, 2] coordinates spanning the image plane normalised by its diagonal."""
    diag = (aspect_ratio ** 2 + 1.0) ** 0.5
    span_x, span_y = aspect_ratio / diag, 1.0 / diag
    xs = torch.linspace(-span_x * (width - 1) / width, span_x * (width - 1) / width, width, dtype=dtype, device=device)
    ys = torch.linspace(-span_y * (height - 1) / height, span_y * (height - 1) / height, height, dtype=dtype,
                        device=device)
    uu, vv = torch.meshgrid(xs, ys, indexing="xy")
    return torch.stack([uu, vv], dim=-1)


def sincos_embed(pos: Tensor, dim: int, omega_0: float = 100.0) -> Tensor:
    # The released code computes this in float64; float32 differs by ~1e-7 (|pos * omega| <= ~1) and keeps
    # exported graphs free of float64, which TensorRT lacks and older ONNX Runtime cannot run (Cos(7)).
    omega = torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2.0)
    omega = 1.0 / omega_0 ** omega
    out = pos.reshape(-1, 1).float() * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def grid_pos_embed(x: Tensor, aspect_ratio: float, ratio: float = 0.1) -> Tensor:
    """Adds the released DPT sinusoidal position embedding of x's grid to x [N, C, h, w]."""
    h, w = x.shape[-2:]
    grid = uv_grid(w, h, aspect_ratio, x.dtype, x.device).reshape(-1, 2)
    c = x.shape[1]
    emb = torch.cat([sincos_embed(grid[:, 0], c // 2), sincos_embed(grid[:, 1], c // 2)], dim=-1)
    emb = emb.reshape(h, w, c).permute(2, 0, 1)[None].to(x.dtype)
    return x + ratio * emb


class DPTHead(nn.Module):
    """Dense prediction from 4 intermediate token layers (released DPTHead, pos_embed on)."""

    def __init__(self, dim_in: int, patch_size: int = 14, output_dim: int = 4, activation: str = "inv_log",
                 features: int = 256, out_channels: tuple[int, ...] = (256, 512, 1024, 1024),
                 intermediate_layer_idx: tuple[int, ...] = (4, 11, 17, 23), feature_only: bool = False,
                 down_ratio: int = 1) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.activation = activation
        self.intermediate_layer_idx = tuple(intermediate_layer_idx)
        self.feature_only = feature_only
        self.down_ratio = down_ratio
        self.norm = nn.LayerNorm(dim_in)
        self.projects = nn.ModuleList([nn.Conv2d(dim_in, oc, 1) for oc in out_channels])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(out_channels[0], out_channels[0], kernel_size=4, stride=4),
            nn.ConvTranspose2d(out_channels[1], out_channels[1], kernel_size=2, stride=2),
            nn.Identity(),
            nn.Conv2d(out_channels[3], out_channels[3], kernel_size=3, stride=2, padding=1),
        ])
        self.scratch = nn.Module()
        for i, oc in enumerate(out_channels, start=1):
            setattr(self.scratch, f"layer{i}_rn", nn.Conv2d(oc, features, 3, padding=1, bias=False))
        self.scratch.refinenet1 = FeatureFusionBlock(features)
        self.scratch.refinenet2 = FeatureFusionBlock(features)
        self.scratch.refinenet3 = FeatureFusionBlock(features)
        self.scratch.refinenet4 = FeatureFusionBlock(features, has_residual=False)
        if feature_only:
            self.scratch.output_conv1 = nn.Conv2d(features, features, 3, padding=1)
        else:
            self.scratch.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
            self.scratch.output_conv2 = nn.Sequential(
                nn.Conv2d(features // 2, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, output_dim, 1)
            )

    def forward(self, layers: dict[int, Tensor], H: int, W: int, patch_start_idx: int,
                frames_chunk_size: int | None = None) -> tuple[Tensor, Tensor] | Tensor:
        """layers: {block index: [B, S, P, C]} -> (values [B, S, H, W, D-1], conf [B, S, H, W]), or with
        `feature_only` the feature maps alone.

        `frames_chunk_size` bounds memory by running that many frames at a time (frames are independent
        here); None runs all at once (the traced/exported form: a loop over a dynamic S does not export). The
        feature-only form (the track head's, training only) always runs all frames at once."""
        S = layers[self.intermediate_layer_idx[0]].shape[1]
        if frames_chunk_size is not None and S > frames_chunk_size and not self.feature_only:
            chunks = [self.forward({i: layers[i][:, s:s + frames_chunk_size] for i in self.intermediate_layer_idx},
                                   H, W, patch_start_idx) for s in range(0, S, frames_chunk_size)]
            return torch.cat([c[0] for c in chunks], dim=1), torch.cat([c[1] for c in chunks], dim=1)
        B = layers[self.intermediate_layer_idx[0]].shape[0]
        gh, gw = H // self.patch_size, W // self.patch_size
        aspect = W / H
        feats = []
        for i, layer_idx in enumerate(self.intermediate_layer_idx):
            x = self.norm(layers[layer_idx][:, :, patch_start_idx:].flatten(0, 1))
            x = x.permute(0, 2, 1).reshape(B * S, -1, gh, gw)
            x = grid_pos_embed(self.projects[i](x), aspect)
            feats.append(self.resize_layers[i](x))
        sc = self.scratch
        l1, l2, l3, l4 = (getattr(sc, f"layer{i}_rn")(f) for i, f in enumerate(feats, start=1))
        out = sc.refinenet4(l4, size=l3.shape[2:])
        out = sc.refinenet3(out, l3, size=l2.shape[2:])
        out = sc.refinenet2(out, l2, size=l1.shape[2:])
        out = sc.output_conv1(sc.refinenet1(out, l1))
        size = (int(gh * self.patch_size / self.down_ratio), int(gw * self.patch_size / self.down_ratio))
        # Upsampled in fp32 (half-precision bilinear is missing or slow on some CPUs) and cast back, so a
        # half-precision head feeds its half-precision output convolution.
        out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=True).to(out.dtype)
        out = grid_pos_embed(out, aspect)
        if self.feature_only:  # the track head's feature extractor: [B, S, features, H / down, W / down]
            return out.reshape(B, S, *out.shape[1:])
        values, conf = activate_head(sc.output_conv2(out), self.activation)
        return values.reshape(B, S, *values.shape[1:]), conf.reshape(B, S, *conf.shape[1:])
