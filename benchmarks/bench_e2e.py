"""End-to-end UniFormerV2 throughput (clips/s) and peak memory: inference and a training step.

The comparison a user makes (issue 20): the official per-GPU batch, eager PyTorch against torch.compile
against the fused model, each way a user would run it.

Providers (one freshly built model each, same seed, so the same weights):
- ``eager``:           the reference model, ``uniformerv2.build_model(name, fused=False)``
- ``compile``:         the reference model under ``torch.compile`` (default mode; ``--compile-mode`` changes it)
- ``compile-max-autotune``: the reference model under ``torch.compile(mode="max-autotune")``. The faster
                       of the two compile rows of a case is "the best compile row" the ratios refer to
- ``fused``:           ``build_model(name, fused=True)``: the default fused path, nothing else set (the fused
                       ops on the backend the registry picks: cuda, else triton, else the reference backend)
- ``fused+compile``:   the fused model under ``torch.compile`` (same mode as ``compile``); the ops are
                       torch.library operators with fake kernels, so the graph has no break and inductor
                       fuses the glue between them
- ``fused+compile-reduce-overhead``: the same with ``mode="reduce-overhead"`` (inductor's CUDA graphs)
- ``fused-cuda``:      the fused model asked for the CUDA C++ kernels (the spatial attention on Triton)
- ``fused+inductor-ffn``: ``fused`` with the FFN on its inductor backend (``backend={"fused_ffn": "inductor"}``:
                       torch.compile of the FFN's reference inside the otherwise eager fused model, the other
                       ops as in ``fused``): the end-to-end half of deciding whether inductor owns the FFN
                       (``OP_BACKENDS`` holds such providers; ``--compile-backend`` applies to them too)
- ``fused-triton-gemm``: ``fused`` with UNIFORMERV2_TRITON_GEMM=triton (the Triton backend's GEMMs with
                       fused epilogues as one autotuned Triton kernel each, instead of the default cuBLAS +
                       a Triton epilogue pass; kept to be timed against the default on each GPU)
- ``fused+graph``:     CUDA only: the fused model replayed from a CUDA graph. Inference: through
                       ``uniformerv2.cuda_graph.GraphedInference`` (what ``eval.cuda_graph=true`` runs;
                       copying the batch in and the logits out included). Training: what ``train.cuda_graph=true``
                       runs, the forward, loss and backward replayed through
                       ``uniformerv2.cuda_graph.GraphedTrainStep`` and the AdamW step eager

Tasks (``--mode``: ``forward`` = inference, ``forward+backward`` = training step; ``backward`` is not a
thing end-to-end and is ignored):
- inference: ``model.eval()``, ``torch.no_grad()``, ``logits = model(x)``.
- training step: ``model.train()``, ``loss = cross_entropy(model(x), labels)``, ``loss.backward()``,
  ``optimizer.step()`` (AdamW, fused on CUDA, foreach on CPU), ``optimizer.zero_grad(set_to_none=True)``.
Precision (``--precision``): ``autocast`` (default: fp32 weights, ``torch.autocast`` in --dtype when it
is not fp32; the official training recipe) or ``cast`` (``model.to(dtype)``, pure low-precision weights;
typical for inference).

Cases. Without --quick and --batch: the official per-GPU batches (``OFFICIAL_CASES``): Kinetics B/16 8x224
training at 32 clips, Sth-Sth B/16 16x224 training at 32 clips (16 videos x 2 repeated augmentations: 32
clips per step), Kinetics B/16 inference at 64 clips, Kinetics L/14 8x224 training at 16 clips; ``--mode``
and ``--configs`` pick among them (a configuration without an official batch runs at 16). With ``--batch``:
every ``--configs`` (default: the two B/16 ones) x ``--batch`` x task. On the CPU, --quick (the default there) uses ``tiny`` in a Kinetics-style and a
Sth-Sth-style variant, 32x32 input, 8 frames, batch 2. ``--frames`` sets the input frames (t_size).

Columns: ``ms`` = median wall time of one step; ``clips/s`` = N / (ms * 1e-3) with N clips per step;
``first ms`` = the first call (compilation, autotuning or graph capture included); ``host ms`` (CUDA) =
the host's time in one step call started on an idle GPU (it includes any wait on a full launch queue);
``GPU ms`` (CUDA) = the time the GPU was busy running kernels in one step (torch.profiler, union of kernel
intervals), so ``ms - GPU ms`` is GPU idle time: a step with GPU ms well under ms waits on the host.
``TFLOP/s`` = model FLOPs / time, the FLOPs counted once by ``torch.utils.flop_counter.FlopCounterMode`` on
the reference model for the same input (matrix products, convolutions, attention; 2 per multiply-add;
forward for inference, forward + backward for training; elementwise work not counted), so every provider is
credited the same work. Peak memory: ``torch.cuda.max_memory_allocated`` over one step (weights, optimizer
state and activations), CUDA only. After the table, the comparison (``comparison_markdown``): per case every
row's time against eager and against the best compile row, wall and GPU.

On CPU with --quick the compile providers (and ``OP_BACKENDS``' inductor rows) are skipped unless named in
--providers (compiling a whole model, training graph included, takes minutes on a small CPU);
``--compile-backend aot_eager`` runs them without code generation (a check that the paths run, not a timing of
inductor).

    python benchmarks/bench_e2e.py                       # CPU: quick, well under a minute
    python benchmarks/bench_e2e.py --device cuda         # GPU: the official batches, every provider
    python benchmarks/bench_e2e.py --configs k400_b16_f8x224 --batch 32 --mode fwd   # GPU inference
    python benchmarks/bench_e2e.py --report benchmarks/results/e2e.csv   # the comparison of recorded rows
"""

