"""The Triton GEMM module: every fused op's GEMMs take their tiles, grouped ordering, precision and plan from here.

- ``linear``: ``epilogue(a @ weight.T + bias)`` with the epilogues the CLIP block needs (QuickGELU with
  or without keeping the pre-activation, its gradient, drop-path row scale, residual, row reordering). The
  FFN's c_fc / c_proj / dgrad and the spatial attention's QKV / out_proj use it.
- The plan (``UNIFORMERV2_TRITON_GEMM``, :func:`gemm_plan`): "cublas" runs the product on cuBLAS and the
  epilogue as one Triton pass (``_linear_epilogue_kernel``); "triton" runs both in ``_linear_kernel``,
  autotuned among :data:`GEMM_CONFIG_SHAPES` (``UNIFORMERV2_AUTOTUNE=quick``: :data:`QUICK_CONFIG_SHAPES`);
  fp32 operands without TF32 among :data:`FP32_FMA_CONFIG_SHAPES` (:data:`FP32_FMA_QUICK_CONFIG_SHAPES`).
- For GEMMs whose A operand is built while loading it (the local MHRA's temporal mix), a kernel of their
  own uses :func:`grouped_tile` and the fixed tiles of :func:`fixed_gemm_config`; their cuBLAS plan uses
  :func:`mm_fp32_out`.
- :func:`input_precision`: fp32 operands use TF32 exactly when torch.matmul would
  (``backends.tf32_allowed``: ``allow_tf32`` or ``fp32_precision``).

All accumulation is fp32; low-precision results are rounded once when stored. ``benchmarks/aot_compile_check.py``
compiles every tile table here for sm_90 and sm_80.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import settings
from ..backends import tf32_allowed
from . import INTERPRETED
from .host_math import cdiv

# Grouped ordering, tiles, precision and plan: shared by every GEMM kernel


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped ordering: GROUP_M consecutive row tiles walk
    the column tiles together, so they share the B operand's tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size) % group_rows, (pid % group_size) // group_rows


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: full fp32 products unless the user allowed TF32 for matmuls (DESIGN 5
    tolerances); 16-bit operands ignore it."""
    return "ieee" if dtype == torch.float32 and not tf32_allowed() else "tf32"


def gemm_plan(gemm: str | None = None) -> str:
    """"triton" or "cublas": the given plan, else UNIFORMERV2_TRITON_GEMM (``settings.triton_gemm``)."""
    gemm = gemm or settings.triton_gemm()
    if gemm not in ("triton", "cublas"):
        raise ValueError(f"gemm must be 'triton' or 'cublas', got {gemm!r}")
    return gemm


# Fixed tiles of the GEMMs that build their A operand while loading it (no autotuning: the operand
# construction makes each configuration a different kernel to time). 128x128 tiles, 8 warps, K steps of 64
# (32 for fp32, whose tiles take twice the shared memory) follow the Triton matmul tutorial's Hopper
# choices; under the interpreter, small tiles keep CPU tests fast while covering several tiles and K steps.
FIXED_GEMM_TILES = {
    "fp32": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
    "16-bit": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "interpreter": dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4),
}
# (BLOCK_M, BLOCK_N) of the cuBLAS plan's epilogue passes over the GEMM output
EPILOGUE_TILE = (32, 128)
INTERPRET_EPILOGUE_TILE = (32, 64)


def fixed_gemm_config(dtype: torch.dtype, interpreted: bool) -> dict:
    """Launch meta (tiles, warps, stages) from :data:`FIXED_GEMM_TILES`."""
    if interpreted:
        return dict(FIXED_GEMM_TILES["interpreter"])
    return dict(FIXED_GEMM_TILES["fp32" if dtype == torch.float32 else "16-bit"])


def mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 output (cuBLAS accumulates in fp32; the result is not rounded to 16 bits)."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


# --------------------------------------------------------------------------------------------------------
# linear: the GEMM with the CLIP block's epilogues

QUICK_GELU_ALPHA = 1.702

