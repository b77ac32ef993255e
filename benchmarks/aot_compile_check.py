"""Ahead-of-time compile check of every Triton kernel for sm_90 (H100) and sm_80 (A100), no GPU needed.

Compiles each ``@triton.jit`` kernel of uniformerv2_kernels/triton/{layer_norm, linear, local_temporal_mhra[_backward],
global_query_attention[_backward]}.py (ffn.py and spatial_attention.py launch those) with
``triton.compile(ASTSource(...), target=GPUTarget(...))``
using the constexpr values / tile configs / num_warps / num_stages its launcher passes ON A GPU (not the
interpreter ones), at the real model shapes (C = 768: B/16, C = 1024: L/14), for fp32, fp16 and bf16, and
prints one row per compile:

    kernel, dtype, config, status, shared memory bytes, registers, spill stores/loads, stack bytes

Status:
- ``ok``: compiled, fits the device's shared memory (sm_90: 232448 B = 227 KB, sm_80: 166912 B = 163 KB)
  and ptxas reports no spills.
- ``ok/spill``: compiled but ptxas spills registers to local memory (slower, still launches).
- ``SMEM>max``: a launch would raise OutOfResources (the compile stops once the shared memory is known:
  no PTX, no ptxas, no register report). For the FFN GEMM (``@triton.autotune``)
  such a config is skipped by the autotuner (it catches OutOfResources), so it only matters when NO config
  of an (epilogue, dtype) variant fits; that case is reported as a failure in the summary.
- ``ERROR``: triton / ptxas failed to compile; the first line of the error is shown.

Cases whose arguments specialise alike (the same kernel, constexprs, launch options, pointer types and
integer divisibility / unit values: e.g. most C = 768 and C = 1024 cases) give the same binary and compile
once per arch; the table lists the cases each compile stands for. The GEMM's three light epilogue variants
(another variant's kernel with less epilogue work) compile every tile by default and the smallest and largest
only with ``--light-variants edges`` (a quicker local check; see ``linear_cases``).

Specialisation mimics a real launch: torch allocations are 16-byte aligned (pointer divisibility 16),
integer arguments divisible by 16 get the divisibility hint, and integer arguments equal to 1 (unit strides,
(1, 1) row swaps) become constants, as Triton's launcher does. Registers / spills come from the ptxas -v
log (``TRITON_DUMP_PTXAS_LOG``); TRITON_ALWAYS_COMPILE makes ptxas run every time.

Usage:
    python benchmarks/aot_compile_check.py                       # sm_90 and sm_80, everything (what CI runs)
    python benchmarks/aot_compile_check.py --light-variants edges  # fewer tiles of the light GEMM variants
    python benchmarks/aot_compile_check.py --arch 90 --ops layer_norm,linear --dtypes bf16 --jobs 2
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

# Must happen before triton / the kernel modules are imported: compile for real, not interpret.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its register report
if "TRITON_CACHE_DIR" not in os.environ:
    # a private cache (a cache hit would skip ptxas), removed at exit: a run leaves 0.3-0.6 GB there
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot_compile_check_")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = {90: 232448, 80: 166912}  # max dynamic shared memory per block (opt-in), bytes
DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}
TL_DTYPES = {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}

# Real model shapes (DESIGN.md section 2): B/16 at 224 (C 768, 12 heads, LMHRA C' = 512, 14x14 patches)
# and L/14 at 224 (C 1024, 16 heads, C' = 682, 16x16 patches); T = 8 frames, N = 8 videos.
MODELS = {
    768: dict(H=12, Cp=512, W=14, T=8, N=8),
    1024: dict(H=16, Cp=682, W=16, T=8, N=8),
}
for _m in MODELS.values():
    _m["L"] = _m["W"] ** 2 + 1
    _m["NT"] = _m["N"] * _m["T"]


@dataclass
class Case:
    op: str
    kernel: str  # attribute name in the op's triton module
    dtype: str
    config: str
    args: dict  # arg name -> pointer type string "*fp16" / python int / python float
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    group: str = ""  # autotune group: at least one config per group must fit
    extra: dict = field(default_factory=dict)


def _module(op):
    import importlib

    return importlib.import_module(f"uniformerv2_kernels.triton.{op}")


def _build_source(fn, args: dict, constexprs: dict):
    """ASTSource with the specialisation Triton's launcher would give these argument values."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):  # pointer
            signature[name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or isinstance(v, float):
            signature[name] = "fp32"
        elif isinstance(v, int):
            if v == 1:
                signature[name] = "constexpr"
                consts[name] = 1
            else:
                signature[name] = "i32" if abs(v) < 2**31 else "i64"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: {v!r}")
    return ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)


class _SharedMemoryOverflow(Exception):
    def __init__(self, shared: int):
        super().__init__(f"{shared} B of shared memory")
        self.shared = shared


