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
   layouts, all padded to Kp rows (see _fold), in one launch.
3. GEMM1 Y1 = X @ W1'^T with cuBLAS (torch.mm): a plain GEMM with nothing to fuse (its bias b1' is added in
   fp32 inside the next kernel's operand load), so cuBLAS's tuned Hopper kernels are the fastest option.
4. ``_fused_matmul_kernel`` (Triton) with HAS_MIX: GEMM2 whose A operand is built while loading it:
   A[m] = w0 * Y1[m-1] + w1 * Y1[m] + w2 * Y1[m+1] + b_dw (each Y1 row plus b1'; zero outside [0, T)),
   and whose epilogue adds b2, multiplies by the per-video branch scale (drop path) and adds the residual.
   This is Triton because the fusion saves writing and re-reading the (M, C') operand and the (M, C) branch.
   (Variant ``UNIFORMERV2_TRITON_GEMM=cublas``: ``_temporal_mix_kernel`` writes the operand, cuBLAS
   multiplies with an fp32 output, ``_rows_epilogue_kernel`` applies the epilogue; the same for the
   backward's dX GEMM below.)

Backward: :mod:`.local_temporal_mhra_backward`.

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
    are multiples of 16 elements keep 16-byte aligned rows for cuBLAS and Triton: unaligned rows (L/14's
    C' = 682) leave the fused GEMM without pipelined loads and spilling in an sm_90 compile
    (benchmarks/aot_compile_check.py). The cost: under 1% more work where C' is not a multiple of 16."""
    return cdiv(Cp, 16) * 16


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------


def bn_stats(xp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (fp32) of xp (M, C), deterministic.

    The sums run over x - x[0] (per channel): a CLIP stream has channels whose |mean| is ~100x their std,
    and summing the raw values there loses ~1e-5 std in the mean to fp32 rounding, which
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
