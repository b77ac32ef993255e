"""Fused local temporal MHRA (LT_MHRA) of the local UniBlock: BatchNorm3d + 1x1x1 conv + depthwise (3,1,1)
temporal conv + 1x1x1 conv + residual, on the stream layout (L, N*T, C) with no permute copies.

    out[0] = x[0]                                       (class tokens unchanged)
    out[1:] = x[1:] + branch_scale[n] * lmhra(x[1:])    (lmhra = the official ``Local_MHRA.pos_embed``)

Public API: :func:`local_temporal_mhra`. Registered ops (:mod:`uniformerv2_kernels.library`, with fake and autograd):
``uniformerv2::local_temporal_mhra_fwd`` and ``uniformerv2::local_temporal_mhra_bwd``. The running
statistics update (training) happens in :func:`local_temporal_mhra`, outside the custom ops, with in-place
torch ops exactly like ``nn.BatchNorm3d`` (so the ops mutate nothing and torch.compile functionalises the
update). The ``inductor`` backend is torch.compile of the reference backend's math
(:func:`..reference.local_temporal_mhra.local_temporal_mhra_reference`), outside the operators
(:mod:`uniformerv2_kernels.inductor`); the running statistics are updated the same way after it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import backends, inductor, library, selection
from ..checks import check_positive_int, check_same, check_tensor
from ..reference import local_temporal_mhra as reference

OP_NAME = "local_temporal_mhra"
IMPLEMENTED = selection.OPS[OP_NAME].backends


def _triton_module():
    from ..triton import local_temporal_mhra as triton_impl  # imported lazily: TRITON_INTERPRET is read then

    return triton_impl


def _triton_backward_module():
    from ..triton import local_temporal_mhra_backward as triton_backward  # lazily, as _triton_module

    return triton_backward


# --------------------------------------------------------------------------------------------------------
# Forward op
# --------------------------------------------------------------------------------------------------------


@library.custom_op("uniformerv2::local_temporal_mhra_fwd")
def _fwd_op(
    x: torch.Tensor,
    T: int,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: Optional[torch.Tensor],
    running_var: Optional[torch.Tensor],
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    training: bool,
    eps: float,
    branch_scale: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (out, mean, biased var, saved Y1). mean/var: batch statistics (training) or a copy of the
    running ones (eval), fp32 (fp64 for fp64 reference calls). Y1 is empty for the reference and the "auto"
    backend (an exported program's: Y1's shape depends on the backend, not known when it was traced)."""
    if backend == library.AUTO_BACKEND:
        out, mean, var, _ = _fwd_op.fn(
            x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
            conv2_weight, conv2_bias, training, eps, branch_scale, select_backend(
                [t for t in (x, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight,
                             dw_bias, conv2_weight, conv2_bias, branch_scale) if t is not None], x))
        return out, mean, var, x.new_empty(0)
    with backends.op_body(x):
        if backend == "triton":
            return _triton_module().forward(
                x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
                conv2_weight, conv2_bias, training, eps, branch_scale,
            )
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.local_temporal_mhra_fwd(
                x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
                conv2_weight, conv2_bias, training, eps, branch_scale,
            ))
        if backend != "reference":
            raise ValueError(f"{OP_NAME}: unknown backend {backend!r}")
        out, mean, var = reference.local_temporal_mhra_reference(
            x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
            conv2_weight, conv2_bias, training, eps, branch_scale,
        )
        return out, mean.clone(), var.clone(), x.new_empty(0)


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_fwd_op.register_fake
def _fwd_fake(x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
              conv2_weight, conv2_bias, training, eps, branch_scale, backend):
    L, NT, C = x.shape
    Cp = conv1_weight.shape[0]
    stat = x.new_empty(C, dtype=_stat_dtype(x))
    if backend in ("reference", library.AUTO_BACKEND):
        y1 = x.new_empty(0)
    elif backend == "triton":  # padded to aligned rows (triton/local_temporal_mhra.py: y1_width)
        y1 = x.new_empty((L - 1) * NT, _triton_module().y1_width(Cp))
    else:
        y1 = x.new_empty((L - 1) * NT, Cp)
    return torch.empty_like(x, memory_format=torch.contiguous_format), stat, torch.empty_like(stat), y1


# --------------------------------------------------------------------------------------------------------
# Backward op
# --------------------------------------------------------------------------------------------------------


