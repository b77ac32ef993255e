"""Triton kernels and launcher of the global UniBlock op's backward (the math, the notation and the forward:
:mod:`.global_query_attention`).

Backward (``backward``):
  1. ``_query_head_kernel`` (WITH_GRAD), grid (N, H): the folded query again, p_h = W_v,h^T dout_h,
     dz_h = gamma * p_h, D_h = dz_h . z_h, and the per-video pieces of the value-path gradients.
  2. ``_dpe_kernel`` again (y is recomputed rather than kept alive from the forward), then
     ``_gqa_backward_tokens_kernel``, grid (N, splits): recomputes xhat per tile from y, a_h(j) from the
     saved lse, ds_h(j) = a_h(j) (dz_h . xhat_j - D_h), dxhat_j = sum_h a_h(j) dz_h + ds_h(j) u_h, the
     LayerNorm backward to dy_j (written to an fp32 buffer, layout of x); it also writes xhat and ds (fp32).
     torch: du_h = sum_j ds_h(j) xhat_j, one batched GEMM (N, H, S) @ (N, S, C).
  3. ``_gqa_backward_dpe_kernel``, grid (N, splits, C blocks): channel-separable DPE backward, the 27 taps
     of a token tile in one 3-d gather of dy. dx_i = dy_i + sum_k w_k dy_{i - off_k} (patch tokens), and,
     from the same loads, dw_k = sum_i x_i dy_{i - off_k}, db = sum over patch tokens of dy; per-program
     partials.
  4. ``_query_grad_kernel``, grid (N, H): the per-video query-path pieces from du; then cuBLAS / torch
     sums over videos give the gradients of gamma, beta, W_q, W_k, W_v, b_q, b_v and query (3 GEMMs,
     5 sums).
No atomics anywhere: every reduction over programs is a torch.sum over a partial buffer (or a GEMM).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from .global_query_attention import (_common, _head_blocks, _normalized_tile, _query_head_kernel, _token_grid,
                                     _token_splits, _token_tile, apply_dpe)
from .host_math import cdiv


@triton.jit
def _gqa_backward_tokens_kernel(
    y_ptr, u_ptr, dz_ptr, lse_ptr, D_ptr, dy_ptr, xhat_ptr, ds_ptr,
    T, NT, C, H, S, tokens_per_split, eps,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Per token: a, ds, dxhat and the LayerNorm backward to dy (fp32, layout of x); also writes xhat
    (N, S, C) and ds (N, S, H) in fp32 for du = ds^T xhat, one batched GEMM afterwards (CUDA cores here).

    The per-head vectors u_h, dz_h are re-read from L1/L2 for each tile (a loop over heads keeps the
    register and shared-memory footprint at about two [BLOCK_S, BLOCK_C] tiles). du is not accumulated
    here: an [H, C] accumulator per program held 64 fp32 registers per thread (BLOCK_H = 16 x BLOCK_C =
    1024 over 256 threads), and its per-head update touched all H rows; with it the kernel ran at 255
    registers and low occupancy (benchmarks/results/kernel_notes.md). Tensor-core
    dots for the scores, dxhat or du (as in the forward) spilled 3-40 KB per thread in an sm_90 AOT compile;
    one dot over interleaved [u_h; dz_h] rows for both score sets and again for dxhat still spilled 1.2-2 KB
    with 131 KB of shared memory (the [16, C] fp32 tiles change layout between the dots and the LayerNorm
    backward), at 16 or 32 tokens and 4-16 warps.
    """
    n = tl.program_id(0)
    split = tl.program_id(1)
    offs_c = tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    u_row = u_ptr + (n * H).to(tl.int64) * C
    dz_row = dz_ptr + (n * H).to(tl.int64) * C
    lse2 = tl.load(lse_ptr + n * H + offs_h, mask=h_mask, other=0.0) * 1.4426950408889634  # base 2
    D = tl.load(D_ptr + n * H + offs_h, mask=h_mask, other=0.0)

    start = split * tokens_per_split
    for s0 in range(start, start + tokens_per_split, BLOCK_S):
        tok = s0 + tl.arange(0, BLOCK_S)
        tok_mask = tok < S
        xhat, rstd, center = _normalized_tile(y_ptr, n, tok, tok_mask, offs_c, c_mask, T, NT, C, eps)
        s = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)  # u_h . xhat_j
        g = tl.zeros([BLOCK_S, BLOCK_H], tl.float32)  # dz_h . xhat_j
        for h in range(H):
            u_h = tl.load(u_row + h * C + offs_c, mask=c_mask, other=0.0)
            dz_h = tl.load(dz_row + h * C + offs_c, mask=c_mask, other=0.0)
            s = tl.where(offs_h[None, :] == h, tl.sum(xhat * u_h[None, :], axis=1)[:, None], s)
            g = tl.where(offs_h[None, :] == h, tl.sum(xhat * dz_h[None, :], axis=1)[:, None], g)
        valid = tok_mask[:, None] & h_mask[None, :]
        a = tl.where(valid, tl.exp2(s * 1.4426950408889634 - lse2[None, :]), 0.0)
        ds = a * (g - D[None, :])
        rows = (n * S + tok).to(tl.int64)  # token j of video n in the (N, S, .) buffers
        tl.store(ds_ptr + rows[:, None] * H + offs_h[None, :], ds, mask=valid)
        tl.store(xhat_ptr + rows[:, None] * C + offs_c[None, :], xhat, mask=tok_mask[:, None] & c_mask[None, :])
        dxhat = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
        for h in range(H):
            u_h = tl.load(u_row + h * C + offs_c, mask=c_mask, other=0.0)
            dz_h = tl.load(dz_row + h * C + offs_c, mask=c_mask, other=0.0)
            a_h = tl.sum(tl.where(offs_h[None, :] == h, a, 0.0), axis=1)
            ds_h = tl.sum(tl.where(offs_h[None, :] == h, ds, 0.0), axis=1)
            dxhat += a_h[:, None] * dz_h[None, :] + ds_h[:, None] * u_h[None, :]
        # LayerNorm backward (no affine: gamma is folded into u and dz).
        mean_g = tl.sum(dxhat, axis=1) / C
        mean_gx = tl.sum(dxhat * xhat, axis=1) / C
        dy = rstd[:, None] * (dxhat - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dy_ptr + center[:, None] * C + offs_c[None, :], dy, mask=tok_mask[:, None] & c_mask[None, :])


