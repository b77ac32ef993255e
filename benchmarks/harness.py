"""Shared benchmark harness: every ``benchmarks/bench_*.py`` script uses it, so they all behave the same.

API (import with ``from harness import ...``; scripts run as ``python benchmarks/bench_<op>.py``)
--------------------------------------------------------------------------------------------------
``parse_args(description, argv=None, extra=None) -> argparse.Namespace``
    The common command line: ``--device {auto,cpu,cuda}``, ``--dtype {auto,fp32,fp16,bf16}`` (auto: bf16
    on CUDA, fp32 on CPU), ``--mode`` (comma list of forward, backward, forward+backward; aliases fwd,
    bwd, fwd+bwd, all), ``--quick`` (tiny shapes; the default on CPU unless ``--full``), ``--full``,
    ``--models b16,l14``, ``--frames 8,16``, ``--batch 16,64`` (override the default shape set; cross
    product), ``--providers eager,compile,...`` (subset), ``--out DIR`` (default benchmarks/out, git-ignored),
    ``--results`` (write to benchmarks/results, the committed tables, instead),
    ``--no-save``, ``--warmup MS``, ``--rep MS``, ``--strict`` (re-raise provider errors),
    ``--interpret`` (run Triton providers on the CPU through TRITON_INTERPRET=1: a smoke test, never a
    timing), ``--threads N`` (torch CPU threads; default 1 on CPU so timings on a shared machine are
    stable, 0 keeps torch's default). ``extra(parser)`` may add script-specific options.
    Also sets ``args.device`` (torch.device), ``args.dtype`` (torch.dtype), ``args.modes`` (list),
    ``args.quick`` (bool, final).

``Shape`` / ``shapes(args) -> list[Shape]``
    Real UniFormerV2 sizes: ``MODELS["b16"]`` (C=768, 12 heads, L=197, LMHRA width 512) and
    ``MODELS["l14"]`` (C=1024, 16 heads, L=257, LMHRA width 682); head dim 64, MLP 4C. A Shape adds
    frames T and batch N: ``NT = N*T`` frame rows, ``S = T*L`` tokens per clip, ``tokens = L*N*T``.
    Full set (GPU): b16 T8 N64 (the DESIGN target), b16 T16 N32, l14 T8 N32, l14 T16 N16. Quick set (CPU):
    ``tiny`` (C=128, 2 heads, 4x4 patches so L=17, T=3, N=2) and b16 with T=2, N=1.

``Case(name, make_inputs, shape=None, fwd_bytes=None, bwd_bytes=None, fwd_flops=None, bwd_flops=None,
       items=None, items_unit="items", params=None)``
    One problem size. ``make_inputs(device, dtype, requires_grad) -> dict`` builds fresh random inputs
    (parameters included; randomise everything, never zeros); leaf tensors that require grad get their
    ``.grad`` cleared between timed backward runs. Bytes and FLOPs are what the caller's formula says one
    forward / one backward must move or compute (write the formula next to it); forward+backward uses the
    sums. ``items`` (e.g. clips per step) gives an items/s column.

``Provider(name, fn, requires=(), compile=False, prepare=None, skip_if=None)``
    One implementation. ``fn(**inputs)`` returns a tensor or a tuple of tensors. ``requires`` lists what
    must be present, each skipped with a reason when missing: ``"gpu"`` (a CUDA device is benchmarked),
    ``"triton"`` (Triton on CUDA, or on CPU only under --interpret), ``"cuda_ext"`` (the compiled
    extension loads), ``"cuda_op:<name>"`` (the extension registers ``torch.ops.uniformerv2_cuda.<name>``),
    ``"xformers"`` (xformers imports and its memory_efficient_attention runs on CUDA). ``compile=True``
    wraps ``fn`` in ``torch.compile`` (compile time is kept out of the timing; see ``first_ms``).
    ``prepare(inputs) -> inputs`` runs once, untimed (e.g. a layout change a real caller would keep).
    ``skip_if(case, args) -> str | None`` gives case-specific reasons (dtype limits...).
    Import op modules lazily inside ``fn`` / ``prepare`` if you want ``--interpret`` to reach them (the
    harness sets TRITON_INTERPRET when it is imported with --interpret on the command line, so top-level
    imports after ``import harness`` also work).

``run_benchmark(name, cases, providers, args, title=None, baseline=None) -> list[dict]``
    Measures every case x mode x provider, prints the table, appends the rows to ``<out>/<name>.csv``,
    writes ``<out>/<name>_<devtag>.md`` (environment header + table) and ``<out>/<name>_<devtag>.png``
    (one bar chart per mode). ``baseline`` (default: the first provider) gives the speed-up column.

Lower-level pieces, for bench_e2e.py and the pytest-benchmark tests:
``time_fn(fn, device, warmup=25, rep=100, grad_to_none=None) -> float`` median milliseconds
(CUDA: ``triton.testing.do_bench(..., return_mode="median")``, which flushes L2 between runs; CPU: wall
clock, ``perf_counter``, 1 warm-up call then 3..10 calls fitted to ``rep`` ms, median).
``make_step(provider, inputs, mode) -> (step, leaves)`` a zero-argument callable running one step.
``measure(provider, case, mode, args) -> dict`` one row. ``env_record(device) -> dict``.
``append_csv(rows, path)``, ``format_table(rows) -> str``, ``plot(rows, path, title)``.
``provider_skip_reason(provider, case, args) -> str | None``. ``new_row(provider_name, case, mode, args)``
(a row with the environment filled in), ``peak_memory_mb(step, device)``, ``add_speedups(rows, baseline)``,
``save(name, rows, args, title)`` (CSV + markdown + plot, as run_benchmark does).

Modes and what is timed
-----------------------
- ``forward``: ``fn(**inputs)`` under ``torch.no_grad()`` (inference; nothing saved for backward).
- ``backward``: one forward is run with autograd; then ``torch.autograd.backward(outputs, grad_outputs,
  retain_graph=True)`` is timed alone, re-using the saved graph (leaf grads set to None between runs).
  If the implementation cannot run its backward twice on one graph, the harness falls back to
  time(forward+backward) - time(forward with autograd), and says so in the ``note`` column.
- ``forward+backward``: forward with autograd plus backward, per step (a training step's op cost).
``grad_outputs`` are fixed random tensors shaped like the outputs.

Columns (CSV and table)
-----------------------
``ms``: median time of one step in milliseconds.
``GB/s`` = bytes / (ms * 1e-3) / 1e9, bytes from the case's formula (minimum traffic: each input read
once, each output written once, unless the caller's formula says otherwise).
``TFLOP/s`` = flops / (ms * 1e-3) / 1e12, flops from the case's formula (2 per multiply-add).
``items/s`` = items / (ms * 1e-3).
``peak_mb``: ``torch.cuda.max_memory_allocated()`` during one untimed step after warm-up, after
``reset_peak_memory_stats()`` (absolute: inputs, parameters and any saved graph included), in MiB.
On CPU there is no allocator high-water mark to read: the column is empty and the table prints ``n/a``.
``first_ms``: wall time of the first call (compilation, autotuning, cache loading included).
``host_ms`` (CUDA only): median wall time of one step's Python call started on an idle GPU, without waiting
for its kernels: what the host spends launching a step. When it is close to ``ms`` the step is bound by
launch overhead (checks, dispatch, Triton's launcher), not by the GPU; the first H100 run suggested this
for the small ops (the CLIP LayerNorm op took 0.19 ms at b16 where its kernel ran 27 us).
``gpu_ms`` (CUDA only): median time of the step replayed from a CUDA graph (captured once after a warm-up;
L2 flushed before each replay, as for ``ms``): the GPU's own time with no host work at all. ``ms`` far above
``gpu_ms`` means the step waits on the host; variants of a kernel compare fairly on ``gpu_ms`` even where the
host hides their difference in ``ms``. Empty, with a note, where the step cannot be captured (a host sync,
an optimizer without ``capturable``, ...).
``speedup``: baseline ms / this ms, same case and mode.
Each CSV row also carries the date (UTC), device name, torch / triton / CUDA / python versions, the git
commit (``-dirty`` when the tree has changes), dtype and whether it is a --quick run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import functools
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

# --interpret must take effect before any Triton kernel module is imported (triton.jit reads the variable
# when the kernel is defined), and scripts import the harness first.
if "--interpret" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # so the scripts run from a checkout even when the package is not installed
    sys.path.insert(0, REPO_ROOT)

# Runs write to an untracked folder (git-ignored) unless asked to record: benchmarks/results/ holds only the
# tables someone chose to commit (--results, or `merge` of a GPU suite's folder).
DEFAULT_OUT = os.path.join(REPO_ROOT, "benchmarks", "out")
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")
MODES = ("forward", "backward", "forward+backward")
_MODE_ALIASES = {
    "forward": "forward", "fwd": "forward", "f": "forward",
    "backward": "backward", "bwd": "backward", "b": "backward",
    "forward+backward": "forward+backward", "fwd+bwd": "forward+backward", "fwdbwd": "forward+backward",
    "fb": "forward+backward", "train": "forward+backward",
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}
CPU_MIN_REPS = 3
CPU_MAX_REPS = 10


# ----------------------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ModelDims:
    """Widths of one UniFormerV2 backbone (DESIGN section 2)."""

    name: str
    C: int           # width
    heads: int       # attention heads (head dim 64)
    side: int        # patches per side: res / patch
    layers: int
    lmhra_dim: int   # int(C // 1.5)

    @property
    def head_dim(self) -> int:
        return self.C // self.heads

    @property
    def L(self) -> int:  # tokens per frame, class token included
        return 1 + self.side * self.side


MODELS = {
    "b16": ModelDims("b16", C=768, heads=12, side=14, layers=12, lmhra_dim=512),      # 224/16: L = 197
    "l14": ModelDims("l14", C=1024, heads=16, side=16, layers=24, lmhra_dim=682),     # 224/14: L = 257
    "l14_336": ModelDims("l14_336", C=1024, heads=16, side=24, layers=24, lmhra_dim=682),  # L = 577
    "tiny": ModelDims("tiny", C=128, heads=2, side=4, layers=2, lmhra_dim=85),        # CPU smoke size
}


@dataclass(frozen=True)
class Shape:
    """A model's widths plus T frames (after the stem) and N clips; the stream is (L, N*T, C)."""

    dims: ModelDims
    T: int
    N: int

    def __getattr__(self, item):  # C, heads, head_dim, L, side, layers, lmhra_dim come from dims
        if item == "dims":
            raise AttributeError(item)
        return getattr(self.dims, item)

    @property
    def model(self) -> str:
        return self.dims.name

    @property
    def hw(self) -> int:  # patch tokens per frame
        return self.dims.side * self.dims.side

    @property
    def NT(self) -> int:  # frame rows of the stream
        return self.N * self.T

    @property
    def S(self) -> int:  # keys per clip for the global block: all T*L tokens
        return self.T * self.dims.L

    @property
    def tokens(self) -> int:  # rows of the (L, N*T, C) stream
        return self.dims.L * self.NT

    @property
    def mlp(self) -> int:
        return 4 * self.dims.C

    @property
    def label(self) -> str:
        return f"{self.model} T={self.T} N={self.N}"

    def as_dict(self) -> dict:
        return {"model": self.model, "T": self.T, "N": self.N, "L": self.L, "C": self.C, "heads": self.heads}


