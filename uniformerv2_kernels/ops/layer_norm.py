"""Fused CLIP LayerNorm: ``F.layer_norm(x.float(), (C,), weight, bias, eps).to(x.dtype)`` in one pass.

Public API: :func:`clip_layer_norm`. Registered as ``torch.ops.uniformerv2.clip_layer_norm_fwd`` /
``clip_layer_norm_bwd`` (operators with fake kernels and autograd, :mod:`uniformerv2_kernels.library`), so
``torch.compile(fullgraph=True)`` traces through it; the ``inductor`` backend is torch.compile of
:func:`..reference.layer_norm.clip_layer_norm`, outside them (:mod:`uniformerv2_kernels.inductor`). The
forward saves fp32 per-row mean and rstd; the backward computes grad_x in one pass and the weight/bias
gradients through per-program partial sums reduced in a fixed order (deterministic).
"""

from __future__ import annotations

import torch

from .. import backends, inductor, library, selection
from ..checks import FLOAT_DTYPES, check_same, check_tensor
from ..reference import layer_norm as reference

OP_NAME = "clip_layer_norm"
IMPLEMENTED = selection.OPS[OP_NAME].backends


def _triton():
    from ..triton import layer_norm as triton_layer_norm  # imported lazily: needs TRITON_INTERPRET set first

    return triton_layer_norm


@library.custom_op("uniformerv2::clip_layer_norm_fwd")
def _clip_layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == library.AUTO_BACKEND:
        backend = select_backend(x, weight, bias)
    with backends.op_body(x):
        if backend == "triton":
            return _triton().forward(x, weight, bias, eps)
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.clip_layer_norm_fwd(x, weight, bias, eps))
        y, mean, rstd = reference.forward(x, weight, bias, eps)
        return y, mean.float(), rstd.float()


@_clip_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    rows = x.numel() // x.shape[-1]
    stats = x.new_empty((rows,), dtype=torch.float32)
    return torch.empty_like(x), stats, stats.clone()


@library.custom_op("uniformerv2::clip_layer_norm_bwd")
def _clip_layer_norm_bwd(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad_y = grad_y.contiguous()
    if backend == library.AUTO_BACKEND:
        backend = select_backend(x, weight, bias)
    with backends.op_body(x):
        if backend == "triton":
            return _triton().backward(grad_y, x, weight, mean, rstd, weight.dtype, bias.dtype)
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.clip_layer_norm_bwd(grad_y, x, weight, bias, mean, rstd))
        return reference.backward(grad_y, x, weight, bias, eps)


@_clip_layer_norm_bwd.register_fake
def _(grad_y, x, weight, bias, mean, rstd, eps, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, backend = inputs
    _, mean, rstd = output
    library.skip_aux_grads(ctx, mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)
    ctx.eps = eps
    ctx.backend = backend


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = _clip_layer_norm_bwd(grad_y, x, weight, bias, mean, rstd, ctx.eps, ctx.backend)
    return dx, dw, db, None, None


_clip_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def select_backend(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, backend: str | None = None) -> str:
    return backends.select_op(OP_NAME, (x, weight, bias), backend, x=x)


def check_inputs(x, weight, bias, eps) -> None:
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension C, got shape {tuple(x.shape)}")
    C = x.shape[-1]
    check_tensor("weight", weight, shape=(C,), dtypes=FLOAT_DTYPES)
    check_tensor("bias", bias, shape=(C,), dtypes=FLOAT_DTYPES)
    check_same([("x", x), ("weight", weight), ("bias", bias)], dtype=False)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def clip_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5, backend: str | None = None
) -> torch.Tensor:
    """CLIP LayerNorm over the last dimension: computed in fp32, returned in x.dtype.

    Equals ``F.layer_norm(x.float(), (C,), weight, bias, eps).to(x.dtype)``; weight/bias (C,) may have a
    different float dtype than x (their gradients come back in their own dtype).
    """
    check_inputs(x, weight, bias, eps)
    name = select_backend(x, weight, bias, backend)
    if name == "inductor" and library.recording_for() is None:  # compiled, outside the operators
        with backends.op_body(x):
            return inductor.run(OP_NAME, reference.clip_layer_norm, x, weight, bias, float(eps))
    y, _, _ = _clip_layer_norm_fwd(x.contiguous(), weight.contiguous(), bias.contiguous(), float(eps), name)
    return y
