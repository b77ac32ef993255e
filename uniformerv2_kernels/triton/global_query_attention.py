"""Triton kernels for the global UniBlock op: DPE + ln_3 + folded one-query cross-attention.

Math (DESIGN.md section 3; see ``reference/global_query_attention.py`` for the formulas and names).
Per video n the S = T*L tokens are the keys; token j = l*T + t lives at row ``l*(N*T) + n*T + t`` of
x (L, N*T, C), so a token tile covers a few runs of T contiguous rows.

Forward (``forward``):
  1. ``_query_head_kernel``, grid (N, H) (O(N*C^2)): q = query W_q^T + b_q, u_h = gamma * W_k,h^T q_h / sqrt(d).
  2. ``_dpe_kernel``, grid (row tiles, channel tiles): y = x + DPE(x) (27 taps, zero padding, class tokens
     untouched), written in x.dtype (the reference's rounding of the DPE output).
  3. ``_gqa_forward_partial_kernel``, grid (N, splits): each program streams a contiguous range of the
     video's tokens of y; per tile of BLOCK_S tokens: the LayerNorm statistics, xhat, the H scores
     u_h . xhat_j, an online softmax in base 2, and acc_h += p_h^T xhat. It writes (max, sum, acc) per
     (video, split, head): flash-decoding partials. Scores and accumulation are tensor-core dots with
     16-bit operands for fp16/bf16 inputs (USE_DOT; xhat is rounded to the input type, as the reference
     rounds ln_3(y)); for fp32 inputs a loop over heads on the CUDA cores (fp32 dots of K = C would need
     megabytes of shared memory on sm_90).
  4. ``_merge_project_kernel``, grid (N, H): merge of the partials in a fixed order (deterministic), giving
     z_h = sum_j a_h(j) xhat_j and lse_h; then out_h = W_v,h (gamma * z_h + beta) + b_v,h.
  Saved for backward: z (N, H, C) fp32 and lse (N, H) fp32 (natural log), besides the inputs.

Why the DPE is a kernel of its own (DESIGN.md section 3 computes it on the fly inside the token loop): the
token kernels hold whole rows (BLOCK_C = next_pow2(C)) for the LayerNorm, so one program of 16 warps fills
an SM, and its 27 tap loads per tile run one after another: latency-bound. The DPE on its own is
channel-separable, so small tiles (16 rows x 128 channels) give several programs per SM to hide the
gathers; the token kernels then stream y once. Cost: one write and one read of y and one (L, N*T, C)
buffer alive per call; on a GPU the on-the-fly form took more GPU time (benchmarks/results/kernel_notes.md).

Backward: :mod:`.global_query_attention_backward`.

No atomics anywhere: every reduction over programs is a torch.sum over a partial buffer (or a GEMM).
The 27 DPE taps are a runtime loop, not unrolled: unrolled, the compiler hoists all 27 tile loads and spills.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from .host_math import cdiv, next_power_of_2


@triton.jit
def _token_grid(tok, tok_mask, n, T, NT, W):
    """Where tokens j = l*T + t of video n sit: (t, is_patch, hh, ww, rows), with (hh, ww) the patch's grid
    position (meaningful where is_patch) and rows = l*NT + n*T + t, the token's row of x (int64)."""
    l = tok // T
    t = tok % T
    is_patch = (l >= 1) & tok_mask
    hh = (l - 1) // W
    ww = (l - 1) % W
    return t, is_patch, hh, ww, (l * NT + n * T + t).to(tl.int64)


