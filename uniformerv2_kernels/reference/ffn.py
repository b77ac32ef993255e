"""Pure-PyTorch reference of the CLIP-block MLP branch with its LayerNorm and residual (DESIGN section 2):

    out = x + row_scale[:, None, ...] * c_proj(quick_gelu(c_fc(ln_2(x))))

ln_2 is the CLIP LayerNorm (fp32 math, cast back to x.dtype), c_fc: Linear(C, 4C), QuickGELU
z * sigmoid(1.702 z), c_proj: Linear(4C, C). ``row_scale`` (x.shape[0],), optional, is the drop-path
multiplier of timm's DropPath on dimension 0 of the (L, N*T, C) stream (the token position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import layer_norm as ref_layer_norm

QUICK_GELU_ALPHA = 1.702


def quick_gelu(z: torch.Tensor) -> torch.Tensor:
    return z * torch.sigmoid(QUICK_GELU_ALPHA * z)


def quick_gelu_grad(z: torch.Tensor) -> torch.Tensor:
    """d/dz [z * sigmoid(a z)] = s + a z s (1 - s), s = sigmoid(a z)."""
    s = torch.sigmoid(QUICK_GELU_ALPHA * z)
    return s + QUICK_GELU_ALPHA * z * s * (1 - s)


def row_scale_view(row_scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """row_scale (x.shape[0],) shaped to broadcast along dimension 0 of x."""
    return row_scale.reshape((x.shape[0],) + (1,) * (x.dim() - 1))


def mlp(x_normed, fc_weight, fc_bias, proj_weight, proj_bias):
    return F.linear(quick_gelu(F.linear(x_normed, fc_weight, fc_bias)), proj_weight, proj_bias)


def fused_ffn(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps=1e-5, row_scale=None):
    """The literal block formulation, x + drop_path(mlp(ln_2(x))) with drop path as a row multiplier."""
    branch = mlp(ref_layer_norm.clip_layer_norm(x, ln_weight, ln_bias, eps), fc_weight, fc_bias, proj_weight, proj_bias)
    if row_scale is not None:
        branch = branch * row_scale_view(row_scale, x).to(branch.dtype)
    return x + branch


def forward(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, eps):
    """Reference forward with what the fused op saves: (out, mean, rstd, h) with h = c_fc(ln_2(x))."""
    mean, rstd = ref_layer_norm.layer_norm_stats(x, eps)
    x_normed = ref_layer_norm.clip_layer_norm(x, ln_weight, ln_bias, eps)
    h = F.linear(x_normed, fc_weight, fc_bias)
    branch = F.linear(quick_gelu(h), proj_weight, proj_bias)
    if row_scale is not None:
        branch = branch * row_scale_view(row_scale, x).to(branch.dtype)
    return x + branch, mean, rstd, h.reshape(-1, h.shape[-1])


def backward(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, eps,
             need_row_scale_grad: bool = False):
    """Explicit reference backward (matmuls in x.dtype, like eager autograd):
    returns (dx, d_ln_weight, d_ln_bias, d_fc_weight, d_fc_bias, d_proj_weight, d_proj_bias, d_row_scale|None).
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    dout = grad_out.reshape(-1, C)
    x_normed = ref_layer_norm.clip_layer_norm(x2, ln_weight, ln_bias, eps)
    h = F.linear(x_normed, fc_weight, fc_bias)
    act = quick_gelu(h)
    d_branch = dout
    d_row_scale = None
    if row_scale is not None:
        scale = row_scale.to(x.dtype).repeat_interleave(x2.shape[0] // x.shape[0])[:, None]
        d_branch = dout * scale
        if need_row_scale_grad:
            branch = F.linear(act, proj_weight, proj_bias)
            per_row = (dout.to(torch.float64 if x.dtype == torch.float64 else torch.float32) * branch).sum(dim=1)
            d_row_scale = per_row.reshape(x.shape[0], -1).sum(dim=1).to(row_scale.dtype)
    d_proj_weight = d_branch.t() @ act
    d_proj_bias = d_branch.sum(dim=0)
    d_h = (d_branch @ proj_weight) * quick_gelu_grad(h)
    d_fc_weight = d_h.t() @ x_normed
    d_fc_bias = d_h.sum(dim=0)
    d_x_normed = d_h @ fc_weight
    dx, d_ln_weight, d_ln_bias = ref_layer_norm.backward(d_x_normed, x2, ln_weight, ln_bias, eps, grad_residual=dout)
    return (dx.reshape(x.shape), d_ln_weight, d_ln_bias, d_fc_weight, d_fc_bias.to(fc_bias.dtype),
            d_proj_weight, d_proj_bias.to(proj_bias.dtype), d_row_scale)
