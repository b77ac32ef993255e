"""Fused FFN of the CLIP blocks: ``x + row_scale * c_proj(quick_gelu(c_fc(ln_2(x))))``.

Public API: :func:`fused_ffn`. Registered as ``torch.ops.uniformerv2.fused_ffn_fwd`` / ``fused_ffn_bwd``
(operators with fake kernels and autograd, :mod:`uniformerv2_kernels.library`); the ``inductor`` backend is
torch.compile of :func:`..reference.ffn.fused_ffn`, outside them (:mod:`uniformerv2_kernels.inductor`).
GEMM placement (Triton GEMMs with fused epilogues for c_fc, c_proj and the activation gradient; cuBLAS for
the weight gradients) is explained in :mod:`uniformerv2_kernels.triton.ffn`. The forward saves x, the LN
mean/rstd (fp32) and the pre-activation h; the backward recomputes the LN output and the activation
(nothing of size (rows, 4C) besides h is kept between forward and backward).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import backends, inductor, library, selection
from ..checks import FLOAT_DTYPES, check_same, check_tensor
from ..reference import ffn as reference

OP_NAME = "fused_ffn"
IMPLEMENTED = selection.OPS[OP_NAME].backends


def _triton():
    from ..triton import ffn as triton_ffn  # lazily: TRITON_INTERPRET must be set before the import

    return triton_ffn


@library.custom_op("uniformerv2::fused_ffn_fwd")
def _fused_ffn_fwd(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    row_scale: Optional[torch.Tensor],
    eps: float,
    save_for_backward: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, mean, rstd, h); mean/rstd/h are empty when save_for_backward is False."""
    if backend == library.AUTO_BACKEND:
        backend = select_backend(x, (ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias))
    with backends.op_body(x):
        if backend == "triton":
            return _triton().forward(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale,
                                     eps, save_for_backward)
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.fused_ffn_fwd(
                x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, eps, save_for_backward))
        out, mean, rstd, h = reference.forward(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                               row_scale, eps)
        if not save_for_backward:
            return (out, x.new_empty((0,), dtype=torch.float32), x.new_empty((0,), dtype=torch.float32),
                    x.new_empty((0,)))
        return out, mean.float(), rstd.float(), h.contiguous()


@_fused_ffn_fwd.register_fake
def _(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, eps, save_for_backward, backend):
    C = x.shape[-1]
    rows = x.numel() // C if save_for_backward else 0
    hidden = fc_weight.shape[0] if save_for_backward else 1
    stats = x.new_empty((rows,), dtype=torch.float32)
    h = x.new_empty((rows, hidden)) if save_for_backward else x.new_empty((0,))
    return torch.empty_like(x), stats, stats.clone(), h


@library.custom_op("uniformerv2::fused_ffn_bwd")
def _fused_ffn_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    row_scale: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    h: torch.Tensor,
    eps: float,
    need_row_scale_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """Returns (dx, d_ln_w, d_ln_b, d_fc_w, d_fc_b, d_proj_w, d_proj_b, d_row_scale or empty)."""
    grad_out = grad_out.contiguous()
    if backend == library.AUTO_BACKEND:
        backend = select_backend(x, (ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias))
    with backends.op_body(x):
        if backend == "triton":
            grads = _triton().backward(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                       row_scale, mean, rstd, h, eps, need_row_scale_grad)
        elif backend == "cuda":
            grads = tuple(torch.ops.uniformerv2_cuda.fused_ffn_bwd(
                grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, mean, rstd, h,
                eps, need_row_scale_grad))
        else:
            grads = reference.backward(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias,
                                       row_scale, eps, need_row_scale_grad)
    grads = list(grads)
    if grads[-1] is None:
        grads[-1] = x.new_empty((0,))
    return tuple(g.contiguous() for g in grads)


