"""Spatial self-attention of the local blocks: ``attn(ln_1(x))`` within each frame, on the (L, B, C) stream.

Public API: :func:`spatial_attention`, :func:`attention_backend`.

The op is three registered pieces, so each has a fake kernel and autograd and torch.compile traces
straight through:
- ``uniformerv2::spatial_attention_qkv_fwd/_bwd``: ln_1 (CLIP LayerNorm) + packed QKV projection,
  writing qkv (B*L, 3C) in frame-major rows (no permute copy; see :mod:`..triton.spatial_attention`);
- the attention core on the (B, L, H, d) views of qkv: xformers ``memory_efficient_attention`` when it
  imports and passes a probe on this machine, else ``torch.nn.functional.scaled_dot_product_attention``
  (both bring their own autograd); the "reference" backend uses the literal softmax math;
- ``uniformerv2::spatial_attention_out_fwd/_bwd``: out_proj, storing rows back in stream order.
The packed ``in_proj_weight`` / ``in_proj_bias`` and ``out_proj`` parameters are used as they are.
The ``inductor`` backend is torch.compile of :func:`..reference.spatial_attention.spatial_attention_sdpa` (the
SDPA core, as nn.MultiheadAttention runs it), outside the operators (:mod:`uniformerv2_kernels.inductor`).

Determinism: the projections' backward is deterministic; the attention core's backward is whatever the
chosen SDPA / xformers kernel does (CPU SDPA is deterministic; on CUDA, set
``torch.use_deterministic_algorithms(True)`` where the attention kernels honour it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import backends, inductor, library, selection, settings
from ..checks import check_positive_int, check_same, check_tensor
from ..reference import spatial_attention as reference
from ..settings import ENV_ATTENTION

OP_NAME = "spatial_attention"
IMPLEMENTED = selection.OPS[OP_NAME].backends

_backend_choice: tuple[str, str] | None = None


def _triton():
    from ..triton import spatial_attention as triton_spatial_attention  # lazily (TRITON_INTERPRET first)

    return triton_spatial_attention


def _probe_xformers() -> tuple[str, str]:
    if settings.attention() == "sdpa":
        return "sdpa", f"{ENV_ATTENTION}=sdpa"
    try:
        import xformers
        import xformers.ops as xops
    except Exception as exc:  # not installed, or its compiled part does not load
        why = "xformers is not installed" if isinstance(exc, ModuleNotFoundError) else (
            f"xformers does not import ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return "sdpa", why
    if not torch.cuda.is_available():
        return "sdpa", f"xformers {xformers.__version__} imports but there is no CUDA device (it has no CPU path)"
    try:
        # grad on even when the first call comes from no_grad / inference_mode code (an eval pass): the
        # probe runs a backward, and its answer is kept for the whole process
        with torch.inference_mode(False), torch.enable_grad():
            gen = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(2, 13, 2, 64, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
            q.requires_grad_()
            out = xops.memory_efficient_attention(q, k, v, scale=1.0 / 8.0)
            out.float().sum().backward()
        expected = F.scaled_dot_product_attention(q.detach().transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        err = (out.detach().float() - expected.transpose(1, 2).float()).abs().max().item()
        torch.cuda.synchronize()
        if not err < 1e-2:
            return "sdpa", f"xformers {xformers.__version__} memory_efficient_attention probe is wrong (max err {err:.2e})"
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return "sdpa", f"xformers {xformers.__version__} memory_efficient_attention fails a probe ({type(exc).__name__}: {first})"
    return "xformers", f"xformers {xformers.__version__} memory_efficient_attention passed a probe on {torch.cuda.get_device_name()}"


def _attention_backend_uncompiled() -> tuple[str, str]:
    global _backend_choice
    if _backend_choice is None:
        name, reason = _probe_xformers()
        if settings.attention() == "xformers" and name != "xformers":
            raise RuntimeError(f"{ENV_ATTENTION}=xformers but xformers cannot run: {reason}")
        _backend_choice = (name, reason)
    return _backend_choice


# Under torch.compile the probe runs eagerly and its answer is a constant of the graph: the mark that
# torch.compiler.assume_constant_result sets, set here without it, because it imports torch._dynamo (seconds)
# and this module is imported with the package (its operators must exist before a saved program loads).
_attention_backend_uncompiled._dynamo_marked_constant = True
_attention_backend_traced = _attention_backend_uncompiled


def attention_backend() -> tuple[str, str]:
    """(name, reason): the attention kernel used for CUDA tensors, "xformers" or "sdpa", and why.

    xformers ``memory_efficient_attention`` is used only when it imports and passes a small forward and
    backward probe against SDPA; ``UNIFORMERV2_ATTENTION=sdpa`` forces SDPA. CPU tensors always use SDPA.
    The probe runs once per process.
    """
    return _attention_backend_traced()


def _attention_core(qkv: torch.Tensor, L: int, B: int, num_heads: int, backend: str) -> torch.Tensor:
    """o (B*L, C) frame-major from qkv (B*L, 3C) frame-major."""
    if backend == "reference":
        return reference.core_forward(qkv, L, B, num_heads)
    C = qkv.shape[1] // 3
    d = C // num_heads
    q, k, v = qkv.view(B, L, 3, num_heads, d).unbind(2)  # each (B, L, H, d), unit stride along d
    # an exported program keeps SDPA, which every machine has, rather than a probe's answer on this one
    if qkv.is_cuda and not torch.compiler.is_exporting() and attention_backend()[0] == "xformers":
        import xformers.ops as xops

        o = xops.memory_efficient_attention(q, k, v, scale=1.0 / math.sqrt(d))
    else:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    return o.reshape(B * L, C)


# ---- ln_1 + QKV projection ----

@library.custom_op("uniformerv2::spatial_attention_qkv_fwd")
def _qkv_fwd(
    x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qkv (B*L, 3C) frame-major, mean (L*B,), rstd (L*B,)) for x (L, B, C)."""
    if backend == library.AUTO_BACKEND:
        backend = select_backend(x, (ln_weight, ln_bias, in_proj_weight, in_proj_bias))
    with backends.op_body(x):
        if backend == "triton":
            return _triton().qkv_forward(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps)
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.spatial_attention_qkv_fwd(
                x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps))
        qkv, mean, rstd = reference.qkv_forward(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps)
        return qkv.contiguous(), mean.float(), rstd.float()


