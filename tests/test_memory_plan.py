"""The memory plan (uniformerv2/memory_plan.py): its prediction against the measured CPU peak of small models,
the plan chooser, and the error for a batch that cannot fit.

The measured peak: the model is built outside the measurement (its parameters and buffers, and the input
batch, are counted from their storages); the optimizer's creation and two training steps run under
``torch.profiler`` with ``profile_memory=True``, which records every allocation and free of PyTorch's CPU
allocator with its size, in order. Adding them up in order gives the bytes alive at each moment; the peak
of that sum plus the storages alive before is the measured peak, the quantity the prediction claims.

Not counted: a buffer that a convolution allocates and frees within one call (its scratch space), which no op
returns, so fake tensors cannot see it. Its size depends on the CPU: oneDNN's kernels on an AVX-512 machine
hold 1.7-4.8 MB there in these models (33-46% of the Kinetics-style peaks), the native im2col path 0.3-1.6 MB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import uniformerv2
from uniformerv2 import memory_plan as mp
from uniformerv2.recipes import build_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small UniFormerV2s of both families: Kinetics-style (1xPxP stem, no LMHRA) and Sth-Sth-style (stride-2
# stem, LMHRA x2, drop path), CPU friendly.
SMALL = dict(name="tiny", num_classes=5, num_frames=4, input_resolution=16, layers=2, return_list=[1],
             no_lmhra=True, temporal_downsample=False)
SMALL_SSV2 = dict(name="tiny", num_classes=5, num_frames=8, input_resolution=32, layers=2, return_list=[1],
                  backbone_drop_path_rate=0.1, drop_path_rate=0.1)


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def measured_cpu_peak(build_args: dict, batch: int, blocks: int, amp: str | None = None) -> int:
    model = uniformerv2.build_model(**build_args).train()
    model.set_grad_checkpointing(blocks > 0, blocks)
    cfg = model.config
    clips = torch.randn(batch, 3, cfg["t_size"], cfg["input_resolution"], cfg["input_resolution"])
    labels = torch.zeros(batch, dtype=torch.long)
    params = [p for p in model.parameters() if p.requires_grad]
    before = _storage_bytes(list(model.parameters()) + list(model.buffers()) + [clips, labels])
    dtype = {"bf16": torch.bfloat16}.get(amp)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        for _ in range(2):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                logits = model(clips)
            loss = nn.functional.cross_entropy(logits.float(), labels)
            del logits
            loss.backward()
            del loss
            nn.utils.clip_grad_norm_(params, 20.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append(node)
    assert events, "the profiler recorded no allocation"
    events.sort(key=lambda node: node.start_time_ns)
    scratch, allocated = set(), {}
    for node in events:
        if node.extra_fields.alloc_size > 0:
            allocated[node.extra_fields.ptr] = node
            continue
        alloc = allocated.pop(node.extra_fields.ptr, None)
        call = _convolution_call(node)
        if alloc is not None and call is not None and _convolution_call(alloc) is call:
            scratch.update((id(alloc), id(node)))
    alive = peak = 0
    for node in events:
        if id(node) not in scratch:
            alive += node.extra_fields.alloc_size
            peak = max(peak, alive)
    return before + peak


_CONVOLUTIONS = ("aten::convolution", "aten::convolution_backward")


def _convolution_call(node):
    """The outermost convolution (forward or backward) call that ``node`` happened in, or None."""
    call, parent = None, node.parent
    while parent is not None:
        if parent.name in _CONVOLUTIONS:
            call = parent
        parent = parent.parent
    return call


@pytest.mark.parametrize("build_args,blocks,amp", [
    (SMALL, 0, None), (SMALL, 2, None), (SMALL, 0, "bf16"), (SMALL_SSV2, 0, None), (SMALL_SSV2, 2, None),
    (SMALL_SSV2, 0, "bf16"), (dict(SMALL_SSV2, input_resolution=16, num_frames=4), 0, None)],
    ids=["kinetics", "kinetics-checkpointed", "kinetics-bf16", "ssv2", "ssv2-checkpointed", "ssv2-bf16", "ssv2-16px"])
def test_prediction_within_10_percent_of_measured_cpu_peak(build_args, blocks, amp):
    predicted = mp.predict_peak(build_args, 4, "cpu", amp=amp or "none", checkpoint_blocks=blocks)
    assert predicted.stand_in is None
    measured = measured_cpu_peak(build_args, 4, blocks, amp)
    assert abs(predicted.peak_bytes - measured) <= 0.10 * measured, (predicted.peak_bytes, measured)


def test_prediction_follows_batch_and_checkpointing():
    one, four = (mp.predict_peak(SMALL, b, "cpu").peak_bytes for b in (1, 4))
    saved = mp.predict_peak(SMALL, 4, "cpu", checkpoint_blocks=2).peak_bytes
    params = sum(p.numel() * 4 for p in uniformerv2.build_model(**SMALL).parameters())
    assert four > one > 4 * params  # weights, gradients, two AdamW moments, activations
    assert saved < four


def _affine(base: int, per_clip: int, per_block_saving: int):
    return lambda batch, blocks: base + batch * (per_clip - blocks * per_block_saving)


@pytest.mark.parametrize("budget", [1000 + 4 * 100 - k * 4 * 7 for k in range(0, 13)] + [1399, 1064, 1063])
def test_chooser_picks_no_checkpointing_else_the_fewest_blocks(budget):
    predict = _affine(1000, 100, 7)  # 12 blocks; batch 4: 1400 without checkpointing, 1064 with all
    layers, batch = 12, 4
    if budget < predict(batch, layers):
        with pytest.raises(mp.MemoryPlanError):
            mp.choose_plan(predict, batch, layers, budget)
        return
    plan = mp.choose_plan(predict, batch, layers, budget)
    fitting = [k for k in range(layers + 1) if predict(batch, k) <= budget]
    assert plan.checkpoint_blocks == min(fitting)
    assert plan.predicted_peak_bytes == predict(batch, plan.checkpoint_blocks) <= budget


def test_chooser_search_is_exact_when_the_peak_is_not_affine():
    calls = []

    def predict(batch, blocks):  # savings that shrink block by block
        calls.append(blocks)
        return 1000 + batch * 100 - sum(40 // (k + 1) for k in range(blocks))

    for budget in range(predict(8, 24), predict(8, 0) + 1, 7):
        plan = mp.choose_plan(predict, 8, 24, budget)
        fitting = [k for k in range(25) if predict(8, k) <= budget]
        assert plan.checkpoint_blocks == min(fitting), budget


def test_chooser_on_real_predictions():
    cache = {}

    def predict(batch, blocks):
        if (batch, blocks) not in cache:
            cache[batch, blocks] = mp.predict_peak(SMALL, batch, "cpu", checkpoint_blocks=blocks).peak_bytes
        return cache[batch, blocks]

    peaks = [predict(8, k) for k in range(3)]
    assert peaks[0] > peaks[2]
    for budget in sorted(set(peaks)) + [peaks[0] - 1]:
        if budget < peaks[2]:
            continue
        plan = mp.choose_plan(predict, 8, 2, budget)
        assert plan.checkpoint_blocks == min(k for k in range(3) if peaks[k] <= budget), budget
    assert mp.choose_plan(predict, 8, 2, peaks[0]).checkpoint_blocks == 0


@pytest.mark.parametrize("batch", [2, 5, 16, 40])
def test_impossible_batch_names_the_largest_that_fits(batch):
    predict = _affine(1000, 100, 7)  # with all 12 blocks checkpointed: 1000 + 16 per clip
    budget = 1000 + 16 * 3 + 5      # 3 clips fit, 4 do not
    if batch <= 3:
        assert mp.choose_plan(predict, batch, 12, budget).checkpoint_blocks > 0
        return
    with pytest.raises(mp.MemoryPlanError, match=r"train\.batch_size: .*the largest batch that fits is 3 per process"):
        mp.choose_plan(predict, batch, 12, budget)
    with pytest.raises(mp.MemoryPlanError, match=r"not even 1 clip"):
        mp.choose_plan(predict, batch, 12, 1010)


def test_trainer_rejects_a_batch_that_cannot_fit(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "uniformerv2.train", "model.overrides.layers=1", "model.overrides.return_list=[0]",
         "model.overrides.mlp_dropout=[0.0]", "train.batch_size=4", "train.memory_budget_gb=0.00001",
         f"train.output_dir={out}"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.batch_size: not even 1 clip per process fits train.memory_budget_gb" in proc.stderr
    assert not out.exists()  # nothing written before the error


def test_plan_training_applies_the_plan_and_records_it():
    cfg = build_config("synthetic", overrides=["train.memory_budget_gb=1.0"])
    model = uniformerv2.build_model(**SMALL)
    plan = mp.plan_training(cfg, SMALL, model, 4, torch.device("cpu"))
    assert plan.checkpoint_blocks == 0 and not model.transformer.use_checkpoint
    budget = mp.predict_peak(SMALL, 4, "cpu", checkpoint_blocks=2).peak_bytes
    cfg["train"]["memory_budget_gb"] = budget / mp.GiB
    plan = mp.plan_training(cfg, SMALL, model, 4, torch.device("cpu"))
    assert plan.checkpoint_blocks >= 1 and model.transformer.use_checkpoint
    assert model.transformer.checkpoint_num == plan.checkpoint_blocks == cfg["model"]["checkpoint_num"]
    assert mp.plan_training(build_config("synthetic"), SMALL, model, 4, torch.device("cpu")) is None


@pytest.mark.parametrize("value", ["abc", 0, -2, True])
def test_memory_budget_setting_is_checked(value):
    with pytest.raises(ValueError, match="train.memory_budget_gb"):
        build_config("synthetic", overrides=[f"train.memory_budget_gb={str(value).lower()}"])


def test_memory_benchmark_writes_its_table(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "memory.py"), "--models", "tiny", "--batches", "2",
         "--plans", "none,1", "--fused", "false", "--device", "cpu", "--amp", "none", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["rows"]
    assert [(r["plan"], r["blocks"]) for r in rows] == [("none", 0), ("1", 1)]
    assert rows[0]["predicted_gib"] > rows[1]["predicted_gib"] > 0
    assert "| tiny | False | 2 | none |" in (tmp_path / "memory.md").read_text()
    bad = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "memory.py"), "--plans", "plan"],
                         capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert bad.returncode == 2 and "--plans plan needs --budget-gb" in bad.stderr


def _plan_on_rank(rank: int, port: int, budgets: list, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = build_config("synthetic", overrides=[f"train.memory_budget_gb={budgets[rank]}"])
        model = uniformerv2.build_model(**SMALL)
        try:
            result = mp.plan_training(cfg, SMALL, model, 4, torch.device("cpu"), world_size=2).checkpoint_blocks
        except mp.MemoryPlanError:
            result = "error"
        with open(os.path.join(out, f"rank{rank}"), "w") as fh:
            fh.write(str(result))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_plan_for_the_smallest_budget(tmp_path):
    """Ranks whose budgets differ (GPUs with different free memory) choose one plan, or fail together."""
    import socket

    import torch.multiprocessing as tmp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp_none = mp.predict_peak(SMALL, 4, "cpu", ddp=True).peak_bytes
    budgets = [1.0, (ddp_none - 1) / mp.GiB]  # rank 0 fits without checkpointing, rank 1 does not
    tmp.spawn(_plan_on_rank, args=(port, budgets, str(tmp_path)), nprocs=2)
    chosen = [(tmp_path / f"rank{r}").read_text() for r in range(2)]
    assert chosen[0] == chosen[1] != "0", chosen
