"""Timing one step: wall clock (``time_fn``), host time, GPU time from a CUDA-graph replay, peak memory;
``measure`` makes one result row of a provider, case and mode."""

from __future__ import annotations

import gc
import statistics
import time
import traceback
from typing import Any, Callable, Sequence

import torch

from .records import _first_line, new_row
from .requirements import _interpreted, provider_skip_reason
from .shapes import MODES, Case, Provider

CPU_MIN_REPS = 3
CPU_MAX_REPS = 10


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