@_qkv_fwd.register_fake
def _(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps, backend):
    L, B, C = x.shape
    stats = x.new_empty((L * B,), dtype=torch.float32)
    return x.new_empty((B * L, in_proj_weight.shape[0])), stats, stats.clone()


@library.custom_op("uniformerv2::spatial_attention_qkv_bwd")
def _qkv_bwd(
    grad_qkv: torch.Tensor, x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    in_proj_weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, eps: float, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_ln_weight, d_ln_bias, d_in_proj_weight, d_in_proj_bias)."""
    grad_qkv = grad_qkv.contiguous()
    if backend == library.AUTO_BACKEND:
        backend = select_backend(x, (ln_weight, ln_bias, in_proj_weight))
    with backends.op_body(x):
        if backend == "triton":
            grads = _triton().qkv_backward(grad_qkv, x, ln_weight, ln_bias, in_proj_weight, mean, rstd, eps)
        elif backend == "cuda":
            grads = torch.ops.uniformerv2_cuda.spatial_attention_qkv_bwd(
                grad_qkv, x, ln_weight, ln_bias, in_proj_weight, mean, rstd, eps)
        else:
            grads = reference.qkv_backward(grad_qkv, x, ln_weight, ln_bias, in_proj_weight, eps)
    return tuple(g.contiguous() for g in grads)


@_qkv_bwd.register_fake
def _(grad_qkv, x, ln_weight, ln_bias, in_proj_weight, mean, rstd, eps, backend):
    return (torch.empty_like(x), torch.empty_like(ln_weight), torch.empty_like(ln_bias),
            torch.empty_like(in_proj_weight), in_proj_weight.new_empty((in_proj_weight.shape[0],)))


def _qkv_setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps, backend = inputs
    _, mean, rstd = output
    library.skip_aux_grads(ctx, mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, in_proj_weight, mean, rstd)
    ctx.eps = eps
    ctx.backend = backend
    ctx.in_bias_dtype = in_proj_bias.dtype


def _qkv_backward(ctx, grad_qkv, _gm, _gr):
    x, ln_weight, ln_bias, in_proj_weight, mean, rstd = ctx.saved_tensors
    dx, d_ln_w, d_ln_b, d_in_w, d_in_b = _qkv_bwd(grad_qkv, x, ln_weight, ln_bias, in_proj_weight, mean, rstd,
                                                   ctx.eps, ctx.backend)
    return dx, d_ln_w, d_ln_b, d_in_w, d_in_b.to(ctx.in_bias_dtype), None, None


_qkv_fwd.register_autograd(_qkv_backward, setup_context=_qkv_setup_context)


# ---- out_proj back into the stream layout ----

@library.custom_op("uniformerv2::spatial_attention_out_fwd")
def _out_fwd(o: torch.Tensor, out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor, L: int, B: int,
             backend: str) -> torch.Tensor:
    """out_proj of o (B*L, C) frame-major, returned as the stream (L, B, C)."""
    if backend == library.AUTO_BACKEND:
        backend = select_backend(o, (out_proj_weight, out_proj_bias))
    with backends.op_body(o):
        if backend == "triton":
            return _triton().out_forward(o, out_proj_weight, out_proj_bias, L, B)
        if backend == "cuda":
            return torch.ops.uniformerv2_cuda.spatial_attention_out_fwd(o, out_proj_weight, out_proj_bias, L, B)
        return reference.out_forward(o, out_proj_weight, out_proj_bias, L, B)


@_out_fwd.register_fake
def _(o, out_proj_weight, out_proj_bias, L, B, backend):
    return o.new_empty((L, B, out_proj_weight.shape[0]))


@library.custom_op("uniformerv2::spatial_attention_out_bwd")
def _out_bwd(grad_out: torch.Tensor, o: torch.Tensor, out_proj_weight: torch.Tensor,
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_o (B*L, C), d_out_proj_weight, d_out_proj_bias)."""
    if backend == library.AUTO_BACKEND:
        backend = select_backend(o, (out_proj_weight,))
    with backends.op_body(o):
        if backend == "triton":
            grads = _triton().out_backward(grad_out, o, out_proj_weight)
        elif backend == "cuda":
            grads = torch.ops.uniformerv2_cuda.spatial_attention_out_bwd(grad_out, o, out_proj_weight)
        else:
            grads = reference.out_backward(grad_out, o, out_proj_weight)
    return tuple(g.contiguous() for g in grads)


