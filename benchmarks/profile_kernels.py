"""Runs each fused op's Triton (or CUDA) path once forward+backward at one model shape, for a profiler.

Meant to run under Nsight Compute on a GPU (the GPU suite's `profile` step does this), to answer what the
timings cannot: per kernel, the DRAM bytes against the L2 and L1 bytes (is a memory-bound kernel limited by
HBM, or by re-reading its neighbours from cache, as the global attention's on-the-fly DPE may be?), the
achieved occupancy and the registers:

    ncu --csv --print-units base --clock-control none --profile-from-start off --kernel-name regex:'^_' \
        --metrics $(python benchmarks/profile_kernels.py --metrics) \
        python benchmarks/profile_kernels.py --device cuda --dtype bfloat16 > ncu.log
    python benchmarks/profile_kernels.py --summarize ncu.log     # markdown table per kernel

`--timeline OUT.md` runs the same steps under torch.profiler instead (no Nsight needed, a few seconds): per op,
the host's time to launch the step, the step's wall time, and the GPU's busy time inside it (the union of its
kernels' intervals), with the kernels that took the most GPU time, ATen's and cuBLAS's included. A busy time
far below the wall time means the step waits on the host (launch overhead, a sync), not on kernels: the first
H100 run's local MHRA forward+backward took 4.95 ms while its Triton kernels, in Nsight, added up to ~0.5 ms.

Each op runs twice: a warm-up that compiles (and autotunes) the Triton kernels, then the profiled step between
cudaProfilerStart and cudaProfilerStop, which `--profile-from-start off` selects. (Not an NVTX range: a range
is per thread, and autograd launches the backward from its own thread; the first H100 run, filtered by
NVTX, saw no backward kernel.) Without a GPU, `--interpret` runs the same driver on tiny shapes under the Triton
interpreter, to check the driver itself.

    python benchmarks/profile_kernels.py --interpret --model tiny --frames 3 --batch 2
"""

from __future__ import annotations

import argparse
import collections
import csv
import importlib
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OPS = ("layer_norm", "ffn", "spatial_attention", "local_temporal_mhra", "global_query_attention")


# Nsight Compute metrics the GPU suite asks for (names as `ncu --query-metrics` lists them)
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "lts__t_bytes.sum",
    "l1tex__t_bytes.sum",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "launch__registers_per_thread",
)


def _union_us(intervals) -> float:
    """Total length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def timeline(step, device, top: int = 8) -> dict:
    """One ``step()`` under torch.profiler: host ms (until step returns), wall ms (until the device is done),
    and on CUDA the GPU busy ms and span ms of its kernels with the ``top`` kernels by GPU time; on CPU the
    ``top`` ATen ops by self CPU time."""
    import time

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        host = time.perf_counter() - start
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    info = {"host_ms": host * 1e3, "wall_ms": wall * 1e3}
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        spans = [(e.time_range.start, e.time_range.end) for e in kernels]
        info["kernels"] = len(kernels)
        info["busy_ms"] = _union_us(spans) / 1e3
        info["span_ms"] = (max(b for _, b in spans) - min(a for a, _ in spans)) / 1e3 if spans else 0.0
        by_name: dict[str, list[float]] = collections.defaultdict(list)
        for e in kernels:
            by_name[e.name].append(e.time_range.end - e.time_range.start)
        ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        info["top"] = [(name, len(t), sum(t)) for name, t in ranked]
    else:
        ranked = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:top]
        info["top"] = [(a.key, a.count, a.self_cpu_time_total) for a in ranked]
    return info


def timeline_markdown(title: str, info: dict) -> str:
    """Markdown for one op's :func:`timeline`."""
    lines = [f"### {title}", ""]
    head = f"host {info['host_ms']:.3f} ms to launch, wall {info['wall_ms']:.3f} ms"
    if "busy_ms" in info:
        busy = info["busy_ms"] / info["wall_ms"] if info["wall_ms"] else 0.0
        head += (f"; GPU busy {info['busy_ms']:.3f} ms over a {info['span_ms']:.3f} ms span "
                 f"({info['kernels']} kernels; busy / wall = {busy:.0%})")
        lines += [head, "", "| kernel | launches | GPU us |", "| --- | ---: | ---: |"]
    else:
        lines += [head + " (CPU: ATen ops by self CPU time)", "", "| op | calls | self CPU us |",
                  "| --- | ---: | ---: |"]
    for name, count, us in info["top"]:
        short = name if len(name) <= 90 else name[:87] + "..."
        lines.append(f"| `{short.replace('|', '/')}` | {count} | {us:.1f} |")
    return "\n".join(lines + [""])


