"""Pure-PyTorch references of the local temporal MHRA (LT_MHRA) of the local UniBlock (DESIGN.md 2, 3).

The official module (UniFormerV2 ``Local_MHRA``) is

    pos_embed = Sequential(BatchNorm3d(C), Conv3d(C, C', 1), Conv3d(C', C', (3,1,1), padding=(1,0,0), groups=C'),
                           Conv3d(C', C, 1))

applied in the block to an (N, C, T, h, w) permuted copy of the patch tokens of the stream x (L, N*T, C):

    tmp = x[1:].view(h, w, N, T, C).permute(2, 4, 3, 0, 1)        # (N, C, T, h, w)
    tmp = tmp + drop_path(pos_embed(tmp))                         # drop path per video
    x = cat([x[:1], tmp.permute back to (L-1, N*T, C)])

Two references live here:

- :func:`official_local_mhra_stream`: literally that path (permute + ``F.batch_norm`` + three ``F.conv3d``),
  the test oracle. In training mode ``F.batch_norm`` updates the running statistics in place, exactly as
  ``nn.BatchNorm3d`` does (pass clones if they must be kept).
- :func:`local_temporal_mhra_reference`: the same math on the native layout: per-channel batch statistics
  over all patch rows, two matmuls over rows, and a mix of the rows of frames t-1, t, t+1 of the same
  (position, video). It returns the batch statistics instead of updating running statistics; the public op
  does the update. It is the "reference" backend of the op.

Both are float64-gradcheckable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batchnorm_momentum_factor(momentum: float | None, num_batches_tracked: torch.Tensor | None):
    """The factor nn.BatchNorm uses to update running stats, after incrementing num_batches_tracked.

    momentum None means a cumulative moving average: factor 1 / num_batches_tracked (a tensor here, so that
    torch.compile does not need the value on the host).
    """
    if momentum is None:
        if num_batches_tracked is None:
            raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
        return 1.0 / num_batches_tracked.to(torch.float64)
    return float(momentum)


def official_local_mhra_stream(
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
) -> torch.Tensor:
    """The official block code on the stream x (L, N*T, C), square h == w grid; returns the new stream.

    Mirrors ``nn.BatchNorm3d.forward`` (num_batches_tracked increment, momentum None = cumulative average)
    and the official permutes. ``branch_scale`` (N,) multiplies the branch per video (timm DropPath).
    """
    L, NT, C = x.shape
    N = NT // T
    hw = L - 1
    h = int(round(hw ** 0.5))
    w = hw // h
    factor = momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    elif momentum is None:
        factor = 0.0
    tmp = x[1:].reshape(h, w, N, T, C).permute(2, 4, 3, 0, 1).contiguous()  # (N, C, T, h, w)
    y = F.batch_norm(tmp, running_mean, running_var, bn_weight, bn_bias, training, factor, eps)
    y = F.conv3d(y, conv1_weight, conv1_bias)
    y = F.conv3d(y, dw_weight, dw_bias, padding=(1, 0, 0), groups=dw_weight.shape[0])
    y = F.conv3d(y, conv2_weight, conv2_bias)
    if branch_scale is not None:
        y = y * branch_scale.to(y.dtype).view(N, 1, 1, 1, 1)
    tmp = tmp + y
    tmp = tmp.view(N, C, T, hw).permute(3, 0, 2, 1).contiguous().view(hw, NT, C)
    return torch.cat([x[:1], tmp], 0)


def temporal_shift_mix(y: torch.Tensor, T: int, dw_weight: torch.Tensor, dw_bias: torch.Tensor) -> torch.Tensor:
    """Depthwise temporal conv (kernel 3, padding 1) on rows m = (.., t) of y (M, C'), M a multiple of T.

    out[m] = w0 * y[m - 1] (if t > 0) + w1 * y[m] + w2 * y[m + 1] (if t < T - 1) + b, per channel, where
    row m has frame t = m % T (rows of one (position, video) are the T consecutive frames).
    """
    M, Cp = y.shape
    w = dw_weight.reshape(Cp, 3).to(y.dtype)
    y3 = y.view(M // T, T, Cp)
    zero = y3.new_zeros(M // T, 1, Cp)
    prev = torch.cat([zero, y3[:, :-1]], 1)  # y[t - 1]
    nxt = torch.cat([y3[:, 1:], zero], 1)  # y[t + 1]
    out = prev * w[:, 0] + y3 * w[:, 1] + nxt * w[:, 2] + dw_bias.to(y.dtype)
    return out.view(M, Cp)


def local_temporal_mhra_reference(
    x: torch.Tensor,
    T: int,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    training: bool,
    eps: float = 1e-5,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Native-layout reference: returns (new stream (L, N*T, C), mean (C,), biased var (C,)) in fp32/fp64.

    The statistics are the batch statistics in training mode and the running statistics in eval mode. The
    BatchNorm is computed in float32 (float64 for float64 inputs), like cuDNN's, and its output cast to
    x.dtype; the convolutions run in x.dtype.
    """
    L, NT, C = x.shape
    N = NT // T
    dtype = x.dtype
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    xp = x[1:].reshape(-1, C)  # (M, C): row m = (position, video, frame)
    xs = xp.to(stat_dtype)
    if training:
        mean = xs.mean(0)
        var = (xs - mean).square().mean(0)
    else:
        mean = running_mean.to(stat_dtype)
        var = running_var.to(stat_dtype)
    rstd = torch.rsqrt(var + eps)
    xn = ((xs - mean) * rstd * bn_weight.to(stat_dtype) + bn_bias.to(stat_dtype)).to(dtype)
    Cp = conv1_weight.shape[0]
    y1 = xn @ conv1_weight.reshape(Cp, C).to(dtype).t() + conv1_bias.to(dtype)
    z = temporal_shift_mix(y1, T, dw_weight.to(dtype), dw_bias.to(dtype))
    branch = z @ conv2_weight.reshape(C, Cp).to(dtype).t() + conv2_bias.to(dtype)
    if branch_scale is not None:
        rows_scale = branch_scale.to(dtype).view(1, N, 1, 1).expand(L - 1, N, T, 1).reshape(-1, 1)
        branch = branch * rows_scale
    out = torch.cat([x[:1], (xp + branch).view(L - 1, NT, C)], 0)
    return out, mean, var


def temporal_shift_mix_transposed(g: torch.Tensor, T: int, dw_weight: torch.Tensor) -> torch.Tensor:
    """The adjoint of :func:`temporal_shift_mix` (without its bias) applied to g (M, C'):
    out[m] = w0 * g[m + 1] (if t < T - 1) + w1 * g[m] + w2 * g[m - 1] (if t > 0)."""
    M, Cp = g.shape
    w = dw_weight.reshape(Cp, 3).to(g.dtype)
    g3 = g.view(M // T, T, Cp)
    zero = g3.new_zeros(M // T, 1, Cp)
    prev = torch.cat([zero, g3[:, :-1]], 1)
    nxt = torch.cat([g3[:, 1:], zero], 1)
    return (nxt * w[:, 0] + g3 * w[:, 1] + prev * w[:, 2]).view(M, Cp)


def local_temporal_mhra_reference_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    T: int,
    mean: torch.Tensor,
    var: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    conv1_weight: torch.Tensor,
    conv1_bias: torch.Tensor,
    dw_weight: torch.Tensor,
    dw_bias: torch.Tensor,
    conv2_weight: torch.Tensor,
    conv2_bias: torch.Tensor,
    training: bool,
    eps: float = 1e-5,
    branch_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """Explicit backward of :func:`local_temporal_mhra_reference` (mean/var: the statistics its forward
    used). Returns (dx, d bn_weight, d bn_bias, d conv1_weight, d conv1_bias, d dw_weight, d dw_bias,
    d conv2_weight, d conv2_bias, d branch_scale or None), each in its input's dtype and shape.

    Chain rule, with rows m of the patch tokens, s = gamma * rstd, xhat = (x - mean) * rstd,
    xn = s (x - mean) + beta, Y1 = xn W1^T + b1, Z = mix(Y1), branch = Z W2^T + b2, D[m] = branch_scale:
    dB = D G; db2 = sum dB; dW2 = dB^T Z; dZ = dB W2; db_dw = sum dZ; dw_k = sum dZ * Y1[t + k - 1];
    dY1 = mix^T(dZ); db1 = sum dY1; dW1 = dY1^T xn; dxn = dY1 W1; dgamma = sum dxn * xhat; dbeta = sum dxn;
    dx = G + s * dxn in eval, G + s * (dxn - dbeta / M - xhat * dgamma / M) in training;
    d branch_scale[n] = sum over the rows of video n of G . branch.
    """
    L, NT, C = x.shape
    N = NT // T
    M = (L - 1) * NT
    dtype = x.dtype
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    Cp = conv1_weight.shape[0]
    g = grad_out[1:].reshape(M, C)
    xs = x[1:].reshape(M, C).to(stat_dtype)
    mean = mean.to(stat_dtype)
    rstd = torch.rsqrt(var.to(stat_dtype) + eps)
    xhat = (xs - mean) * rstd
    gamma = bn_weight.to(stat_dtype)
    xn = (xhat * gamma + bn_bias.to(stat_dtype)).to(dtype)
    w1 = conv1_weight.reshape(Cp, C).to(dtype)
    w2 = conv2_weight.reshape(C, Cp).to(dtype)
    y1 = xn @ w1.t() + conv1_bias.to(dtype)
    z = temporal_shift_mix(y1, T, dw_weight.to(dtype), dw_bias.to(dtype))

    if branch_scale is not None:
        rows_scale = branch_scale.to(dtype).view(1, N, 1, 1).expand(L - 1, N, T, 1).reshape(M, 1)
        d_branch = g * rows_scale
    else:
        d_branch = g
    d_b2 = d_branch.sum(0)
    d_w2 = d_branch.t() @ z
    dz = d_branch @ w2
    d_dw_bias = dz.sum(0)
    y3 = y1.view(M // T, T, Cp)
    zero = y3.new_zeros(M // T, 1, Cp)
    y_prev = torch.cat([zero, y3[:, :-1]], 1).view(M, Cp)
    y_next = torch.cat([y3[:, 1:], zero], 1).view(M, Cp)
    d_dw_weight = torch.stack([(dz * y_prev).sum(0), (dz * y1).sum(0), (dz * y_next).sum(0)], 1)
    dy1 = temporal_shift_mix_transposed(dz, T, dw_weight.to(dtype))
    d_b1 = dy1.sum(0)
    d_w1 = dy1.t() @ xn
    dxn = (dy1 @ w1).to(stat_dtype)
    d_gamma = (dxn * xhat).sum(0)
    d_beta = dxn.sum(0)
    if training:
        dxs = gamma * rstd * (dxn - d_beta / M - xhat * d_gamma / M)
    else:
        dxs = gamma * rstd * dxn
    dx = torch.cat([grad_out[:1], (g.to(stat_dtype) + dxs).to(dtype).view(L - 1, NT, C)], 0)
    d_branch_scale = None
    if branch_scale is not None:
        branch = z @ w2.t() + conv2_bias.to(dtype)
        per_row = (g.to(stat_dtype) * branch.to(stat_dtype)).sum(1)
        d_branch_scale = per_row.view(L - 1, N, T).sum((0, 2)).to(branch_scale.dtype)
    return (
        dx,
        d_gamma.to(bn_weight.dtype),
        d_beta.to(bn_bias.dtype),
        d_w1.to(conv1_weight.dtype).reshape(conv1_weight.shape),
        d_b1.to(conv1_bias.dtype),
        d_dw_weight.to(dw_weight.dtype).reshape(dw_weight.shape),
        d_dw_bias.to(dw_bias.dtype),
        d_w2.to(conv2_weight.dtype).reshape(conv2_weight.shape),
        d_b2.to(conv2_bias.dtype),
        d_branch_scale,
    )