@library.custom_op("uniformerv2::local_temporal_mhra_bwd")
def _bwd_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    y1: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    T: int,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    training: bool,
    eps: float,
    branch_scale: Optional[torch.Tensor],
    need_branch_scale_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d bn_weight, d bn_bias, d conv1_weight, d conv1_bias, d dw_weight, d dw_bias, d conv2_weight,
    d conv2_bias, d branch_scale (empty unless need_branch_scale_grad)). The "auto" forward keeps no Y1, which
    the kernels' backward needs: its backward is the reference's."""
    if backend == library.AUTO_BACKEND:
        backend = "reference"
    with backends.op_body(x):
        if backend == "triton":
            return _triton_backward_module().backward(
                grad_out, x, y1, mean, var, T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
                conv2_weight, conv2_bias, training, eps, branch_scale, need_branch_scale_grad,
            )
        if backend == "cuda":
            return tuple(torch.ops.uniformerv2_cuda.local_temporal_mhra_bwd(
                grad_out, x, y1, mean, var, T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
                conv2_weight, conv2_bias, training, eps, branch_scale, need_branch_scale_grad,
            ))
        if backend != "reference":
            raise ValueError(f"{OP_NAME}: unknown backend {backend!r}")
        grads = reference.local_temporal_mhra_reference_backward(
            grad_out, x, T, mean, var, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
            conv2_weight, conv2_bias, training, eps, branch_scale,
        )
        d_bs = grads[-1] if need_branch_scale_grad else x.new_empty(0)
    return grads[:-1] + (d_bs,)


@_bwd_op.register_fake
def _bwd_fake(grad_out, x, y1, mean, var, T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
              conv2_weight, conv2_bias, training, eps, branch_scale, need_branch_scale_grad, backend):
    if need_branch_scale_grad:
        d_bs = torch.empty_like(branch_scale)
    else:
        d_bs = x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.contiguous_format),) + tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) for t in (
            bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias)
    ) + (d_bs,)


def _setup_context(ctx, inputs, output):
    (x, T, bn_weight, bn_bias, _rm, _rv, conv1_weight, conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias,
     training, eps, branch_scale, backend) = inputs
    _out, mean, var, y1 = output
    library.skip_aux_grads(ctx, mean, var, y1)
    ctx.save_for_backward(x, y1, mean, var, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
                          conv2_weight, conv2_bias, branch_scale)
    ctx.T = T
    ctx.training = training
    ctx.eps = eps
    ctx.backend = backend


def _backward(ctx, grad_out, _g_mean, _g_var, _g_y1):
    (x, y1, mean, var, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias,
     branch_scale) = ctx.saved_tensors
    need_bs = branch_scale is not None and ctx.needs_input_grad[14]
    grads = _bwd_op(
        grad_out, x, y1, mean, var, ctx.T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
        conv2_weight, conv2_bias, ctx.training, ctx.eps, branch_scale, need_bs, ctx.backend,
    )
    dx, d_bn_w, d_bn_b, d_w1, d_b1, d_dw_w, d_dw_b, d_w2, d_b2, d_bs = grads
    return (dx, None, d_bn_w, d_bn_b, None, None, d_w1, d_b1, d_dw_w, d_dw_b, d_w2, d_b2, None, None,
            d_bs if need_bs else None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------


def _check_inputs(x, T, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv1_weight,
                  conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias, training, momentum, eps, branch_scale):
    check_tensor("x", x, ndim=3)
    check_positive_int("T", T)
    L, NT, C = x.shape
    if L < 2:
        raise ValueError(f"x must hold a class token and at least one patch token (L >= 2), got shape {tuple(x.shape)}")
    if NT % T != 0:
        raise ValueError(f"x: dimension 1 (N*T = {NT}) must be a multiple of T = {T}")
    if C == 0:
        raise ValueError(f"x must have C > 0 channels, got shape {tuple(x.shape)}")
    check_tensor("conv1_weight", conv1_weight, shape=(None, C, 1, 1, 1))
    Cp = conv1_weight.shape[0]
    if Cp == 0:
        raise ValueError("conv1_weight must have at least one output channel")
    check_tensor("bn_weight", bn_weight, shape=(C,))
    check_tensor("bn_bias", bn_bias, shape=(C,))
    check_tensor("conv1_bias", conv1_bias, shape=(Cp,))
    check_tensor("dw_weight", dw_weight, shape=(Cp, 1, 3, 1, 1))
    check_tensor("dw_bias", dw_bias, shape=(Cp,))
    check_tensor("conv2_weight", conv2_weight, shape=(C, Cp, 1, 1, 1))
    check_tensor("conv2_bias", conv2_bias, shape=(C,))
    named = [("x", x), ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("conv1_weight", conv1_weight),
             ("conv1_bias", conv1_bias), ("dw_weight", dw_weight), ("dw_bias", dw_bias),
             ("conv2_weight", conv2_weight), ("conv2_bias", conv2_bias)]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            if not training:
                raise ValueError(f"{name} is required in eval mode (training=False uses the running statistics)")
        else:
            check_tensor(name, t, shape=(C,))
            named.append((name, t))
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if num_batches_tracked is not None:
        check_tensor("num_batches_tracked", num_batches_tracked, dtypes=None)
        if num_batches_tracked.numel() != 1:
            raise ValueError(f"num_batches_tracked must hold one value, got shape {tuple(num_batches_tracked.shape)}")
        named.append(("num_batches_tracked", num_batches_tracked))
    if branch_scale is not None:
        check_tensor("branch_scale", branch_scale, shape=(NT // T,))
        named.append(("branch_scale", branch_scale))
    check_same(named, dtype=False)
    if momentum is not None and not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__}")
    if training and momentum is None and running_mean is not None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    if training and (L - 1) * NT <= 1:
        raise ValueError(
            f"x: expected more than 1 value per channel when training, got {(L - 1) * NT} patch rows"
        )


def select_backend(tensors: Sequence[torch.Tensor], x: torch.Tensor, backend: str | None = None) -> str:
    return backends.select_op(OP_NAME, tensors, backend, x=x)


def local_temporal_mhra(
    x: torch.Tensor,
    T: int,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    num_batches_tracked: torch.Tensor | None,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    branch_scale: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """x (L, N*T, C) -> x with ``x[1:] + branch_scale[n] * lmhra(x[1:])`` and the class tokens unchanged.

    Parameters are those of the official ``Local_MHRA.pos_embed`` as held: BatchNorm3d weight/bias/running
    stats/num_batches_tracked/momentum/eps, conv weights with their 5-d shapes ((C',C,1,1,1), (C',1,3,1,1),
    (C,C',1,1,1)) and biases. ``training`` selects batch statistics (and updates running_mean, running_var
    (unbiased) and num_batches_tracked in place like nn.BatchNorm3d; momentum None = cumulative average)
    versus the running statistics. ``branch_scale`` (N,) multiplies the branch per video (drop path:
    mask / keep_prob). Parameters may be in another float dtype than x (e.g. fp32 under autocast); the
    math runs in x.dtype with fp32 statistics and accumulation, and gradients come back in each input's
    dtype. A non-contiguous x is copied.
    """
    T = check_positive_int("T", T)
    _check_inputs(x, T, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv1_weight,
                  conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias, training, momentum, eps, branch_scale)
    tensors: Sequence[torch.Tensor] = [t for t in (x, bn_weight, bn_bias, running_mean, running_var, conv1_weight,
                                                   conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias,
                                                   branch_scale) if t is not None]
    name = select_backend(tensors, x, backend)
    if name == "inductor" and library.recording_for() is None:  # compiled, outside the operators
        with backends.op_body(x):
            out, mean, var = inductor.run(
                OP_NAME, reference.local_temporal_mhra_reference, x, T, bn_weight, bn_bias,
                running_mean if not training else None, running_var if not training else None, conv1_weight,
                conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias, bool(training), float(eps), branch_scale)
    else:
        out, mean, var, _ = _fwd_op(
            x.contiguous(), T, bn_weight, bn_bias, running_mean if not training else None,
            running_var if not training else None, conv1_weight, conv1_bias, dw_weight, dw_bias, conv2_weight,
            conv2_bias, bool(training), float(eps), branch_scale, name,
        )
    if training and running_mean is not None:
        _update_running_stats(mean, var, running_mean, running_var, num_batches_tracked, momentum,
                              count=(x.shape[0] - 1) * x.shape[1])
    return out


def _update_running_stats(mean, var, running_mean, running_var, num_batches_tracked, momentum, count):
    """nn.BatchNorm3d's training-mode update: num_batches_tracked += 1, then with factor = momentum (or
    1 / num_batches_tracked when momentum is None) running = factor * batch + (1 - factor) * running, the
    variance unbiased (count / (count - 1))."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if momentum is not None and running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
            # the usual case (fp32 buffers, autocast included): 3 kernel launches instead of 9, the same
            # value up to one fp32 rounding (lerp: running + factor * (batch - running))
            running_mean.lerp_(mean, float(momentum))
            running_var.lerp_(var * (count / (count - 1)), float(momentum))
            return
        factor = reference.batchnorm_momentum_factor(momentum, num_batches_tracked)
        unbiased = var * (count / (count - 1))
        # in fp32, rounded once into the buffers' dtype (as ATen's kernels do): fp16/bf16 buffers times a
        # Python float would round (1 - factor) * running first
        running_mean.copy_(factor * mean + (1 - factor) * running_mean.float())
        running_var.copy_(factor * unbiased + (1 - factor) * running_var.float())