FULL_SHAPES = (("b16", 8, 64), ("b16", 16, 32), ("l14", 8, 32), ("l14", 16, 16))
QUICK_SHAPES = (("tiny", 3, 2), ("b16", 2, 1))


def shapes(args) -> list[Shape]:
    """The shapes to run: --models/--frames/--batch (cross product) if given, else the full or quick set."""
    if args.models or args.frames or args.batch:
        models = args.models or (["tiny"] if args.quick else ["b16", "l14"])
        frames = args.frames or ([3] if args.quick else [8, 16])
        batch = args.batch or ([2] if args.quick else [16])
        return [Shape(MODELS[m], t, n) for m in models for t in frames for n in batch]
    table = QUICK_SHAPES if args.quick else FULL_SHAPES
    return [Shape(MODELS[m], t, n) for m, t, n in table]


# ------------------------------------------------------------------------------------- cases, providers

@dataclass
class Case:
    name: str
    make_inputs: Callable[[torch.device, torch.dtype, bool], dict]
    shape: Shape | None = None
    fwd_bytes: float | None = None
    bwd_bytes: float | None = None
    fwd_flops: float | None = None
    bwd_flops: float | None = None
    items: float | None = None
    items_unit: str = "items"
    params: dict = field(default_factory=dict)

    def work(self, mode: str) -> tuple[float | None, float | None]:
        """(bytes, flops) of one step in ``mode``."""
        def pick(fwd, bwd):
            if mode == "forward":
                return fwd
            if mode == "backward":
                return bwd
            return None if fwd is None or bwd is None else fwd + bwd
        return pick(self.fwd_bytes, self.bwd_bytes), pick(self.fwd_flops, self.bwd_flops)

    def shape_text(self) -> str:
        d = dict(self.shape.as_dict()) if self.shape is not None else {}
        d.update(self.params)
        return " ".join(f"{k}={v}" for k, v in d.items())


