"""Triton kernels and launcher of the local temporal MHRA's backward (the forward, the notation and the
shared launchers: :mod:`.local_temporal_mhra`).

Backward (G = grad of the output's patch rows, D = dropped-path scale per row):
1. dZ = G @ W2 with cuBLAS (plain GEMM).
2. ``_temporal_mix_backward_kernel``: dY1 (the transposed temporal conv of D*dZ), Zs = D * Z (recomputed
   from Y1, for dW2), and per-block column partial sums for db_dw, dw_dw (3 taps) and db1' (second pass
   ``_sum_partials_kernel``; deterministic). Optionally per-row dot products for the branch-scale grad.
3. dW2 = G^T @ Zs and P = dY1^T @ X with cuBLAS (K = M reductions into small outputs: cuBLAS's
   split-K kernels are deterministic and fast); db2 = sum_m D[m] G[m] with ``_scaled_column_sum_kernel``.
4. ``_bn_conv1_grads_kernel``: the BatchNorm parameters come from P = dY1^T (X - mean): ds = sum_j W1[j] *
   P[j], dgamma = ds * rstd, dbeta = W1^T db1', dW1 = P * s + db1' beta^T (X centred first: no cancellation
   when |mean| >> std), and the per-channel coefficients of step 5's epilogue.
5. dX = G + dY1 @ W1' - s * (dbeta + xhat * dgamma) / M (last term in training only): Triton
   ``_fused_matmul_kernel`` without the mix, with the BatchNorm-backward correction and the residual gradient
   in its epilogue (one pass over dX).

All kernels: int64 row offsets, every load masked, fp32 arithmetic and accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .host_math import cdiv
from .linear import mm_fp32_out
from .local_temporal_mhra import (_centre, _fold, _interpreting, _mix_taps, _row_split, _sum_partials, fused_matmul,
                                  y1_width)


@triton.jit
def _temporal_mix_backward_kernel(
    dz_ptr, y1_ptr, k_bias_ptr, mix_w_ptr, mix_b_ptr, row_scale_ptr,
    dy1_ptr, zs_ptr, part_ptr, rowdot_ptr,
    M, K, T, NT, rows_per_prog,
    HAS_ROW_SCALE: tl.constexpr, NEED_ROWDOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward of the temporal mix on rows [pid_r * rows_per_prog, ...) and channels of block pid_k.

    dz = G @ W2 (unscaled); with D the per-row branch scale, the mix output's gradient is D * dz. Writes
    dY1[m] = w0 * D dz[m+1] + w1 * D dz[m] + w2 * D dz[m-1] (taps outside the clip dropped), Zs = D * Z
    with Z the recomputed mix output (rounded like the forward's), partial column sums
    part[pid_r, 0..4, :] = (sum D dz, sum D dz * Y1[m-1], sum D dz * Y1[m], sum D dz * Y1[m+1], sum dY1),
    and with NEED_ROWDOT rowdot[pid_k, m] = sum over this channel block of dz[m] * Z[m].
    """
    pid_r = tl.program_id(0)
    pid_k = tl.program_id(1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    kb, w0, w1, w2, mb = _mix_taps(k_bias_ptr, mix_w_ptr, mix_b_ptr, ks, kmask)
    acc_db = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_w0 = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_w1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_w2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    acc_b1 = tl.zeros([BLOCK_K], dtype=tl.float32)
    row_start = pid_r.to(tl.int64) * rows_per_prog
    n_rows = tl.minimum(M - row_start, rows_per_prog)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        local = r0 + tl.arange(0, BLOCK_M)
        rmask = local < n_rows
        rows = row_start + local
        t = rows % T
        mask = rmask[:, None] & kmask[None, :]
        p_mask = (rmask & (t > 0))[:, None] & kmask[None, :]
        n_mask = (rmask & (t < T - 1))[:, None] & kmask[None, :]
        offs = rows[:, None] * K + ks[None, :]
        dz_raw = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz_prev = tl.load(dz_ptr + offs - K, mask=p_mask, other=0.0).to(tl.float32)
        dz_next = tl.load(dz_ptr + offs + K, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ROW_SCALE:
            # rows m-1 and m+1, when inside the clip, belong to the same video as row m
            scale = tl.load(row_scale_ptr + (rows % NT) // T, mask=rmask, other=0.0)[:, None]
            dz = dz_raw * scale
            dz_prev = dz_prev * scale
            dz_next = dz_next * scale
        else:
            dz = dz_raw
        y_cur = tl.where(mask, tl.load(y1_ptr + offs, mask=mask, other=0.0).to(tl.float32) + kb, 0.0)
        y_prev = tl.where(p_mask, tl.load(y1_ptr + offs - K, mask=p_mask, other=0.0).to(tl.float32) + kb, 0.0)
        y_next = tl.where(n_mask, tl.load(y1_ptr + offs + K, mask=n_mask, other=0.0).to(tl.float32) + kb, 0.0)
        z = (w0 * y_prev + w1 * y_cur + w2 * y_next + mb).to(zs_ptr.dtype.element_ty).to(tl.float32)
        # Sums below use dY1 as stored (rounded to its dtype): the BatchNorm backward subtracts them from
        # dY1 @ W1', and the two sides must see the same values or the cancellation leaves rounding noise.
        dy1 = (w0 * dz_next + w1 * dz + w2 * dz_prev).to(dy1_ptr.dtype.element_ty)
        tl.store(dy1_ptr + offs, dy1, mask=mask)
        dy1 = dy1.to(tl.float32)
        if HAS_ROW_SCALE:
            tl.store(zs_ptr + offs, (z * scale).to(zs_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(zs_ptr + offs, z.to(zs_ptr.dtype.element_ty), mask=mask)
        acc_db += tl.sum(dz, axis=0)
        acc_w0 += tl.sum(dz * y_prev, axis=0)
        acc_w1 += tl.sum(dz * y_cur, axis=0)
        acc_w2 += tl.sum(dz * y_next, axis=0)
        acc_b1 += tl.sum(dy1, axis=0)
        if NEED_ROWDOT:
            rd = tl.sum(tl.where(mask, dz_raw * z, 0.0), axis=1)
            tl.store(rowdot_ptr + pid_k.to(tl.int64) * M + rows, rd, mask=rmask)
    base = part_ptr + pid_r.to(tl.int64) * 5 * K + ks
    tl.store(base, acc_db, mask=kmask)
    tl.store(base + K, acc_w0, mask=kmask)
    tl.store(base + 2 * K, acc_w1, mask=kmask)
    tl.store(base + 3 * K, acc_w2, mask=kmask)
    tl.store(base + 4 * K, acc_b1, mask=kmask)


@triton.jit
def _scaled_column_sum_kernel(
    g_ptr, row_scale_ptr, part_ptr, M, C, T, NT, rows_per_prog,
    HAS_ROW_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """part[pid_r, c] = sum over rows [pid_r * rows_per_prog, ...) of row_scale[video(m)] * g[m, c]."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row_start = pid_r.to(tl.int64) * rows_per_prog
    n_rows = tl.minimum(M - row_start, rows_per_prog)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        local = r0 + tl.arange(0, BLOCK_M)
        rmask = local < n_rows
        rows = row_start + local
        mask = rmask[:, None] & cmask[None, :]
        g = tl.load(g_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_ROW_SCALE:
            g = g * tl.load(row_scale_ptr + (rows % NT) // T, mask=rmask, other=0.0)[:, None]
        acc += tl.sum(g, axis=0)
    tl.store(part_ptr + pid_r.to(tl.int64) * C + cols, acc, mask=cmask)


@triton.jit
def _bn_conv1_grads_kernel(
    pc_ptr, w1_ptr, w1f_ptr, db1_ptr, var_ptr, bn_w_ptr, bn_b_ptr,
    d_w1_ptr, d_bn_w_ptr, d_bn_b_ptr, coef_ptr, col_bias_ptr, C, Cp, M, eps,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Backward step 4 for one block of input channels c, from P = dY1^T (X - mean) (fp32, rows k) and
    db1' (fp32): dW1[k] = P[k] * s + db1'[k] * beta (W1's dtype), ds = sum_k W1[k] * P[k],
    dgamma = ds * rstd, dbeta = sum_k W1[k] db1'[k] (their dtypes), and the BatchNorm-backward terms of dX's
    epilogue: coef = -s * rstd * dgamma / M and col_bias = -(sum_k W1'[k] db1'[k]) / M (fp32; with W1' as
    rounded for the GEMM, so dX's rows sum as they should). Fixed loop order over k: deterministic."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    rstd = 1.0 / tl.sqrt(tl.load(var_ptr + cols, mask=cmask, other=1.0) + eps)
    s = tl.load(bn_w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) * rstd
    beta = tl.load(bn_b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    d_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    d_beta = tl.zeros([BLOCK_C], dtype=tl.float32)
    w1f_db1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for k0 in range(0, Cp, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        rmask = rows < Cp
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        p = tl.load(pc_ptr + offs, mask=mask, other=0.0)
        w1 = tl.load(w1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        w1f = tl.load(w1f_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        db1 = tl.load(db1_ptr + rows, mask=rmask, other=0.0)
        d_s += tl.sum(w1 * p, axis=0)
        d_beta += tl.sum(w1 * db1[:, None], axis=0)
        w1f_db1 += tl.sum(w1f * db1[:, None], axis=0)
        d_w1 = p * s[None, :] + db1[:, None] * beta[None, :]
        tl.store(d_w1_ptr + offs, d_w1.to(d_w1_ptr.dtype.element_ty), mask=mask)
    d_gamma = d_s * rstd
    tl.store(d_bn_w_ptr + cols, d_gamma.to(d_bn_w_ptr.dtype.element_ty), mask=cmask)
    tl.store(d_bn_b_ptr + cols, d_beta.to(d_bn_b_ptr.dtype.element_ty), mask=cmask)
    tl.store(coef_ptr + cols, -(s * rstd * d_gamma / M), mask=cmask)
    tl.store(col_bias_ptr + cols, -w1f_db1 / M, mask=cmask)


def backward(
    grad_out, x, y1, mean, var, T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
    conv2_weight, conv2_bias, training, eps, branch_scale, need_branch_scale_grad,
):
    """Gradients (dx, d bn_weight, d bn_bias, d conv1_weight, d conv1_bias, d dw_weight, d dw_bias,
    d conv2_weight, d conv2_bias, d branch_scale or an empty tensor), each in its input's dtype and shape."""
    L, NT, C = x.shape
    M = (L - 1) * NT
    Cp = conv1_weight.shape[0]
    Kp = y1_width(Cp)  # every (M, C') buffer has Kp columns, zero past C' (see y1_width)
    dtype = x.dtype
    dev = x.device
    g = grad_out.contiguous()
    gp = g[1:].reshape(M, C)
    xp = x[1:].reshape(M, C)
    w1_folded, b1_folded, taps, b_dw, w2t = _fold(var, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight,
                                                  dw_bias, conv2_weight, eps, dtype)
    row_scale = branch_scale.float().contiguous() if branch_scale is not None else None

    dz = gp @ w2t.t()  # (M, Kp) cuBLAS
    dy1 = torch.empty((M, Kp), device=dev, dtype=dtype)
    zs = torch.empty_like(dy1)
    interp = _interpreting(x)
    # 32x64 tiles, 8 warps: no register spills in an sm_90 AOT compile at C' = 512 and 682 (32x128 with 4
    # warps spilled 0.2-1 KB per thread; benchmarks/aot_compile_check.py)
    BLOCK_M, BLOCK_K, mix_warps = (32, 32, 4) if interp else (32, 64, 8)
    k_blocks = cdiv(Kp, BLOCK_K)
    per_prog, R = _row_split(x, M, k_blocks, BLOCK_M)
    part = torch.empty((R, 5, Kp), device=dev, dtype=torch.float32)
    rowdot = torch.empty((k_blocks, M) if need_branch_scale_grad else (1,), device=dev, dtype=torch.float32)
    dummy = b1_folded
    _temporal_mix_backward_kernel[(R, k_blocks)](
        dz, y1, b1_folded, taps, b_dw,
        row_scale if row_scale is not None else dummy, dy1, zs, part, rowdot,
        M, Kp, T, NT, per_prog,
        HAS_ROW_SCALE=row_scale is not None, NEED_ROWDOT=need_branch_scale_grad,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, num_warps=mix_warps,
    )
    sums = _sum_partials(part.view(R, 5 * Kp)).view(5, Kp)
    d_dw_bias = sums[0, :Cp].clone()  # clones: outputs of a custom op must not alias each other
    d_dw_weight = sums[1:4, :Cp].t().contiguous()  # (C', 3)
    d_b1_folded = sums[4]  # (Kp,), zero past C'; its output below is a copy

    d_w2 = mm_fp32_out(gp.t(), zs)[:, :Cp].contiguous()  # (C, C') cuBLAS
    BLOCK_MC, BLOCK_C = (64, 64) if interp else (32, 128)
    c_blocks = cdiv(C, BLOCK_C)
    per_prog_c, R_c = _row_split(x, M, c_blocks, BLOCK_MC)
    part_c = torch.empty((R_c, C), device=dev, dtype=torch.float32)
    _scaled_column_sum_kernel[(R_c, c_blocks)](
        gp, row_scale if row_scale is not None else dummy, part_c, M, C, T, NT, per_prog_c,
        HAS_ROW_SCALE=row_scale is not None, BLOCK_M=BLOCK_MC, BLOCK_C=BLOCK_C,
    )
    d_b2 = _sum_partials(part_c)

    # BatchNorm and first conv parameters from P = dY1^T (X - mean) (fp32, C' x C). X is centred before
    # the GEMM: forming dY1^T X - colsum(dY1) mean^T afterwards cancels catastrophically when a channel's
    # |mean| >> std (CLIP streams have such channels), at the cost of one extra pass over X.
    xc = _centre(xp, mean)
    pc = mm_fp32_out(dy1.t(), xc)  # (Kp, C), zero rows past C'
    d_w1 = torch.empty(conv1_weight.shape, device=dev, dtype=conv1_weight.dtype)
    d_bn_weight = torch.empty_like(bn_weight)
    d_bn_bias = torch.empty_like(bn_bias)
    coef = torch.empty(C, device=dev, dtype=torch.float32)
    col_bias = torch.empty_like(coef)
    BLOCK_KP, BLOCK_CP = (32, 32) if interp else (64, 32)  # GPU: C / 32 programs (24 at B/16), not C / 128
    _bn_conv1_grads_kernel[(cdiv(C, BLOCK_CP),)](
        pc, conv1_weight.contiguous(), w1_folded, d_b1_folded, var.contiguous(), bn_weight.contiguous(),
        bn_bias.contiguous(), d_w1, d_bn_weight, d_bn_bias, coef, col_bias, C, Cp, M, float(eps),
        BLOCK_K=BLOCK_KP, BLOCK_C=BLOCK_CP, num_warps=4,
    )

    dx = torch.empty_like(x)
    dx[0].copy_(g[0])
    if training:
        # dX = G + dY1 @ W1' - s * (dbeta + (x - mean) * rstd * dgamma) / M: col_bias = -s * dbeta / M (with
        # the W1' the GEMM uses, rounded to x's dtype, so that the rows of dX sum to what they should: the
        # BatchNorm output does not move when all rows shift), coef = -s * rstd * dgamma / M on (x - mean),
        # read from the centred copy for the same reason as P above.
        fused_matmul(dy1, w1_folded, dx[1:].view(M, C), gp, col_bias, T, NT, b_transposed=False, e=xc,
                     col_coef=coef)
    else:
        fused_matmul(dy1, w1_folded, dx[1:].view(M, C), gp, torch.zeros_like(col_bias), T, NT,
                     b_transposed=False)

    if need_branch_scale_grad:
        N = NT // T
        per_row = rowdot.sum(0) + gp.float() @ conv2_bias.float()
        d_branch_scale = per_row.view(L - 1, N, T).sum((0, 2)).to(branch_scale.dtype)
    else:
        d_branch_scale = torch.empty(0, device=dev, dtype=dtype)

    return (
        dx,
        d_bn_weight,
        d_bn_bias,
        d_w1,
        d_b1_folded[:Cp].to(conv1_bias.dtype, copy=True),
        d_dw_weight.to(dw_weight.dtype).reshape(dw_weight.shape),
        d_dw_bias.to(dw_bias.dtype),
        d_w2.to(conv2_weight.dtype).reshape(conv2_weight.shape),
        d_b2.to(conv2_bias.dtype),
        d_branch_scale,
    )