from __future__ import annotations

import os
import sys
import time
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402  (sets TRITON_INTERPRET for --interpret before triton is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from uniformerv2_kernels import settings  # noqa: E402  (imports no Triton)

QUICK_CONFIGS = {
    # name shown -> (preset, overrides)
    "tiny_k400": ("tiny", dict(temporal_downsample=False, no_lmhra=True, double_lmhra=False)),
    "tiny_ssv2": ("tiny", {}),
}
FULL_CONFIGS = ("k400_b16_f8x224", "ssv2_b16_f16x224")
PROVIDERS = ("eager", "compile", "compile-max-autotune", "fused", "fused+compile", "fused+compile-reduce-overhead",
             "fused-cuda", "fused+inductor-ffn", "fused-triton-gemm", "fused+graph")
# provider -> the torch.compile mode it forces (None: --compile-mode, torch's default when not given)
COMPILE_MODES = {"compile": None, "compile-max-autotune": "max-autotune", "fused+compile": None,
                 "fused+compile-reduce-overhead": "reduce-overhead"}
# the rows "the best compile row" is chosen from: torch.compile of the reference model
REFERENCE_COMPILE = ("compile", "compile-max-autotune")
# provider -> the model's per-op backends (uniformerv2_kernels.selection.OPS names; the other ops automatic)
OP_BACKENDS = {"fused+inductor-ffn": {"fused_ffn": "inductor"}}
TASKS = {"forward": "inference", "forward+backward": "train"}
TRITON_GEMM_AT_START = settings.triton_gemm()  # the fused providers' GEMM plan, as set when the run started


class E2ECase(NamedTuple):
    label: str        # shown in the case column
    preset: str       # uniformerv2.list_models() name
    overrides: dict   # build_model keyword arguments
    batch: int        # clips per step
    task: str         # "train" or "inference"
    note: str = ""    # how the batch is made up, where it is not plain clips


# The official per-GPU batches (issue 20): the recipes' per-GPU batch sizes
OFFICIAL_CASES = (
    E2ECase("k400_b16_f8x224", "k400_b16_f8x224", {}, 32, "train"),
    E2ECase("ssv2_b16_f16x224", "ssv2_b16_f16x224", {}, 32, "train", "16 videos x 2 repeated augmentations"),
    E2ECase("k400_b16_f8x224", "k400_b16_f8x224", {}, 64, "inference"),
    E2ECase("k400_l14_f8x224", "k400_l14_f8x224", {}, 16, "train"),
)


def extra_args(p):
    p.add_argument("--configs", default=None,
                   help="comma list of uniformerv2.list_models() names (default: tiny variants on CPU, "
                        "the official batches on GPU)")
    p.add_argument("--precision", choices=("autocast", "cast"), default="autocast",
                   help="autocast: fp32 weights + torch.autocast(dtype); cast: model.to(dtype)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compile and fused+compile providers (default: torch's)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (aot_eager: no code generation, to check the paths on a CPU)")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count (one extra reference run per case)")
    p.add_argument("--timeline", metavar="OUT_MD", help="after timing, profile one more step of each provider "
                   "with torch.profiler (host vs GPU-busy time, the kernels that took the most GPU time) and "
                   "append the sections to OUT_MD")
    p.add_argument("--table", default="e2e",
                   help="name of the markdown table / plot / partial CSV (rows always go to e2e.csv); the GPU "
                        "suite's compile step uses e2e_compile so it does not overwrite the first table")
    p.add_argument("--report", nargs="+", metavar="CSV",
                   help="measure nothing: print the comparison of the rows in these e2e CSVs (per case and "
                        "provider the latest row of the latest commit on each device)")


def resolve_cases(args, tasks: list[str]) -> list[E2ECase]:
    """The cases to run, in order. Not --quick and no --batch: a configuration of ``OFFICIAL_CASES`` runs
    its official batches (every one, or those of --configs), any other one batch 16; else every
    configuration x --batch (default: 2 with --quick, 16) x task."""
    if args.configs:
        names = [c.strip() for c in args.configs.split(",") if c.strip()]
    elif args.quick:
        names = list(QUICK_CONFIGS)
    else:
        names = list(dict.fromkeys(c.preset for c in OFFICIAL_CASES)) if not args.batch else list(FULL_CONFIGS)
    official = [c for c in OFFICIAL_CASES if c.label in names and c.task in tasks]
    if not args.quick and not args.batch:
        names = [n for n in names if n not in {c.label for c in OFFICIAL_CASES}]
    else:
        official = []
    batches = args.batch or ([2] if args.quick else [16])
    grid = [E2ECase(name, *(QUICK_CONFIGS[name] if name in QUICK_CONFIGS else (name, {})), batch, task)
            for name in names for batch in batches for task in tasks]
    return official + grid


def build(preset: str, overrides: dict, frames: int | None, fused: bool, args, seed: int):
    import uniformerv2

    torch.manual_seed(seed)
    model = uniformerv2.build_model(preset, num_frames=frames, fused=fused, **overrides)
    model = model.to(args.device)
    if args.precision == "cast" and args.dtype != torch.float32:
        model = model.to(args.dtype)
    return model


def randomise_buffers(model: torch.nn.Module) -> None:
    """DESIGN 5: no zero-initialised state, BN running statistics included (zero-inits also make some
    branches vanish, which could make a fused path look faster than real weights would)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0 or float(p.abs().max()) == 0.0:
                p.normal_(0.0, 0.02)
        for name, b in model.named_buffers():
            if b.is_floating_point():
                if "running_var" in name:
                    b.uniform_(0.5, 1.5)
                else:
                    b.normal_(0.0, 0.1)


def make_inputs(model, batch: int, args, seed: int):
    cfg = model.config if hasattr(model, "config") else {}
    frames = int(cfg.get("t_size", 8))
    res = int(cfg.get("input_resolution", 224))
    classes = int(cfg.get("num_classes", 400))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, frames, res, res, generator=gen).to(args.device)
    if args.precision == "cast":
        x = x.to(args.dtype)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(args.device)
    return x, labels, frames, res


def autocast_ctx(args, cache_enabled=None):
    """``cache_enabled=False`` inside a CUDA-graph capture (PyTorch's rule)."""
    if args.precision == "autocast" and args.dtype != torch.float32:
        return torch.autocast(device_type=args.device.type, dtype=args.dtype, cache_enabled=cache_enabled)
    return torch.autocast(device_type=args.device.type, enabled=False)


def make_step(model, run, task: str, x, labels, args):
    """A zero-argument callable running one inference call or one training step; ``run`` is ``model`` or
    ``torch.compile(model)`` (train()/eval() and the optimizer act on ``model``)."""
    if task == "train":
        model.train()
        fused_opt = args.device.type == "cuda"
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                fused=fused_opt, foreach=None if fused_opt else True)

        def step():
            with autocast_ctx(args):
                loss = F.cross_entropy(run(x).float(), labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    model.eval()

    def step():
        with torch.no_grad(), autocast_ctx(args):
            return run(x)
    return step


def make_graphed_inference_step(model, x, args):
    """What ``eval.cuda_graph=true`` runs: ``uniformerv2.cuda_graph.GraphedInference`` (captured at the first
    call), the batch copied in and the logits out included."""
    from uniformerv2.cuda_graph import GraphedInference

    model.eval()
    graphed = GraphedInference(model, context=lambda: autocast_ctx(args, cache_enabled=False))
    return lambda: graphed(x)


def make_graphed_train_step(model, x, labels, args):
    """What ``train.cuda_graph=true`` runs: the forward, loss and backward replayed from a CUDA graph
    (``uniformerv2.cuda_graph.GraphedTrainStep``, captured at the first call), then the optimizer step of
    ``make_step`` eagerly. No ``zero_grad``: each replay rewrites the gradients."""
    from uniformerv2.cuda_graph import GraphedTrainStep

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    graphed = GraphedTrainStep(model, lambda logits, y: F.cross_entropy(logits.float(), y),
                               context=lambda: autocast_ctx(args, cache_enabled=False))

    def step():
        graphed(x, labels)
        opt.step()
    return step


def count_flops(model, task: str, x, labels, args) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        if task == "train":
            model.train()
            with counter, autocast_ctx(args):
                loss = F.cross_entropy(model(x).float(), labels)
                loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            model.eval()
            with counter, torch.no_grad(), autocast_ctx(args):
                model(x)
        return float(counter.get_total_flops()) or None
    except Exception as exc:
        print(f"  FLOP count failed ({H._first_line(exc)}); TFLOP/s left empty", file=sys.stderr)
        return None


def main(argv=None):
    args = H.parse_args(__doc__.splitlines()[0], argv, extra=extra_args)
    args.bench_name = "e2e"
    if args.report:
        print(report(args.report))
        return []
    try:
        import uniformerv2  # noqa: F401
    except Exception as exc:
        raise SystemExit(f"bench_e2e: the model package does not import: {H._first_line(exc)}")
    unknown = set(args.providers or ()) - set(PROVIDERS)
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; this benchmark has {list(PROVIDERS)}")
    providers = [p for p in PROVIDERS if not args.providers or p in args.providers]
    tasks = [TASKS[m] for m in args.modes if m in TASKS]
    if not tasks:
        raise SystemExit("--mode: end-to-end runs forward (inference) and/or forward+backward (training step)")
    frames_list = args.frames or [None]
    rows = []
    # every row also goes to <table>.partial.csv when measured: a run cut short by a timeout keeps them
    args.partial = None if args.no_save else os.path.join(args.out, f"{args.table}.partial.csv")
    if args.partial and os.path.exists(args.partial):
        os.remove(args.partial)
    for case in resolve_cases(args, tasks):
        for frames in frames_list:
            rows += run_case(case, frames, providers, args)
    H.add_speedups(rows, "eager" if "eager" in providers else providers[0])
    title = "end-to-end UniFormerV2 (inference: forward under no_grad; train: fwd + loss + bwd + AdamW step)"
    comparison = comparison_markdown(rows)
    print(f"\n## {title}\n{H.env_header(rows)}, precision {args.precision}\n")
    print(H.format_table(rows))
    print(f"\n### Against eager and the best torch.compile row\n\n{comparison}")
    if not args.no_save and rows:
        H.save("e2e", rows, args, title, table=args.table)
        tag = H.device_tag(args.device) + ("_quick" if args.quick else "")
        with open(os.path.join(args.out, f"{args.table}_{tag}.md"), "a") as f:
            f.write(f"\n## Against eager and the best torch.compile row\n\n{comparison}")
    if args.partial and os.path.exists(args.partial):
        os.remove(args.partial)
    return rows


def _skip_reason(prov: str, args) -> str | None:
    if prov in COMPILE_MODES and args.quick and args.device.type == "cpu" and not args.providers:
        return "torch.compile of a whole model takes minutes on the CPU; ask for it with --providers"
    if prov in OP_BACKENDS and args.quick and args.device.type == "cpu" and not args.providers:
        return "inductor compiles C++ for each op shape on the CPU (minutes in all); ask for it with --providers"
    if prov == "fused-cuda":
        return _cuda_backend_unavailable(args)
    if prov in ("fused+graph", "fused+compile-reduce-overhead") and args.device.type != "cuda":
        return "CUDA graphs need a CUDA GPU"
    return None


def run_case(case: E2ECase, frames, providers, args) -> list[dict]:
    rows = []
    flops = None
    case_name = f"{case.label} N={case.batch}" + (f" T={frames}" if frames else "")
    task, batch = case.task, case.batch
    h_case = H.Case(case_name, lambda *a: {}, items=batch, items_unit="clips")
    for prov in providers:
        row = H.new_row(prov, h_case, task, args)
        fused = prov.startswith("fused")
        why = _skip_reason(prov, args)
        if why:
            row.update(status="skipped", note=why)
            rows.append(row)
            continue
        model = run_model = step = None
        compiler_before = None  # uniformerv2_kernels.inductor.COMPILER, put back after an OP_BACKENDS row
        try:
            model = build(case.preset, case.overrides, frames, fused, args, seed=args.seed)
            if prov == "fused-cuda":  # the spatial attention on Triton: see uniformerv2.model
                model.set_fused(True, backend="cuda")
            elif prov in OP_BACKENDS:
                from uniformerv2_kernels import inductor

                compiler_before, inductor.COMPILER = inductor.COMPILER, args.compile_backend
                torch._dynamo.reset()  # fresh dynamo caches: the first call compiles, as in the compile rows
                model.set_fused(True, backend=OP_BACKENDS[prov])
            randomise_buffers(model)
            x, labels, t_in, res = make_inputs(model, batch, args, seed=args.seed + 1)
            row["shape"] = (f"config={case.preset} N={batch} T_in={t_in} res={res} width={model.config.get('width')} "
                            f"layers={model.config.get('layers')} precision={args.precision}"
                            + (f" overrides={case.overrides}" if case.overrides else ""))
            if flops is None and not args.no_flops and not fused:
                flops = count_flops(model, task, x, labels, args)
            note = [case.note] if case.note else []
            if prov in COMPILE_MODES:
                # fresh dynamo caches: each row compiles its own model, never against another row's
                # recompile limit (past it dynamo would silently run eager code under the compile label)
                torch._dynamo.reset()
                mode = COMPILE_MODES[prov] or args.compile_mode
                kwargs = {"backend": args.compile_backend, **({"mode": mode} if mode else {})}
                run_model = torch.compile(model, **kwargs)
                note.append(f"torch.compile mode={mode or 'default'} backend={args.compile_backend}")
            else:
                run_model = model
            if prov == "fused+graph" and task == "train":
                step = make_graphed_train_step(model, x, labels, args)
            elif prov == "fused+graph":
                step = make_graphed_inference_step(model, x, args)
            else:
                step = make_step(model, run_model, task, x, labels, args)
            if prov == "fused-triton-gemm":
                step = H.with_triton_gemm(step, "triton")
            elif fused:  # the setting this run started with, whatever an earlier provider set since
                step = H.with_triton_gemm(step, TRITON_GEMM_AT_START)
            t0 = time.perf_counter()
            step()
            H.synchronize(args.device)
            row["first_ms"] = (time.perf_counter() - t0) * 1e3
            ms = H.time_fn(step, args.device, args.warmup, args.rep, min_reps=5)
            row["host_ms"] = H.host_time_ms(step, args.device, reps=5)  # a model step is long: 5 suffice
            row["peak_mb"] = H.peak_memory_mb(step, args.device)
            if not args.no_gpu_ms:
                row["gpu_ms"] = gpu_busy_ms(step, args.device)
            if args.timeline:
                _append_timeline(args.timeline, f"{case_name}, {task}, {prov}", step, args.device)
            if prov == "fused-cuda":
                note.append("fused ops backend: cuda (spatial attention: triton)")
            elif prov in OP_BACKENDS:
                note.append("fused ops backend: " + ", ".join(f"{op}: {b}" for op, b in OP_BACKENDS[prov].items())
                            + f" (torch.compile backend={args.compile_backend}), the others "
                            + _fused_backend(args))
            elif fused:
                note.append("fused ops backend: " + _fused_backend(args))
            if fused and args.device.type == "cuda":
                from uniformerv2_kernels.backends import triton_gemm
                from uniformerv2_kernels.triton.ffn import autotune_setting

                # the GPU suite's one-call lease sets quick to save compile time
                if triton_gemm() == "triton" and autotune_setting() == "quick":
                    note.append("Triton GEMM autotuned among 2 configurations (UNIFORMERV2_AUTOTUNE=quick)")
            row.update(status="ok", ms=ms, items_per_s=batch / (ms * 1e-3), note="; ".join(note))
        except Exception as exc:
            if args.strict:
                raise
            row.update(status="error", note=H._first_line(exc))
            if args.verbose:
                import traceback
                traceback.print_exc()
        finally:
            model = run_model = step = None  # noqa: F841  (a graphed step holds its graph's memory pool)
            if compiler_before is not None:
                from uniformerv2_kernels import inductor

                inductor.COMPILER = compiler_before
            import gc
            gc.collect()
            if args.device.type == "cuda":
                torch.cuda.empty_cache()
        if flops and row["status"] == "ok":
            row["flops"] = flops
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
        rows.append(row)
        if args.partial:
            H.append_csv([row], args.partial)
        status = f"{row['ms']:.4g} ms" if row["status"] == "ok" else f"{row['status']}: {row['note']}"
        print(f"  [e2e] {case_name} | {task} | {prov}: {status}", file=sys.stderr, flush=True)
    for row in rows:  # rows measured before the FLOP count existed (a fused provider listed first)
        if flops and row["status"] == "ok" and row.get("flops") is None:
            row["flops"] = flops
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    return rows


def gpu_busy_ms(step, device) -> float | None:
    """Milliseconds the GPU spends running kernels in one ``step()`` (CUDA; None on the CPU): the union of
    the kernel intervals torch.profiler records, so overlapping streams count once. Unlike a CUDA-graph
    replay this works for every provider (an eager AdamW step and torch.compile's own graphs included)."""
    if torch.device(device).type != "cuda":
        return None
    import profile_kernels

    return profile_kernels.timeline(step, torch.device(device), top=0)["busy_ms"]


# ----------------------------------------------------------------------------------------- comparison

def _ratio(num, den) -> str:
    return f"{num / den:.2f}x" if num and den else ""


def comparison_markdown(rows) -> str:
    """Per case and task: each measured row's wall and GPU time against eager and against the best
    torch.compile row of the reference model (the faster of ``REFERENCE_COMPILE``); above 1x: faster than
    that row. ``GPU busy`` = GPU ms / ms: well under 100% means the step waits on the host."""
    ok = [r for r in rows if H.is_timing(r)]
    head = ("| case | task | provider | ms | GPU ms | host ms | GPU busy | clips/s | peak MiB | first call s "
            "| vs eager | vs best compile | GPU ms vs eager | GPU ms vs best compile |")
    lines = [head, "|" + "|".join(" --- " for _ in head.strip("|").split("|")) + "|"]
    for key in dict.fromkeys((r["case"], r["mode"]) for r in ok):
        group = [r for r in ok if (r["case"], r["mode"]) == key]
        eager = next((r for r in group if r["provider"] == "eager"), None)
        compiled = [r for r in group if r["provider"] in REFERENCE_COMPILE]
        best = min(compiled, key=lambda r: r["ms"]) if compiled else None
        for r in group:
            name = r["provider"] + (" (best compile)" if r is best and len(compiled) > 1 else "")
            gpu, host = r.get("gpu_ms"), r.get("host_ms")
            cells = [r["case"], r["mode"], name, H._fmt(r["ms"]), H._fmt(gpu), H._fmt(host),
                     f"{gpu / r['ms']:.0%}" if gpu else "", H._fmt(r.get("items_per_s")),
                     H._fmt(r.get("peak_mb"), 4), H._fmt(r["first_ms"] / 1e3) if r.get("first_ms") else "",
                     _ratio(eager and eager["ms"], r["ms"]), _ratio(best and best["ms"], r["ms"]),
                     _ratio(eager and eager.get("gpu_ms"), gpu), _ratio(best and best.get("gpu_ms"), gpu)]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if len(lines) == 2:
        return "(no measured rows)\n"
    return "\n".join(lines) + "\n"


def report(paths) -> str:
    """The comparison of recorded e2e rows (CSV files, e.g. the GPU suite's e2e steps together): on each
    device, the latest commit's rows, and per case, task and provider its latest row."""
    rows = [r for path in paths for r in H.read_csv(path) if r["bench"] == "e2e"]
    parts = []
    for device in dict.fromkeys(r["device"] for r in rows):
        mine = [r for r in rows if r["device"] == device]
        commit = max(mine, key=lambda r: r["date"])["commit"]
        latest: dict = {}
        for r in sorted((r for r in mine if r["commit"] == commit), key=lambda r: r["date"]):
            latest[(r["case"], r["mode"], r["provider"])] = r
        run = list(latest.values())
        parts.append(f"## {device}, commit {commit}\n\n{H.env_header(run)}\n\n{comparison_markdown(run)}")
    return "\n".join(parts) if parts else "(no e2e rows)\n"


def _append_timeline(path: str, title: str, step, device) -> None:
    """One more ``step()`` under torch.profiler, appended to ``path`` as markdown (profile_kernels.timeline):
    where the model's time goes, kernel by kernel, and whether the host keeps the GPU busy."""
    import profile_kernels

    info = profile_kernels.timeline(step, device, top=15)
    new_file = not os.path.exists(path)
    with open(path, "a") as f:
        if new_file:
            f.write(f"# torch.profiler timeline of one end-to-end step per provider ({device})\n\n")
        f.write(profile_kernels.timeline_markdown(title, info) + "\n")


def _cuda_backend_unavailable(args) -> str | None:
    """Why the fused-cuda provider cannot run here, or None."""
    from uniformerv2_kernels import backends

    if args.device.type != "cuda":
        return "the CUDA C++ kernels need a CUDA GPU"
    return backends.cuda_extension_error()


def _fused_backend(args) -> str:
    from uniformerv2_kernels import backends

    if args.device.type == "cuda":  # the registry picks cuda only for GPU-verified ops unless forced
        forced = os.environ.get(backends.ENV_BACKEND)
        if forced:
            return forced
        if backends.cuda_extension_error():  # not built here: every op on Triton
            return "triton (CUDA extension not loaded)"
        verified = ", ".join(sorted(backends.GPU_VERIFIED_CUDA_OPS))
        return "triton" + (f" (cuda for {verified})" if verified else "")
    return "triton (interpreted)" if backends.triton_interpret() else "reference (CPU)"


if __name__ == "__main__":
    main()