@dataclass
class Provider:
    name: str
    fn: Callable[..., Any]
    requires: Sequence[str] = ()
    compile: bool = False
    prepare: Callable[[dict], dict] | None = None
    skip_if: Callable[[Case, Any], str | None] | None = None
    compile_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def callable(self) -> Callable[..., Any]:
        """``fn``, compiled once per provider when ``compile`` (dynamo re-specialises per shape)."""
        if not self.compile:
            return self.fn
        return torch.compile(self.fn, **dict(self.compile_kwargs))


def with_triton_gemm(fn: Callable[..., Any], gemm: str) -> Callable[..., Any]:
    """``fn`` with UNIFORMERV2_TRITON_GEMM set to ``gemm`` ("triton", "cublas"; "" the default) on every call, for the
    providers that time the Triton backend's two GEMM plans side by side. Left set after the call: the
    backward that autograd runs after ``fn`` returns reads it too, and every such provider sets its own."""
    def wrapped(*args, **kwargs):
        os.environ["UNIFORMERV2_TRITON_GEMM"] = gemm
        return fn(*args, **kwargs)
    return wrapped


# --------------------------------------------------------------------------------- availability checks

def _device_type(args) -> str:
    return torch.device(args.device).type


@functools.lru_cache(maxsize=None)
def xformers_error() -> str | None:
    """Why xformers' memory_efficient_attention cannot be benchmarked here, or None."""
    try:
        import xformers.ops as xops  # noqa: F401
    except Exception as exc:
        return f"xformers is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not torch.cuda.is_available():
        return "xformers has no CPU path (needs a CUDA GPU)"
    try:
        q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as exc:
        return f"xformers does not run here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _requirement_reason(req: str, args) -> str | None:
    from uniformerv2_kernels import backends

    dev = _device_type(args)
    if req == "gpu":
        if dev != "cuda":
            return "needs a CUDA device (benchmarking on the CPU)"
        return None
    if req == "triton":
        err = backends._triton_import_error()
        if err:
            return err
        if dev == "cuda":
            return None
        if backends.triton_interpret():
            return None
        return ("Triton timing needs a CUDA GPU (pass --interpret to smoke-test the kernels on the CPU "
                "under TRITON_INTERPRET=1; those times mean nothing)")
    if req == "cuda_ext":
        if dev != "cuda":
            return "the CUDA extension needs a CUDA device"
        return backends.cuda_extension_error()
    if req.startswith("cuda_op:"):
        if dev != "cuda":
            return "the CUDA extension needs a CUDA device"
        err = backends.cuda_extension_error()
        if err:
            return err
        op = req.split(":", 1)[1]
        if not backends.has_cuda_op(op):
            return f"the built extension has no torch.ops.uniformerv2_cuda.{op}"
        return None
    if req == "xformers":
        return xformers_error()
    raise ValueError(f"unknown requirement {req!r}")


def provider_skip_reason(provider: Provider, case: Case | None, args) -> str | None:
    """The first reason ``provider`` cannot run ``case`` here, or None."""
    for req in provider.requires:
        reason = _requirement_reason(req, args)
        if reason:
            return reason
    if provider.skip_if is not None and case is not None:
        return provider.skip_if(case, args)
    return None


def _interpreted(provider: Provider, args) -> bool:
    return _device_type(args) == "cpu" and "triton" in provider.requires and os.environ.get(
        "TRITON_INTERPRET", "0") not in ("", "0")


# ---------------------------------------------------------------------------------------------- timing

