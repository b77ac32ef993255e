"""Training-step peak memory: the memory plan's prediction per model, batch and checkpointing plan, and on a
GPU the measured ``torch.cuda.max_memory_allocated`` and clips/s beside it.

The prediction (``uniformerv2.memory_plan.predict_peak``) runs the step on fake tensors: seconds per row on
any machine, no device memory. Without a GPU a CUDA prediction runs on a CPU stand-in (see the module's
docstring); the ``on`` column says where each prediction ran.

Examples::

    python benchmarks/memory.py                                  # the L/14 presets, batch 1 and 2, no / all blocks
    python benchmarks/memory.py --models k400_l14_f32x336 --batches 1,2,4 --budget-gb 24
    python benchmarks/memory.py --measure --cap-gb 24 --budget-gb 24   # on a GPU: measured beside predicted
    python benchmarks/memory.py --capped-check --fused true      # on a GPU: the 24 GiB check of issue 26

A training step here is what the trainer runs: the forward under ``--amp`` autocast, cross-entropy, backward,
gradient clipping at 20, AdamW (the states exist: the measured steps follow a first one), zero_grad.

Plans (``--plans``): ``none`` (no checkpointing), ``all`` (every block checkpointed), ``plan`` (the memory plan's
choice for ``--budget-gb``; an impossible batch shows the largest that fits), or a number of blocks.

``--capped-check`` (GPU): K400 L/14@336 32 frames, the device capped at 24 GiB with
``torch.cuda.set_per_process_memory_fraction``, fused and reference (``--fused``), at batch 1, 2 and the largest
batch the plan allows, each with the plan the trainer's default budget would choose under the cap (90% of it:
``memory_plan.DEFAULT_BUDGET_FRACTION``); then the same batches without the cap (the plan for the whole
device), for the step rates side by side.

Output: a Markdown table and a JSON file in ``--out`` (default: ``runs/benchmarks/``, not tracked);
``--results`` writes them to ``benchmarks/results/`` instead.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import uniformerv2  # noqa: E402
from uniformerv2 import memory_plan as mp  # noqa: E402

DEFAULT_MODELS = ("k400_l14_f32x336", "k400_l14_f8x224", "ssv2_l14_f16x224")
CAPPED_MODEL = "k400_l14_f32x336"
CAP_GIB = 24.0


def _ints(text: str) -> list[int]:
    return [int(tok) for tok in text.split(",") if tok]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="uniformerv2.list_models() names, comma-separated")
    p.add_argument("--batches", default="1,2", help="clips per step, comma-separated")
    p.add_argument("--plans", default="none,all", help="none, all, plan, or block counts, comma-separated")
    p.add_argument("--fused", default="true,false", help="true, false or both (true,false)")
    p.add_argument("--amp", choices=("none", "fp16", "bf16"), default="bf16")
    p.add_argument("--device", default=None, help="device to predict for (default: cuda)")
    p.add_argument("--budget-gb", type=float, default=None, help="the budget of the 'plan' plan (GiB)")
    p.add_argument("--measure", action="store_true", help="also run the steps on the GPU and measure them")
    p.add_argument("--cap-gb", type=float, default=None, help="cap the GPU at this many GiB while measuring")
    p.add_argument("--steps", type=int, default=3, help="measured steps after the first (GPU)")
    p.add_argument("--capped-check", action="store_true", help="the 24 GiB check of issue 26 (GPU; see above)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "benchmarks"), help="output folder")
    p.add_argument("--results", action="store_true", help="write to benchmarks/results/ (the tracked tables)")
    p.add_argument("--name", default="memory", help="output file stem")
    return p


def _fail(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors, before any work."""
    known = set(uniformerv2.list_models())
    for name in args.models.split(","):
        if name not in known:
            parser.error(f"--models: unknown model {name!r}; known: {', '.join(sorted(known))}")
    try:
        batches = _ints(args.batches)
    except ValueError:
        parser.error(f"--batches={args.batches!r}: expected comma-separated integers")
    if not batches or min(batches) < 1:
        parser.error(f"--batches={args.batches!r}: expected integers >= 1")
    for plan in args.plans.split(","):
        if plan not in ("none", "all", "plan") and not plan.isdigit():
            parser.error(f"--plans: {plan!r} is not none, all, plan or a number of blocks")
        if plan == "plan" and args.budget_gb is None:
            parser.error("--plans plan needs --budget-gb")
    for flag in args.fused.split(","):
        if flag not in ("true", "false"):
            parser.error(f"--fused: expected true, false or true,false, got {flag!r}")
    if (args.measure or args.capped_check or args.cap_gb) and not torch.cuda.is_available():
        parser.error("--measure, --cap-gb and --capped-check need a CUDA GPU")
    if args.steps < 1:
        parser.error("--steps: expected >= 1")