@_out_bwd.register_fake
def _(grad_out, o, out_proj_weight, backend):
    return torch.empty_like(o), torch.empty_like(out_proj_weight), out_proj_weight.new_empty((out_proj_weight.shape[0],))


def _out_setup_context(ctx, inputs, output):
    o, out_proj_weight, out_proj_bias, L, B, backend = inputs
    ctx.save_for_backward(o, out_proj_weight)
    ctx.backend = backend
    ctx.out_bias_dtype = out_proj_bias.dtype


def _out_backward(ctx, grad_out):
    o, out_proj_weight = ctx.saved_tensors
    d_o, d_w, d_b = _out_bwd(grad_out, o, out_proj_weight, ctx.backend)
    return d_o, d_w, d_b.to(ctx.out_bias_dtype), None, None, None


_out_fwd.register_autograd(_out_backward, setup_context=_out_setup_context)


# ---- public API ----

def check_inputs(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads,
                 eps) -> None:
    check_tensor("x", x, ndim=3)
    L, B, C = x.shape
    if C == 0:
        raise ValueError(f"x must be (L, B, C) with C > 0, got shape {tuple(x.shape)}")
    check_positive_int("num_heads", num_heads)
    if C % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the width C={C}")
    check_tensor("ln_weight", ln_weight, shape=(C,))
    check_tensor("ln_bias", ln_bias, shape=(C,))
    check_tensor("in_proj_weight", in_proj_weight, shape=(3 * C, C))
    check_tensor("in_proj_bias", in_proj_bias, shape=(3 * C,))
    check_tensor("out_proj_weight", out_proj_weight, shape=(C, C))
    check_tensor("out_proj_bias", out_proj_bias, shape=(C,))
    check_same([("x", x), ("ln_weight", ln_weight), ("ln_bias", ln_bias), ("in_proj_weight", in_proj_weight),
                ("in_proj_bias", in_proj_bias), ("out_proj_weight", out_proj_weight),
                ("out_proj_bias", out_proj_bias)], dtype=False)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")


def select_backend(x, params, backend=None) -> str:
    return backends.select_op(OP_NAME, (x, *params), backend, x=x)


def spatial_attention(
    x: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    num_heads: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """``attn(ln_1(x))`` for the stream x (L, B, C): self-attention among the L tokens of each of the B frames.

    ln_1 is the CLIP LayerNorm (ln params any float dtype); attn is nn.MultiheadAttention's math with the
    packed in_proj_weight (3C, C) (rows q, k, v), in_proj_bias (3C,), out_proj (C, C) + (C,), head_dim
    C // num_heads, scale 1/sqrt(head_dim), no mask, no dropout. Projection parameters in another dtype
    than x are cast to x.dtype (as autocast does). Returns (L, B, C) in x.dtype, without the residual.
    """
    check_inputs(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, num_heads, eps)
    L, B, C = x.shape
    proj = [p if p.dtype == x.dtype else p.to(x.dtype)
            for p in (in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias)]
    name = select_backend(x, (ln_weight, ln_bias, *proj), backend)
    if name == "inductor" and library.recording_for() is None:  # compiled, outside the operators
        with backends.op_body(x):
            return inductor.run(OP_NAME, reference.spatial_attention_sdpa, x, ln_weight, ln_bias, *proj,
                                int(num_heads), float(eps))
    in_w, in_b, out_w, out_b = (p.contiguous() for p in proj)
    qkv, _, _ = _qkv_fwd(x.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), in_w, in_b, float(eps), name)
    with backends.op_body(x):  # the core computes in x.dtype as well (qkv is already x.dtype)
        o = _attention_core(qkv, L, B, num_heads, name)
    return _out_fwd(o.contiguous(), out_w, out_b, L, B, name)