def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], device, warmup: float = 25, rep: float = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None, min_reps: int = 1) -> float:
    """Median milliseconds of ``fn()``.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run, warm-up and repetition
    given in milliseconds, median), with ``rep`` raised so that at least ``min_reps`` runs are timed: a
    200 ms training step under ``rep=300`` is otherwise the median of one run (so were the first H100
    run's end-to-end training steps). CPU: wall clock (``time.perf_counter``), one warm-up call, then
    between 3 and 10 calls (as many as fit in ``rep`` ms), median.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        import triton.testing
        if min_reps > 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            rep = max(rep, 1.2 * min_reps * (time.perf_counter() - start) * 1e3)
        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                             return_mode="median"))

    def clear():
        for t in grad_to_none or ():
            t.grad = None

    clear()
    start = time.perf_counter()
    fn()
    estimate = (time.perf_counter() - start) * 1e3
    reps = int(min(CPU_MAX_REPS, max(CPU_MIN_REPS, rep / max(estimate, 1e-3))))
    times = []
    for _ in range(reps):
        clear()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    mid = len(times) // 2
    return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _leaves(inputs: dict) -> list[torch.Tensor]:
    found = []
    for t in _tensors(list(inputs.values())):
        if t.requires_grad and t.is_leaf:
            found.append(t)
    # parameters of modules passed as inputs
    for v in inputs.values():
        if isinstance(v, torch.nn.Module):
            found.extend(p for p in v.parameters() if p.requires_grad)
    return found


def _differentiable(out) -> list[torch.Tensor]:
    return [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]


def make_step(provider: Provider, inputs: dict, mode: str) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """A zero-argument callable that runs one step of ``mode`` (see the module docstring), and the leaf
    tensors whose ``.grad`` should be cleared between steps. Runs one forward (untimed) for the backward
    mode. Raises RuntimeError when the outputs have no autograd graph in a backward mode."""
    fn = provider.callable
    leaves = _leaves(inputs)
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(**inputs)
        return step, leaves

    def grads_for(outs):
        gen = torch.Generator(device=outs[0].device).manual_seed(1234)
        return [torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype) for o in outs]

    outs = _differentiable(fn(**inputs))
    if not outs:
        raise RuntimeError("the outputs need no gradient (inputs without requires_grad, or no autograd)")
    grads = grads_for(outs)
    if mode == "backward":
        def step():
            torch.autograd.backward(outs, grads, retain_graph=True)
        return step, leaves
    if mode == "forward+backward":
        del outs

        def step():
            outs = _differentiable(fn(**inputs))
            if len(outs) != len(grads):
                raise RuntimeError("forward+backward: the outputs lost their autograd graph")
            torch.autograd.backward(outs, grads)
        return step, leaves
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")


def peak_memory_mb(step, device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def host_time_ms(step, device, grad_to_none: Sequence[torch.Tensor] | None = None, reps: int = 15) -> float | None:
    """Median milliseconds the host spends in one ``step()`` call that starts on an idle GPU (CUDA only).

    A step that synchronises inside (``.item()``, a host copy) includes its GPU time here too."""
    if torch.device(device).type != "cuda":
        return None
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e3


def graph_time_ms(step, device, grad_to_none: Sequence[torch.Tensor] | None = None,
                  reps: int = 10) -> tuple[float | None, str | None]:
    """(median ms of ``step()`` replayed from a CUDA graph, None) on CUDA; (None, why) where it cannot be
    captured; (None, None) on the CPU. The step is warmed up twice on a side stream (as capture requires),
    captured once, and each timed replay follows an L2 flush, between CUDA events around the replay only."""
    if torch.device(device).type != "cuda":
        return None, None
    graph = None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                _clear_grads(grad_to_none or ())
                step()
        torch.cuda.current_stream().wait_stream(side)
        _clear_grads(grad_to_none or ())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device)
        times = []
        for _ in range(reps):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), None
    except Exception as exc:  # not capturable: say why, keep the row
        return None, _first_line(exc)
    finally:
        del graph
        _clear_grads(grad_to_none or ())
        torch.cuda.synchronize()


# Failures a "backward by difference" retry must not swallow: out of memory, and a sticky CUDA fault
# (torch.AcceleratorError, e.g. an illegal address, where torch has it).
DEVICE_ERRORS = tuple(e for e in (torch.cuda.OutOfMemoryError, getattr(torch, "AcceleratorError", None)) if e)


def _clear_grads(leaves) -> None:
    for t in leaves:
        t.grad = None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def measure(provider: Provider, case: Case, mode: str, args, inputs: dict | None = None) -> dict:
    """One row: status ok / skipped / error, ms, GB/s, TFLOP/s, items/s, peak memory, first-call time."""
    row = new_row(provider.name, case, mode, args)
    reason = provider_skip_reason(provider, case, args)
    if reason:
        row.update(status="skipped", note=reason)
        return row
    note = []
    if _interpreted(provider, args):
        note.append("TRITON_INTERPRET: smoke test, not a timing")
    try:
        if inputs is None:
            inputs = case.make_inputs(args.device, args.dtype, mode != "forward")
        if provider.prepare is not None:
            inputs = provider.prepare(inputs)
        t0 = time.perf_counter()
        step, leaves = make_step(provider, inputs, mode)
        fallback = False
        try:
            step()
            if mode == "backward":  # some backwards free what they saved: a second run on one graph fails
                step()
            synchronize(args.device)
        except RuntimeError as exc:
            if mode != "backward" or isinstance(exc, DEVICE_ERRORS):
                raise
            fallback = True  # e.g. torch.compile's donated buffers refuse retain_graph=True
        row["first_ms"] = (time.perf_counter() - t0) * 1e3
        if fallback:
            fb_step, _ = make_step(provider, inputs, "forward+backward")
            fwd_inputs = inputs

            def fwd_step():
                return provider.callable(**fwd_inputs)

            t_fb = time_fn(fb_step, args.device, args.warmup, args.rep, leaves)
            t_f = time_fn(fwd_step, args.device, args.warmup, args.rep, leaves)
            if t_fb <= t_f:  # timing noise; a clamped difference would report absurd GB/s
                raise RuntimeError(f"backward by difference is not positive: fwd+bwd {t_fb:.3g} ms <= "
                                   f"fwd {t_f:.3g} ms")
            ms = t_fb - t_f
            note.append("backward = time(fwd+bwd) - time(fwd with autograd)")
            _clear_grads(leaves)  # the peak of one step, not one step plus the last timed run's gradients
            row["peak_mb"] = peak_memory_mb(fb_step, args.device)
        else:
            ms = time_fn(step, args.device, args.warmup, args.rep, leaves)
            row["host_ms"] = host_time_ms(step, args.device, leaves)
            _clear_grads(leaves)
            row["peak_mb"] = peak_memory_mb(step, args.device)
            row["gpu_ms"], why = (None, None) if getattr(args, "no_gpu_ms", False) else graph_time_ms(
                step, args.device, leaves)
            if why:
                note.append(f"no GPU ms: {why}")
        del step
    except Exception as exc:  # keep going: one broken provider must not hide the others
        if getattr(args, "strict", False):
            raise
        row.update(status="error", note=_first_line(exc))
        if getattr(args, "verbose", False):
            traceback.print_exc()
        return row
    finally:
        inputs = None
        gc.collect()
        if torch.device(args.device).type == "cuda":
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001 - a kernel fault poisons the CUDA context for good
                args.cuda_lost = _first_line(exc)
                row.update(status="error", note=f"{_first_line(exc)} (CUDA context lost: later rows cannot run)")
                return row  # noqa: B012 - this row names the culprit; the caller stops and saves
    nbytes, flops = case.work(mode)
    row.update(status="ok", ms=ms, note="; ".join(note))
    if nbytes:
        row["bytes"] = nbytes
        row["gbps"] = nbytes / (ms * 1e-3) / 1e9
    if flops:
        row["flops"] = flops
        row["tflops"] = flops / (ms * 1e-3) / 1e12
    if case.items:
        row["items_per_s"] = case.items / (ms * 1e-3)
    return row


# ----------------------------------------------------------------------------------------- environment

def _git(*cmd) -> str | None:
    try:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except Exception:
        return None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:  # a copy of the tree without .git (e.g. on a lent GPU machine): the caller may say it
        return os.environ.get("GIT_COMMIT", "").strip() or "unknown"
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("-dirty" if dirty else "")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=None)
def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return out.strip().splitlines()[0]
    except Exception:
        return ""


def env_record(device) -> dict:
    """Date, device, versions and commit, as stored with every result row."""
    dev = torch.device(device)
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "none"
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        device_name = torch.cuda.get_device_name(idx)
    else:
        device_name = f"CPU {_cpu_name()} ({os.cpu_count()} threads visible, torch uses {torch.get_num_threads()})"
    try:
        import xformers
        xformers_version = xformers.__version__
    except Exception:
        xformers_version = "none"
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "none",
        "driver": _driver_version() if dev.type == "cuda" else "",
        "xformers": xformers_version,
        "python": platform.python_version(),
        "commit": git_commit(),
        "host": platform.node(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }


def device_tag(device) -> str:
    """Short file-name tag: cpu, h100, h200, a100, or the GPU's name in lower case."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    for known in ("h200", "h100", "a100", "l40s", "a10g", "l4", "v100", "t4"):
        if known in name.lower():
            return known
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