class Bench:
    def __init__(self, device: torch.device, amp: str):
        self.device, self.amp = device, amp
        self._predictions: dict[tuple, mp.Prediction] = {}  # the plan searches ask for some cases twice

    def predict(self, name: str, batch: int, fused: bool, blocks: int) -> mp.Prediction:
        key = (name, batch, fused, blocks)
        if key not in self._predictions:
            self._predictions[key] = mp.predict_peak({"name": name}, batch, self.device, amp=self.amp,
                                                     fused=fused, checkpoint_blocks=blocks)
        return self._predictions[key]

    def chosen(self, name: str, batch: int, fused: bool, budget_gb: float) -> tuple[mp.Plan | None, str]:
        """The memory plan's choice, or None and the error naming the largest batch that fits."""
        layers = uniformerv2.configs.get_config(name)["layers"]
        try:
            return mp.choose_plan(lambda b, k: self.predict(name, b, fused, k).peak_bytes, batch, layers,
                                  int(budget_gb * mp.GiB)), ""
        except mp.MemoryPlanError as exc:
            return None, str(exc)

    def measure(self, name: str, batch: int, fused: bool, blocks: int, steps: int) -> dict:
        """Peak allocated bytes and clips/s of real training steps on the GPU ('OOM' when it ran out)."""
        torch.cuda.empty_cache()
        model = optimizer = None
        try:
            with torch.device(self.device):  # initialised on the GPU: an L/14 takes seconds on a CPU
                model = uniformerv2.build_model(name, fused=fused).train()
            model.set_grad_checkpointing(blocks > 0, blocks)
            cfg = model.config
            clips = torch.randn(batch, 3, cfg["t_size"], cfg["input_resolution"], cfg["input_resolution"],
                                device=self.device)
            labels = torch.zeros(batch, dtype=torch.long, device=self.device)
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=1e-6)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.amp)

            def step():
                with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                    logits = model(clips)
                torch.nn.functional.cross_entropy(logits.float(), labels).backward()
                torch.nn.utils.clip_grad_norm_(params, 20.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

            step()  # creates the AdamW states; Triton autotuning happens here
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            return {"measured_gib": torch.cuda.max_memory_allocated(self.device) / mp.GiB,
                    "clips_per_s": batch * steps / seconds}
        except torch.cuda.OutOfMemoryError:
            return {"measured_gib": "OOM", "clips_per_s": None}
        finally:
            del model, optimizer
            torch.cuda.empty_cache()


def _blocks(plan: str, layers: int) -> int:
    if plan in ("none", "all"):
        return 0 if plan == "none" else layers
    return min(int(plan), layers)


def sweep(bench: Bench, args: argparse.Namespace, on_row) -> list[dict]:
    rows = []
    for name in args.models.split(","):
        layers = uniformerv2.configs.get_config(name)["layers"]
        for fused in (flag == "true" for flag in args.fused.split(",")):
            for batch in _ints(args.batches):
                for plan in args.plans.split(","):
                    row = {"model": name, "fused": fused, "batch": batch, "plan": plan}
                    if plan == "plan":
                        start = time.perf_counter()
                        chosen, error = bench.chosen(name, batch, fused, args.budget_gb)
                        row["plan_s"] = time.perf_counter() - start  # the chooser's predictions
                        if chosen is None:
                            rows.append(dict(row, note=error))
                            continue
                        blocks, row["plan"] = chosen.checkpoint_blocks, f"plan: {chosen.checkpoint_blocks} blocks"
                    else:
                        blocks = _blocks(plan, layers)
                    rows.append(run_row(bench, row, name, batch, fused, blocks, args))
                    on_row(rows)
    return rows


def run_row(bench: Bench, row: dict, name: str, batch: int, fused: bool, blocks: int,
            args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    pred = bench.predict(name, batch, fused, blocks)  # a plan row's prediction is the chooser's, reused
    row = dict(row, blocks=blocks, predicted_gib=pred.peak_gib, predict_s=time.perf_counter() - start,
               on="CPU stand-in" if pred.stand_in else str(bench.device))
    if args.measure:
        row.update(bench.measure(name, batch, fused, blocks, args.steps))
    return row


def capped_check(bench: Bench, args: argparse.Namespace, on_row) -> list[dict]:
    """Issue 26's check: the 32x336 L/14 at 24 GiB (batch 1, 2, the largest the plan allows), then uncapped."""
    layers = uniformerv2.configs.get_config(CAPPED_MODEL)["layers"]
    total = torch.cuda.get_device_properties(bench.device).total_memory
    rows = []
    for fused in (flag == "true" for flag in args.fused.split(",")):
        budget = int(CAP_GIB * mp.GiB * mp.DEFAULT_BUDGET_FRACTION)

        def peak(batch: int) -> int:  # with every block checkpointed: the most a batch can save
            return bench.predict(CAPPED_MODEL, batch, fused, layers).peak_bytes

        over = 2
        while peak(over) <= budget:
            over *= 2
        largest = mp.largest_batch(peak, over, peak(over), budget)
        for batch in sorted({1, 2, largest} - {0}):
            for cap in (CAP_GIB, None):
                torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap * mp.GiB / total, bench.device)
                # the trainer's default budget: a share of what the process may allocate, capped or not
                usable = cap * mp.GiB if cap is not None else mp.device_budget_bytes(bench.device)
                budget_gib = usable * mp.DEFAULT_BUDGET_FRACTION / mp.GiB
                chosen, error = bench.chosen(CAPPED_MODEL, batch, fused, budget_gib)
                row = {"model": CAPPED_MODEL, "fused": fused, "batch": batch, "cap_gib": cap, "budget_gib": budget_gib,
                       "plan": "impossible" if chosen is None else f"{chosen.checkpoint_blocks} blocks"}
                if chosen is None:
                    rows.append(dict(row, note=error))
                    continue
                rows.append(run_row(bench, row, CAPPED_MODEL, batch, fused, chosen.checkpoint_blocks,
                                    argparse.Namespace(**{**vars(args), "measure": True})))
                on_row(rows)
    torch.cuda.set_per_process_memory_fraction(1.0, bench.device)
    return rows


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def to_markdown(rows: list[dict], header: str) -> str:
    columns = ["model", "fused", "batch", "cap_gib", "budget_gib", "plan", "blocks", "predicted_gib", "on", "measured_gib",
               "clips_per_s", "predict_s", "plan_s", "note"]
    columns = [c for c in columns if any(c in r for r in rows)]
    lines = [header, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _fail(parser, args)
    device = torch.device(args.device or "cuda")
    bench = Bench(device, args.amp)
    if args.cap_gb and not args.capped_check:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gb * mp.GiB / total), device)
    where = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no GPU (CPU stand-in)"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    precision = "fp32" if args.amp == "none" else f"{args.amp} autocast"
    header = (f"# Training-step peak memory ({precision}, AdamW, clip 20) on {where}, torch {torch.__version__}, "
              f"{stamp}\n\npredicted: uniformerv2.memory_plan.predict_peak (fake tensors); measured: "
              "torch.cuda.max_memory_allocated over the steps after the first")
    out = os.path.join(REPO_ROOT, "benchmarks", "results") if args.results else args.out
    os.makedirs(out, exist_ok=True)

    def write(rows: list[dict]) -> None:  # after every row: a run cut short keeps what it measured
        with open(os.path.join(out, f"{args.name}.md"), "w") as fh:
            fh.write(to_markdown(rows, header))
        with open(os.path.join(out, f"{args.name}.json"), "w") as fh:
            json.dump({"header": header, "rows": rows}, fh, indent=1)

    rows = (capped_check if args.capped_check else sweep)(bench, args, write)
    write(rows)
    print(to_markdown(rows, header))
    print(f"wrote {os.path.join(out, args.name)}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