def _stop_at_shared_memory_overflow(*args):
    """Triton's stage hook: after the LLVM-IR stage, where the kernel's shared memory is final, a kernel that
    cannot launch on the target (SMEM>max) stops before PTX and ptxas, the costly part of a big tile's
    compile, whose register report would not matter for it. Called without arguments, it names itself in
    the compile's cache key."""
    if not args:
        return "aot_compile_check-stop-at-smem-overflow", ""
    _backend, stages, _options, _language, capability = args
    make_llir, limit = stages["llir"], SMEM_LIMIT[capability]

    def llir(src, metadata):
        module = make_llir(src, metadata)
        if metadata["shared"] > limit:
            raise _SharedMemoryOverflow(metadata["shared"])
        return module

    stages["llir"] = llir


triton.knobs.runtime.add_stages_inspection_hook = _stop_at_shared_memory_overflow

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _jit_function(case: Case):
    fn = getattr(_module(case.op), case.kernel)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap an Autotuner / heuristics wrapper
        fn = fn.fn
    return fn


def binary_key(case: Case) -> tuple:
    """What determines the compiled binary for one arch: the kernel, its specialised signature (pointer
    types, integer divisibility, constants), the constexprs and the launch options. Cases that differ only
    in shapes that specialise the same way (e.g. M at C = 768 and C = 1024) share a key."""
    src = _build_source(_jit_function(case), case.args, case.constexprs)
    return (case.op, case.kernel, tuple(sorted(src.signature.items())),
            tuple(sorted((str(k), repr(v)) for k, v in src.constants.items())),
            tuple(sorted((str(k), repr(v)) for k, v in src.attrs.items())), case.num_warps, case.num_stages)


def distinct_cases(cases: list[Case]) -> tuple[list[Case], dict[int, list[Case]]]:
    """(one case per distinct binary, {index in that list: the other cases it stands for})."""
    first, same = {}, {}
    for c in cases:
        k = binary_key(c)
        if k in first:
            same[first[k]].append(c)
        else:
            first[k] = len(first)
            same[first[k]] = []
    unique = [None] * len(first)
    for c in cases:
        i = first[binary_key(c)]
        if unique[i] is None:
            unique[i] = c
    return unique, same


def _cost_estimate(case: Case) -> int:
    """Relative compile time, to start the slow compiles first (a big GEMM tile compiles ~5x longer than
    an elementwise kernel): the tile area times the pipeline depth, else 1."""
    c = case.constexprs
    if "BLOCK_M" in c and "BLOCK_N" in c and "BLOCK_K" in c:
        return c["BLOCK_M"] * c["BLOCK_N"] * case.num_stages // 1024
    return 1


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): unlike wall time, not inflated by other
    work on the machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_case(case: Case, arch: int) -> dict:
    fn = _jit_function(case)
    row = dict(op=case.op, kernel=case.kernel, dtype=case.dtype, config=case.config, arch=arch, group=case.group)
    t0, cpu0 = time.time(), _cpu_seconds()
    buf = io.StringIO()
    try:
        src = _build_source(fn, case.args, case.constexprs)
        with contextlib.redirect_stdout(buf):
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=case.num_warps, num_stages=case.num_stages))
    except _SharedMemoryOverflow as e:
        row.update(status="SMEM>max", smem=e.shared, regs=None, secs=time.time() - t0, cpu=_cpu_seconds() - cpu0)
        return row
    except Exception as e:  # noqa: BLE001 - report any compile failure
        msg = str(e).strip().splitlines()
        first = next((ln for ln in msg if ln.strip()), type(e).__name__)
        row.update(status="ERROR", error=f"{type(e).__name__}: {first[:200]}", secs=time.time() - t0,
                   cpu=_cpu_seconds() - cpu0)
        return row
    log = buf.getvalue()
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    row["smem"] = int(k.metadata.shared)
    row["regs"] = int(regs[-1]) if regs else None
    if spill:
        stack, st, ld = map(int, spill[-1])
        row.update(stack=stack, spill_st=st, spill_ld=ld)
    row["wgmma"] = "wgmma.mma_async" in k.asm.get("ptx", "")
    row["secs"] = time.time() - t0
    row["cpu"] = _cpu_seconds() - cpu0
    if row["smem"] > SMEM_LIMIT[arch]:
        row["status"] = "SMEM>max"
    elif row.get("spill_st", 0) or row.get("spill_ld", 0):
        row["status"] = "ok/spill"
    else:
        row["status"] = "ok"
    return row


# ------------------------------------------------------------------------------------------------------
# cases: what each launcher passes on a GPU


def _ptr(dt):
    return f"*{dt}"


