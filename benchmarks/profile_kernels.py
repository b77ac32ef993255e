"""Runs each fused op's Triton (or CUDA) path once forward+backward at one model shape, for a profiler.

Meant to run under Nsight Compute on a GPU (the GPU suite's `profile` step does this), to answer what the
timings cannot: per kernel, the DRAM bytes against the L2 and L1 bytes (is a memory-bound kernel limited by
HBM, or by re-reading its neighbours from cache, as the global attention's on-the-fly DPE may be?), the
achieved occupancy and the registers:

    ncu --csv --print-units base --clock-control none --profile-from-start off --kernel-name regex:'^_' \
        --metrics $(python benchmarks/profile_kernels.py --metrics) \
        python benchmarks/profile_kernels.py --device cuda --dtype bfloat16 > ncu.log
    python benchmarks/profile_kernels.py --summarize ncu.log     # markdown table per kernel

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
    ap.add_argument("--backend", default="triton", choices=["triton", "cuda"])
    ap.add_argument("--model", default="b16", help="harness model name: b16, l14, tiny, ...")
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--interpret", action="store_true", help="CPU: run the Triton kernels interpreted")
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
    for op in [o for o in args.ops.split(",") if o]:
        bench = importlib.import_module(f"bench_{op}")
        provider = next(p for p in bench.PROVIDERS if p.name == args.backend)
        extra = {"local_temporal_mhra": (True,), "spatial_attention": ("sdpa",)}.get(op, ())  # training BN
        case = bench.make_case(shape, dtype, *extra)
        inputs = case.make_inputs(device, dtype, True)
        step, leaves = H.make_step(provider, inputs, "forward+backward")
        step()  # warm-up: compiles the kernels
        H.synchronize(device)
        for t in leaves:
            t.grad = None
        print(f"[profile] {op} {args.backend} {case.name} {args.dtype}: profiled step", flush=True)
        if device.type == "cuda":  # `ncu --profile-from-start off` skips the warm-up (and autotuning)
            torch.cuda.profiler.start()
        step()
        H.synchronize(device)
        if device.type == "cuda":
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
