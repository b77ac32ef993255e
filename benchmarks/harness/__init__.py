"""Shared benchmark harness: every ``benchmarks/bench_*.py`` script uses it, so they all behave the same.

A package along its seams: ``shapes`` (model sizes, modes, ``Case``, ``Provider``), ``requirements`` (whether a
provider can run here), ``timing`` (time, host time, GPU time, memory; ``measure``), ``environment`` (folders,
commit, device, versions), ``records`` (rows, CSV, tables, plots, summaries), ``merging`` (adding a run made
elsewhere), ``cli`` (``parse_args``, ``run_benchmark``, ``python benchmarks/harness summarize|variants|merge``).
Everything below is importable from the package itself.

API (import with ``import harness as H`` or ``from harness import ...``, with ``benchmarks/`` on ``sys.path``
as the scripts put it; scripts run as ``python benchmarks/bench_<op>.py``)
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
    ``"xformers"`` (xformers imports and its memory_efficient_attention runs on CUDA), ``"inductor"`` (the
    fused ops' inductor backend can run: torch.compile here, Triton for CUDA; on the CPU only when
    ``--providers`` names ``inductor``, its C++ compile taking tens of seconds per shape). ``compile=True``
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

import os
import sys

# --interpret must take effect before any Triton kernel module is imported (triton.jit reads the variable
# when the kernel is defined), and scripts import the harness first.
if "--interpret" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"

from .environment import (DEFAULT_OUT, REPO_ROOT, RESULTS_DIR, _cpu_name, device_tag, env_record,  # noqa: E402
                          git_commit)

if REPO_ROOT not in sys.path:  # so the scripts run from a checkout even when the package is not installed
    sys.path.insert(0, REPO_ROOT)

from .cli import DTYPES, _cli, parse_args, run_benchmark  # noqa: E402
from .merging import merge  # noqa: E402
from .records import (CSV_COLUMNS, VARIANTS, _first_line, _fmt, add_speedups, append_csv,  # noqa: E402
                      compare_variants, env_header, format_table, is_timing, new_row, plot, read_csv, save,
                      summarize)
from .requirements import provider_skip_reason, xformers_error  # noqa: E402
from .shapes import (FULL_SHAPES, MODELS, MODES, QUICK_SHAPES, Case, ModelDims, Provider, Shape,  # noqa: E402
                     shapes, with_triton_gemm)
from .timing import (CPU_MAX_REPS, CPU_MIN_REPS, DEVICE_ERRORS, graph_time_ms, host_time_ms,  # noqa: E402
                     make_step, measure, peak_memory_mb, synchronize, time_fn)