# -------------------------------------------------------------------------------------------- records

CSV_COLUMNS = (
    "date", "bench", "case", "shape", "mode", "provider", "status", "ms", "gbps", "tflops", "items_per_s",
    "items_unit", "peak_mb", "first_ms", "host_ms", "gpu_ms", "speedup", "bytes", "flops", "dtype", "quick", "note",
    "device", "torch", "triton", "cuda", "driver", "xformers", "python", "commit", "host", "triton_interpret",
)

_ENV: dict = {}


def new_row(provider: str, case: Case, mode: str, args) -> dict:
    if not _ENV:
        _ENV.update(env_record(args.device))
    row = {c: None for c in CSV_COLUMNS}
    row.update(_ENV)
    row.update(bench=getattr(args, "bench_name", ""), case=case.name, shape=case.shape_text(), mode=mode,
               provider=provider, dtype=str(args.dtype).replace("torch.", ""), quick=bool(args.quick),
               items_unit=case.items_unit if case.items else None)
    return row


def is_timing(row: dict) -> bool:
    """An ok row that is a real timing (not a Triton-interpreter smoke run)."""
    return row["status"] == "ok" and not (row.get("note") or "").startswith("TRITON_INTERPRET")


def add_speedups(rows: list[dict], baseline: str) -> None:
    base = {(r["case"], r["mode"]): r["ms"] for r in rows if r["provider"] == baseline and is_timing(r)}
    for r in rows:
        b = base.get((r["case"], r["mode"]))
        if is_timing(r) and b:
            r["speedup"] = b / r["ms"]


