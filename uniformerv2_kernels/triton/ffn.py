"""Triton kernels of the fused FFN: GEMMs with fused epilogues, plus the launchers the FFN op uses.

Where the GEMMs run (the decision, and why):
- The three GEMMs whose outputs need elementwise work are Triton GEMMs with that work in their epilogue,
  so the (rows, 4C) activations are written once and never re-read for elementwise passes:
    c_fc      h = xn @ W_fc^T + b_fc,   a = quick_gelu(h)            (stores a; h too when training)
    c_proj    out = x + row_scale * (a @ W_proj^T + b_proj)           (bias, drop path, residual)
    dgrad     dh = (dy @ W_proj) * quick_gelu'(h), a = quick_gelu(h)  (activation recomputed, not saved)
  An eager / cuBLAS formulation spends one extra read+write of the (rows, 4C) tensor per elementwise op
  (about 30% on top of the GEMM time at C = 768).
- The weight-gradient GEMMs (reductions over the ~100k rows into (4C, C) matrices), dx_normed = dh @ W_fc
  and the bias sums have nothing to fuse and stay on cuBLAS / torch (``torch.mm``, ``sum``), which is
  deterministic for a given device and shape.
- The LayerNorm is its own one-pass kernel (:mod:`..triton.layer_norm`) rather than a GEMM prologue: it
  costs one read of x and one write of xn (~7% of the c_fc GEMM at C = 768), while a prologue would
  redo the normalisation in every one of the 4C / BLOCK_N column programs inside the GEMM main loop.

The GEMMs (tiles, plan, precision, epilogues) are :mod:`.linear`'s, shared with the spatial attention.
"""

from __future__ import annotations

import torch

from . import layer_norm as triton_layer_norm
from .linear import EPI_QUICK_GELU, EPI_QUICK_GELU_GRAD, linear
from .linear import autotune_setting  # noqa: F401  (benchmarks read it here)


def forward(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, eps, save_for_backward):
    """out = x + row_scale * c_proj(quick_gelu(c_fc(ln(x)))); returns (out, mean, rstd, h or empty).

    x: contiguous (..., C) with weights in x.dtype (LN params any float dtype); row_scale (x.shape[0],).
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    M = x2.shape[0]
    x_normed, mean, rstd = triton_layer_norm.forward(x2, ln_weight, ln_bias, eps, store_stats=save_for_backward)
    act, h = linear(x_normed, fc_weight, fc_bias, epilogue=EPI_QUICK_GELU, store_pre=save_for_backward)
    del x_normed
    rows_per_scale = M // x.shape[0] if (row_scale is not None and x.shape[0] > 0) else 1
    out = linear(act, proj_weight, proj_bias, residual=x2, row_scale=row_scale, rows_per_scale=rows_per_scale)
    if not save_for_backward:  # three distinct empty tensors (custom-op outputs must not alias)
        return (out.view(x.shape), x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32),
                x.new_empty((0,)))
    return out.view(x.shape), mean, rstd, h


def backward(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale,
             mean, rstd, h, eps, need_row_scale_grad):
    """Gradients of :func:`forward`: (dx, d_ln_w, d_ln_b, d_fc_w, d_fc_b, d_proj_w, d_proj_b, d_row_scale).

    Uses the saved LN statistics and pre-activation h; the LN output and the activation are recomputed.
    """
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    M = x2.shape[0]
    dout = grad_out.reshape(-1, C)
    d_row_scale = None
    if row_scale is not None:
        rows_per_scale = M // x.shape[0] if x.shape[0] > 0 else 1
        scale = row_scale.to(x.dtype).repeat_interleave(rows_per_scale)[:, None]
        d_branch = dout * scale
    else:
        d_branch = dout
    # da = d_branch @ W_proj, fused with dh = da * quick_gelu'(h) and act = quick_gelu(h)
    d_h, act = linear(d_branch, proj_weight.t(), None, epilogue=EPI_QUICK_GELU_GRAD, aux=h)
    if need_row_scale_grad:
        branch = torch.addmm(proj_bias, act, proj_weight.t())
        per_row = (dout.float() * branch.float()).sum(dim=1)
        d_row_scale = per_row.reshape(x.shape[0], -1).sum(dim=1).to(row_scale.dtype)
    d_proj_weight = d_branch.t() @ act
    d_proj_bias = d_branch.sum(dim=0, dtype=torch.float32).to(proj_bias.dtype)
    del act
    x_normed, _, _ = triton_layer_norm.forward(x2, ln_weight, ln_bias, eps, store_stats=False)
    d_fc_weight = d_h.t() @ x_normed
    del x_normed
    d_fc_bias = d_h.sum(dim=0, dtype=torch.float32).to(fc_bias.dtype)
    d_x_normed = d_h @ fc_weight
    del d_h
    dx, d_ln_weight, d_ln_bias = triton_layer_norm.backward(
        d_x_normed, x2, ln_weight, mean, rstd, ln_weight.dtype, ln_bias.dtype, grad_residual=dout
    )
    return (dx.view(x.shape), d_ln_weight, d_ln_bias, d_fc_weight, d_fc_bias, d_proj_weight, d_proj_bias,
            d_row_scale)
