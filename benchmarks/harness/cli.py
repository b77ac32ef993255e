"""The command line every benchmark script shares (``parse_args``), the driver that runs a script's cases
(``run_benchmark``), and ``python benchmarks/harness summarize|variants|merge``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

import torch

from .environment import DEFAULT_OUT, RESULTS_DIR
from .merging import merge
from .records import add_speedups, append_csv, compare_variants, env_header, format_table, save, summarize
from .shapes import MODELS, MODES, Case, Provider
from .timing import measure

_MODE_ALIASES = {
    "forward": "forward", "fwd": "forward", "f": "forward",
    "backward": "backward", "bwd": "backward", "b": "backward",
    "forward+backward": "forward+backward", "fwd+bwd": "forward+backward", "fwdbwd": "forward+backward",
    "fb": "forward+backward", "train": "forward+backward",
}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64, "float64": torch.float64}


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