def append_csv(rows: Sequence[dict], path: str) -> None:
    """Appends rows to ``path``; a file with another header is moved aside (``.old-<date>``) first."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if os.path.exists(path):
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(CSV_COLUMNS):
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            os.replace(path, f"{path}.old-{stamp}")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in CSV_COLUMNS})


def _csv_value(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return "" if v is None else v


def _fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.{digits + 1}g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def format_table(rows: Sequence[dict], markdown: bool = False) -> str:
    """The result table (ok and error rows; skipped providers are listed once below it, with reasons)."""
    shown = [r for r in rows if r["status"] != "skipped"]
    has = {k: any(r.get(k) is not None for r in shown)
           for k in ("gbps", "tflops", "items_per_s", "host_ms", "gpu_ms", "speedup")}
    on_gpu = any(r.get("peak_mb") is not None for r in shown)
    units = sorted({r["items_unit"] for r in shown if r.get("items_unit")})
    header = ["case", "mode", "provider", "ms"]
    if has["gbps"]:
        header.append("GB/s")
    if has["tflops"]:
        header.append("TFLOP/s")
    if has["items_per_s"]:
        header.append(f"{'/'.join(units) or 'items'}/s")
    header += ["peak MiB", "first ms"]
    if has["host_ms"]:
        header.append("host ms")
    if has["gpu_ms"]:
        header.append("GPU ms")
    if has["speedup"]:
        header.append("speed-up")
    header.append("note")
    lines = []
    for r in shown:
        ok = r["status"] == "ok"
        cells = [r["case"], r["mode"], r["provider"], _fmt(r["ms"]) if ok else r["status"]]
        if has["gbps"]:
            cells.append(_fmt(r.get("gbps")))
        if has["tflops"]:
            cells.append(_fmt(r.get("tflops")))
        if has["items_per_s"]:
            cells.append(_fmt(r.get("items_per_s")))
        cells.append(_fmt(r.get("peak_mb"), 4) if r.get("peak_mb") is not None else ("n/a" if not on_gpu else ""))
        cells.append(_fmt(r.get("first_ms")))
        if has["host_ms"]:
            cells.append(_fmt(r.get("host_ms")))
        if has["gpu_ms"]:
            cells.append(_fmt(r.get("gpu_ms")))
        if has["speedup"]:
            cells.append(f"{r['speedup']:.2f}x" if r.get("speedup") else "")
        cells.append(r.get("note") or "")
        lines.append([str(c) for c in cells])
    skipped = {}
    for r in rows:
        if r["status"] == "skipped":
            skipped.setdefault((r["provider"], r["note"]), []).append(r["case"])
    out = []
    if markdown:
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + "|".join(" --- " for _ in header) + "|")
        out += ["| " + " | ".join(c.replace("|", "/") for c in cells) + " |" for cells in lines]
    else:
        widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(header)]
        widths[-1] = 0  # the note column is not padded
        out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        out.append("  ".join("-" * max(w, 4) for w in widths).rstrip())
        out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in lines]
    if not lines:
        out.append("(no provider could run)")
    for (prov, why), cases in skipped.items():
        where = "all cases" if len(set(cases)) == len({r["case"] for r in rows}) else ", ".join(dict.fromkeys(cases))
        out.append(("- " if markdown else "") + f"skipped {prov} ({where}): {why}")
    return "\n".join(out)


def env_header(rows: Sequence[dict], markdown: bool = True) -> str:
    if not rows:
        return ""
    r = rows[0]
    fields = ["date", "device", "torch", "triton", "cuda", "driver", "xformers", "python", "commit", "dtype", "quick"]
    text = ", ".join(f"{k} {r[k]}" for k in fields if r.get(k) not in (None, ""))
    if r.get("triton_interpret") not in (None, "", "0"):
        text += ", TRITON_INTERPRET=1 (Triton rows are smoke tests, not timings)"
    if not any(x.get("peak_mb") is not None for x in rows):
        text += ", peak memory n/a on CPU"
    return text


def plot(rows: Sequence[dict], path: str, title: str) -> str | None:
    """One bar chart per mode: median ms per case, one bar per provider (interpreter smoke runs left out).
    Returns the path, or None."""
    ok = [r for r in rows if is_timing(r)]
    if not ok:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in ok))
    cases = list(dict.fromkeys(r["case"] for r in ok))
    provs = list(dict.fromkeys(r["provider"] for r in ok))
    fig, axes = plt.subplots(1, len(modes), figsize=(max(5.0, 1.2 * len(cases) * len(provs) ** 0.5) * len(modes), 4.2),
                             squeeze=False)
    width = 0.8 / max(len(provs), 1)
    for ax, mode in zip(axes[0], modes):
        for j, p in enumerate(provs):
            ys = []
            for c in cases:
                hit = [r["ms"] for r in ok if r["mode"] == mode and r["provider"] == p and r["case"] == c]
                ys.append(hit[0] if hit else float("nan"))
            ax.bar([i + (j - (len(provs) - 1) / 2) * width for i in range(len(cases))], ys, width, label=p)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("median ms (lower is better)")
        ax.set_title(mode)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    r = ok[0]
    fig.suptitle(f"{title} — {r['device']}, {r['dtype']}, torch {r['torch']}, commit {r['commit']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ the driver

def parse_args(description: str = "", argv: Sequence[str] | None = None,
               extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    p.add_argument("--mode", default="all", help="comma list: forward, backward, forward+backward (fwd, bwd, fwd+bwd), all")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the default on CPU)")
    p.add_argument("--full", action="store_true", help="real shapes even on CPU (slow)")
    p.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",") if m.strip()], default=None,
                   help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--frames", type=lambda s: [int(x) for x in s.split(",")], default=None, help="comma list of T")
    p.add_argument("--batch", type=lambda s: [int(x) for x in s.split(",")], default=None, help="comma list of N (clips)")
    p.add_argument("--providers", default=None, help="comma list of providers to run (default: all)")
    p.add_argument("--out", default=None,
                   help="directory for the CSV, markdown table and plot (default benchmarks/out, git-ignored)")
    p.add_argument("--results", action="store_true",
                   help="write to benchmarks/results (the committed results) instead of --out")
    p.add_argument("--no-save", action="store_true", help="print the table only")
    p.add_argument("--warmup", type=float, default=25.0, help="warm-up, ms (do_bench on CUDA)")
    p.add_argument("--rep", type=float, default=100.0, help="repetition budget, ms")
    p.add_argument("--no-gpu-ms", action="store_true",
                   help="skip the GPU ms column (the CUDA-graph replay of each step)")
    p.add_argument("--strict", action="store_true", help="re-raise provider errors instead of recording them")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of provider errors")
    p.add_argument("--interpret", action="store_true",
                   help="run Triton providers on the CPU under TRITON_INTERPRET=1 (a smoke test, not a timing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1, so timings on a shared machine are stable; "
                        "0 keeps torch's default)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    if args.results and args.out:
        p.error("--results and --out: give one (--results writes to benchmarks/results)")
    args.out = RESULTS_DIR if args.results else (args.out or DEFAULT_OUT)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    if args.dtype == "auto":
        args.dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    else:
        if args.dtype not in DTYPES:
            p.error(f"--dtype {args.dtype!r}: expected one of {sorted(DTYPES)}")
        args.dtype = DTYPES[args.dtype]
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    modes = []
    for m in args.mode.split(","):
        m = m.strip().lower()
        if m == "all":
            modes += list(MODES)
        elif m in _MODE_ALIASES:
            modes.append(_MODE_ALIASES[m])
        elif m:
            p.error(f"--mode {m!r}: expected one of {MODES} (or fwd, bwd, fwd+bwd, all)")
    args.modes = list(dict.fromkeys(modes))
    args.quick = bool(args.quick or (args.device.type == "cpu" and not args.full))
    if args.models:
        unknown = [m for m in args.models if m not in MODELS]
        if unknown:
            p.error(f"--models: unknown {unknown}; expected {list(MODELS)}")
    args.providers = [x.strip() for x in args.providers.split(",")] if args.providers else None
    if args.threads is None:
        args.threads = 1 if args.device.type == "cpu" else 0
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return args


def run_benchmark(name: str, cases: Sequence[Case], providers: Sequence[Provider], args,
                  title: str | None = None, baseline: str | None = None) -> list[dict]:
    """Runs every case x mode x provider; prints the table; saves CSV, markdown and plot unless --no-save."""
    args.bench_name = name
    title = title or name
    if args.providers:
        unknown = set(args.providers) - {p.name for p in providers}
        if unknown:
            raise SystemExit(f"--providers: unknown {sorted(unknown)}; this benchmark has {[p.name for p in providers]}")
        providers = [p for p in providers if p.name in args.providers]
    baseline = baseline or (providers[0].name if providers else None)
    rows = []
    # Each row also goes to <name>.partial.csv as soon as it is measured, so a run cut short (a timeout on
    # a lent machine) keeps what it measured; the complete run replaces it by the rows in <name>.csv.
    partial = None if args.no_save else os.path.join(args.out, f"{name}.partial.csv")
    if partial and os.path.exists(partial):
        os.remove(partial)
    args.cuda_lost = None
    for case in cases:
        # Fresh dynamo caches per case: the compile providers get static graphs for each shape instead of
        # hitting the recompile limit (8 per function) across shapes and grad modes, after which dynamo
        # silently runs the eager code under the "compile" label.
        torch._dynamo.reset()
        for mode in args.modes:
            for prov in providers:
                torch.manual_seed(args.seed)
                row = measure(prov, case, mode, args)
                rows.append(row)
                if partial:
                    append_csv([row], partial)
                status = f"{row['ms']:.4g} ms" if row["status"] == "ok" else f"{row['status']}: {row['note']}"
                print(f"  [{name}] {case.name} | {mode} | {prov.name}: {status}", file=sys.stderr, flush=True)
                if args.cuda_lost:
                    break
            if args.cuda_lost:
                break
        if args.cuda_lost:
            print(f"  [{name}] stopping: {args.cuda_lost}; saving the rows measured so far", file=sys.stderr)
            break
    if baseline:
        add_speedups(rows, baseline)
    print(f"\n## {title}\n{env_header(rows)}\n")
    print(format_table(rows))
    print()
    if not args.no_save and rows:
        save(name, rows, args, title)
    if partial and os.path.exists(partial):
        os.remove(partial)
    if args.cuda_lost:
        raise SystemExit(3)
    return rows


def save(name: str, rows: Sequence[dict], args, title: str | None = None, table: str | None = None) -> None:
    """Appends to <out>/<name>.csv; writes <out>/<table or name>_<devtag>.md and .png (devtag: cpu, h100,
    ...; ``_quick`` added for --quick runs)."""
    title = title or name
    tag = device_tag(args.device) + ("_quick" if args.quick else "")
    csv_path = os.path.join(args.out, f"{name}.csv")
    append_csv(rows, csv_path)
    md_path = os.path.join(args.out, f"{table or name}_{tag}.md")
    with open(md_path, "w") as f:
        f.write(f"# {title}\n\n{env_header(rows)}\n\n{format_table(rows, markdown=True)}\n")
    try:
        png = plot(rows, os.path.join(args.out, f"{table or name}_{tag}.png"), title)
    except Exception as exc:  # a plot must never cost the numbers
        png = None
        print(f"plot failed: {_first_line(exc)}", file=sys.stderr)
    print(f"saved: {csv_path} (appended), {md_path}" + (f", {png}" if png else ""))


# ------------------------------------------------------------------------- reading results back (CLI)

_NUMERIC = ("ms", "gbps", "tflops", "items_per_s", "peak_mb", "first_ms", "host_ms", "gpu_ms", "speedup", "bytes",
            "flops")


def read_csv(path: str) -> list[dict]:
    """Rows of a results CSV with the numeric columns as floats (empty -> None)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in CSV_COLUMNS:
            r.setdefault(k, None)
            if r[k] == "":
                r[k] = None
        for k in _NUMERIC:
            if r[k] is not None:
                r[k] = float(r[k])
        r["quick"] = r["quick"] == "True"
    return rows


