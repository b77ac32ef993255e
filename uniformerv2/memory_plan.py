"""Memory plan: predict a training step's peak memory before the first step, and choose the cheapest
gradient-checkpointing plan that fits a budget.

The prediction runs a training step (forward under the configured autocast, loss, backward, gradient
clipping, AdamW step, after one AdamW step that creates the moments) on *fake* tensors (``torch._subclasses.FakeTensorMode``): every op computes
only its output's shape and dtype, so an L/14 step costs about a second of host time and no device memory.
A dispatch mode counts the bytes of every storage those ops create and forgets them when the storage is
freed (a weak reference), exactly as the allocator would see them; the peak of that count is the
prediction. Parameters, buffers, gradients, AdamW states, the input batch, saved activations, the
backward's temporaries and the recomputation of checkpointed blocks are all included, because all of them
are storages some op creates. Not included: memory an op allocates and frees inside one kernel (cuBLAS or
Triton workspaces) and the caching allocator's fragmentation, which is why ``max_memory_allocated`` is the
number to compare with (not ``memory_reserved``).

On a CUDA device the fake tensors are CUDA tensors, so autocast, attention kernel selection and the fused
ops' backend selection are those of the real run. Without a GPU (``benchmarks/memory.py`` on a laptop) a
CUDA prediction runs on fake CPU tensors instead: CPU autocast with the same dtype, the CPU's fused
attention (which, like the GPU's, saves only a log-sum-exp per query) and the fused ops' Triton backend,
rounded to the CUDA allocator's 512-byte blocks; :func:`predict_peak` reports that it did (``stand_in``).

Plans, from cheapest to most memory-saving: no checkpointing, then checkpointing the first k local blocks
(k = 1 .. layers; the official ``use_checkpoint``/``checkpoint_num``). The peak falls as k grows, so the
fewest blocks that fit are found by bisection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import weakref
from typing import Callable

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

logger = logging.getLogger("uniformerv2")

GiB = 1 << 30
# The share of a device's free memory the default budget plans for: the prediction counts allocated bytes,
# while the caching allocator also needs room for fragmentation and for the workspaces kernels allocate and
# free inside themselves, which the prediction cannot see.
DEFAULT_BUDGET_FRACTION = 0.9
# The CUDA caching allocator hands out blocks in multiples of 512 bytes (c10/cuda/CUDACachingAllocator.cpp,
# kMinBlockSize); the CPU allocator gives what was asked for.
CUDA_BLOCK_BYTES = 512


class MemoryPlanError(ValueError):
    """The configured batch cannot fit the memory budget with any plan."""


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that ops create while they are alive, and the peak of that count.

    Views share their base's storage and are counted once. Memory that existed before the mode was entered
    is invisible to it; the predictor creates everything (parameters included) inside it."""

    def __init__(self, block_bytes: int = 1):
        super().__init__()
        self.block_bytes = block_bytes
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _add(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._live:
            return
        nbytes = -(-storage.nbytes() // self.block_bytes) * self.block_bytes
        self._live[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


@dataclasses.dataclass(frozen=True)
class Prediction:
    peak_bytes: int
    stand_in: str | None = None   # why the prediction ran on another device than the one asked for

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GiB


@dataclasses.dataclass(frozen=True)
class Plan:
    batch_size: int               # clips per process
    checkpoint_blocks: int        # 0 = no checkpointing; k = the first k local blocks
    layers: int
    predicted_peak_bytes: int
    budget_bytes: int | None

    def apply(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(self.checkpoint_blocks > 0, self.checkpoint_blocks)

    def describe(self) -> str:
        what = ("no gradient checkpointing" if self.checkpoint_blocks == 0 else
                f"gradient checkpointing of {self.checkpoint_blocks} of {self.layers} blocks")
        budget = "no budget" if self.budget_bytes is None else f"budget {self.budget_bytes / GiB:.2f} GiB"
        return (f"memory plan: {what}; predicted peak {self.predicted_peak_bytes / GiB:.2f} GiB at "
                f"{self.batch_size} clip(s) per process ({budget})")


def _amp_dtype(amp: str | None) -> torch.dtype | None:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp or "none")


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _input_shape(config: dict, batch_size: int) -> tuple[int, ...]:
    res = config["input_resolution"]
    return (batch_size, 3, config["t_size"], res, res)


def predict_peak(build_args: dict, batch_size: int, device: torch.device | str, amp: str | None = "none",
                 fused: bool = False, checkpoint_blocks: int = 0, clip_grad: float | None = 20.0,
                 ddp: bool = False, backend: str | None = None) -> Prediction:
    """Peak bytes of a training step of ``uniformerv2.build_model(**build_args)`` at ``batch_size`` clips.

    ``build_args`` are ``build_model`` arguments (a name plus overrides, as ``train.model_build_args``
    returns them). ``ddp`` adds DistributedDataParallel's gradient buckets (one copy of the gradients).
    """
    import uniformerv2

    device = torch.device(device)
    stand_in = None
    run_device, block = device, (CUDA_BLOCK_BYTES if device.type == "cuda" else 1)
    if device.type == "cuda" and not torch.cuda.is_available():
        # The autograd engine cannot run a backward on fake CUDA tensors without a CUDA driver.
        stand_in = "no GPU here: fake CPU tensors with CPU autocast and the Triton backend stood in for CUDA"
        run_device = torch.device("cpu")
        if fused and backend is None:
            backend = "triton"
    dtype = _amp_dtype(amp)
    args = {k: v for k, v in build_args.items() if k not in ("use_checkpoint", "checkpoint_num")}
    with torch.device("meta"):
        model = uniformerv2.build_model(**args)
    model.train()
    if fused:
        model.set_fused(True, backend=backend)
    model.set_grad_checkpointing(checkpoint_blocks > 0, checkpoint_blocks)
    shape = _input_shape(model.config, batch_size)
    interpret = _env("TRITON_INTERPRET", "1") if stand_in and fused else contextlib.nullcontext()
    tracker = LiveBytes(block)
    with interpret, FakeTensorMode(allow_non_fake_inputs=True), tracker:
        model.to_empty(device=run_device)
        params = [p for p in model.parameters() if p.requires_grad]
        foreach = device.type == "cuda"  # AdamW's default: one op over all tensors on CUDA, a loop on a CPU
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
        # The steady state holds AdamW's moments: one step on stand-in gradients creates them (cheaper than
        # a second training step).
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bucket = [torch.empty_like(p) for p in params] if ddp else []
        clips = torch.empty(shape, device=run_device)
        labels = torch.zeros(batch_size, dtype=torch.long, device=run_device)
        with torch.autocast(run_device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(clips)
        loss = nn.functional.cross_entropy(logits.float(), labels)
        del logits
        loss.backward()
        del loss
        if clip_grad:
            nn.utils.clip_grad_norm_(params, clip_grad, foreach=foreach)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del bucket, optimizer, params, clips, labels
    return Prediction(tracker.peak, stand_in)


def _fit_boundary(predict: Callable[[int], int], fit: int, fit_peak: int, over: int, over_peak: int,
                  budget: int) -> tuple[int, int]:
    """Given a count ``fit`` whose predicted peak fits the budget and a count ``over`` whose peak does not,
    the fitting count next to a failing one between them (the peak moves one way with the count), with its
    peak. The peak is close to affine in the count (every block, every clip costs about the same), so each
    probe is the affine estimate of where it crosses the budget, rounded towards the fitting side and kept
    strictly between the two: usually two predictions, never more than the counts in between."""
    while abs(over - fit) > 1:
        step = 1 if over > fit else -1
        t = (budget - fit_peak) / (over_peak - fit_peak)  # in [0, 1): over_peak > budget >= fit_peak
        estimate = fit + t * (over - fit)
        guess = math.floor(estimate) if step > 0 else math.ceil(estimate)
        guess = min(max(guess, min(fit, over) + 1), max(fit, over) - 1)
        peak = predict(guess)
        if peak <= budget:
            fit, fit_peak = guess, peak
        else:
            over, over_peak = guess, peak
    return fit, fit_peak


def choose_plan(predict: Callable[[int, int], int], batch_size: int, layers: int, budget_bytes: int) -> Plan:
    """The cheapest plan whose predicted peak (``predict(batch, checkpoint_blocks)``, bytes) fits the budget:
    no checkpointing if it fits, else the fewest checkpointed blocks that fit. Raises MemoryPlanError naming
    the largest batch that fits (with every block checkpointed) when none does."""
    peak_none = predict(batch_size, 0)
    if peak_none <= budget_bytes:
        return Plan(batch_size, 0, layers, peak_none, budget_bytes)
    peak_all = predict(batch_size, layers)
    if peak_all > budget_bytes:
        budget = f"{budget_bytes / GiB:.2f} GiB"
        fits = largest_batch(lambda b: predict(b, layers), batch_size, peak_all, budget_bytes)
        if fits == 0:
            raise MemoryPlanError(
                f"train.batch_size: not even 1 clip per process fits train.memory_budget_gb ({budget}) with "
                f"every block checkpointed")
        raise MemoryPlanError(
            f"train.batch_size: {batch_size} clips per process need {peak_all / GiB:.2f} GiB even with every "
            f"block checkpointed, over train.memory_budget_gb ({budget}); the largest batch that fits is "
            f"{fits} per process")
    blocks, peak = _fit_boundary(lambda k: predict(batch_size, k), layers, peak_all, 0, peak_none, budget_bytes)
    return Plan(batch_size, blocks, layers, peak, budget_bytes)


def largest_batch(predict: Callable[[int], int], too_big: int, too_big_peak: int, budget_bytes: int) -> int:
    """The largest batch below ``too_big`` (whose predicted peak ``too_big_peak`` is over the budget) that
    fits; 0 when not even one clip does."""
    if too_big <= 1:
        return 0
    peak_one = predict(1)
    if peak_one > budget_bytes:
        return 0
    return _fit_boundary(predict, 1, peak_one, too_big, too_big_peak, budget_bytes)[0]


def device_budget_bytes(device: torch.device) -> int:
    """What this process may still allocate on ``device``: the free device memory plus what its own caching
    allocator holds."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def budget_bytes_for(cfg: dict, device: torch.device) -> int | None:
    """``train.memory_budget_gb`` in bytes; unset: DEFAULT_BUDGET_FRACTION of what the CUDA device has left,
    or None (no plan) on a CPU."""
    budget_gb = cfg["train"].get("memory_budget_gb")
    if budget_gb is not None:
        return int(float(budget_gb) * GiB)
    if device.type != "cuda":
        return None
    return int(device_budget_bytes(device) * DEFAULT_BUDGET_FRACTION)


def plan_training(cfg: dict, build_args: dict, model: nn.Module, batch_size: int, device: torch.device,
                  world_size: int = 1, log: bool = True) -> Plan | None:
    """The trainer's memory plan, before the model reaches the device: predicts the step's peak, chooses the
    checkpointing (unless ``model.grad_checkpointing`` was set by hand, which is kept and only checked),
    applies it to ``model`` and records it in ``cfg`` (so that options that cannot run with checkpointing,
    such as ``train.cuda_graph``, see it). Returns None where there is no budget (a CPU without one)."""
    budget = budget_bytes_for(cfg, device)
    if budget is None:  # the same on every rank: the device type and the configuration are
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Every rank plans for the smallest budget (free memory differs between GPUs), so the ranks choose
        # the same plan and a batch that cannot fit stops all of them instead of leaving the others waiting.
        budgets: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(budgets, budget)
        budget = min(budgets)
    layers = len(model.transformer.resblocks)
    amp = cfg["train"]["amp"]

    def predict(batch: int, blocks: int) -> int:
        return predict_peak(build_args, batch, device, amp=amp, fused=model.fused, checkpoint_blocks=blocks,
                            clip_grad=cfg["optim"].get("clip_grad"), ddp=world_size > 1,
                            backend=model.backend).peak_bytes

    m_cfg = cfg["model"]
    if m_cfg.get("grad_checkpointing"):
        blocks = build_args.get("checkpoint_num", layers)
        blocks = int(blocks[0] if isinstance(blocks, (list, tuple)) else blocks)
        plan = Plan(batch_size, blocks, layers, predict(batch_size, blocks), budget)
        if plan.predicted_peak_bytes > budget:
            logger.warning("model.grad_checkpointing was set by hand and its predicted peak is over the budget: %s",
                           plan.describe())
    else:
        plan = choose_plan(predict, batch_size, layers, budget)
        plan.apply(model)
        if plan.checkpoint_blocks:
            m_cfg["grad_checkpointing"], m_cfg["checkpoint_num"] = True, plan.checkpoint_blocks
    if log:
        logger.info(plan.describe())
        if cfg["train"].get("compile") or cfg["train"].get("cuda_graph"):
            logger.info("memory plan: the prediction is of the eager step; train.compile and train.cuda_graph "
                        "change the peak")
    return plan