def layer_norm_cases(dtypes):
    mod = _module("layer_norm")
    cases = []
    for C, m in MODELS.items():
        M = m["L"] * m["NT"]
        for dt in dtypes:
            p = _ptr(dt)
            # forward: target 4096 elements per program on a GPU
            bc, br, nw = mod._block_sizes(C, 4096)
            for swap, stats in [(False, True), (False, False), (True, True), (True, False)]:
                n_outer, n_inner = (m["L"], m["NT"]) if swap else (1, 1)
                cases.append(Case(
                    "layer_norm", "_layer_norm_fwd_kernel", dt,
                    f"C={C} SWAP={int(swap)} STATS={int(stats)} BR={br} BC={bc} w{nw}",
                    dict(X=p, W=p, B=p, Y=p, Mean="*fp32", Rstd="*fp32", M=M, C=C, n_outer=n_outer,
                         n_inner=n_inner, eps=1e-5),
                    dict(SWAP_Y_ROWS=swap, STORE_STATS=stats, BLOCK_ROWS=br, BLOCK_C=bc), num_warps=nw))
            bc, br, nw = mod._block_sizes(C, 2048)
            for swap, dres in [(False, True), (True, False), (False, False)]:
                n_outer, n_inner = (m["L"], m["NT"]) if swap else (1, 1)
                cases.append(Case(
                    "layer_norm", "_layer_norm_bwd_kernel", dt,
                    f"C={C} SWAP={int(swap)} DRES={int(dres)} BR={br} BC={bc} w{nw}",
                    dict(DY=p, X=p, W=p, Mean="*fp32", Rstd="*fp32", DX=p, DRES=p, PartialDW="*fp32",
                         PartialDB="*fp32", M=M, C=C, n_outer=n_outer, n_inner=n_inner, rows_per_program=br * 7),
                    dict(SWAP_DY_ROWS=swap, HAS_DRES=dres, BLOCK_ROWS=br, BLOCK_C=bc), num_warps=nw))
    return cases


def _linear_case(mod, dt, label, M, N, K, stride_am, stride_ak, stride_wn, stride_wk, n_outer, n_inner,
                 rows_per_scale, flags, cfg, group):
    p = _ptr(dt)
    meta = dict(cfg.kwargs)
    consts = dict(flags, EVEN_K=(K % 64 == 0), INPUT_PRECISION="ieee" if dt == "fp32" else "tf32", **meta)
    return Case(
        "linear", "_linear_kernel", dt,
        f"{label} {meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']} s{cfg.num_stages} w{cfg.num_warps}",
        dict(A=p, W=p, Bias=p, Out=p, Aux=p, Aux2=p, Res=p, RowScale=p, M=M, N=N, K=K,
             stride_am=stride_am, stride_ak=stride_ak, stride_wn=stride_wn, stride_wk=stride_wk,
             n_outer=n_outer, n_inner=n_inner, rows_per_scale=rows_per_scale),
        consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages, group=group)


def _edge_tiles(configs):
    """The smallest and the largest tile of an autotune list (tile volume times pipeline stages)."""
    def size(cfg):
        k = cfg.kwargs
        return k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"] * cfg.num_stages

    return [min(configs, key=size), max(configs, key=size)]


