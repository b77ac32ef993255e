"""Triton kernels of the local temporal MHRA: BatchNorm3d + 1x1 conv + depthwise temporal conv + 1x1 conv
+ residual, on the native stream layout (L, N*T, C) (DESIGN.md sections 2 and 3).

Notation: the patch rows of the stream, x[1:] viewed as (M, C) with M = (L-1)*N*T, are ordered (position p,
video n, frame t): row m has frame t = m % T and video n = (m % (N*T)) // T, so the frames of one
(position, video) are T consecutive rows and the depthwise temporal conv mixes rows m-1, m, m+1.

Forward (per call):
1. training only: ``_bn_stats_partial_kernel`` + ``_bn_stats_combine_kernel``: per-channel mean and biased
   variance over the M patch rows (Chan/Welford merges in a fixed order: deterministic, no atomics).
2. ``_fold_params_kernel``: BatchNorm folded into the first 1x1 conv, W1' = W1 * (gamma * rstd) per input
   channel, b1' = b1 + W1 @ beta, applied to X - mean; with W2^T and the depthwise taps in the kernels'
   layouts, all padded to Kp rows (see _fold; ~10 small torch ops before, one launch now).
3. GEMM1 Y1 = X @ W1'^T with cuBLAS (torch.mm): a plain GEMM with nothing to fuse (its bias b1' is added in
   fp32 inside the next kernel's operand load), so cuBLAS's tuned Hopper kernels are the fastest option.
4. ``_fused_matmul_kernel`` (Triton) with HAS_MIX: GEMM2 whose A operand is built while loading it:
   A[m] = w0 * Y1[m-1] + w1 * Y1[m] + w2 * Y1[m+1] + b_dw (each Y1 row plus b1'; zero outside [0, T)),
   and whose epilogue adds b2, multiplies by the per-video branch scale (drop path) and adds the residual.
   This is Triton because the fusion saves writing and re-reading the (M, C') operand and the (M, C) branch.
   (Variant ``UNIFORMERV2_TRITON_GEMM=cublas``: ``_temporal_mix_kernel`` writes the operand, cuBLAS
   multiplies with an fp32 output, ``_rows_epilogue_kernel`` applies the epilogue; the same for the
   backward's dX GEMM below.)

Backward (G = grad of the output's patch rows, D = dropped-path scale per row):
1. dZ = G @ W2 with cuBLAS (plain GEMM).
2. ``_temporal_mix_backward_kernel``: dY1 (the transposed temporal conv of D*dZ), Zs = D * Z (recomputed
   from Y1, for dW2), and per-block column partial sums for db_dw, dw_dw (3 taps) and db1' (second pass
   ``_sum_partials_kernel``; deterministic). Optionally per-row dot products for the branch-scale grad.
3. dW2 = G^T @ Zs and P = dY1^T @ X with cuBLAS (K = M reductions into small outputs: cuBLAS's
   split-K kernels are deterministic and fast); db2 = sum_m D[m] G[m] with ``_scaled_column_sum_kernel``.
4. ``_bn_conv1_grads_kernel``: the BatchNorm parameters come from P = dY1^T (X - mean): ds = sum_j W1[j] *
   P[j], dgamma = ds * rstd, dbeta = W1^T db1', dW1 = P * s + db1' beta^T (X centred first: no cancellation
   when |mean| >> std), and the per-channel coefficients of step 5's epilogue (~12 small torch ops before).
5. dX = G + dY1 @ W1' - s * (dbeta + xhat * dgamma) / M (last term in training only): Triton
   ``_fused_matmul_kernel`` without the mix, with the BatchNorm-backward correction and the residual gradient
   in its epilogue (one pass over dX).

All kernels: int64 row offsets, every load masked, fp32 arithmetic and accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from .host_math import cdiv
from .linear import EPILOGUE_TILE, fixed_gemm_config, gemm_plan, grouped_tile, input_precision, mm_fp32_out

# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, M, C, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Partial (mean - shift, sum of squared deviations) of rows [pid_r * rows_per_prog, ...) per channel,
    with shift = row 0: sums of values near the mean instead of the raw ones (see bn_stats)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    row_start = pid_r.to(tl.int64) * rows_per_prog
    n_rows = tl.minimum(M - row_start, rows_per_prog)
    mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in range(0, rows_per_prog, BLOCK_M):
        local = r0 + tl.arange(0, BLOCK_M)
        rmask = local < n_rows
        rows = row_start + local
        mask = rmask[:, None] & cmask[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, v - shift[None, :], 0.0)
        n_a = tl.minimum(r0, n_rows).to(tl.float32)
        n_b = tl.sum(rmask.to(tl.float32), axis=0)
        mean_b = tl.sum(v, axis=0) / tl.maximum(n_b, 1.0)
        d = tl.where(mask, v - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        frac = n_b / tl.maximum(n_a + n_b, 1.0)
        delta = mean_b - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * n_a * frac
    tl.store(part_mean_ptr + pid_r * C + cols, mean_a, mask=cmask)
    tl.store(part_m2_ptr + pid_r * C + cols, m2_a, mask=cmask)


@triton.jit
def _bn_stats_combine_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, mean_ptr, var_ptr, R, M, C, rows_per_prog,
    BLOCK_C: tl.constexpr,
):
    """Merges the R partials in order (Chan et al.); writes mean (shift added back) and biased variance
    (divisor M)."""
    pid_c = tl.program_id(0)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = tl.load(x_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    mean_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    m2_a = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r in range(0, R):
        n_a = (r * rows_per_prog).to(tl.float32)
        n_b = tl.minimum(M - r * rows_per_prog, rows_per_prog).to(tl.float32)
        mean_b = tl.load(part_mean_ptr + r * C + cols, mask=cmask, other=0.0)
        m2_b = tl.load(part_m2_ptr + r * C + cols, mask=cmask, other=0.0)
        frac = n_b / (n_a + n_b)
        delta = mean_b - mean_a
        mean_a = mean_a + delta * frac
        m2_a = m2_a + m2_b + delta * delta * n_a * frac
    tl.store(mean_ptr + cols, shift + mean_a, mask=cmask)
    tl.store(var_ptr + cols, m2_a / M, mask=cmask)


@triton.jit
def _mix_taps(k_bias_ptr, mix_w_ptr, mix_b_ptr, ks, kmask):
    """The temporal mix's per-channel constants for channels ks, as [1, BLOCK_K] rows: (k_bias, the taps
    w0, w1, w2 for frames t-1, t, t+1, mix_b)."""
    kb = tl.load(k_bias_ptr + ks, mask=kmask, other=0.0)[None, :]
    w0 = tl.load(mix_w_ptr + ks * 3 + 0, mask=kmask, other=0.0)[None, :]
    w1 = tl.load(mix_w_ptr + ks * 3 + 1, mask=kmask, other=0.0)[None, :]
    w2 = tl.load(mix_w_ptr + ks * 3 + 2, mask=kmask, other=0.0)[None, :]
    mb = tl.load(mix_b_ptr + ks, mask=kmask, other=0.0)[None, :]
    return kb, w0, w1, w2, mb


@triton.jit
def _store_epilogue(acc, rows, cols, rmask, cmask, N, T, NT, out_ptr, res_ptr, e_ptr, col_bias_ptr, col_coef_ptr,
                    row_scale_ptr, HAS_ROW_SCALE: tl.constexpr, HAS_E: tl.constexpr):
    """out[rows, cols] = res + row_scale[video] * (acc + col_bias) [+ col_coef * E], fp32 math, one rounding
    to out's dtype; acc is an fp32 [rows, cols] tile, the other (M, N) tensors row-major."""
    mask = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * N + cols[None, :]
    val = acc + tl.load(col_bias_ptr + cols, mask=cmask, other=0.0)[None, :]
    if HAS_ROW_SCALE:
        scale = tl.load(row_scale_ptr + (rows % NT) // T, mask=rmask, other=0.0)
        val = val * scale[:, None]
    val += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_E:
        coef = tl.load(col_coef_ptr + cols, mask=cmask, other=0.0)[None, :]
        val += coef * tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fused_matmul_kernel(
    a_ptr, b_ptr, out_ptr, res_ptr, e_ptr,
    col_bias_ptr, col_coef_ptr, row_scale_ptr, k_bias_ptr, mix_w_ptr, mix_b_ptr,
    M, N, K, T, NT, stride_bk, stride_bn,
    HAS_MIX: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, HAS_E: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """out (M, N) = res + row_scale[video] * (A @ B + col_bias) [+ col_coef * E].

    A is a (M, K) row-major; with HAS_MIX it is the temporal mix of the rows of a (plus k_bias) described
    in the module docstring, computed in fp32 and rounded to B's dtype before the dot. B[k, n] is at
    b_ptr + k * stride_bk + n * stride_bn. res, E and out are (M, N) row-major.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    if HAS_MIX:
        t = rows % T
        has_prev = rmask & (t > 0)
        has_next = rmask & (t < T - 1)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a_mask = rmask[:, None] & kmask[None, :]
        a_cur = tl.load(a_ptr + rows[:, None] * K + ks[None, :], mask=a_mask, other=0.0)
        if HAS_MIX:
            kb, w0, w1, w2, mb = _mix_taps(k_bias_ptr, mix_w_ptr, mix_b_ptr, ks, kmask)
            p_mask = has_prev[:, None] & kmask[None, :]
            n_mask = has_next[:, None] & kmask[None, :]
            a_prev = tl.load(a_ptr + (rows[:, None] - 1) * K + ks[None, :], mask=p_mask, other=0.0)
            a_next = tl.load(a_ptr + (rows[:, None] + 1) * K + ks[None, :], mask=n_mask, other=0.0)
            z = w1 * (a_cur.to(tl.float32) + kb) + mb
            z += tl.where(p_mask, w0 * (a_prev.to(tl.float32) + kb), 0.0)
            z += tl.where(n_mask, w2 * (a_next.to(tl.float32) + kb), 0.0)
            a = z.to(b_ptr.dtype.element_ty)
        else:
            a = a_cur
        b = tl.load(
            b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
            mask=kmask[:, None] & cmask[None, :], other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    _store_epilogue(acc, rows, cols, rmask, cmask, N, T, NT, out_ptr, res_ptr, e_ptr, col_bias_ptr, col_coef_ptr,
                    row_scale_ptr, HAS_ROW_SCALE, HAS_E)


@triton.jit
def _temporal_mix_kernel(
    y1_ptr, k_bias_ptr, mix_w_ptr, mix_b_ptr, z_ptr, M, K, T,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Z[m] = w0 * (Y1[m-1] + kb) + w1 * (Y1[m] + kb) + w2 * (Y1[m+1] + kb) + mb (taps outside the clip
    dropped), rounded to Z's dtype: the A operand ``_fused_matmul_kernel`` builds with HAS_MIX, written out
    for a cuBLAS GEMM (the ``gemm="cublas"`` variant)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < M
    kmask = ks < K
    t = rows % T
    mask = rmask[:, None] & kmask[None, :]
    p_mask = (rmask & (t > 0))[:, None] & kmask[None, :]
    n_mask = (rmask & (t < T - 1))[:, None] & kmask[None, :]
    kb, w0, w1, w2, mb = _mix_taps(k_bias_ptr, mix_w_ptr, mix_b_ptr, ks, kmask)
    offs = rows[:, None] * K + ks[None, :]
    a_cur = tl.load(y1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a_prev = tl.load(y1_ptr + offs - K, mask=p_mask, other=0.0).to(tl.float32)
    a_next = tl.load(y1_ptr + offs + K, mask=n_mask, other=0.0).to(tl.float32)
    z = w1 * (a_cur + kb) + mb
    z += tl.where(p_mask, w0 * (a_prev + kb), 0.0)
    z += tl.where(n_mask, w2 * (a_next + kb), 0.0)
    tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rows_epilogue_kernel(
    acc_ptr, out_ptr, res_ptr, e_ptr, col_bias_ptr, col_coef_ptr, row_scale_ptr, M, N, T, NT,
    HAS_ROW_SCALE: tl.constexpr, HAS_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out = res + row_scale[video] * (acc + col_bias) [+ col_coef * E]: ``_fused_matmul_kernel``'s epilogue
    as a pass over the fp32 GEMM output acc (the ``gemm="cublas"`` variant)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < N
    acc = tl.load(acc_ptr + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    _store_epilogue(acc, rows, cols, rmask, cmask, N, T, NT, out_ptr, res_ptr, e_ptr, col_bias_ptr, col_coef_ptr,
                    row_scale_ptr, HAS_ROW_SCALE, HAS_E)


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
def _centre_kernel(x_ptr, mean_ptr, out_ptr, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = x - mean per channel, subtracted in fp32 and rounded once to x's dtype: what
    ``(x.float() - mean).to(x.dtype)`` gives, bit for bit, in one pass instead of three through an fp32 copy
    (20 bytes per element moved for bf16 instead of 4)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = rows[:, None] * C + cols[None, :]
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
    v = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :]
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, R, W, BLOCK: tl.constexpr):
    """out[w] = sum_r part[r, w], summed in order r = 0, 1, ... (deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < W
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in range(0, R):
        acc += tl.load(part_ptr + r * W + cols, mask=cmask, other=0.0)
    tl.store(out_ptr + cols, acc, mask=cmask)


@triton.jit
def _fold_params_kernel(
    var_ptr, bn_w_ptr, bn_b_ptr, w1_ptr, b1_ptr, dw_w_ptr, dw_b_ptr, w2_ptr,
    w1f_ptr, b1f_ptr, mix_w_ptr, mix_b_ptr, w2t_ptr, C, Cp, Kp, eps,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The parameters of one block of rows k (C' channels, padded to Kp zero rows) in the kernels' layouts:
    W1'[k] = W1[k] * s (s = gamma * rstd, rounded to W1''s dtype), b1'[k] = b1[k] + W1[k] . beta (fp32),
    the depthwise taps and bias (fp32), and W2^T[k] = W2[:, k] (W2^T's dtype): ``_fold`` plus the conv2
    transpose, ~10 small torch ops, in one launch. Rows k >= C' are written as zeros."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    out_mask = rows < Kp
    rmask = rows < Cp
    rows64 = rows.to(tl.int64)
    acc_b = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        cmask = cols < C
        s = tl.load(bn_w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) / tl.sqrt(
            tl.load(var_ptr + cols, mask=cmask, other=1.0) + eps)
        beta = tl.load(bn_b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        in_mask = rmask[:, None] & cmask[None, :]
        out_tile = out_mask[:, None] & cmask[None, :]
        offs = rows64[:, None] * C + cols[None, :]
        w1 = tl.load(w1_ptr + offs, mask=in_mask, other=0.0).to(tl.float32)
        tl.store(w1f_ptr + offs, (w1 * s[None, :]).to(w1f_ptr.dtype.element_ty), mask=out_tile)
        acc_b += tl.sum(w1 * beta[None, :], axis=1)
        w2 = tl.load(w2_ptr + cols[None, :].to(tl.int64) * Cp + rows64[:, None], mask=in_mask, other=0.0)
        tl.store(w2t_ptr + offs, w2.to(w2t_ptr.dtype.element_ty), mask=out_tile)
    b1 = tl.load(b1_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(b1f_ptr + rows, b1 + acc_b, mask=out_mask)
    for j in range(3):
        tap = tl.load(dw_w_ptr + rows64 * 3 + j, mask=rmask, other=0.0).to(tl.float32)
        tl.store(mix_w_ptr + rows64 * 3 + j, tap, mask=out_mask)
    tl.store(mix_b_ptr + rows, tl.load(dw_b_ptr + rows, mask=rmask, other=0.0).to(tl.float32), mask=out_mask)


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


# --------------------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------------------


def _interpreting(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or INTERPRETED


def _num_sms(t: torch.Tensor) -> int:
    if t.device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def _row_split(t: torch.Tensor, M: int, col_blocks: int, block_m: int) -> tuple[int, int]:
    """(rows per program, number of row programs) for the column-reduction kernels: about 4 programs per
    SM on a GPU; rows per program is a multiple of block_m."""
    if _interpreting(t):
        target = 4
    else:
        target = max(1, (4 * _num_sms(t)) // max(col_blocks, 1))
    row_blocks = cdiv(M, block_m)
    per_prog = cdiv(row_blocks, min(target, row_blocks)) * block_m
    return per_prog, cdiv(M, per_prog)


def y1_width(Cp: int) -> int:
    """Columns of the saved Y1 (and of every (M, C') buffer): C' rounded up to a multiple of 16, the extra
    columns exactly zero (zero rows of W1', zero mix taps and biases, zero columns of W2). Row strides that
    are multiples of 16 elements keep 16-byte aligned rows for cuBLAS and Triton: at L/14's C' = 682 the
    sm_90 AOT compile of the fused GEMM had no pipelined loads (35 KB of shared memory instead of ~170 KB)
    and spilled ~720 B/thread; padded to 688 it compiles like B/16's C' = 512, no spills
    (benchmarks/aot_compile_check.py).
    The cost: 0.9% more work at C' = 682, none where C' is already a multiple of 16."""
    return cdiv(Cp, 16) * 16


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------


def bn_stats(xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32) of xp (M, C), deterministic.

    The sums run over x - x[0] (per channel): a CLIP stream has channels whose |mean| is ~100x their std,
    and summing the raw values there loses ~1e-5 std in the mean to fp32 rounding (measured 2.8e-5), which
    centring passes on to every normalised value; shifted, the mean is within one rounding of exact."""
    M, C = xp.shape
    interp = _interpreting(xp)
    BLOCK_M, BLOCK_C = (64, 64) if interp else (32, 128)
    col_blocks = cdiv(C, BLOCK_C)
    per_prog, R = _row_split(xp, M, col_blocks, BLOCK_M)
    part_mean = torch.empty((R, C), device=xp.device, dtype=torch.float32)
    part_m2 = torch.empty_like(part_mean)
    _bn_stats_partial_kernel[(R, col_blocks)](xp, part_mean, part_m2, M, C, per_prog, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    mean = torch.empty(C, device=xp.device, dtype=torch.float32)
    var = torch.empty_like(mean)
    _bn_stats_combine_kernel[(col_blocks,)](xp, part_mean, part_m2, mean, var, R, M, C, per_prog, BLOCK_C=BLOCK_C)
    return mean, var


def _sum_partials(part: torch.Tensor) -> torch.Tensor:
    R, W = part.shape
    out = torch.empty(W, device=part.device, dtype=torch.float32)
    BLOCK = 256 if _interpreting(part) else 512
    _sum_partials_kernel[(cdiv(W, BLOCK),)](part, out, R, W, BLOCK=BLOCK)
    return out


def fused_matmul(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, res: torch.Tensor, col_bias: torch.Tensor,
    T: int, NT: int, b_transposed: bool, row_scale: torch.Tensor | None = None,
    mix: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    e: torch.Tensor | None = None, col_coef: torch.Tensor | None = None, gemm: str | None = None,
) -> None:
    """out = res + row_scale * (A @ B' + col_bias) [+ col_coef * e], see ``_fused_matmul_kernel``.

    b is the weight as stored: B' = b^T when b_transposed (b is (N, K)), else B' = b (b is (K, N)).
    mix = (k_bias, mix_w (K, 3), mix_b), all fp32, turns on the temporal mix of a's rows.
    gemm: "triton" (one fused kernel) or "cublas" (the mix written out by ``_temporal_mix_kernel``, the GEMM
    on cuBLAS with an fp32 output, then ``_rows_epilogue_kernel``: the CUDA backend's plan, ~2 extra passes
    over (M, K) and (M, N) buffers for cuBLAS's GEMM speed); default: ``linear.gemm_plan()``
    (UNIFORMERV2_TRITON_GEMM)."""
    if gemm_plan(gemm) == "cublas":
        _matmul_then_epilogue(a, b, out, res, col_bias, T, NT, b_transposed, row_scale, mix, e, col_coef)
        return
    M, K = a.shape
    N = out.shape[1]
    stride_bk, stride_bn = (1, K) if b_transposed else (N, 1)
    cfg = fixed_gemm_config(a.dtype, _interpreting(a))
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    dummy = col_bias
    k_bias, mix_w, mix_b = mix if mix is not None else (dummy, dummy, dummy)
    _fused_matmul_kernel[grid](
        a, b, out, res, e if e is not None else res,
        col_bias, col_coef if col_coef is not None else dummy,
        row_scale if row_scale is not None else dummy, k_bias, mix_w, mix_b,
        M, N, K, T, NT, stride_bk, stride_bn,
        HAS_MIX=mix is not None, HAS_ROW_SCALE=row_scale is not None, HAS_E=e is not None,
        INPUT_PRECISION=input_precision(a.dtype), **cfg,
    )


def _matmul_then_epilogue(a, b, out, res, col_bias, T, NT, b_transposed, row_scale, mix, e, col_coef) -> None:
    """``fused_matmul`` as three steps: [temporal mix kernel] -> cuBLAS (fp32 output) -> epilogue kernel."""
    M, K = a.shape
    N = out.shape[1]
    interp = _interpreting(a)
    if mix is not None:
        k_bias, mix_w, mix_b = mix
        z = torch.empty(a.shape, dtype=b.dtype, device=a.device)  # rounded to B's dtype, as the fused kernel does
        bm, bk = (32, 32) if interp else (32, 128)
        _temporal_mix_kernel[(cdiv(M, bm), cdiv(K, bk))](
            a, k_bias, mix_w, mix_b, z, M, K, T, BLOCK_M=bm, BLOCK_K=bk, num_warps=4)
        a = z
    acc = mm_fp32_out(a, b.t() if b_transposed else b)  # (M, N) fp32, cuBLAS
    dummy = col_bias
    bm, bn = (32, 32) if interp else EPILOGUE_TILE
    _rows_epilogue_kernel[(cdiv(M, bm), cdiv(N, bn))](
        acc, out, res, e if e is not None else res, col_bias, col_coef if col_coef is not None else dummy,
        row_scale if row_scale is not None else dummy, M, N, T, NT,
        HAS_ROW_SCALE=row_scale is not None, HAS_E=e is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4)


def _fold(var, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias, conv2_weight, eps, dtype):
    """BatchNorm folded into the first 1x1 conv, applied to the centred rows X - mean:
    Y1 = (X - mean) @ W1'^T + b1' with W1' = W1 * s, s = gamma * rstd, b1' = b1 + W1 @ beta; with the
    other parameters in the kernels' layouts. One ``_fold_params_kernel`` launch.

    Returns (W1' (Kp, C) in dtype, b1' (Kp,) fp32, taps (Kp, 3) fp32, b_dw (Kp,) fp32, W2^T (Kp, C) in
    dtype), every row past C' zero (Kp = y1_width(C')). Folding the mean into b1' instead would make
    X @ W1'^T and b1' two large terms that cancel when a channel's |mean| >> std (CLIP streams have such
    channels), losing precision in Y1; centring first costs one extra pass over X.
    """
    Cp, C = conv1_weight.shape[0], conv1_weight.shape[1]
    Kp = y1_width(Cp)
    dev = var.device
    w1f = torch.empty((Kp, C), device=dev, dtype=dtype)
    w2t = torch.empty((Kp, C), device=dev, dtype=dtype)
    b1f = torch.empty(Kp, device=dev, dtype=torch.float32)
    taps = torch.empty((Kp, 3), device=dev, dtype=torch.float32)
    b_dw = torch.empty(Kp, device=dev, dtype=torch.float32)
    BLOCK_R, BLOCK_C = (16, 32) if _interpreting(var) else (16, 128)
    _fold_params_kernel[(cdiv(Kp, BLOCK_R),)](
        var.contiguous(), bn_weight.contiguous(), bn_bias.contiguous(), conv1_weight.contiguous(),
        conv1_bias.contiguous(), dw_weight.contiguous(), dw_bias.contiguous(), conv2_weight.contiguous(),
        w1f, b1f, taps, b_dw, w2t, C, Cp, Kp, float(eps), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=4,
    )
    return w1f, b1f, taps, b_dw, w2t


def _centre(xp: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """X - mean per channel (xp (M, C) contiguous, mean (C,) fp32), computed in fp32 and stored in X's dtype."""
    M, C = xp.shape
    out = torch.empty_like(xp)
    BLOCK_M, BLOCK_C = (64, 64) if _interpreting(xp) else (32, 128)
    _centre_kernel[(cdiv(M, BLOCK_M), cdiv(C, BLOCK_C))](
        xp, mean.contiguous(), out, M, C, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C)
    return out


def forward(
    x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
    conv2_weight, conv2_bias, training, eps, branch_scale,
):
    """Returns (out (L, N*T, C), mean (C,) fp32, biased var (C,) fp32, Y1 = (X - mean) @ W1'^T in x.dtype,
    (M, y1_width(C')) with zero columns past C').

    x must be contiguous. mean/var are the batch statistics in training and the running ones in eval.
    """
    L, NT, C = x.shape
    M = (L - 1) * NT
    dtype = x.dtype
    xp = x[1:].reshape(M, C)
    if training:
        mean, var = bn_stats(xp)
    else:
        mean, var = running_mean.float(), running_var.float()
    w1_folded, b1_folded, taps, b_dw, w2t = _fold(var, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight,
                                                  dw_bias, conv2_weight, eps, dtype)
    y1 = _centre(xp, mean) @ w1_folded.t()  # cuBLAS; (M, Kp), columns >= C' are zero
    out = torch.empty_like(x)
    out[0].copy_(x[0])
    fused_matmul(
        y1, w2t, out[1:].view(M, C), xp, conv2_bias.float().contiguous(), T, NT, b_transposed=False,
        row_scale=branch_scale.float().contiguous() if branch_scale is not None else None,
        mix=(b1_folded, taps, b_dw),
    )
    return out, mean.clone() if not training else mean, var.clone() if not training else var, y1


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