@triton.jit
def _gqa_backward_dpe_kernel(
    x_ptr, dy_ptr, dpe_w_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
    T, NT, C, W, S, tokens_per_split, num_splits,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """DPE backward of one (video, split, channel block): dx of its tokens (in x's dtype) and per-program
    partials of dw (27 taps) and db, summed afterwards.

    The 27 taps of a tile are one 3-d gather of dy, [BLOCK_S tokens, 32 taps, BLOCK_C channels]: dx sums it
    over the taps and dw over the tokens, two reductions per tile (a loop over the taps, one reduction per
    tap, took more GPU time on an H100)."""
    n = tl.program_id(0)
    split = tl.program_id(1)
    cb = tl.program_id(2)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    cmask2 = c_mask[None, :]
    taps = tl.arange(0, 32)
    tap_ok = taps < 27
    dt_ = taps // 9 - 1
    dh_ = (taps // 3) % 3 - 1
    dw_ = taps % 3 - 1
    w_taps = tl.load(dpe_w_ptr + taps[:, None] * C + offs_c[None, :], mask=tap_ok[:, None] & cmask2, other=0.0)
    acc_w = tl.zeros([32, BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_C], tl.float32)
    start = split * tokens_per_split
    for s0 in range(start, start + tokens_per_split, BLOCK_S):
        tok = s0 + tl.arange(0, BLOCK_S)
        tok_mask = tok < S
        t, is_patch, hh, ww, center = _token_grid(tok, tok_mask, n, T, NT, W)
        c_offs = center[:, None] * C + offs_c[None, :]
        dyc = tl.load(dy_ptr + c_offs, mask=tok_mask[:, None] & cmask2, other=0.0)
        xc = tl.load(x_ptr + c_offs, mask=is_patch[:, None] & cmask2, other=0.0).to(tl.float32)  # 0 on class tokens
        acc_b += tl.sum(tl.where(is_patch[:, None], dyc, 0.0), axis=0)
        # y_j += w_k x_{j + off_k}  =>  dx_i += w_k dy_{i - off_k},  dw_k += x_i dy_{i - off_k}
        tt = t[:, None] - dt_[None, :]  # [BLOCK_S, 32]
        h2 = hh[:, None] - dh_[None, :]
        w2 = ww[:, None] - dw_[None, :]
        ok = (is_patch[:, None] & tap_ok[None, :] & (tt >= 0) & (tt < T) & (h2 >= 0) & (h2 < W)
              & (w2 >= 0) & (w2 < W))
        row = ((1 + h2 * W + w2) * NT + n * T + tt).to(tl.int64)
        dyn = tl.load(dy_ptr + row[:, :, None] * C + offs_c[None, None, :],
                      mask=ok[:, :, None] & c_mask[None, None, :], other=0.0)  # [BLOCK_S, 32, BLOCK_C]
        dx = dyc + tl.sum(w_taps[None, :, :] * dyn, axis=1)
        acc_w += tl.sum(xc[:, None, :] * dyn, axis=0)
        tl.store(dx_ptr + c_offs, dx.to(dx_ptr.dtype.element_ty), mask=tok_mask[:, None] & cmask2)

    part = (n * num_splits + split).to(tl.int64)
    w_offs = (part * 27 + taps).to(tl.int64)[:, None] * C + offs_c[None, :]
    tl.store(dw_part_ptr + w_offs, acc_w, mask=tap_ok[:, None] & cmask2)
    tl.store(db_part_ptr + part * C + offs_c, acc_b, mask=c_mask)


@triton.jit
def _query_grad_kernel(
    du_ptr, gamma_ptr, r_ptr, w_ptr, grad_q_ptr, dr_ptr, colsum_ptr,
    N, C, H, D, scale,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Backward step 4 for one (video n, head h), from du_h = sum_j ds_h(j) xhat_j: dr_h = gamma * du_h,
    grad q_h = W_k,h dr_h / sqrt(d) (into grad_q (N, C)), dr_h / sqrt(d) in (H, N, C) layout (grad W_k,h =
    q_h^T dr_h / sqrt(d) summed over n is then one batched GEMM) and du_h * r_h into row block 2 of colsum
    (its column sum is the score part of grad gamma)."""
    n = tl.program_id(0)
    h = tl.program_id(1)
    head = (n * H + h).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < D
    k_rows = (C + h * D + offs_d).to(tl.int64)
    gq = tl.zeros([BLOCK_D], tl.float32)
    for c0 in range(0, C, BLOCK_K):
        offs_c = c0 + tl.arange(0, BLOCK_K)
        c_mask = offs_c < C
        du = tl.load(du_ptr + head * C + offs_c, mask=c_mask, other=0.0)
        gamma = tl.load(gamma_ptr + offs_c, mask=c_mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + head * C + offs_c, mask=c_mask, other=0.0)
        dr = gamma * du * scale
        w_k = tl.load(w_ptr + k_rows[:, None] * C + offs_c[None, :], mask=d_mask[:, None] & c_mask[None, :],
                      other=0.0)
        gq += tl.sum(w_k.to(tl.float32) * dr[None, :], axis=1)
        tl.store(dr_ptr + (h * N + n).to(tl.int64) * C + offs_c, dr, mask=c_mask)
        tl.store(colsum_ptr + (2 * N * H + head) * C + offs_c, du * r, mask=c_mask)
    tl.store(grad_q_ptr + n.to(tl.int64) * C + h * D + offs_d, gq, mask=d_mask)


def backward(
    grad_out, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse,
    num_heads, eps=1e-5, *, num_splits=None, block_s=None, dpe_block_c=None,
):
    """Gradients for (x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias)."""
    x, L, NT, C, N, W, H, BLOCK_C, BLOCK_H, dpe_w, dpe_b = _common(x, T, dpe_weight, dpe_bias, num_heads)
    block_s, num_warps = _token_tile("backward", BLOCK_C, False, block_s)
    S = T * L
    d = C // H
    f32 = torch.float32
    dev = x.device
    z = z.to(f32).contiguous()
    w_in = in_proj_weight.contiguous()
    BLOCK_D, BLOCK_K = _head_blocks(C, H)

    # step 1: folded query, dz, D and the value-path pieces (reference.small_backward_algebra)
    q = query[0]
    u = torch.empty((N, H, C), device=dev, dtype=f32)
    qh = torch.empty((N, H, d), device=dev, dtype=f32)
    r = torch.empty_like(u)
    dz = torch.empty_like(u)
    D = torch.empty((N, H), device=dev, dtype=f32)
    zn = torch.empty((H, N, C), device=dev, dtype=f32)
    dout_t = torch.empty((H, d, N), device=dev, dtype=f32)
    colsum = torch.empty((3, N * H, C), device=dev, dtype=f32)  # p, p * z, du * r: column sums -> beta, gamma
    _query_head_kernel[(N, H)](
        q, q.stride(0), q.stride(1), w_in, in_proj_bias.contiguous(), ln_weight.contiguous(), ln_bias.contiguous(), u,
        qh, r, grad_out.reshape(N, C).contiguous(), z, dz, D, zn, dout_t, colsum,
        N, C, H, d, 1.0 / math.sqrt(d),
        WITH_GRAD=True, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=4,
    )

    tokens_per_split, splits = _token_splits(S, N, block_s, num_splits, dev)
    dy = torch.empty((L, NT, C), device=dev, dtype=f32)
    xhat = torch.empty((N, S, C), device=dev, dtype=f32)
    ds = torch.empty((N, S, H), device=dev, dtype=f32)
    # y recomputed (cheaper than keeping it alive from the forward)
    y = apply_dpe(x, T, dpe_w, dpe_b)
    _gqa_backward_tokens_kernel[(N, splits)](
        y, u, dz, lse.to(f32).contiguous(), D, dy, xhat, ds,
        T, NT, C, H, S, tokens_per_split, float(eps),
        BLOCK_S=block_s, BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H, num_warps=num_warps,
    )
    del y
    # du_h = sum_j ds_h(j) xhat_j: a batched GEMM over the S tokens (cuBLAS; fp32 unless the caller allowed
    # TF32 matmuls, as for any torch matmul)
    du = torch.bmm(ds.transpose(1, 2), xhat)  # (N, H, C)
    del xhat

    # DPE backward: channel blocks are independent.
    # 4 tokens x 32 channels, 4 warps: 128 registers in an sm_90 AOT compile, no spills (8 x 32: 168-205
    # registers)
    if dpe_block_c is None:
        dpe_block_c = BLOCK_C if INTERPRETED else min(32, BLOCK_C)
    dpe_block_s = block_s if INTERPRETED else 4
    c_blocks = cdiv(C, dpe_block_c)
    dpe_splits = num_splits
    if dpe_splits is None and x.device.type == "cuda" and not INTERPRETED:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        dpe_splits = max(1, (4 * sms + N * c_blocks - 1) // (N * c_blocks))
    dpe_tokens_per_split, dpe_splits = _token_splits(S, N, dpe_block_s, dpe_splits, x.device)
    dx = torch.empty_like(x)
    dw_part = torch.empty((N * dpe_splits, 27, C), device=x.device, dtype=f32)
    db_part = torch.empty((N * dpe_splits, C), device=x.device, dtype=f32)
    _gqa_backward_dpe_kernel[(N, dpe_splits, c_blocks)](
        x, dy, dpe_w, dx, dw_part, db_part,
        T, NT, C, W, S, dpe_tokens_per_split, dpe_splits,
        BLOCK_S=dpe_block_s, BLOCK_C=dpe_block_c, num_warps=4,
    )
    # (27, C) -> the weight's (C, 1, 3, 3, 3) layout and dtype in one copy kernel
    grad_dpe_w = torch.empty((C, 27), device=x.device, dtype=dpe_weight.dtype).copy_(dw_part.sum(dim=0).t())
    grad_dpe_b = db_part.sum(dim=0)

    # step 4: the query path (reference.finish_query_gradients), then every sum over videos in a fixed order
    grad_q = torch.empty((N, C), device=dev, dtype=f32)
    dr = torch.empty((H, N, C), device=dev, dtype=f32)
    _query_grad_kernel[(N, H)](
        du, ln_weight.contiguous(), r, w_in, grad_q, dr, colsum, N, C, H, d, 1.0 / math.sqrt(d),
        BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=4,
    )
    grad_in_w = torch.empty((3 * C, C), device=dev, dtype=f32)
    torch.mm(grad_q.t(), q.to(f32), out=grad_in_w[:C])  # W_q: sum_n grad_q_n query_n^T
    torch.bmm(qh.permute(1, 2, 0), dr, out=grad_in_w[C : 2 * C].view(H, d, C))  # W_k,h: sum_n q_h dr_h^T
    torch.bmm(dout_t, zn, out=grad_in_w[2 * C :].view(H, d, C))  # W_v,h: sum_n dout_h zn_h^T
    grad_in_b = torch.zeros(3 * C, device=dev, dtype=f32)  # b_k's gradient is zero (cancels in the softmax)
    torch.sum(grad_q, 0, out=grad_in_b[:C])
    torch.sum(dout_t, 2, out=grad_in_b[2 * C :].view(H, d))
    grad_query = torch.mm(grad_q, w_in[:C].to(f32)).unsqueeze(0)
    grad_ln_bias = colsum[0].sum(0)
    grad_ln_weight = colsum[1:].reshape(2 * N * H, C).sum(0)
    return (
        dx,
        grad_dpe_w.reshape(dpe_weight.shape),
        grad_dpe_b.to(dpe_bias.dtype),
        grad_ln_weight.to(ln_weight.dtype),
        grad_ln_bias.to(ln_bias.dtype),
        grad_query.to(query.dtype),
        grad_in_w.to(in_proj_weight.dtype),
        grad_in_b.to(in_proj_bias.dtype),
    )