def linear_cases(dtypes, light_variants="all"):
    """The autotuned GEMM: every autotune config x the epilogue variants the FFN and spatial attention use.

    M, N, K only specialise through divisibility by 16 (EVEN_K: all model K are multiples of 64), so C = 768
    stands for both widths; the variants differ in the epilogue flags and strides.

    ``light_variants``: the three variants whose kernel is another's with epilogue work removed (qkv and
    c_fc(gelu) are c_fc(gelu,pre) without the pre-activation store, and qkv also without the GELU; c_proj(res) is
    c_proj(res,scale) without the row scale) with every config ("all"), with the list's smallest and largest
    tile only ("edges", a quicker local check), or not at all ("none"). With "edges" their main loop and pipelining are
    compiled by the full variant at every tile, and their own epilogue at both ends of the list; what is not
    compiled is their register report at the other tiles (a run with "all", triton 3.8, found their shared
    memory equal to the full variant's at every tile and arch, and their registers within 10 of it)."""
    if light_variants not in ("all", "edges", "none"):
        raise ValueError(f"light_variants: all, edges or none, not {light_variants!r}")
    mod = _module("linear")
    C, m = 768, MODELS[768]
    M = m["L"] * m["NT"]
    base = dict(HAS_BIAS=True, EPILOGUE=0, STORE_PRE=False, HAS_RES=False, HAS_ROW_SCALE=False, SWAP_OUT_ROWS=False)
    # (label, M, N, K, strides a (m, k), strides w (n, k), n_outer, n_inner, rows_per_scale, flags)
    variants = [
        ("c_fc(gelu,pre)", M, 4 * C, C, C, 1, C, 1, 1, 1, 1, dict(base, EPILOGUE=1, STORE_PRE=True)),
        ("c_proj(res,scale)", M, C, 4 * C, 4 * C, 1, 4 * C, 1, 1, 1, m["NT"],
         dict(base, HAS_RES=True, HAS_ROW_SCALE=True)),
        ("dgrad(gelu')", M, 4 * C, C, C, 1, 1, 4 * C, 1, 1, 1, dict(base, HAS_BIAS=False, EPILOGUE=2)),
        ("out_proj(swap)", M, C, C, C, 1, C, 1, m["NT"], m["L"], 1, dict(base, SWAP_OUT_ROWS=True)),
    ]
    light = []
    if light_variants != "none":
        light = [
            ("c_fc(gelu)", M, 4 * C, C, C, 1, C, 1, 1, 1, 1, dict(base, EPILOGUE=1)),
            ("c_proj(res)", M, C, 4 * C, 4 * C, 1, 4 * C, 1, 1, 1, 1, dict(base, HAS_RES=True)),
            ("qkv", M, 3 * C, C, C, 1, C, 1, 1, 1, 1, dict(base)),
        ]
    cases = []
    for dt in dtypes:
        configs = mod.gemm_configs(precision="ieee" if dt == "fp32" else "tf32")
        light_configs = _edge_tiles(configs) if light_variants == "edges" else configs
        for v, tiles in [(v, configs) for v in variants] + [(v, light_configs) for v in light]:
            for cfg in tiles:
                cases.append(_linear_case(mod, dt, *v, cfg, group=f"linear {v[0]} {dt}"))
        # the default UNIFORMERV2_TRITON_GEMM=cublas plan's epilogue pass (after torch.addmm)
        p = _ptr(dt)
        for label, N, n_outer, n_inner, rows_per_scale, flags in (
                ("c_fc(gelu)", 4 * C, 1, 1, 1, dict(EPILOGUE=1, HAS_RES=False, HAS_ROW_SCALE=False,
                                                     SWAP_OUT_ROWS=False)),
                ("c_proj(res,scale)", C, 1, 1, m["NT"], dict(EPILOGUE=0, HAS_RES=True, HAS_ROW_SCALE=True,
                                                              SWAP_OUT_ROWS=False)),
                ("dgrad(gelu')", 4 * C, 1, 1, 1, dict(EPILOGUE=2, HAS_RES=False, HAS_ROW_SCALE=False,
                                                       SWAP_OUT_ROWS=False)),
                ("out_proj(swap)", C, m["NT"], m["L"], 1, dict(EPILOGUE=0, HAS_RES=False, HAS_ROW_SCALE=False,
                                                               SWAP_OUT_ROWS=True))):
            bm, bn = mod.EPILOGUE_TILE
            cases.append(Case(
                "linear", "_linear_epilogue_kernel", dt, f"{label} BM={bm} BN={bn} w4",
                dict(P=p, Out=p, Aux=p, Aux2=p, Res=p, RowScale=p, M=M, N=N, n_outer=n_outer, n_inner=n_inner,
                     rows_per_scale=rows_per_scale),
                dict(flags, BLOCK_M=bm, BLOCK_N=bn)))
    return cases


