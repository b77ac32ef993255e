"""Host time per call of the pieces every fused op is built from, and of each fused op on tiny inputs.

Why: on the first H100 run every fused op's forward+backward took ~1.1-1.2 ms even where its kernels took
~0.1 ms (the layer norm, on the CUDA and the Triton backend alike), and torch.compile's forward+backward of
the reference did too (1.05 ms), while F.layer_norm's took 0.44 ms at both model sizes. All of them have a
Python backward; F.layer_norm has none. This script separates the candidates, in microseconds of host
time per call on inputs so small that the GPU work is negligible:

- an ATen op launch (``torch.add(out=)``), a Triton launch with 3 and with 20 arguments (the launcher's
  argument binding and specialisation run in Python per call), and through ``@triton.autotune``;
- a ``torch.library.custom_op`` call against the plain function it wraps, and against the same op
  registered the way the fused ops are (``uniformerv2_kernels/library.py``: define/impl, autograd in a
  Function around it);
- forward+backward of the same elementwise op three ways: native autograd (C++ backward), an
  ``autograd.Function`` (Python backward) and a custom op with ``register_autograd`` (Python backward
  through the dispatcher). On CUDA, autograd runs the backward on its own device thread, so a Python
  backward also costs a GIL hand-off from the calling thread;
- every fused op of this package, forward (no grad) and forward+backward, per available backend;
- whole model steps (inference, and training forward+backward) of the Kinetics and Sth-Sth recipes' layer
  structure at a tiny width, eager against fused: what a step costs the host when the GPU work is
  negligible, and what it issues (ATen ops that may launch a kernel, allocations, views and no-op casts,
  Triton launches), countable on any machine.

``host us`` is the host's time per call with the calls issued back to back (the GPU keeps up: the kernels
are tiny); ``wall us`` adds the wait for the GPU at the end of the batch, spread over the calls. When the two
agree, the call is host-bound. On the CPU the Triton rows (and the fused model steps) run with the
interpreted launches stubbed: their time is the host's work around the launches (Python, ATen on tiny CPU
tensors), what a GPU host does besides launching; the numbers then are this machine's host costs, a floor
for the GPU host's. ``ATen ops`` and ``Triton launches`` count what one call issues (top-level ATen ops, each
a kernel launch or a tensor allocation on a GPU): on any machine, Triton included. On a GPU
machine the forward+backward building blocks also run on CPU tensors: CUDA tensors' backward runs on
autograd's device thread, CPU tensors' on the calling thread, and the difference is that hand-off.

    python benchmarks/launch_overhead.py --device cuda --out benchmarks/results/launch_overhead_h100.md
    python benchmarks/launch_overhead.py --device cpu --reps 300     # host work, launches stubbed
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


# ----------------------------------------------------------------------------------------------- timing


def per_call_us(fn, device: torch.device, reps: int, warmup: int = 20) -> tuple[float, float]:
    """(host us, wall us) per call of ``fn()`` over ``reps`` calls issued back to back."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - start
    return host / reps * 1e6, wall / reps * 1e6


# ------------------------------------------------------------------------------------- building blocks


