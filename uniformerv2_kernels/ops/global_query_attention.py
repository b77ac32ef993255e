"""Fused global UniBlock attention: DPE + ln_3 + learnable-query cross-attention, K and V never formed.

Public API: :func:`global_query_attention`. Registered as ``torch.ops.uniformerv2.global_query_attention_fwd``
and ``global_query_attention_bwd`` (operators with fake kernels and autograd, :mod:`uniformerv2_kernels.library`), so
``torch.compile(fullgraph=True)`` traces through it without a graph break. The ``inductor`` backend is
torch.compile of the reference backend's forward (:func:`_reference_forward`, the folded form), outside the
operators (:mod:`uniformerv2_kernels.inductor`).

The forward op returns (out (1, N, C), z (N, H, C), lse (N, H)); z = sum_j a_h(j) xhat_j and lse (the
log-sum-exp of the folded scores) are what the backward starts from, in fp32 (fp64 for fp64 inputs on the
reference backend). See ``reference/global_query_attention.py`` for the math and
``triton/global_query_attention.py`` for the kernels.
"""

from __future__ import annotations

import torch

from .. import backends, inductor, library, selection
from ..checks import check_positive_int, check_same, check_tensor, square_side
from ..reference import global_query_attention as reference

OP_NAME = "global_query_attention"
IMPLEMENTED = selection.OPS[OP_NAME].backends


def _triton():
    from ..triton import global_query_attention as triton_kernels  # lazily: TRITON_INTERPRET must be set first

    return triton_kernels


def _triton_backward():
    from ..triton import global_query_attention_backward as triton_backward  # lazily, as _triton

    return triton_backward


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _reference_forward(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias,
                       num_heads, eps):
    """The reference backend's forward as one differentiable function (what the inductor backend compiles):
    the folded form in fp32 for fp16/bf16 inputs (fp64 for fp64), the output cast back to x.dtype."""
    dt = _stats_dtype(x)
    out = reference.global_query_attention_folded(
        x.to(dt), T, dpe_weight.to(dt), dpe_bias.to(dt), ln_weight.to(dt), ln_bias.to(dt), query.to(dt),
        in_proj_weight.to(dt), in_proj_bias.to(dt), num_heads, eps)
    return out.to(x.dtype)


@library.custom_op("uniformerv2::global_query_attention_fwd")
def _global_query_attention_fwd(
    x: torch.Tensor,
    T: int,
    dpe_weight: torch.Tensor,
    dpe_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    query: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    num_heads: int,
    eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == library.AUTO_BACKEND:
        backend = select_backend((x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias),
                                 x, num_heads)
    with backends.op_body(x):
        args = (x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps)
        if backend == "triton":
            return _triton().forward(*args)
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.global_query_attention_fwd(*args))
        # Reference: the folded form (it yields z and lse), in fp32 for fp16/bf16 inputs, fp64 for fp64.
        dt = _stats_dtype(x)
        out, z, lse = reference.global_query_attention_folded_with_stats(
            *[a.to(dt) if isinstance(a, torch.Tensor) else a for a in args]
        )
        return out.to(x.dtype), z, lse


@_global_query_attention_fwd.register_fake
def _(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps, backend):
    C = x.shape[2]
    N = x.shape[1] // T
    dt = _stats_dtype(x)
    out = x.new_empty((1, N, C))
    z = x.new_empty((N, num_heads, C), dtype=dt)
    lse = x.new_empty((N, num_heads), dtype=dt)
    return out, z, lse


@library.custom_op("uniformerv2::global_query_attention_bwd")
def _global_query_attention_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    T: int,
    dpe_weight: torch.Tensor,
    dpe_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    query: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    z: torch.Tensor,
    lse: torch.Tensor,
    num_heads: int,
    eps: float,
    backend: str,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor
]:
    grad_out = grad_out.contiguous()
    if backend == library.AUTO_BACKEND:
        backend = select_backend((x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias),
                                 x, num_heads)
    with backends.op_body(x):
        args = (grad_out, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse,
                num_heads, eps)
        if backend == "triton":
            grads = _triton_backward().backward(*args)
        elif backend == "cuda":
            grads = torch.ops.uniformerv2_cuda.global_query_attention_bwd(*args)
        else:
            grads = reference.global_query_attention_folded_backward(*args)
    return tuple(g.contiguous() for g in grads)


@_global_query_attention_bwd.register_fake
def _(grad_out, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse,
      num_heads, eps, backend):
    return tuple(torch.empty_like(t) for t in (x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
                                               in_proj_bias))