def local_temporal_mhra_cases(dtypes):
    mod = _module("local_temporal_mhra")
    linear = _module("linear")
    ebm, ebn = linear.EPILOGUE_TILE
    cases = []
    for C, m in MODELS.items():
        Cp, T, NT = mod.y1_width(m["Cp"]), m["T"], m["NT"]  # the launchers pad C' to aligned rows
        M = (m["L"] - 1) * NT
        for dt in dtypes:
            p = _ptr(dt)
            cfg = linear.fixed_gemm_config(_torch_dtype(dt), interpreted=False)
            nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages")
            precision = "ieee" if dt == "fp32" else "tf32"
            common = dict(a_ptr=p, b_ptr=p, out_ptr=p, res_ptr=p, e_ptr=p, col_bias_ptr="*fp32",
                          col_coef_ptr="*fp32", row_scale_ptr="*fp32", k_bias_ptr="*fp32", mix_w_ptr="*fp32",
                          mix_b_ptr="*fp32", T=T, NT=NT)
            tiles = f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} s{ns} w{nw}"
            # forward GEMM2 with the temporal mix (K = C' padded, N = C, b = conv2^T (C', C) row-major) and the
            # backward dX GEMM (A = dY1 (M, C'), B = W1' (C', C) row-major)
            for label, flags in (("fwd MIX ROW_SCALE=0", dict(HAS_MIX=True, HAS_ROW_SCALE=False, HAS_E=False)),
                                 ("fwd MIX ROW_SCALE=1", dict(HAS_MIX=True, HAS_ROW_SCALE=True, HAS_E=False)),
                                 ("bwd-dX E=1", dict(HAS_MIX=False, HAS_ROW_SCALE=False, HAS_E=True)),
                                 ("bwd-dX E=0", dict(HAS_MIX=False, HAS_ROW_SCALE=False, HAS_E=False))):
                cases.append(Case("local_temporal_mhra", "_fused_matmul_kernel", dt, f"C={C} {label} {tiles}",
                                  dict(common, M=M, N=C, K=Cp, stride_bk=C, stride_bn=1),
                                  dict(flags, INPUT_PRECISION=precision, **cfg), num_warps=nw, num_stages=ns))
            # the gemm="cublas" plan's kernels (the default) around the cuBLAS GEMMs
            cases.append(Case("local_temporal_mhra", "_temporal_mix_kernel", dt, f"C={C} BM=32 BK=128 w4",
                              dict(y1_ptr=p, k_bias_ptr="*fp32", mix_w_ptr="*fp32", mix_b_ptr="*fp32", z_ptr=p,
                                   M=M, K=Cp, T=T),
                              dict(BLOCK_M=32, BLOCK_K=128)))
            for rs, e in ((True, False), (False, True)):
                cases.append(Case("local_temporal_mhra", "_rows_epilogue_kernel", dt,
                                  f"C={C} ROW_SCALE={int(rs)} E={int(e)} BM={ebm} BN={ebn} w4",
                                  dict(acc_ptr="*fp32", out_ptr=p, res_ptr=p, e_ptr=p, col_bias_ptr="*fp32",
                                       col_coef_ptr="*fp32", row_scale_ptr="*fp32", M=M, N=C, T=T, NT=NT),
                                  dict(HAS_ROW_SCALE=rs, HAS_E=e, BLOCK_M=ebm, BLOCK_N=ebn)))
            cases.append(Case("local_temporal_mhra", "_bn_stats_partial_kernel", dt, f"C={C} BM=32 BC=128 w4",
                              dict(x_ptr=p, part_mean_ptr="*fp32", part_m2_ptr="*fp32", M=M, C=C,
                                   rows_per_prog=32 * 13),
                              dict(BLOCK_M=32, BLOCK_C=128)))
            for rs, rd in [(True, True), (False, False)]:
                cases.append(Case("local_temporal_mhra_backward", "_temporal_mix_backward_kernel", dt,
                                  f"C={C} ROW_SCALE={int(rs)} ROWDOT={int(rd)} BM=32 BK=64 w8",
                                  dict(dz_ptr=p, y1_ptr=p, k_bias_ptr="*fp32", mix_w_ptr="*fp32",
                                       mix_b_ptr="*fp32", row_scale_ptr="*fp32", dy1_ptr=p, zs_ptr=p,
                                       part_ptr="*fp32", rowdot_ptr="*fp32", M=M, K=Cp, T=T, NT=NT,
                                       rows_per_prog=32 * 13),
                                  dict(HAS_ROW_SCALE=rs, NEED_ROWDOT=rd, BLOCK_M=32, BLOCK_K=64), num_warps=8))
            cases.append(Case("local_temporal_mhra_backward", "_scaled_column_sum_kernel", dt,
                              f"C={C} ROW_SCALE=1 BM=32 BC=128 w4",
                              dict(g_ptr=p, row_scale_ptr="*fp32", part_ptr="*fp32", M=M, C=C, T=T, NT=NT,
                                   rows_per_prog=32 * 13),
                              dict(HAS_ROW_SCALE=True, BLOCK_M=32, BLOCK_C=128)))
    for dt in dtypes:  # reads the shift row x[0] in x's dtype
        cases.append(Case("local_temporal_mhra", "_centre_kernel", dt, "BM=32 BC=128 w4",
                          dict(x_ptr=_ptr(dt), mean_ptr="*fp32", out_ptr=_ptr(dt), M=12544, C=768),
                          dict(BLOCK_M=32, BLOCK_C=128)))
        cases.append(Case("local_temporal_mhra", "_bn_stats_combine_kernel", dt, "BC=128 w4",
                          dict(x_ptr=_ptr(dt), part_mean_ptr="*fp32", part_m2_ptr="*fp32", mean_ptr="*fp32",
                               var_ptr="*fp32", R=40, M=12544, C=768, rows_per_prog=32 * 13),
                          dict(BLOCK_C=128)))
        for C, m in MODELS.items():  # parameters in x's dtype (the model under autocast: fp32 ones too)
            Cp, Kp = m["Cp"], mod.y1_width(m["Cp"])
            pd = _ptr(dt)
            cases.append(Case("local_temporal_mhra", "_fold_params_kernel", dt, f"C={C} BR=16 BC=128 w4",
                              dict(var_ptr="*fp32", bn_w_ptr=pd, bn_b_ptr=pd, w1_ptr=pd, b1_ptr=pd, dw_w_ptr=pd,
                                   dw_b_ptr=pd, w2_ptr=pd, w1f_ptr=pd, b1f_ptr="*fp32", mix_w_ptr="*fp32",
                                   mix_b_ptr="*fp32", w2t_ptr=pd, C=C, Cp=Cp, Kp=Kp, eps=1e-5),
                              dict(BLOCK_R=16, BLOCK_C=128)))
            cases.append(Case("local_temporal_mhra_backward", "_bn_conv1_grads_kernel", dt, f"C={C} BK=64 BC=32 w4",
                              dict(pc_ptr="*fp32", w1_ptr=pd, w1f_ptr=pd, db1_ptr="*fp32", var_ptr="*fp32",
                                   bn_w_ptr=pd, bn_b_ptr=pd, d_w1_ptr=pd, d_bn_w_ptr=pd, d_bn_b_ptr=pd,
                                   coef_ptr="*fp32", col_bias_ptr="*fp32", C=C, Cp=Cp, M=12544, eps=1e-5),
                              dict(BLOCK_K=64, BLOCK_C=32)))
    # dtype-independent (fp32 buffers only)
    cases.append(Case("local_temporal_mhra", "_sum_partials_kernel", "fp32", "BLOCK=512 w4",
                      dict(part_ptr="*fp32", out_ptr="*fp32", R=40, W=5 * 682), dict(BLOCK=512)))
    return cases