# epilogue kinds
EPI_NONE = 0  # out = acc (+ bias)
EPI_QUICK_GELU = 1  # pre = acc + bias (optionally stored), out = quick_gelu(pre)
EPI_QUICK_GELU_GRAD = 2  # out = acc * quick_gelu'(pre) with pre loaded from Aux; Aux2 = quick_gelu(pre)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) the autotuner chooses among on a GPU
GEMM_CONFIG_SHAPES = [
    (128, 256, 64, 3, 8),
    (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 4),
    (128, 128, 64, 3, 8),
    (64, 256, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 3, 8),
    (64, 64, 32, 4, 4),
]
# UNIFORMERV2_AUTOTUNE=quick: a large and a small tile only, for the GPU tests (tests/conftest.py sets it):
# each new (shape, flags) key compiles and times every configuration, too slow for a cold GPU machine's
# test time. tests/test_ffn.py runs every configuration of the full list once, directly.
QUICK_CONFIG_SHAPES = [(128, 128, 64, 4, 4), (64, 64, 32, 4, 4)]
# fp32 operands without TF32 (input precision "ieee") multiply on the FMA units, each thread holding its
# fp32 products and accumulators in registers: the tiles above with K steps of 64 or over 64 accumulators
# per thread spill registers on sm_80 and sm_90 (1,000-9,000 spill stores), or exceed an A100's shared memory
# in fp32 (the ahead-of-time compile check's report, benchmarks/results/kernel_notes.md). These tiles spill
# nothing, or at most 64 stores in the dgrad and swapped-row epilogues.
FP32_FMA_CONFIG_SHAPES = [
    (128, 128, 32, 3, 8),
    (64, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
]
FP32_FMA_QUICK_CONFIG_SHAPES = [(128, 128, 32, 3, 8), (64, 64, 32, 4, 4)]


def autotune_setting() -> str:
    """UNIFORMERV2_AUTOTUNE: "full" (default) or "quick"; read when the autotuned GEMM is first built."""
    return settings.autotune()


def gemm_config_shapes(precision: str = "tf32", quick: bool = False) -> list[tuple[int, int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) the autotuner chooses among for operands of this
    :func:`input_precision` ("ieee": fp32 on the FMA units; else tensor cores)."""
    if precision == "ieee":
        return FP32_FMA_QUICK_CONFIG_SHAPES if quick else FP32_FMA_CONFIG_SHAPES
    return QUICK_CONFIG_SHAPES if quick else GEMM_CONFIG_SHAPES


def _config(shape) -> triton.Config:
    bm, bn, bk, stages, warps = shape
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def config_shape(config: triton.Config) -> tuple[int, int, int, int, int]:
    """The (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps) of a configuration: :func:`_config`'s inverse."""
    kw = config.kwargs
    return kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_stages, config.num_warps


def gemm_configs(quick: bool = False, precision: str = "tf32") -> list[triton.Config]:
    """The autotuner's configurations of ``_linear_kernel`` for operands of this input precision."""
    return [_config(shape) for shape in gemm_config_shapes(precision, quick)]


def autotuned_configs(quick: bool = False) -> list[triton.Config]:
    """The autotuned kernel's configurations: both lists, each tile once (the call's precision prunes them)."""
    return [_config(s) for s in dict.fromkeys(gemm_config_shapes("tf32", quick) + gemm_config_shapes("ieee", quick))]


def _configs_for_the_call_precision(configs, named_args, *, quick: bool, **kwargs):
    """The autotuner's early pruning: only the configurations of the call's INPUT_PRECISION."""
    shapes = set(gemm_config_shapes(kwargs["INPUT_PRECISION"], quick))
    return [c for c in configs if config_shape(c) in shapes]


@triton.jit
def _linear_kernel(
    A, W, Bias, Out, Aux, Aux2, Res, RowScale,
    M, N, K,
    stride_am, stride_ak, stride_wn, stride_wk,
    n_outer, n_inner, rows_per_scale,
    HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr,
    HAS_RES: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SWAP_OUT_ROWS: tl.constexpr,
    EVEN_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Out[m, n] = epilogue(sum_k A[m, k] * W[n, k]); W is a Linear weight (N, K) given by strides.

    Out / Aux / Aux2 / Res are contiguous (M, N) (row-major); with SWAP_OUT_ROWS, GEMM row m is stored
    at row (m % n_inner) * n_outer + m // n_inner of Out (and read from that row of Res).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    w_ptrs = W + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = (k0 + offs_k) < K
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    _linear_epilogue(acc, offs_m, offs_n, m_ok, n_ok, N, Out, Aux, Aux2, Res, RowScale, n_outer, n_inner,
                     rows_per_scale, EPILOGUE, STORE_PRE, HAS_RES, HAS_ROW_SCALE, SWAP_OUT_ROWS)


@triton.jit
def _linear_epilogue(
    acc, offs_m, offs_n, m_ok, n_ok, N, Out, Aux, Aux2, Res, RowScale, n_outer, n_inner, rows_per_scale,
    EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, HAS_RES: tl.constexpr, HAS_ROW_SCALE: tl.constexpr,
    SWAP_OUT_ROWS: tl.constexpr,
):
    """The epilogue of one [rows, cols] tile of a linear: acc (fp32, bias included) -> Out (see
    ``_linear_kernel``), with the same roundings wherever it runs (GEMM kernel or ``_linear_epilogue_kernel``)."""
    mask = m_ok[:, None] & n_ok[None, :]
    if SWAP_OUT_ROWS:
        out_rows = (offs_m % n_inner) * n_outer + offs_m // n_inner
    else:
        out_rows = offs_m
    tile = offs_m[:, None] * N + offs_n[None, :]
    out_tile = out_rows[:, None] * N + offs_n[None, :]
    if EPILOGUE == 1:  # quick_gelu of the (rounded) pre-activation
        pre = acc.to(Out.dtype.element_ty)
        if STORE_PRE:
            tl.store(Aux + tile, pre, mask=mask)
        pre = pre.to(tl.float32)
        acc = pre * tl.sigmoid(1.702 * pre)
    elif EPILOGUE == 2:  # gradient through quick_gelu; recompute the activation for the weight gradient
        pre = tl.load(Aux + tile, mask=mask, other=0.0).to(tl.float32)
        s = tl.sigmoid(1.702 * pre)
        tl.store(Aux2 + tile, (pre * s).to(Aux2.dtype.element_ty), mask=mask)
        acc = acc.to(Out.dtype.element_ty).to(tl.float32) * (s + 1.702 * pre * s * (1.0 - s))
    if HAS_ROW_SCALE:
        scale = tl.load(RowScale + out_rows // rows_per_scale, mask=m_ok, other=0.0).to(tl.float32)
        acc = acc.to(Out.dtype.element_ty).to(tl.float32) * scale[:, None]
    if HAS_RES:
        acc = acc.to(Out.dtype.element_ty).to(tl.float32)
        acc += tl.load(Res + out_tile, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + out_tile, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _linear_epilogue_kernel(
    P, Out, Aux, Aux2, Res, RowScale, M, N, n_outer, n_inner, rows_per_scale,
    EPILOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SWAP_OUT_ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``_linear_kernel``'s epilogue as a pass over P = a @ weight.T + bias, computed by cuBLAS and already
    rounded to Out's dtype (the UNIFORMERV2_TRITON_GEMM=cublas variant). The pre-activation to keep is P
    itself, so nothing is stored to Aux here (STORE_PRE off)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.load(P + offs_m[:, None] * N + offs_n[None, :], mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    _linear_epilogue(acc.to(tl.float32), offs_m, offs_n, m_ok, n_ok, N, Out, Aux, Aux2, Res, RowScale,
                     n_outer, n_inner, rows_per_scale, EPILOGUE, False, HAS_RES, HAS_ROW_SCALE, SWAP_OUT_ROWS)


INTERPRET_META = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4}
_autotuned_linear_kernel = None


def _kernel_and_meta(config: triton.Config | None = None):
    """(kernel, launch meta): the given configuration; else the autotuned kernel on a GPU, one fixed
    configuration under the interpreter (which cannot autotune several)."""
    global _autotuned_linear_kernel
    if config is not None:
        return _linear_kernel, dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
    if INTERPRETED:
        return _linear_kernel, dict(INTERPRET_META)
    if _autotuned_linear_kernel is None:
        quick = autotune_setting() == "quick"
        _autotuned_linear_kernel = triton.autotune(
            configs=autotuned_configs(quick),
            key=["M", "N", "K", "EPILOGUE", "HAS_RES", "HAS_ROW_SCALE", "SWAP_OUT_ROWS", "EVEN_K", "INPUT_PRECISION"],
            prune_configs_by={"early_config_prune": functools.partial(_configs_for_the_call_precision, quick=quick)},
        )(_linear_kernel)
    return _autotuned_linear_kernel, {}


def linear(
    a: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    epilogue: int = EPI_NONE,
    store_pre: bool = False,
    aux: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    row_scale: torch.Tensor | None = None,
    rows_per_scale: int = 1,
    swap_out_rows: tuple[int, int] | None = None,
    gemm: str | None = None,
    config: triton.Config | None = None,
):
    """One fused GEMM: ``epilogue(a @ weight.T + bias)``.

    gemm: "triton" (``_linear_kernel``: the epilogue inside the GEMM) or "cublas" (``torch.addmm``, then
    ``_linear_epilogue_kernel``); default :func:`gemm_plan` (UNIFORMERV2_TRITON_GEMM).

    a: (M, K) with unit stride along K or M (any 2-d strides work); weight: (N, K) with any strides (pass
    ``w.t()`` to multiply by w). Returns ``out`` (M, N) contiguous in a.dtype, plus:
    - EPI_QUICK_GELU: ``(act, pre)``; pre (the rounded pre-activation) is None unless ``store_pre``.
    - EPI_QUICK_GELU_GRAD: ``(grad_pre, act)``: ``aux`` holds the pre-activation; grad_pre is
      ``(a @ weight.T) * quick_gelu'(aux)`` and act = ``quick_gelu(aux)``.
    - EPI_NONE: ``out`` only; ``residual`` (same rows as out) and ``row_scale`` apply as
      ``residual + row_scale[row // rows_per_scale] * (a @ weight.T + bias)``.
    ``swap_out_rows=(n_outer, n_inner)`` stores GEMM row m at row (m % n_inner) * n_outer + m // n_inner.
    ``config``: run ``_linear_kernel`` with this configuration instead of the autotuner's choice (tests).
    """
    M, K = a.shape
    N, K2 = weight.shape
    assert K == K2, (a.shape, weight.shape)
    gemm = gemm_plan("triton" if config is not None and gemm is None else gemm)
    if gemm == "cublas":
        return _linear_cublas(a, weight, bias, epilogue, store_pre, aux, residual, row_scale, rows_per_scale,
                              swap_out_rows)
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    aux2 = None
    if epilogue == EPI_QUICK_GELU:
        aux = torch.empty((M, N), dtype=a.dtype, device=a.device) if store_pre else None
    elif epilogue == EPI_QUICK_GELU_GRAD:
        assert aux is not None and aux.shape == (M, N) and aux.is_contiguous()
        aux2 = torch.empty((M, N), dtype=a.dtype, device=a.device)
    if residual is not None:
        assert residual.is_contiguous() and residual.numel() == M * N
    if M > 0 and N > 0:
        kernel, meta = _kernel_and_meta(config)
        even_k = K % 64 == 0 and (not meta or K % meta["BLOCK_K"] == 0)
        grid = lambda META: (cdiv(M, META["BLOCK_M"]) * cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        n_outer, n_inner = swap_out_rows if swap_out_rows is not None else (1, 1)
        kernel[grid](
            a, weight, bias if bias is not None else out, out,
            aux if aux is not None else out, aux2 if aux2 is not None else out,
            residual if residual is not None else out, row_scale if row_scale is not None else out,
            M, N, K,
            a.stride(0), a.stride(1), weight.stride(0), weight.stride(1),
            n_outer, n_inner, rows_per_scale,
            HAS_BIAS=bias is not None, EPILOGUE=epilogue, STORE_PRE=bool(store_pre),
            HAS_RES=residual is not None, HAS_ROW_SCALE=row_scale is not None,
            SWAP_OUT_ROWS=swap_out_rows is not None, EVEN_K=even_k,
            INPUT_PRECISION=input_precision(a.dtype), **meta,
        )
    if epilogue == EPI_QUICK_GELU:
        return out, aux
    if epilogue == EPI_QUICK_GELU_GRAD:
        return out, aux2
    return out


def _linear_cublas(a, weight, bias, epilogue, store_pre, aux, residual, row_scale, rows_per_scale, swap_out_rows):
    """``linear`` as cuBLAS (``addmm``: fp32 accumulation, the bias in its epilogue, one rounding to a.dtype,
    as ``_linear_kernel`` rounds) plus ``_linear_epilogue_kernel`` for what follows the rounding; the
    pre-activation kept for backward is the addmm output itself."""
    M, _ = a.shape
    N = weight.shape[0]
    w_t = weight.t() if weight.dtype == a.dtype else weight.t().to(a.dtype)
    pre = torch.addmm(bias.to(a.dtype), a, w_t) if bias is not None else a @ w_t
    if epilogue == EPI_NONE and residual is None and row_scale is None and swap_out_rows is None:
        return pre
    out = torch.empty((M, N), dtype=a.dtype, device=a.device)
    aux2 = torch.empty((M, N), dtype=a.dtype, device=a.device) if epilogue == EPI_QUICK_GELU_GRAD else None
    if epilogue == EPI_QUICK_GELU_GRAD:
        assert aux is not None and aux.shape == (M, N) and aux.is_contiguous()
    if residual is not None:
        assert residual.is_contiguous() and residual.numel() == M * N
    if M > 0 and N > 0:
        bm, bn = INTERPRET_EPILOGUE_TILE if INTERPRETED else EPILOGUE_TILE
        n_outer, n_inner = swap_out_rows if swap_out_rows is not None else (1, 1)
        _linear_epilogue_kernel[(cdiv(M, bm), cdiv(N, bn))](
            pre, out, aux if aux is not None else out, aux2 if aux2 is not None else out,
            residual if residual is not None else out, row_scale if row_scale is not None else out,
            M, N, n_outer, n_inner, rows_per_scale,
            EPILOGUE=epilogue, HAS_RES=residual is not None, HAS_ROW_SCALE=row_scale is not None,
            SWAP_OUT_ROWS=swap_out_rows is not None, BLOCK_M=bm, BLOCK_N=bn, num_warps=4,
        )
    if epilogue == EPI_QUICK_GELU:
        return out, (pre if store_pre else None)
    if epilogue == EPI_QUICK_GELU_GRAD:
        return out, aux2
    return out