def summarize(paths: Sequence[str], all_runs: bool = False) -> str:
    """Markdown: for each CSV (``<name>.csv`` or ``<name>.partial.csv``), the rows of its latest run per
    device (every run with ``all_runs``), each with its environment header."""
    parts = []
    for path in paths:
        rows = read_csv(path)
        if not rows:
            continue
        name = os.path.basename(path)[: -len(".csv")]
        for device in dict.fromkeys(r["device"] for r in rows):
            mine = [r for r in rows if r["device"] == device]
            dates = list(dict.fromkeys(r["date"] for r in mine)) if all_runs else [max(r["date"] for r in mine)]
            for date in dates:
                run = [r for r in mine if r["date"] == date]
                cut = " (PARTIAL: the run was cut short)" if name.endswith(".partial") else ""
                parts.append(f"### {name}{cut}\n\n{env_header(run)}\n\n{format_table(run, markdown=True)}\n")
    return "\n".join(parts) if parts else "(no results)\n"


# provider kept to be timed against another on one GPU -> the provider it may replace (benchmarks/README.md)
VARIANTS = {
    "triton-triton-gemm": "triton",
    "fused-triton-gemm": "fused",
    # the same comparison in runs before cuBLAS became the default GEMM plan (results of 2026-11-25/26)
    "triton-cublas-gemm": "triton",
    "fused-cublas-gemm": "fused",
}