@triton.jit
def _dpe_kernel(
    x_ptr, dpe_w_ptr, dpe_b_ptr, y_ptr, R, T, NT, C, W,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = x + DPE(x) on patch rows and y = x on class rows, for one [BLOCK_R rows, BLOCK_C channels] tile
    of x (L, N*T, C) seen as R = L*N*T rows; y is written in its own dtype (x's).

    The depthwise 3x3x3 conv is channel-separable, so the tiles are small and many (high occupancy hides
    the latency of the 27 gathered loads); the frame neighbours t +- 1 are rows of the same tile, the
    spatial ones rows (1 or W) * N*T away, mostly L2 hits.
    """
    pid_r = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    row_ok = rows < R
    l = rows // NT
    t = (rows % NT) % T
    video_row0 = rows % NT - t  # n * T
    is_patch = (l >= 1) & row_ok
    p = l - 1
    hh = p // W
    ww = p % W
    cmask2 = c_mask[None, :]
    y = tl.load(x_ptr + rows[:, None] * C + offs_c[None, :], mask=row_ok[:, None] & cmask2, other=0.0)
    y = y.to(tl.float32)
    for k in range(27):  # a runtime loop: unrolled, the compiler hoists all 27 tile loads and spills
        tt = t + (k // 9 - 1)
        h2 = hh + ((k // 3) % 3 - 1)
        w2 = ww + (k % 3 - 1)
        ok = is_patch & (tt >= 0) & (tt < T) & (h2 >= 0) & (h2 < W) & (w2 >= 0) & (w2 < W)
        row = (1 + h2 * W + w2) * NT + video_row0 + tt
        v = tl.load(x_ptr + row[:, None] * C + offs_c[None, :], mask=ok[:, None] & cmask2, other=0.0)
        wk = tl.load(dpe_w_ptr + k * C + offs_c, mask=c_mask, other=0.0)
        y += v.to(tl.float32) * wk[None, :]
    bias = tl.load(dpe_b_ptr + offs_c, mask=c_mask, other=0.0)
    y += tl.where(is_patch[:, None], bias[None, :], 0.0)
    tl.store(y_ptr + rows[:, None] * C + offs_c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & cmask2)


@triton.jit
def _normalized_tile(y_ptr, n, tok, tok_mask, offs_c, c_mask, T, NT, C, eps):
    """LayerNorm without affine of one tile of tokens of y = x + DPE(x) (the DPE kernel's output, layout of x).

    Token j = l*T + t of video n is row l*NT + n*T + t. Returns (xhat, rstd, rows): xhat [BLOCK_S, BLOCK_C]
    fp32, zero outside (valid tokens) x (c < C); rows, the tokens' rows (int64).
    """
    rows = ((tok // T) * NT + n * T + tok % T).to(tl.int64)
    cmask2 = c_mask[None, :]
    y = tl.load(y_ptr + rows[:, None] * C + offs_c[None, :], mask=tok_mask[:, None] & cmask2, other=0.0)
    y = y.to(tl.float32)
    mean = tl.sum(y, axis=1) / C
    diff = tl.where(cmask2, y - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    xhat = diff * rstd[:, None]
    xhat = tl.where(tok_mask[:, None], xhat, 0.0)
    return xhat, rstd, rows


@triton.jit
def _dot(a, b, OPERAND_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; operands rounded to OPERAND_DTYPE (the input's 16-bit type or fp32)."""
    return tl.dot(a.to(OPERAND_DTYPE), b.to(OPERAND_DTYPE), input_precision=DOT_PRECISION)


@triton.jit
def _gqa_forward_partial_kernel(
    y_ptr, u_ptr, m_ptr, l_ptr, acc_ptr,
    T, NT, C, H, S, tokens_per_split, num_splits, eps,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr, USE_DOT: tl.constexpr,
    OPERAND_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flash-decoding partials of one (video, split): running max m and sum l (base 2) and acc = sum p xhat.

    USE_DOT: the H score dots and the weighted accumulation as tensor-core dots with OPERAND_DTYPE
    operands (fp16/bf16 inputs on a GPU); otherwise a loop over heads on the CUDA cores (fp32 inputs).
    """
    n = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    hc_mask = h_mask[:, None] & c_mask[None, :]
    u_row = u_ptr + (n * H).to(tl.int64) * C

    m_i = tl.full([BLOCK_H], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    start = split * tokens_per_split
    for s0 in range(start, start + tokens_per_split, BLOCK_S):
        tok = s0 + tl.arange(0, BLOCK_S)
        tok_mask = tok < S
        xhat, _, _ = _normalized_tile(y_ptr, n, tok, tok_mask, offs_c, c_mask, T, NT, C, eps)
        if USE_DOT:
            u = tl.load(u_row + offs_h[:, None] * C + offs_c[None, :], mask=hc_mask, other=0.0)
            s = _dot(xhat, tl.trans(u), OPERAND_DTYPE, DOT_PRECISION)
        else:
            s = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)
            for h in range(H):
                u_h = tl.load(u_row + h * C + offs_c, mask=c_mask, other=0.0)
                s_h = tl.sum(xhat * u_h[None, :], axis=1)
                s = tl.where(offs_h[None, :] == h, s_h[:, None], s)
        s = s * 1.4426950408889634  # base 2
        s = tl.where(tok_mask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha[:, None]
        if USE_DOT:
            acc += _dot(tl.trans(p), xhat, OPERAND_DTYPE, DOT_PRECISION)
        else:
            for h in range(H):
                p_h = tl.sum(tl.where(offs_h[None, :] == h, p, 0.0), axis=1)
                contrib = tl.sum(p_h[:, None] * xhat, axis=0)
                acc = tl.where(offs_h[:, None] == h, acc + contrib[None, :], acc)
        m_i = m_new

    part = (n * num_splits + split).to(tl.int64)
    tl.store(m_ptr + part * H + offs_h, m_i, mask=h_mask)
    tl.store(l_ptr + part * H + offs_h, l_i, mask=h_mask)
    acc_offs = (part * H + offs_h).to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(acc_ptr + acc_offs, acc, mask=hc_mask)


# ----------------------------------------------------------------------------------------------------
# the O(N*C^2) per-(video, head) algebra around the token kernels
#
# Small work (a few matrix-vector products per video and head), but as torch ops it would be ~20 launches
# in the forward and ~70 in the backward, each costing more host time than GPU time. One
# program per (video n, head h) walks C in chunks of BLOCK_K against the head's d rows of in_proj_weight
# (rows [h*d, (h+1)*d) are W_q,h, then C + that for W_k,h and 2C + that for W_v,h), in fp32.


@triton.jit
def _query_head_kernel(
    query_ptr, stride_qn, stride_qc, w_ptr, b_ptr, gamma_ptr, beta_ptr, u_ptr,
    qh_ptr, r_ptr, dout_ptr, z_ptr, dz_ptr, D_ptr, zn_ptr, dout_t_ptr, colsum_ptr,
    N, C, H, D, scale,
    WITH_GRAD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward step 1 for one (video n, head h): q_h = W_q,h query_n + b_q,h, r_h = W_k,h^T q_h / sqrt(d),
    u_h = gamma * r_h (writes u; with WITH_GRAD also q_h and r_h).

    WITH_GRAD (backward step 1), from dout_h (d values of grad_out) and the saved z_h, also:
    p_h = W_v,h^T dout_h, dz_h = gamma * p_h, D_h = dz_h . z_h; and for the parameter gradients (sums over
    videos, taken afterwards by cuBLAS / torch in a fixed order): zn_h = gamma * z_h + beta in (H, N, C)
    layout, dout_h in (H, d, N) layout (grad W_v,h = dout_h^T zn_h summed over n is then one batched GEMM,
    grad b_v one sum), and rows p_h and p_h * z_h of colsum (3, N*H, C) (their column sums are grad beta and
    the value-path part of grad gamma).
    """
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    q_rows = (h * D + offs_d).to(tl.int64)
    query_row = query_ptr + n.to(tl.int64) * stride_qn
    q = tl.zeros([BLOCK_D], tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < C
        w = tl.load(w_ptr + q_rows[:, None] * C + offs_k[None, :], mask=d_mask[:, None] & k_mask[None, :], other=0.0)
        v = tl.load(query_row + offs_k * stride_qc, mask=k_mask, other=0.0)
        q += tl.sum(w.to(tl.float32) * v.to(tl.float32)[None, :], axis=1)
    q += tl.load(b_ptr + q_rows, mask=d_mask, other=0.0).to(tl.float32)
    head = (n * H + h).to(tl.int64)
    if WITH_GRAD:
        tl.store(qh_ptr + head * D + offs_d, q, mask=d_mask)
        g = tl.load(dout_ptr + n.to(tl.int64) * C + q_rows, mask=d_mask, other=0.0).to(tl.float32)
        tl.store(dout_t_ptr + q_rows * N + n, g, mask=d_mask)
        d_acc = tl.zeros([BLOCK_K], tl.float32)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        tile_mask = d_mask[:, None] & c_mask[None, :]
        gamma = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        w_k = tl.load(w_ptr + (q_rows + C)[:, None] * C + offs_c[None, :], mask=tile_mask, other=0.0)
        r = tl.sum(w_k.to(tl.float32) * q[:, None], axis=0) * scale
        tl.store(u_ptr + head * C + offs_c, gamma * r, mask=c_mask)
        if WITH_GRAD:
            tl.store(r_ptr + head * C + offs_c, r, mask=c_mask)
            w_v = tl.load(w_ptr + (q_rows + 2 * C)[:, None] * C + offs_c[None, :], mask=tile_mask, other=0.0)
            p = tl.sum(w_v.to(tl.float32) * g[:, None], axis=0)
            z = tl.load(z_ptr + head * C + offs_c, mask=c_mask, other=0.0)
            beta = tl.load(beta_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
            dz = gamma * p
            tl.store(dz_ptr + head * C + offs_c, dz, mask=c_mask)
            d_acc += dz * z
            tl.store(zn_ptr + (h * N + n).to(tl.int64) * C + offs_c, gamma * z + beta, mask=c_mask)
            tl.store(colsum_ptr + head * C + offs_c, p, mask=c_mask)
            tl.store(colsum_ptr + (N * H + head) * C + offs_c, p * z, mask=c_mask)
    if WITH_GRAD:
        tl.store(D_ptr + head, tl.sum(d_acc, axis=0))


@triton.jit
def _merge_project_kernel(
    m_ptr, l_ptr, acc_ptr, gamma_ptr, beta_ptr, w_ptr, b_ptr, z_ptr, lse_ptr, out_ptr,
    C, H, D, num_splits,
    BLOCK_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Forward step 4 for one (video n, head h): the flash-decoding merge of the splits' partials in a fixed
    order (deterministic), z_h = sum_s 2^(m_s - m) acc_s / sum_s 2^(m_s - m) l_s and lse_h (natural log),
    then out_h = W_v,h (gamma * z_h + beta) + b_v,h, stored in out's dtype."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_SPLITS)
    s_mask = offs_s < num_splits
    part = (n * num_splits + offs_s).to(tl.int64) * H + h  # rows (n, split, h) of the (N, splits, H) partials
    m = tl.load(m_ptr + part, mask=s_mask, other=float("-inf"))
    m_max = tl.max(m, axis=0)
    weight = tl.where(s_mask, tl.exp2(m - m_max), 0.0)
    total = tl.sum(weight * tl.load(l_ptr + part, mask=s_mask, other=0.0), axis=0)
    head = (n * H + h).to(tl.int64)
    tl.store(lse_ptr + head, (m_max + tl.log2(total)) * 0.6931471805599453)
    weight = weight / total
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    v_rows = (2 * C + h * D + offs_d).to(tl.int64)
    out = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        acc = tl.load(acc_ptr + part[:, None] * C + offs_c[None, :], mask=s_mask[:, None] & c_mask[None, :],
                      other=0.0)
        z = tl.sum(acc * weight[:, None], axis=0)
        tl.store(z_ptr + head * C + offs_c, z, mask=c_mask)
        gamma = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        beta = tl.load(beta_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        w_v = tl.load(w_ptr + v_rows[:, None] * C + offs_c[None, :], mask=d_mask[:, None] & c_mask[None, :],
                      other=0.0)
        out += tl.sum(w_v.to(tl.float32) * (gamma * z + beta)[None, :], axis=1)
    out += tl.load(b_ptr + v_rows, mask=d_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + n.to(tl.int64) * C + h * D + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


# ----------------------------------------------------------------------------------------------------
# launchers


def _dot_precision(dtype: torch.dtype) -> str:
    # Only used with 16-bit operands on the GPU (where it does not matter); "ieee" for fp32 operands
    # (the interpreter, or a forced use_dot=True).
    return "ieee" if dtype == torch.float32 else "tf32"


def _operand_dtype(dtype: torch.dtype):
    """Dot operands in the input's own 16-bit type: the same rounding the reference applies to ln_3(y)."""
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype, tl.float32)


def _token_splits(S: int, N: int, block_s: int, num_splits: int | None, device: torch.device) -> tuple[int, int]:
    """(tokens_per_split, splits): tokens_per_split is a multiple of block_s and every split is non-empty."""
    if num_splits is None:
        if device.type == "cuda" and not INTERPRETED:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            num_splits = max(1, (2 * sms + N - 1) // N)
        else:
            num_splits = 1
    tiles = cdiv(S, block_s)
    num_splits = max(1, min(num_splits, tiles))
    tokens_per_split = cdiv(tiles, num_splits) * block_s
    return tokens_per_split, cdiv(S, tokens_per_split)


def _token_tile(kernel: str, BLOCK_C: int, use_dot: bool, block_s: int | None) -> tuple[int, int]:
    """(BLOCK_S, num_warps) of the forward / backward token kernels.

    On a GPU with full-width rows (C > 512): the configs with the fewest register spills in an ahead-of-time
    sm_90 compile at C = 768 and 1024 (benchmarks/aot_compile_check.py; not timed on a GPU yet): forward 16
    tokens with tensor-core dots (a dot needs >= 16 rows), 8 tokens with the fp32 CUDA-core loops, 16 warps;
    backward 8 tokens and 8 warps (16 warps: 128 registers and spills). Under the interpreter, 64-token
    tiles keep the number of (slow) program instances small.
    """
    if INTERPRETED:
        return block_s or 64, 4
    if BLOCK_C <= 512:
        return block_s or 16, (4 if BLOCK_C <= 256 else 8)
    if kernel == "forward":
        return block_s or (16 if use_dot else 8), 16
    return block_s or 8, 8


def _forward_stages(device: torch.device) -> int:
    """Software-pipeline stages of the forward token kernel: 2 (the next tile of y loads while this one is
    reduced; sm_90 / sm_80 AOT, 16-bit, C = 768 and 1024: 99 KB of shared memory, 112-119 registers, no
    spills) where an SM has the shared memory for it with room to spare (A100, H100), else 1 (66 KB)."""
    if device.type != "cuda" or INTERPRETED:
        return 1
    return 2 if torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor >= 140 * 1024 else 1


def _common(x, T, dpe_weight, dpe_bias, num_heads):
    L, NT, C = x.shape
    N = NT // T
    W = int(round((L - 1) ** 0.5))
    H = num_heads
    BLOCK_C = next_power_of_2(C)
    BLOCK_H = max(16, next_power_of_2(H))
    x = x.contiguous()
    # (27, C) fp32, tap k = kt*9 + kh*3 + kw: one copy kernel (transpose and cast) whatever the weight's dtype
    dpe_w = torch.empty((27, C), device=x.device, dtype=torch.float32).copy_(dpe_weight.reshape(C, 27).t())
    dpe_b = dpe_bias.to(torch.float32).contiguous()
    return x, L, NT, C, N, W, H, BLOCK_C, BLOCK_H, dpe_w, dpe_b


def _dpe_blocks(C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the DPE kernel: small tiles on a GPU (many programs per SM hide the
    gathers' latency; sm_90 AOT: 70 registers at 16 x 128 and 4 warps, ~7 programs per SM, where 32 x 128
    took 120), whole rows under the interpreter (few slow program instances)."""
    if INTERPRETED:
        return 64, next_power_of_2(C), 4
    return 16, min(128, next_power_of_2(C)), 4


def apply_dpe(x: torch.Tensor, T: int, dpe_w: torch.Tensor, dpe_b: torch.Tensor) -> torch.Tensor:
    """y = x + dwconv3d_3x3x3(x) + bias on the patch tokens of x (L, N*T, C), y = x on the class tokens, in
    x.dtype (the reference, too, rounds the DPE output to x.dtype). dpe_w: (27, C) fp32, dpe_b: (C,) fp32."""
    L, NT, C = x.shape
    W = int(round((L - 1) ** 0.5))
    y = torch.empty_like(x)
    R = L * NT
    block_r, block_c, num_warps = _dpe_blocks(C)
    _dpe_kernel[(cdiv(R, block_r), cdiv(C, block_c))](
        x, dpe_w, dpe_b, y, R, T, NT, C, W,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y


def _head_blocks(C: int, H: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_K) of the per-(video, head) kernels: all d rows of a head's in_proj slice, C in chunks
    of 128 (a 64 x 128 fp32 tile over 4 warps: 64 registers per thread); 32 under the interpreter, so the
    tests' small C still takes several chunks."""
    return next_power_of_2(C // H), (32 if INTERPRETED else 128)


def folded_query(query, in_proj_weight, in_proj_bias, ln_weight, num_heads):
    """u (N, H, C) fp32 = ``reference.folded_query``'s u, one kernel launch. query: (1, N, C), any strides."""
    _, N, C = query.shape
    H = num_heads
    BLOCK_D, BLOCK_K = _head_blocks(C, H)
    q = query[0]
    u = torch.empty((N, H, C), device=query.device, dtype=torch.float32)
    w = in_proj_weight.contiguous()
    _query_head_kernel[(N, H)](
        q, q.stride(0), q.stride(1), w, in_proj_bias.contiguous(), ln_weight.contiguous(), ln_weight, u,
        u, u, u, u, u, u, u, u, u,
        N, C, H, C // H, 1.0 / math.sqrt(C // H),
        WITH_GRAD=False, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return u


def forward(
    x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads,
    eps=1e-5, *, num_splits=None, block_s=None, use_dot=None,
):
    """Returns (out (1, N, C) in x.dtype, z (N, H, C) fp32, lse (N, H) fp32)."""
    x, L, NT, C, N, W, H, BLOCK_C, BLOCK_H, dpe_w, dpe_b = _common(x, T, dpe_weight, dpe_bias, num_heads)
    if use_dot is None:
        use_dot = x.dtype != torch.float32
    block_s, num_warps = _token_tile("forward", BLOCK_C, use_dot, block_s)
    S = T * L
    f32 = torch.float32
    u = folded_query(query, in_proj_weight, in_proj_bias, ln_weight, H)
    tokens_per_split, splits = _token_splits(S, N, block_s, num_splits, x.device)
    m = torch.empty((N, splits, H), device=x.device, dtype=f32)
    lsum = torch.empty((N, splits, H), device=x.device, dtype=f32)
    acc = torch.empty((N, splits, H, C), device=x.device, dtype=f32)
    y = apply_dpe(x, T, dpe_w, dpe_b)
    _gqa_forward_partial_kernel[(N, splits)](
        y, u, m, lsum, acc,
        T, NT, C, H, S, tokens_per_split, splits, float(eps),
        BLOCK_S=block_s, BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H, USE_DOT=use_dot,
        OPERAND_DTYPE=_operand_dtype(x.dtype), DOT_PRECISION=_dot_precision(x.dtype),
        num_warps=num_warps, num_stages=_forward_stages(x.device),
    )
    del y
    z = torch.empty((N, H, C), device=x.device, dtype=f32)
    lse = torch.empty((N, H), device=x.device, dtype=f32)
    out = torch.empty((1, N, C), device=x.device, dtype=x.dtype)
    BLOCK_D, BLOCK_K = _head_blocks(C, H)
    _merge_project_kernel[(N, H)](
        m, lsum, acc, ln_weight.contiguous(), ln_bias.contiguous(), in_proj_weight.contiguous(),
        in_proj_bias.contiguous(), z, lse, out,
        C, H, C // H, splits,
        BLOCK_SPLITS=next_power_of_2(splits), BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return out, z, lse
