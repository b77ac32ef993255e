"""Pure-PyTorch reference of the CLIP LayerNorm (DESIGN section 2).

The CLIP-block LayerNorms (ln_pre, ln_1, ln_2 of the local blocks) upcast to fp32, normalise over the last
dimension C with eps 1e-5, and cast back to the input dtype:

    y = F.layer_norm(x.float(), (C,), weight, bias, eps).to(x.dtype)

For float64 inputs the computation stays in float64 (so that gradcheck can run on it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def clip_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The literal official formulation: layer norm in fp32 (fp64 for fp64 input), cast back to x.dtype."""
    dt = _compute_dtype(x)
    y = F.layer_norm(x.to(dt), (x.shape[-1],), weight.to(dt), bias.to(dt), eps)
    return y.to(x.dtype)


def layer_norm_stats(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and 1/sqrt(biased var + eps) over the last dimension, in fp32 (fp64 for fp64 input),
    flattened to shape (rows,)."""
    dt = _compute_dtype(x)
    xf = x.reshape(-1, x.shape[-1]).to(dt)
    mean = xf.mean(dim=1)
    var = (xf - mean[:, None]).pow(2).mean(dim=1)
    return mean, torch.rsqrt(var + eps)


def forward(x, weight, bias, eps):
    """Reference forward with the tensors the fused op saves: (y, mean, rstd)."""
    mean, rstd = layer_norm_stats(x, eps)
    return clip_layer_norm(x, weight, bias, eps), mean, rstd


def backward(grad_y, x, weight, bias, eps, grad_residual=None):
    """Reference backward, the explicit formula (fp32 math, fp64 for fp64 input):
    xhat = (x - mean) * rstd, g = grad_y * weight,
    grad_x = rstd * (g - mean_C(g) - xhat * mean_C(g * xhat)) (+ grad_residual),
    grad_weight = sum_rows(grad_y * xhat), grad_bias = sum_rows(grad_y).
    Returns (grad_x in x.dtype, grad_weight in weight.dtype, grad_bias in bias.dtype)."""
    dt = _compute_dtype(x)
    C = x.shape[-1]
    mean, rstd = layer_norm_stats(x, eps)
    xf = x.reshape(-1, C).to(dt)
    dy = grad_y.reshape(-1, C).to(dt)
    xhat = (xf - mean[:, None]) * rstd[:, None]
    g = dy * weight.to(dt)
    dx = rstd[:, None] * (g - g.mean(dim=1, keepdim=True) - xhat * (g * xhat).mean(dim=1, keepdim=True))
    if grad_residual is not None:
        dx = dx + grad_residual.reshape(-1, C).to(dt)
    grad_weight = (dy * xhat).sum(dim=0)
    grad_bias = dy.sum(dim=0)
    return dx.reshape(x.shape).to(x.dtype), grad_weight.to(weight.dtype), grad_bias.to(bias.dtype)