def compare_variants(paths: Sequence[str]) -> str:
    """Markdown: for the latest run per device of each CSV, every variant provider (``VARIANTS``) beside the
    default it may replace, per case and mode: ms and GPU ms of both and variant / default (below 1: the
    variant is faster). The decision the GPU run is for; GPU ms ranks kernels even where ms is host-bound."""
    lines = ["| bench | case | mode | variant | default ms | variant ms | ratio | default GPU ms | variant GPU ms "
             "| GPU ratio |", "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for path in paths:
        rows = [r for r in read_csv(path) if r["status"] == "ok"]
        for device in dict.fromkeys(r["device"] for r in rows):
            mine = [r for r in rows if r["device"] == device]
            latest = max(r["date"] for r in mine)
            run = {(r["case"], r["mode"], r["provider"]): r for r in mine if r["date"] == latest}
            for (case, mode, prov), r in run.items():
                base = run.get((case, mode, VARIANTS.get(prov, "")))
                if prov not in VARIANTS or base is None:
                    continue

                def ratio(key):
                    return f"{r[key] / base[key]:.2f}" if r.get(key) and base.get(key) else ""
                lines.append(f"| {r['bench']} | {case} | {mode} | {prov} | {_fmt(base['ms'])} | {_fmt(r['ms'])} | "
                             f"{ratio('ms')} | {_fmt(base.get('gpu_ms'))} | {_fmt(r.get('gpu_ms'))} | "
                             f"{ratio('gpu_ms')} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else "(no variant rows)\n"


def merge(src: str, dest: str = RESULTS_DIR) -> list[str]:
    """Adds the results of a run made elsewhere (e.g. the GPU suite's results folder) to ``dest``: CSV rows
    appended to ``dest/<name>.csv`` (partial files included, under their own name), markdown tables and
    plots copied. Returns the files written."""
    import shutil

    written = []
    os.makedirs(dest, exist_ok=True)
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry.endswith(".csv"):
            rows = read_csv(path)
            target = os.path.join(dest, entry)
            append_csv(rows, target)
            written.append(target)
        elif entry.endswith((".md", ".png")):
            shutil.copy2(path, os.path.join(dest, entry))
            written.append(os.path.join(dest, entry))
    return written


def _cli(argv=None) -> None:
    p = argparse.ArgumentParser(description="Read benchmark results back: summarize CSVs, or merge a "
                                            "results folder (e.g. from the GPU suite) into benchmarks/results.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="print a markdown summary of the latest run in each CSV")
    s.add_argument("paths", nargs="+", help="CSV files or folders holding them")
    s.add_argument("--all", action="store_true", help="every run in each CSV, not only the latest per device")
    v = sub.add_parser("variants", help="each variant provider beside the default it may replace (ms, GPU ms)")
    v.add_argument("paths", nargs="+", help="CSV files or folders holding them")
    m = sub.add_parser("merge", help="append CSV rows and copy tables/plots from SRC into DEST")
    m.add_argument("src")
    m.add_argument("dest", nargs="?", default=RESULTS_DIR)
    a = p.parse_args(argv)
    if a.cmd in ("summarize", "variants"):
        files = []
        for path in a.paths:
            if os.path.isdir(path):
                files += sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".csv"))
            else:
                files.append(path)
        print(summarize(files, all_runs=a.all) if a.cmd == "summarize" else compare_variants(files))
    else:
        for path in merge(a.src, a.dest):
            print(path)


if __name__ == "__main__":
    _cli()