def _torch_dtype(dt):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]


def global_query_attention_cases(dtypes):
    mod = _module("global_query_attention")
    cases = []
    for C, m in MODELS.items():
        T, NT, H, W, L = m["T"], m["NT"], m["H"], m["W"], m["L"]
        S = T * L
        BLOCK_C = triton.next_power_of_2(C)
        BLOCK_H = max(16, triton.next_power_of_2(H))
        for dt in dtypes:
            p = _ptr(dt)
            use_dot = dt != "fp32"
            block_r, block_c, num_warps = mod._dpe_blocks(C)
            cases.append(Case(
                "global_query_attention", "_dpe_kernel", dt, f"C={C} BR={block_r} BC={block_c} w{num_warps}",
                dict(x_ptr=p, dpe_w_ptr="*fp32", dpe_b_ptr="*fp32", y_ptr=p, R=L * NT, T=T, NT=NT, C=C, W=W),
                dict(BLOCK_R=block_r, BLOCK_C=block_c), num_warps=num_warps))
            common = dict(y_ptr=p, u_ptr="*fp32", T=T, NT=NT, C=C, H=H, S=S, num_splits=33, eps=1e-5)
            stages = 2  # _forward_stages() on an A100 / H100
            block_s, num_warps = mod._token_tile("forward", BLOCK_C, use_dot, None)  # the GPU launch config
            tps = triton.cdiv(triton.cdiv(S, block_s), 33) * block_s  # ~2*132 SMs / N splits
            cases.append(Case(
                "global_query_attention", "_gqa_forward_partial_kernel", dt,
                f"C={C} BS={block_s} BC={BLOCK_C} BH={BLOCK_H} DOT={int(use_dot)} s{stages} w{num_warps}",
                dict(common, tokens_per_split=tps, m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32"),
                dict(BLOCK_S=block_s, BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H, USE_DOT=use_dot,
                     OPERAND_DTYPE=TL_DTYPES[dt], DOT_PRECISION=mod._dot_precision(_torch_dtype(dt))),
                num_warps=num_warps, num_stages=stages))
            block_s, num_warps = mod._token_tile("backward", BLOCK_C, False, None)
            tps = triton.cdiv(triton.cdiv(S, block_s), 33) * block_s
            cases.append(Case(
                "global_query_attention_backward", "_gqa_backward_tokens_kernel", dt,
                f"C={C} BS={block_s} BC={BLOCK_C} BH={BLOCK_H} w{num_warps}",
                dict({k: v for k, v in common.items() if k != "num_splits"}, tokens_per_split=tps,
                     dz_ptr="*fp32", lse_ptr="*fp32", D_ptr="*fp32", dy_ptr="*fp32", xhat_ptr="*fp32",
                     ds_ptr="*fp32"),
                dict(BLOCK_S=block_s, BLOCK_C=BLOCK_C, BLOCK_H=BLOCK_H),
                num_warps=num_warps))
            bs, bc = 4, 32  # backward(): 4 tokens x min(32, BLOCK_C) channels on a GPU
            cases.append(Case(
                "global_query_attention_backward", "_gqa_backward_dpe_kernel", dt, f"C={C} BS={bs} BC={bc} w4",
                dict(x_ptr=p, dy_ptr="*fp32", dpe_w_ptr="*fp32", dx_ptr=p, dw_part_ptr="*fp32",
                     db_part_ptr="*fp32", T=T, NT=NT, C=C, W=W, S=S, tokens_per_split=bs * 20, num_splits=13),
                dict(BLOCK_S=bs, BLOCK_C=bc), num_warps=4))
            block_d, block_k = triton.next_power_of_2(C // H), 128  # _head_blocks() on a GPU
            heads = dict(C=C, H=H, D=C // H)
            for with_grad in (False, True):
                cases.append(Case(
                    "global_query_attention", "_query_head_kernel", dt,
                    f"C={C} BD={block_d} BK={block_k} GRAD={int(with_grad)} w4",
                    dict(query_ptr=p, stride_qn=C, stride_qc=1, w_ptr=p, b_ptr=p, gamma_ptr=p, beta_ptr=p,
                         u_ptr="*fp32", qh_ptr="*fp32", r_ptr="*fp32", dout_ptr=p, z_ptr="*fp32", dz_ptr="*fp32",
                         D_ptr="*fp32", zn_ptr="*fp32", dout_t_ptr="*fp32", colsum_ptr="*fp32", N=16,
                         scale=0.125, **heads),
                    dict(WITH_GRAD=with_grad, BLOCK_D=block_d, BLOCK_K=block_k), num_warps=4))
            cases.append(Case(
                "global_query_attention", "_merge_project_kernel", dt, f"C={C} BD={block_d} BK={block_k} w4",
                dict(m_ptr="*fp32", l_ptr="*fp32", acc_ptr="*fp32", gamma_ptr=p, beta_ptr=p, w_ptr=p, b_ptr=p,
                     z_ptr="*fp32", lse_ptr="*fp32", out_ptr=p, num_splits=17, **heads),
                dict(BLOCK_SPLITS=32, BLOCK_D=block_d, BLOCK_K=block_k), num_warps=4))
            cases.append(Case(
                "global_query_attention_backward", "_query_grad_kernel", dt, f"C={C} BD={block_d} BK={block_k} w4",
                dict(du_ptr="*fp32", gamma_ptr=p, r_ptr="*fp32", w_ptr=p, grad_q_ptr="*fp32", dr_ptr="*fp32",
                     colsum_ptr="*fp32", N=16, scale=0.125, **heads),
                dict(BLOCK_D=block_d, BLOCK_K=block_k), num_warps=4))
    return cases


def no_kernels_of_its_own(dtypes):
    """ffn.py and spatial_attention.py launch layer_norm and linear kernels, which those cases cover (the
    FFN's c_fc / c_proj / dgrad, the attention's SWAP=1 LayerNorm, 'qkv' and 'out_proj' GEMMs)."""
    return []


OPS = {
    "layer_norm": layer_norm_cases,
    "linear": linear_cases,
    "ffn": no_kernels_of_its_own,
    "spatial_attention": no_kernels_of_its_own,
    "local_temporal_mhra": local_temporal_mhra_cases,
    "global_query_attention": global_query_attention_cases,
}


# the modules whose kernels an op's cases compile (one op's kernels may span a forward and a backward file)
KERNEL_MODULES = {"local_temporal_mhra": ("local_temporal_mhra", "local_temporal_mhra_backward"),
                  "global_query_attention": ("global_query_attention", "global_query_attention_backward")}


def _check_every_kernel_covered(cases, ops):
    """Every @triton.jit kernel (name ending in _kernel) of the selected ops' modules must have a case."""
    missing = []
    for module_name in (m for op in ops for m in KERNEL_MODULES.get(op, (op,))):
        module = _module(module_name)
        for name, obj in vars(module).items():
            if (isinstance(obj, triton.runtime.jit.JITFunction) and name.endswith("_kernel")
                    and obj.fn.__module__ == module.__name__):  # defined there, not imported
                if not any(c.op == module_name and c.kernel == name for c in cases):
                    missing.append(f"{module_name}.{name}")
    return missing


def _fmt(v, width):
    return ("-" if v is None else str(v)).rjust(width)


def print_table(rows):
    hdr = (f"{'arch':>4}  {'kernel':<32} {'dtype':<5} {'config':<52} {'status':<9} {'smem B':>7} {'regs':>4} "
           f"{'spill st/ld':>11} {'stack':>5} {'s':>5}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        spill = None if "spill_st" not in r else f"{r['spill_st']}/{r['spill_ld']}"
        print(f"sm{r['arch']:<2}  {r['kernel']:<32} {r['dtype']:<5} {r['config']:<52} {r['status']:<9} "
              f"{_fmt(r.get('smem'), 7)} {_fmt(r.get('regs'), 4)} {_fmt(spill, 11)} {_fmt(r.get('stack'), 5)} "
              f"{r['secs']:5.1f}")
        if r["status"] == "ERROR":
            print(f"      -> {r['error']}")
        if r.get("same_as"):
            print(f"      = also {'; '.join(r['same_as'])}")


def summarise(rows):
    """Failures: errors and shared-memory overflows outside autotune groups, and autotune groups with no
    config that fits."""
    failures, notes = [], []
    groups = {}
    for r in rows:
        if r["group"]:
            groups.setdefault((r["arch"], r["group"]), []).append(r)
        elif r["status"] in ("ERROR", "SMEM>max"):
            failures.append(f"sm{r['arch']} {r['kernel']} {r['dtype']} {r['config']}: {r['status']} "
                            f"{r.get('error', '')}{r.get('smem', '')}")
    for (arch, g), rs in groups.items():
        fit = [r for r in rs if r["status"] in ("ok", "ok/spill")]
        bad = [r for r in rs if r["status"] not in ("ok", "ok/spill")]
        if not fit:
            failures.append(f"sm{arch} autotuned {g}: NO config compiles within shared memory")
        elif bad:
            notes.append(f"sm{arch} autotuned {g}: {len(fit)}/{len(rs)} configs usable; skipped by the autotuner: "
                         + ", ".join(f"{r['config'].split()[-3]} ({r['status']}"
                                     + (f" {r['smem']} B)" if 'smem' in r else ")") for r in bad))
    spills = [r for r in rows if r["status"] == "ok/spill"]
    return failures, notes, spills


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90,80", help="compute capabilities, comma separated (default 90,80)")
    ap.add_argument("--ops", default=",".join(OPS), help="ops, comma separated")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles (processes)")
    ap.add_argument("--light-variants", choices=("all", "edges", "none"), default="all",
                    help="linear GEMM: the qkv / c_fc(gelu) / c_proj(res) variants (another variant's kernel with "
                         "less epilogue work) with every autotune config, with the smallest and largest tile, "
                         "or not at all")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    ops = [o for o in args.ops.split(",") if o]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for d in dtypes:
        if d not in DTYPES:
            ap.error(f"unknown dtype {d}")

    cases = []
    for op in ops:
        if op == "linear":
            cases += linear_cases(dtypes, light_variants=args.light_variants)
        else:
            cases += OPS[op](dtypes)
    missing = _check_every_kernel_covered(cases, ops)
    unique, same = distinct_cases(cases)
    jobs = [(i, a) for a in archs for i in range(len(unique))]
    print(f"triton {triton.__version__}: {len(cases)} cases, {len(unique)} distinct binaries per arch "
          f"(shapes that specialise alike compile once), {len(jobs)} compiles for archs {archs}, "
          f"{args.jobs} processes, cache {os.environ['TRITON_CACHE_DIR']}", flush=True)
    # slowest first, so that no long GEMM compile starts last on an otherwise idle pool
    order = sorted(range(len(jobs)), key=lambda j: -_cost_estimate(unique[jobs[j][0]]))
    t0 = time.time()
    rows = [None] * len(jobs)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            futures = {ex.submit(compile_case, unique[jobs[j][0]], jobs[j][1]): j for j in order}
            for f in as_completed(futures):
                rows[futures[f]] = f.result()
    else:
        for j in order:
            rows[j] = compile_case(unique[jobs[j][0]], jobs[j][1])
    for row, (i, _) in zip(rows, jobs):
        row["same_as"] = [c.config if c.dtype == row["dtype"] else f"{c.config} {c.dtype}" for c in same[i]]
    wall = time.time() - t0
    print(f"compiled in {wall:.0f} s wall; CPU seconds per arch (wall on one idle core): "
          + ", ".join(f"sm{a} {sum(r['cpu'] for r in rows if r['arch'] == a):.0f}" for a in archs) + "\n")
    print_table(rows)
    # a duplicate case shares its binary's result, in its own autotune group too
    failures, notes, _ = summarise(
        rows + [dict(r, kernel=c.kernel, dtype=c.dtype, config=c.config, group=c.group)
                for r, (i, _) in zip(rows, jobs) for c in same[i]])
    print("\nshared-memory limits used: " + ", ".join(f"sm{a}: {SMEM_LIMIT[a]} B" for a in archs))
    if missing:
        print("\nkernels without a case (add them): " + ", ".join(missing))
    spills = [r for r in rows if r["status"] == "ok/spill"]
    print(f"\nregister spills: {len(spills)} of {len(rows)} compiles")
    for n in notes:
        print("note: " + n)
    if failures:
        print(f"\nFAILURES ({len(failures)}):")
        for f in failures:
            print("  " + f)
    else:
        print("\nno failures: every launcher configuration compiles and fits shared memory")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    sys.exit(main())