def _setup_context(ctx, inputs, output):
    (x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps,
     backend) = inputs
    _, z, lse = output
    library.skip_aux_grads(ctx, z, lse)
    ctx.save_for_backward(x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse)
    ctx.T = T
    ctx.num_heads = num_heads
    ctx.eps = eps
    ctx.backend = backend


def _backward(ctx, grad_out, _grad_z, _grad_lse):
    x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse = ctx.saved_tensors
    grads = _global_query_attention_bwd(
        grad_out, x, ctx.T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse,
        ctx.num_heads, ctx.eps, ctx.backend,
    )
    dx, d_dpe_w, d_dpe_b, d_ln_w, d_ln_b, d_query, d_in_w, d_in_b = grads
    return dx, None, d_dpe_w, d_dpe_b, d_ln_w, d_ln_b, d_query, d_in_w, d_in_b, None, None, None


_global_query_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def select_backend(tensors, x: torch.Tensor, num_heads: int, backend: str | None = None) -> str:
    return backends.select_op(OP_NAME, tensors, backend, x=x, num_heads=num_heads)


def check_inputs(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps):
    """Raises a clear error naming the offending argument."""
    check_tensor("x", x, ndim=3)
    T = check_positive_int("T", T)
    check_positive_int("num_heads", num_heads)
    L, NT, C = x.shape
    if NT == 0 or NT % T != 0:
        raise ValueError(f"x: dimension 1 is N*T and must be a positive multiple of T={T}, got shape {tuple(x.shape)}")
    if L < 2:
        raise ValueError(f"x: dimension 0 is L = 1 + h*w and must be >= 2, got shape {tuple(x.shape)}")
    square_side("x", L - 1)
    if C == 0 or C % num_heads != 0:
        raise ValueError(f"num_heads={num_heads} must divide the channel count C={C} of x")
    N = NT // T
    check_tensor("dpe_weight", dpe_weight, shape=(C, 1, 3, 3, 3))
    check_tensor("dpe_bias", dpe_bias, shape=(C,))
    check_tensor("ln_weight", ln_weight, shape=(C,))
    check_tensor("ln_bias", ln_bias, shape=(C,))
    check_tensor("query", query, shape=(1, N, C))
    check_tensor("in_proj_weight", in_proj_weight, shape=(3 * C, C))
    check_tensor("in_proj_bias", in_proj_bias, shape=(3 * C,))
    check_same([("x", x), ("dpe_weight", dpe_weight), ("dpe_bias", dpe_bias), ("ln_weight", ln_weight),
                ("ln_bias", ln_bias), ("query", query), ("in_proj_weight", in_proj_weight),
                ("in_proj_bias", in_proj_bias)])
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def global_query_attention(
    x: torch.Tensor,
    T: int,
    dpe_weight: torch.Tensor,
    dpe_bias: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    query: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    num_heads: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Global UniBlock cross-attention of one query per video over DPE(x) after ln_3, before out_proj.

    x: (L, N*T, C) stream from the local blocks (row n*T + t, token 0 of each frame the class token,
    L = 1 + h*w with h == w); dpe_weight/dpe_bias: (C, 1, 3, 3, 3)/(C,) depthwise Conv3d of the DPE
    (patch tokens only); ln_weight/ln_bias: ln_3 (C,); query: (1, N, C), already ln_1(g);
    in_proj_weight/in_proj_bias: (3C, C)/(3C,) packed q, k, v; num_heads divides C.
    Returns (1, N, C) in x.dtype: the heads' attention outputs concatenated, before out_proj.
    All tensors share one device and dtype. Differentiable in every tensor argument.
    """
    T = check_positive_int("T", T)
    check_inputs(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps)
    tensors = (x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias)
    name = select_backend(tensors, x, num_heads, backend)
    if name == "inductor" and library.recording_for() is None:  # compiled, outside the operators
        with backends.op_body(x):
            return inductor.run(OP_NAME, _reference_forward, x, int(T), dpe_weight, dpe_bias, ln_weight, ln_bias,
                                query, in_proj_weight, in_proj_bias, int(num_heads), float(eps))
    out, _, _ = _global_query_attention_fwd(
        x.contiguous(), int(T), dpe_weight.contiguous(), dpe_bias.contiguous(), ln_weight.contiguous(),
        ln_bias.contiguous(), query.contiguous(), in_proj_weight.contiguous(), in_proj_bias.contiguous(),
        int(num_heads), float(eps), name,
    )
    return out