def summarize(path: str) -> str:
    """A markdown table per kernel from `ncu --csv --print-units base` output (other lines are skipped):
    launches, total time, DRAM bytes and GB/s, and the L2 / L1 traffic as multiples of the DRAM traffic
    (a memory-bound kernel far above 1x re-reads its data from cache)."""
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    rows = list(csv.DictReader(lines))
    per_launch: dict[tuple[str, str], dict[str, float]] = collections.defaultdict(dict)
    for r in rows:
        try:
            value = float(r["Metric Value"].replace(",", ""))
        except (KeyError, ValueError):
            continue
        per_launch[(r["ID"], r["Kernel Name"])][r["Metric Name"]] = value
    kernels: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
    for (_, name), metrics in per_launch.items():
        kernels[name.split("(")[0]].append(metrics)
    out = ["| kernel | launches | time us | DRAM MB | DRAM GB/s | L2 / DRAM | L1 / DRAM | occupancy % | regs |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, launches in sorted(kernels.items(), key=lambda kv: -sum(m.get(NCU_METRICS[0], 0) for m in kv[1])):
        total = lambda key: sum(m.get(key, 0.0) for m in launches)  # noqa: E731
        ns = total("gpu__time_duration.sum")
        dram = total("dram__bytes_read.sum") + total("dram__bytes_write.sum")
        ratio = lambda key: f"{total(key) / dram:.1f}x" if dram else "-"  # noqa: E731
        occ = total("sm__warps_active.avg.pct_of_peak_sustained_active") / len(launches)
        regs = max(m.get("launch__registers_per_thread", 0) for m in launches)
        out.append(f"| {name} | {len(launches)} | {ns / 1e3:.1f} | {dram / 1e6:.1f} | "
                   f"{dram / ns if ns else 0:.0f} | {ratio('lts__t_bytes.sum')} | {ratio('l1tex__t_bytes.sum')} | "
                   f"{occ:.0f} | {regs:.0f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--metrics"]:
        print(",".join(NCU_METRICS))
        return 0
    if argv[:1] == ["--summarize"] and len(argv) == 2:
        print(summarize(argv[1]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--backend", default="triton",
                    help="comma list of benchmark provider names to profile per op (triton, cuda, or a variant "
                         "such as triton-triton-gemm); an op without a provider of that name skips it")
    ap.add_argument("--model", default="b16", help="harness model name: b16, l14, tiny, ...")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--interpret", action="store_true", help="CPU: run the Triton kernels interpreted")
    ap.add_argument("--timeline", metavar="OUT_MD", help="profile each step with torch.profiler (host and GPU "
                                                        "time, top kernels) and write markdown to OUT_MD")
    args = ap.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        args.device = "cpu"
    sys.path.insert(0, HERE)
    import harness as H  # noqa: E402  (after TRITON_INTERPRET is decided)
    import torch  # noqa: E402

    dtype = getattr(torch, args.dtype)
    shape = H.Shape(H.MODELS[args.model], args.frames, args.batch)
    device = torch.device(args.device)
    if args.timeline:  # written section by section: a run cut by a timeout keeps what it profiled
        with open(args.timeline, "w") as f:
            f.write(f"# torch.profiler timeline of one forward+backward per op ({device}, {args.dtype})\n\n")
    wanted = [b for b in args.backend.split(",") if b]
    for op in [o for o in args.ops.split(",") if o]:
        bench = importlib.import_module(f"bench_{op}")
        for provider in [p for name in wanted for p in bench.PROVIDERS if p.name == name]:
            extra = {"local_temporal_mhra": (True,), "spatial_attention": ("sdpa",)}.get(op, ())  # training BN
            case = bench.make_case(shape, dtype, *extra)
            why = H.provider_skip_reason(provider, case, argparse.Namespace(device=device, dtype=dtype))
            if why:
                print(f"[profile] {op} {provider.name}: skipped ({why})", flush=True)
                continue
            inputs = case.make_inputs(device, dtype, True)
            step, leaves = H.make_step(provider, inputs, "forward+backward")
            step()  # warm-up: compiles the kernels
            H.synchronize(device)
            for t in leaves:
                t.grad = None
            print(f"[profile] {op} {provider.name} {case.name} {args.dtype}: profiled step", flush=True)
            if args.timeline:
                info = timeline(step, device)
                section = timeline_markdown(f"{op} ({provider.name}, {case.name}, {args.dtype}, forward+backward)",
                                            info)
                print(section, flush=True)
                with open(args.timeline, "a") as f:
                    f.write(section + "\n")
                continue
            if device.type == "cuda":  # `ncu --profile-from-start off` skips the warm-up (and autotuning)
                torch.cuda.profiler.start()
            step()
            H.synchronize(device)
            if device.type == "cuda":
                torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
