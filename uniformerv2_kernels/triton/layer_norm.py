"""Triton kernels of the CLIP LayerNorm (compute in fp32, cast back to the input dtype).

Rows are the flattened leading dimensions of a contiguous (..., C) tensor. One program normalises
BLOCK_ROWS rows held whole in registers (C <= 8192), so the forward reads x once and writes y once (plus
fp32 mean/rstd per row for the backward), and the backward reads dy and x once and writes dx once.

Row reordering: the spatial attention keeps its activations in (batch, token) row order while the
stream is (token, batch); ``swap_rows=(n_outer, n_inner)`` makes the kernels address the y / dy tensor at
row ``i * n_outer + o`` for stream row ``r = o * n_inner + i``, so that transpose costs no extra pass.

Determinism: the weight/bias gradients are per-program partial sums over a fixed chunk of rows, written
to a (programs, C) fp32 buffer and reduced in a fixed order afterwards (no atomics), so two backward runs
are bitwise equal.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..selection import LAYER_NORM_MAX_C as MAX_C
from . import INTERPRETED
from .host_math import cdiv, next_power_of_2


@triton.jit
def _swapped_row(row, n_outer, n_inner):
    # stream row r = o * n_inner + i  ->  row i * n_outer + o of the reordered tensor
    return (row % n_inner) * n_outer + row // n_inner


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, Mean, Rstd,
    M, C, n_outer, n_inner, eps,
    SWAP_Y_ROWS: tl.constexpr, STORE_STATS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    row_ok = rows < M
    col_ok = cols < C
    mask = row_ok[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    if SWAP_Y_ROWS:
        y_rows = _swapped_row(rows, n_outer, n_inner)
    else:
        y_rows = rows
    tl.store(Y + y_rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, DRES, PartialDW, PartialDB,
    M, C, n_outer, n_inner, rows_per_program,
    SWAP_DY_ROWS: tl.constexpr, HAS_DRES: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C).to(tl.int64)
    col_ok = cols < C
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_ROWS, BLOCK_C), dtype=tl.float32)
    start = pid * rows_per_program
    for r0 in range(0, rows_per_program, BLOCK_ROWS):
        rows = start + r0 + tl.arange(0, BLOCK_ROWS).to(tl.int64)
        row_ok = (rows < M) & (r0 + tl.arange(0, BLOCK_ROWS) < rows_per_program)
        mask = row_ok[:, None] & col_ok[None, :]
        if SWAP_DY_ROWS:
            dy_rows = _swapped_row(rows, n_outer, n_inner)
        else:
            dy_rows = rows
        dy = tl.load(DY + dy_rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        dyw = dy * w[None, :]
        c1 = tl.sum(dyw * xhat, axis=1) / C
        c2 = tl.sum(dyw, axis=1) / C
        dx = (dyw - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += tl.load(DRES + rows[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(PartialDW + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(PartialDB + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_ok)


def _block_sizes(C: int, target: int) -> tuple[int, int, int]:
    block_c = next_power_of_2(C)
    block_rows = max(1, target // block_c)
    num_warps = 8 if block_c * block_rows >= 8192 else 4
    return block_c, block_rows, num_warps


def _check_c(C: int) -> None:
    if C > MAX_C:
        raise ValueError(f"the Triton layer norm keeps a row in registers: C must be <= {MAX_C}, got {C}")


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    store_stats: bool = True,
    swap_rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """y = layer_norm(x) in x.dtype, with fp32 per-row mean and rstd (None unless store_stats).

    x: contiguous (..., C). With swap_rows=(n_outer, n_inner) (n_outer * n_inner == rows), y is returned
    as a (rows, C) matrix whose row i * n_outer + o holds stream row o * n_inner + i.
    """
    C = x.shape[-1]
    _check_c(C)
    M = x.numel() // C
    y = torch.empty_like(x) if swap_rows is None else torch.empty((M, C), dtype=x.dtype, device=x.device)
    mean = torch.empty(M if store_stats else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if M == 0:
        return y, (mean if store_stats else None), (rstd if store_stats else None)
    n_outer, n_inner = swap_rows if swap_rows is not None else (1, 1)
    block_c, block_rows, num_warps = _block_sizes(C, 16384 if INTERPRETED else 4096)
    grid = (cdiv(M, block_rows),)
    _layer_norm_fwd_kernel[grid](
        x, weight, bias, y, mean, rstd,
        M, C, n_outer, n_inner, eps,
        SWAP_Y_ROWS=swap_rows is not None, STORE_STATS=store_stats,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    return y, (mean if store_stats else None), (rstd if store_stats else None)


def _num_programs(M: int, block_rows: int, device: torch.device) -> int:
    tiles = cdiv(M, block_rows)
    if INTERPRETED or device.type != "cuda":
        return min(tiles, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return min(tiles, 4 * sms)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight_grad_dtype: torch.dtype | None = None,
    bias_grad_dtype: torch.dtype | None = None,
    grad_residual: torch.Tensor | None = None,
    swap_rows: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_bias) of the CLIP layer norm, grad_x in x.dtype.

    grad_residual (shaped like x), if given, is added to grad_x in the same pass (the residual branch of
    a block). With swap_rows, grad_y is the reordered (rows, C) matrix of :func:`forward`.
    """
    C = x.shape[-1]
    _check_c(C)
    M = x.numel() // C
    weight_grad_dtype = weight_grad_dtype or weight.dtype
    bias_grad_dtype = bias_grad_dtype or weight.dtype
    dx = torch.empty_like(x)
    if M == 0:  # two separate tensors: a custom op's outputs must not alias
        return (dx, torch.zeros(C, dtype=weight_grad_dtype, device=x.device),
                torch.zeros(C, dtype=bias_grad_dtype, device=x.device))
    block_c, block_rows, num_warps = _block_sizes(C, 16384 if INTERPRETED else 2048)
    programs = _num_programs(M, block_rows, x.device)
    rows_per_program = cdiv(cdiv(M, block_rows), programs) * block_rows
    programs = cdiv(M, rows_per_program)
    partial_dw = torch.empty((programs, C), dtype=torch.float32, device=x.device)
    partial_db = torch.empty_like(partial_dw)
    n_outer, n_inner = swap_rows if swap_rows is not None else (1, 1)
    _layer_norm_bwd_kernel[(programs,)](
        grad_y, x, weight, mean, rstd, dx,
        grad_residual if grad_residual is not None else dx,
        partial_dw, partial_db,
        M, C, n_outer, n_inner, rows_per_program,
        SWAP_DY_ROWS=swap_rows is not None, HAS_DRES=grad_residual is not None,
        BLOCK_ROWS=block_rows, BLOCK_C=block_c, num_warps=num_warps,
    )
    # fixed-order reduction of the per-program partial sums (deterministic)
    return dx, partial_dw.sum(dim=0).to(weight_grad_dtype), partial_db.sum(dim=0).to(bias_grad_dtype)