@_fused_ffn_bwd.register_fake
def _(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, mean, rstd, h, eps,
      need_row_scale_grad, backend):
    d_row_scale = torch.empty_like(row_scale) if (need_row_scale_grad and row_scale is not None) else x.new_empty((0,))
    return (torch.empty_like(x), torch.empty_like(ln_weight), torch.empty_like(ln_bias), torch.empty_like(fc_weight),
            torch.empty_like(fc_bias), torch.empty_like(proj_weight), torch.empty_like(proj_bias), d_row_scale)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, eps, save, backend = inputs
    _, mean, rstd, h = output
    library.skip_aux_grads(ctx, mean, rstd, h)
    ctx.save_for_backward(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, mean, rstd, h)
    ctx.eps = eps
    ctx.backend = backend
    ctx.saved = save
    ctx.row_scale_needs_grad = row_scale is not None and row_scale.requires_grad


def _backward(ctx, grad_out, _gm, _gr, _gh):
    if not ctx.saved:
        raise RuntimeError("fused_ffn was called with save_for_backward=False; it cannot be differentiated")
    x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale, mean, rstd, h = ctx.saved_tensors
    need_rs = ctx.row_scale_needs_grad and ctx.needs_input_grad[7]
    grads = _fused_ffn_bwd(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale,
                           mean, rstd, h, ctx.eps, need_rs, ctx.backend)
    d_row_scale = grads[7] if need_rs else None
    return (*grads[:7], d_row_scale, None, None, None)


_fused_ffn_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_inputs(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps, row_scale) -> None:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension C, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    check_tensor("ln_weight", ln_weight, shape=(C,))
    check_tensor("ln_bias", ln_bias, shape=(C,))
    check_tensor("fc_weight", fc_weight, shape=(None, C))
    hidden = fc_weight.shape[0]
    check_tensor("fc_bias", fc_bias, shape=(hidden,))
    check_tensor("proj_weight", proj_weight, shape=(C, hidden))
    check_tensor("proj_bias", proj_bias, shape=(C,))
    named = [("x", x), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("fc_weight", fc_weight),
             ("fc_bias", fc_bias), ("proj_weight", proj_weight), ("proj_bias", proj_bias)]
    if row_scale is not None:
        if x.dim() < 2:
            raise ValueError("row_scale needs x with at least 2 dimensions (it scales along dimension 0)")
        check_tensor("row_scale", row_scale, shape=(x.shape[0],))
        named.append(("row_scale", row_scale))
    check_same(named, dtype=False)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def select_backend(x, params, backend=None) -> str:
    return backends.select_op(OP_NAME, (x, *params), backend, x=x)


def fused_ffn(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    eps: float = 1e-5,
    row_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``x + row_scale[:, None, ...] * c_proj(quick_gelu(c_fc(clip_layer_norm(x))))`` for x (L, B, C) or (..., C).

    ln_weight/ln_bias (C,) may be any float dtype (the LN computes in fp32 and casts back to x.dtype, as
    CLIP's LayerNorm); the Linear weights/biases (fc: (4C, C), (4C,); proj: (C, 4C), (C,)) are cast to
    x.dtype if they differ (as autocast does for the Linear layers). row_scale (x.shape[0],), optional,
    multiplies the branch along dimension 0 (timm DropPath on the stream). No dropout inside.
    """
    check_inputs(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, eps, row_scale)
    linear_params = [p if p.dtype == x.dtype else p.to(x.dtype) for p in (fc_weight, fc_bias, proj_weight, proj_bias)]
    name = select_backend(x, (ln_weight, ln_bias, *linear_params), backend)
    if row_scale is not None and row_scale.dtype != x.dtype:
        row_scale = row_scale.to(x.dtype)
    if name == "inductor" and library.recording_for() is None:  # compiled, outside the operators
        with backends.op_body(x):
            return inductor.run(OP_NAME, reference.fused_ffn, x, ln_weight, ln_bias, *linear_params, float(eps),
                                row_scale)
    tensors = (x, ln_weight, ln_bias, *linear_params) + ((row_scale,) if row_scale is not None else ())
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    fc_w, fc_b, proj_w, proj_b = (p.contiguous() for p in linear_params)
    out, _, _, _ = _fused_ffn_fwd(
        x.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), fc_w, fc_b, proj_w, proj_b,
        row_scale.contiguous() if row_scale is not None else None, float(eps), save, name,
    )
    return out