@torch.library.custom_op("uniformerv2_bench::scale2", mutates_args=())
def _scale2_op(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_scale2_op.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("uniformerv2_bench::scale2_bwd", mutates_args=())
def _scale2_bwd_op(g: torch.Tensor) -> torch.Tensor:
    return g * 2


@_scale2_bwd_op.register_fake
def _(g):
    return torch.empty_like(g)


_scale2_op.register_autograd(lambda ctx, g: _scale2_bwd_op(g), setup_context=lambda ctx, inputs, output: None)


def _library_scale2():
    """The same op as ``_scale2_op`` through uniformerv2_kernels.library (define/impl + an autograd.Function
    around it: how the fused ops are registered)."""
    from uniformerv2_kernels import library

    @library.custom_op("uniformerv2_bench::scale2_lib")
    def scale2(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    scale2.register_fake(lambda x: torch.empty_like(x))

    @library.custom_op("uniformerv2_bench::scale2_lib_bwd")
    def scale2_bwd(g: torch.Tensor) -> torch.Tensor:
        return g * 2

    scale2_bwd.register_fake(lambda g: torch.empty_like(g))
    scale2.register_autograd(lambda ctx, g: scale2_bwd(g), setup_context=lambda ctx, inputs, output: None)
    return scale2


class _Scale2Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, g):
        return g * 2


def _triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def copy_kernel(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def copy_kernel_20_args(src, dst, p2, p3, p4, p5, p6, p7, p8, p9,
                            n, i1, i2, i3, i4, i5, i6, i7, f1, f2, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)

    # the wrapper every autotuned kernel of ours goes through (the FFN / projection GEMMs): a cache lookup
    # by key per call, then the launch
    copy_kernel_autotuned = triton.autotune(
        configs=[triton.Config({"BLOCK": 64}, num_warps=1), triton.Config({"BLOCK": 128}, num_warps=2)],
        key=["n"])(triton.jit(copy_kernel.fn))
    return copy_kernel, copy_kernel_20_args, copy_kernel_autotuned


def building_block_rows(device: torch.device, reps: int) -> list[dict]:
    rows = []

    def add(name, fn, note=""):
        host, wall = per_call_us(fn, device, reps)
        rows.append(dict(item=name, backend="-", host_us=host, wall_us=wall, note=note))

    a = torch.randn(64, device=device)
    b = torch.randn(64, device=device)
    c = torch.empty_like(a)
    add("ATen op: torch.add(a, b, out=c)", lambda: torch.add(a, b, out=c))
    add("plain function: x * 2", lambda: a * 2)
    add("allocation: torch.empty(64)", lambda: torch.empty(64, device=device))
    from uniformerv2_kernels.backends import op_body

    def enter_op_body():
        with op_body(a):
            pass

    add("op body context (backends.op_body)", enter_op_body)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        add("op body context under autocast (turns it off inside)", enter_op_body)
    add("custom op: uniformerv2_bench::scale2(x)", lambda: _scale2_op(a))
    scale2_lib = _library_scale2()
    add("library operator: uniformerv2_bench::scale2_lib(x)", lambda: scale2_lib(a))

    if device.type == "cuda":
        copy_kernel, copy_kernel_20, copy_kernel_autotuned = _triton_kernels()
        p = [torch.randn(64, device=device) for _ in range(10)]
        add("Triton launch, 3 arguments", lambda: copy_kernel[(1,)](a, c, 64, BLOCK=64))
        add("Triton launch, 3 arguments, @triton.autotune (2 configs)", lambda: copy_kernel_autotuned[(1,)](a, c, 64))
        add("Triton launch, 20 arguments", lambda: copy_kernel_20[(1,)](
            a, c, *p[2:], 64, 1, 2, 3, 4, 5, 6, 7, 0.5, 0.25, BLOCK=64))
    else:
        rows.append(dict(item="Triton launch", backend="-", host_us=None, wall_us=None, note="needs a CUDA GPU"))

    # On CUDA tensors autograd runs the backward on its device thread; on CPU tensors on the calling thread.
    # Both on a GPU machine: the difference is the thread hand-off (and, for a Python backward, the GIL's).
    for where in ([device, torch.device("cpu")] if device.type == "cuda" else [device]):
        x = torch.randn(64, device=where, requires_grad=True)
        g = torch.randn(64, device=where)

        def fwd_bwd(f, x=x, g=g):
            def step():
                x.grad = None
                f(x).backward(g)
            return step

        tag = "" if where == device else ", CPU tensors"
        note = "" if where == device else "backward on the calling thread"
        add(f"fwd+bwd{tag}, native autograd (C++ backward)", fwd_bwd(lambda t: t * 2), note)
        add(f"fwd+bwd{tag}, autograd.Function (Python backward)", fwd_bwd(_Scale2Function.apply), note)
        add(f"fwd+bwd{tag}, custom op + register_autograd", fwd_bwd(_scale2_op), note)
        add(f"fwd+bwd{tag}, library operator + autograd.Function (the fused ops' registration)",
            fwd_bwd(scale2_lib), note)
    return rows


# ------------------------------------------------------------------------------------------- fused ops


def _tiny_op_calls(device: torch.device, dtype: torch.dtype):
    """(name, make_call(backend) -> (forward_fn, fwd_bwd_fn)) for each fused op on tiny inputs."""
    from uniformerv2_kernels.ops.ffn import fused_ffn
    from uniformerv2_kernels.ops.global_query_attention import global_query_attention
    from uniformerv2_kernels.ops.layer_norm import clip_layer_norm
    from uniformerv2_kernels.ops.local_temporal_mhra import local_temporal_mhra

    gen = torch.Generator().manual_seed(0)
    L, N, T, C, Cp, H = 5, 2, 3, 64, 40, 2  # 2x2 patches + class token, 2 clips of 3 frames

    def p(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(True)

    x = p(L, N * T, C, scale=1.0)
    ln = (p(C, scale=1.0), p(C))
    ffn_w = (p(4 * C, C), p(4 * C), p(C, 4 * C), p(C))
    bn = (p(C, scale=1.0), p(C))
    running = (torch.zeros(C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype),
               torch.zeros((), device=device, dtype=torch.long))
    mhra_w = (p(Cp, C, 1, 1, 1), p(Cp), p(Cp, 1, 3, 1, 1), p(Cp), p(C, Cp, 1, 1, 1), p(C))
    gqa_w = (p(C, 1, 3, 3, 3), p(C), p(C, scale=1.0), p(C), p(1, N, C), p(3 * C, C), p(3 * C))

    ops = {
        "clip_layer_norm": lambda be: clip_layer_norm(x, *ln, backend=be),
        "fused_ffn": lambda be: fused_ffn(x, *ln, *ffn_w, backend=be),
        "local_temporal_mhra (train)": lambda be: local_temporal_mhra(
            x, T, *bn, *running, mhra_w[0], mhra_w[1], mhra_w[2], mhra_w[3], mhra_w[4], mhra_w[5], True,
            backend=be),
        "global_query_attention": lambda be: global_query_attention(x, T, *gqa_w, H, backend=be),
    }
    leaves = [x, *ln, *ffn_w, *bn, *mhra_w, *gqa_w]
    return ops, leaves


# ATen ops that launch nothing: views and metadata, allocations (the caching allocator), and casts /
# contiguous calls that return their input (no child op)
_VIEW_OPS = {"view", "reshape", "t", "transpose", "slice", "select", "unsqueeze", "squeeze", "permute", "expand",
             "expand_as", "detach", "alias", "as_strided", "narrow", "unbind", "split", "chunk", "_unsafe_view",
             "view_as", "flatten", "unflatten", "lift_fresh", "numpy_T", "_reshape_alias"}
_ALLOC_OPS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


@contextlib.contextmanager
def counted_triton_launches(stub: bool | None = None):
    """Counts the calls of any Triton kernel's launcher (yields a one-element list holding the count). Under the
    Triton interpreter (or with ``stub=True``, on a GPU) the launches are stubbed, not run: what remains is the
    host's Python and ATen work around them (the interpreter's own tensor copies would swamp it; the outputs
    are garbage, which counting and host timing do not read)."""
    import triton
    from uniformerv2_kernels import backends

    launcher = triton.runtime.jit.JITFunction
    if backends.triton_interpret():
        from triton.runtime.interpreter import InterpretedFunction as launcher
    count = [0]
    original = launcher.run
    skip = backends.triton_interpret() if stub is None else stub

    def counted(self, *args, **kwargs):
        count[0] += 1
        return None if skip else original(self, *args, **kwargs)

    launcher.run = counted
    try:
        yield count
    finally:
        launcher.run = original


def op_profile(fn) -> dict:
    """What one ``fn()`` issues: top-level ATen ops from torch.profiler (not the ones inside another ATen op),
    split into ``compute`` (everything that may launch a kernel), ``alloc`` and ``view`` (views and
    metadata ops, and casts / contiguous calls that return their input), plus ``triton``, the calls of
    any Triton kernel's launcher (interpreted: counted, not run; see ``counted_triton_launches``)."""
    from torch.profiler import ProfilerActivity, profile

    with counted_triton_launches() as launches, profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts = dict(aten=0, compute=0, alloc=0, view=0, triton=launches[0])
    for e in prof.events():
        if not e.name.startswith("aten::") or (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")):
            continue
        name = e.name[len("aten::"):]
        counts["aten"] += 1
        if name in _VIEW_OPS or (name in ("to", "contiguous", "type_as") and not e.cpu_children):
            counts["view"] += 1
        elif name in _ALLOC_OPS:
            counts["alloc"] += 1
        else:
            counts["compute"] += 1
    return counts


STUBBED_NOTE = "interpreted Triton: launches stubbed, host work around them timed (a GPU adds the launches)"
GPU_STUBBED = "Triton launches stubbed"
GPU_STUBBED_NOTE = ("the row above without running its Triton launches: the difference is what the launches "
                    "cost the host")


def stubbed_host_us(fn, device, reps: int, warmup: int) -> tuple[float | None, float | None, str]:
    """(host us, wall us, note) of ``fn`` on a GPU with every Triton launch skipped (outputs garbage, unread)."""
    try:
        with counted_triton_launches(stub=True):
            host, wall = per_call_us(fn, device, reps, warmup=warmup)
        return host, wall, GPU_STUBBED_NOTE
    except Exception as exc:  # a measurement aid: its failure must not cost the rest of the table
        return None, None, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"


def fused_op_rows(device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    from uniformerv2_kernels import backends

    ops, leaves = _tiny_op_calls(device, dtype)
    rows = []
    for name, call in ops.items():
        for backend in backends.BACKENDS:
            if backend == "inductor":  # compiles per op and shape (minutes on a CPU); its host time is in the op
                continue               # benchmarks' and bench_e2e's host ms
            interpreted = backend == "triton" and (device.type != "cuda" or backends.triton_interpret())
            try:
                out = call(backend)  # interpreted Triton too: tiny inputs, and it says whether the call runs
            except Exception as exc:  # a backend that cannot run here says why (its own line of the error)
                lines = [ln.strip() for ln in str(exc).strip().splitlines()]
                reason = next((ln for ln in lines if ln.startswith(f"{backend}:")), lines[0] if lines else "")
                rows.append(dict(item=name, backend=backend, host_us=None, wall_us=None, note=reason[:240]))
                continue
            grad = torch.randn_like(out)

            def forward(call=call, backend=backend):
                with torch.no_grad():
                    call(backend)

            def fwd_bwd(call=call, backend=backend, grad=grad):
                for t in leaves:
                    t.grad = None
                call(backend).backward(grad)

            for mode, fn in (("forward", forward), ("forward+backward", fwd_bwd)):
                row = dict(item=f"{name}, {mode}", backend=backend, host_us=None, wall_us=None, note="")
                if interpreted:  # the host's work around the launches, which are stubbed
                    row["note"] = STUBBED_NOTE
                    with counted_triton_launches():
                        row["host_us"], row["wall_us"] = per_call_us(fn, device, reps, warmup=5)
                else:
                    row["host_us"], row["wall_us"] = per_call_us(fn, device, reps, warmup=5)
                rows.append(row)
                if backend == "triton" and not interpreted:
                    host, wall, note = stubbed_host_us(fn, device, reps, warmup=5)
                    rows.append(dict(item=f"{name}, {mode}", backend=f"triton, {GPU_STUBBED}", host_us=host,
                                     wall_us=wall, note=note, counts_of=row))
                row["count_fn"] = fn  # counted by count_ops once every row is timed
    return rows


def count_ops(rows: list[dict]) -> None:
    """Fills each row's ATen op and Triton launch counts (torch.profiler), after all the timing: on an H200
    the Triton launches timed after a torch.profiler session took far longer than in a fresh process
    (clip_layer_norm forward through the op: 239 us against 94 us; benchmarks/results/h200_2026-11-26.md)."""
    for row in rows:
        fn = row.pop("count_fn", None)
        if fn is not None:
            row.update(op_profile(fn))
    for row in rows:  # a stubbed row issues what the row it stubs issues
        source = row.pop("counts_of", None)
        if source is not None:
            row.update({k: source[k] for k in ("aten", "compute", "alloc", "view", "triton")})


# ------------------------------------------------------------------------------------------ model step

# The real recipes' layer structure (12 layers, the Kinetics recipe's 4 global blocks and no local MHRA, the
# Sth-Sth recipe's two local MHRAs per layer and 8 global blocks), at width 96 on 32x32 frames of 8x8 patches
# (17 tokens), 2 clips: the GPU work is negligible, so the step's time is the host's. Width 96 keeps the local
# MHRA's C' = 64 a multiple of 16, like B/16's 512 (no padding ops).
MODEL_STEP_RECIPES = ("k400_b16_f8x224", "ssv2_b16_f16x224")


def model_step_rows(device: torch.device, reps: int) -> list[dict]:
    import uniformerv2
    from uniformerv2_kernels import backends

    interpreted = device.type != "cuda" or backends.triton_interpret()
    rows = []
    for recipe in MODEL_STEP_RECIPES:
        T = uniformerv2.get_config(recipe)["t_size"]
        x = torch.randn(2, 3, T, 32, 32, device=device)
        for provider in ("eager", "fused"):
            torch.manual_seed(0)
            # on the CPU the fused model runs the Triton backend, interpreted and counted (the GPU's structure);
            # on a GPU the default selection (CUDA kernels where verified, else Triton)
            model = uniformerv2.build_model(
                recipe, num_frames=T, fused=provider == "fused", backend="triton" if interpreted else None,
                width=96, layers=12, heads=2, n_dim=96, n_head=2, patch_size=8, input_resolution=32).to(device)
            params = [p for p in model.parameters() if p.requires_grad]

            def inference(model=model, x=x):
                model.eval()
                with torch.no_grad():
                    model(x)

            def train_step(model=model, x=x, params=params):
                model.train()
                for p in params:  # as optimizer.zero_grad() does: no accumulation into old .grad
                    p.grad = None
                model(x).float().sum().backward()

            for mode, fn in (("inference", inference), ("train fwd+bwd", train_step)):
                # warm-up (on a GPU: Triton's compiles): a real call; interpreted, a counted one (op_profile
                # stubs the launches; running the interpreter here would take minutes)
                op_profile(fn) if interpreted else fn()
                row = dict(item=f"{recipe} {mode}", backend=provider, host_us=None, wall_us=None,
                           note=STUBBED_NOTE if interpreted and provider == "fused" else "")
                with counted_triton_launches() if interpreted else contextlib.nullcontext():
                    row["host_us"], row["wall_us"] = per_call_us(fn, device, reps, warmup=2)
                rows.append(row)
                if provider == "fused" and not interpreted:
                    host, wall, note = stubbed_host_us(fn, device, reps, warmup=2)
                    rows.append(dict(item=row["item"], backend=f"fused, {GPU_STUBBED}", host_us=host,
                                     wall_us=wall, note=note, counts_of=row))
                row["count_fn"] = fn  # counted by count_ops once every row is timed
    return rows


# -------------------------------------------------------------------------------------------- output


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| item | backend | host us | wall us | ATen ops | Triton launches | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        cells = [("-" if r.get(k) is None else f"{r[k]:.1f}") for k in ("host_us", "wall_us")]
        cells += [("-" if r.get(k) is None else str(r[k])) for k in ("aten", "triton")]
        lines.append(f"| {r['item']} | {r['backend']} | {' | '.join(cells)} | {r['note']} |")
    return "\n".join(lines) + "\n"


def model_markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| step | provider | host ms | wall ms | ATen compute ops | allocations | views / no-op casts "
             "| Triton launches | note |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        cells = [("-" if r.get(k) is None else f"{r[k] / 1000:.2f}") for k in ("host_us", "wall_us")]
        cells += [("-" if r.get(k) is None else str(r[k])) for k in ("compute", "alloc", "view", "triton")]
        lines.append(f"| {r['item']} | {r['backend']} | {' | '.join(cells)} | {r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype of the fused ops' tiny inputs")
    ap.add_argument("--reps", type=int, default=1000, help="calls per building-block row (fused ops: reps/5)")
    ap.add_argument("--out", help="also write the markdown table to this file")
    ap.add_argument("--no-model", action="store_true", help="skip the model-step rows")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA GPU here")
    if device.type == "cpu":  # the Triton rows then count their ops (launches stubbed: see counted_triton_launches)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, HERE)
    import harness as H

    env = H.env_record(device)
    header = (f"# Host time per call ({env['device']}, torch {env['torch']}, triton {env['triton']}, "
              f"commit {env['commit']}, {env['date']})\n\nbenchmarks/launch_overhead.py --device {device.type} "
              f"--dtype {args.dtype} --reps {args.reps}; fused ops on tiny inputs (L=5, N*T=6, C=64) in {args.dtype}")
    rows = building_block_rows(device, args.reps)
    print(markdown(rows, "## building blocks"), flush=True)
    op_rows = fused_op_rows(device, getattr(torch, args.dtype), max(20, args.reps // 5))
    print(markdown(op_rows, "## fused ops (timed; their op counts come after the model steps)"), flush=True)

    def write(text):
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(text)

    # first without the op counts and the model steps (a GPU's cold Triton cache compiles for a while there)
    write(markdown(rows + op_rows, header))
    step_rows = [] if args.no_model else model_step_rows(device, max(5, args.reps // 100))
    count_ops(op_rows + step_rows)
    print(markdown(op_rows, "## fused ops, with their op counts"), flush=True)
    text = markdown(rows + op_rows, header)
    if step_rows:
        step_text = model_markdown(step_rows, "## model steps (12 layers at width 96, 2 clips of 32x32 frames)")
        print(step_text, flush=True)
        text += "\n" + step_text
    write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
