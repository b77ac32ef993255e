"""Triton launchers of the spatial attention's projections (the attention core is xformers / SDPA).

The stream is (L, B, C) (token-major) while an attention kernel wants each frame's tokens contiguous,
(B, L, ...). Instead of permute copies:
- ln_1 is the one-pass LayerNorm kernel writing its output rows directly in (frame, token) order
  (``swap_rows``), then the QKV projection is the Triton GEMM with the bias in its epilogue, giving
  qkv (B*L, 3C) whose q/k/v views are (B, L, H, d) with unit stride along d: the layout xformers takes as
  is and SDPA takes as (B, H, L, d) strided views.
- out_proj is the Triton GEMM with the bias in its epilogue, storing its rows back in the stream order.
ln_1 is not fused into the GEMM prologue, for the reason given in :mod:`.ffn` (one extra read+write of
(rows, C) against redoing the normalisation in each of the 3C / BLOCK_N column programs).
Backward: the LN output is recomputed (only x and the fp32 LN statistics are saved); the weight
gradients and dx_normed = dqkv @ W_in use cuBLAS (``torch.mm``); grad_out is copied once into frame-major
order for the out_proj gradients.
"""

from __future__ import annotations

import torch

from . import layer_norm as triton_layer_norm
from . import linear as triton_linear


def qkv_forward(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps, save_for_backward=True):
    """(qkv (B*L, 3C) frame-major, mean, rstd) for the stream x (L, B, C) (stats None unless saved)."""
    L, B, C = x.shape
    x_normed, mean, rstd = triton_layer_norm.forward(x, ln_weight, ln_bias, eps, store_stats=save_for_backward,
                                                     swap_rows=(L, B))
    qkv = triton_linear.linear(x_normed, in_proj_weight, in_proj_bias)
    return qkv, mean, rstd


def qkv_backward(grad_qkv, x, ln_weight, ln_bias, in_proj_weight, mean, rstd, eps):
    """(dx, d_ln_weight, d_ln_bias, d_in_proj_weight, d_in_proj_bias)."""
    L, B, C = x.shape
    x_normed, _, _ = triton_layer_norm.forward(x, ln_weight, ln_bias, eps, store_stats=False, swap_rows=(L, B))
    d_in_w = grad_qkv.t() @ x_normed
    del x_normed
    d_in_b = grad_qkv.sum(dim=0, dtype=torch.float32).to(in_proj_weight.dtype)
    d_x_normed = grad_qkv @ in_proj_weight
    dx, d_ln_w, d_ln_b = triton_layer_norm.backward(d_x_normed, x, ln_weight, mean, rstd, ln_weight.dtype,
                                                    ln_bias.dtype, swap_rows=(L, B))
    return dx, d_ln_w, d_ln_b, d_in_w, d_in_b


def out_forward(o, out_proj_weight, out_proj_bias, L: int, B: int):
    """out_proj of o (B*L, C) frame-major, stored as the stream (L, B, C)."""
    out = triton_linear.linear(o, out_proj_weight, out_proj_bias, swap_out_rows=(B, L))
    return out.view(L, B, -1)


def out_backward(grad_out, o, out_proj_weight):
    """(d_o (B*L, C), d_out_proj_weight, d_out_proj_bias) for grad_out (L, B, C)."""
    L, B, C = grad_out.shape
    g = grad_out.transpose(0, 1).reshape(B * L, C)  # one copy into frame-major rows
    return g @ out_proj_weight, g.t() @ o, g.sum(dim=0, dtype=torch.float32).to(out_proj_weight.dtype)
