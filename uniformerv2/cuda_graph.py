"""Inference and training steps from CUDA graphs: captured once, replayed per batch.

Why: on the H100 the fused model's inference at batch 16 was bound by the host, not the GPU. Each fused op
issues tens of small ATen ops and a few kernel launches per call (``benchmarks/launch_overhead.py`` counts
them), at ~25 us of host time each on that machine, which adds up to more than the GPU's work. A replayed
graph issues all of a forward's kernels in one call. The benchmarks' ``GPU ms`` column (a step replayed
from a CUDA graph) is what this gets.

``GraphedInference`` (``eval.cuda_graph``): ``model.eval()``, no autograd. BatchNorm uses its running
statistics, so every clip's logits depend on that clip alone, and a smaller batch is padded to the captured
one and cut back. ``GraphedTrainStep`` (``train.cuda_graph``): a training step's forward, loss and backward;
the optimizer step stays eager. Both graphs read the parameters where they live: in-place updates
(``optimizer.step()``, ``load_state_dict``) are seen by later replays; replacing a parameter tensor is not
(capture again: a new object).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
import torch.nn as nn

logger = logging.getLogger("uniformerv2")


def _check_arguments(model, warmup: int) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1 (the capture must not compile or autotune), got {warmup}")


def _warm_up_and_capture(device: torch.device, warmup: int, step: Callable[[], object],
                         before_capture: Callable[[], None] | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """``warmup`` calls of ``step`` on a side stream (Triton's compiles and autotuning, cuBLAS's
    workspaces: none of it may happen inside a capture), then ``before_capture()``, then ``step`` captured;
    returns (graph, its output). The capture runs nothing: its output is filled by each replay."""
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    if before_capture is not None:
        before_capture()
    graph = torch.cuda.CUDAGraph()
    # thread_local: a DataLoader's pin-memory thread may touch CUDA during the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = step()
    return graph, out


def _log_eager_once(seen: set, key: tuple, what: str, static: torch.Tensor, video: torch.Tensor) -> None:
    if key not in seen:
        seen.add(key)
        logger.info("%s captured for %s %s; input %s %s runs eagerly", what, tuple(static.shape), static.dtype,
                    tuple(video.shape), video.dtype)


class GraphedInference:
    """``GraphedInference(model)(video)`` equals ``model(video)`` under ``torch.no_grad()`` and ``context()``;
    on CUDA it captures the forward for the first batch's shape and replays it for every batch of that
    shape or a smaller batch (padded). Other shapes, and CPU inputs, run the model as is.

    ``context``: a factory for the context the forward runs in, entered at capture and on the eager path;
    autocast must have ``cache_enabled=False`` (PyTorch's rule for autocast in a capture); ``warmup``:
    forwards before the capture (Triton's autotuning and compilation, cuBLAS's workspace: none of it may
    happen inside a capture).
    """

    def __init__(self, model: nn.Module, context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 warmup: int = 3):
        _check_arguments(model, warmup)
        self.model = model
        self.context = context or contextlib.nullcontext
        self.warmup = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_input: torch.Tensor | None = None
        self.static_output: torch.Tensor | None = None
        self.replays = 0
        self.eager_calls = 0
        self._warned_shapes: set[tuple] = set()

    @torch.no_grad()
    def __call__(self, video: torch.Tensor) -> torch.Tensor:
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video must be a tensor, got {type(video).__name__}")
        if self.model.training:
            raise ValueError("GraphedInference needs model.eval(): in training mode BatchNorm would update its "
                             "running statistics inside the graph and mix the clips of a padded batch")
        if video.device.type != "cuda":
            return self._eager(video)
        if self.graph is None:
            self._capture(video)
        static = self.static_input
        if video.shape[1:] != static.shape[1:] or video.shape[0] > static.shape[0] or video.dtype != static.dtype \
                or video.device != static.device:
            _log_eager_once(self._warned_shapes, (tuple(video.shape), video.dtype, str(video.device)),
                            "CUDA graph", static, video)
            return self._eager(video)
        n = video.shape[0]
        static[:n].copy_(video)
        if n < static.shape[0]:
            static[n:].zero_()  # padding clips: their logits are computed and dropped
        self.graph.replay()
        self.replays += 1
        return self.static_output[:n].clone()

    def _eager(self, video: torch.Tensor) -> torch.Tensor:
        self.eager_calls += 1
        with self.context():
            return self.model(video)

    def _capture(self, video: torch.Tensor) -> None:
        self.static_input = video.detach().clone()

        def forward():
            with self.context():
                return self.model(self.static_input)

        self.graph, self.static_output = _warm_up_and_capture(video.device, self.warmup, forward)
        logger.info("CUDA graph captured for inputs %s %s", tuple(video.shape), video.dtype)


class GraphedTrainStep:
    """``loss = GraphedTrainStep(model, loss_fn)(video, label)``: the forward, the loss and the backward of a
    training step replayed from a CUDA graph; it returns the loss and leaves the gradients in each
    parameter's ``.grad``. The optimizer step (gradient clipping, GradScaler, the lr schedule) stays eager:
    its state and checkpoints are those of eager training, and the loss can be checked before the weights
    change. The graph is captured for the first batch's shape; other shapes, and CPU inputs, run eagerly.

    The gradients are static tensors the graph rewrites on each replay, not accumulates into: do not set them
    to None between steps (``optimizer.zero_grad(set_to_none=True)`` would detach them from the graph); the
    eager path zeroes them in place. ``scale``: applied to the loss before the backward (``GradScaler.scale``:
    its scale is a device tensor updated in place, so the graph follows it). ``context``: the forward's
    context, entered at capture and on the eager path; autocast must have ``cache_enabled=False``.

    Capture does not run the model; the ``warmup`` forward+backward passes before it do (Triton's compiles
    and autotuning, cuBLAS's workspaces: none may happen inside a capture). They update BatchNorm's running
    statistics and draw random numbers (drop path), so the module's buffers and the device's random state
    are put back before the capture: each replay then draws the drop-path masks that the eager step would
    (a captured graph reads the generator's state when it replays and advances it as the eager kernels
    would). Not supported: several processes (DDP), gradient checkpointing, ``torch.compile`` (see
    ``check_training_options``).
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 scale: Callable[[torch.Tensor], torch.Tensor] | None = None, warmup: int = 3):
        _check_arguments(model, warmup)
        self.model = model
        self.loss_fn = loss_fn
        self.context = context or contextlib.nullcontext
        self.scale = scale or (lambda loss: loss)
        self.warmup = warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_video: torch.Tensor | None = None
        self.static_label: torch.Tensor | None = None
        self.static_loss: torch.Tensor | None = None
        self.replays = 0
        self.eager_calls = 0
        self._warned_shapes: set[tuple] = set()

    def __call__(self, video: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if not isinstance(video, torch.Tensor) or not isinstance(label, torch.Tensor):
            raise TypeError("video and label must be tensors")
        if not self.model.training:
            raise ValueError("GraphedTrainStep needs model.train(): a graph captured in training mode replays "
                             "training-mode BatchNorm and drop path")
        if video.device.type != "cuda":
            return self._eager(video, label)
        if self.graph is None:
            self._capture(video, label)
        if (video.shape != self.static_video.shape or video.dtype != self.static_video.dtype
                or label.shape != self.static_label.shape or video.device != self.static_video.device):
            _log_eager_once(self._warned_shapes, (tuple(video.shape), video.dtype, tuple(label.shape)),
                            "training step", self.static_video, video)
            return self._eager(video, label)
        self.static_video.copy_(video)
        self.static_label.copy_(label)
        self.graph.replay()
        self.replays += 1
        return self.static_loss.clone()

    def _forward_backward(self, video: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        with self.context():
            loss = self.loss_fn(self.model(video), label)
        self.scale(loss).backward()
        return loss.detach()

    def _eager(self, video: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        self.eager_calls += 1
        for p in self.params:  # in place: after a capture these are the graph's gradient tensors
            if p.grad is not None:
                p.grad.zero_()
        return self._forward_backward(video, label)

    def _capture(self, video: torch.Tensor, label: torch.Tensor) -> None:
        self.static_video = video.detach().clone()
        self.static_label = label.detach().clone()
        buffers = [b.detach().clone() for b in self.model.buffers()]
        rng_state = torch.cuda.get_rng_state(video.device)

        def step():
            # gradients set to None first: the captured backward allocates them in the graph's pool
            for p in self.params:
                p.grad = None
            return self._forward_backward(self.static_video, self.static_label)

        def undo_warm_up():  # BatchNorm's running statistics and the random numbers the warm-up drew
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            torch.cuda.set_rng_state(rng_state, video.device)

        self.graph, self.static_loss = _warm_up_and_capture(video.device, self.warmup, step, undo_warm_up)
        logger.info("training step (forward, loss, backward) captured in a CUDA graph for inputs %s %s",
                    tuple(video.shape), video.dtype)


def training_option_problems(cfg: dict, world_size: int) -> list[str]:
    """The options (and the process count) with which ``train.cuda_graph`` cannot work, each with why."""
    problems = []
    if world_size > 1:
        problems.append(f"{world_size} processes (DDP's gradient all-reduce runs in backward hooks outside "
                        "a graph; use one process)")
    compile_setting = cfg["train"].get("compile")
    if compile_setting:
        shown = str(compile_setting).lower() if isinstance(compile_setting, bool) else compile_setting
        problems.append(f"train.compile={shown} (torch.compile has CUDA graphs of its own: "
                        "train.compile=reduce-overhead)")
    if cfg["model"].get("grad_checkpointing"):
        problems.append("model.grad_checkpointing=true (recomputation saves and restores the RNG state, "
                        "which a capture forbids)")
    return problems


def check_training_options(cfg: dict, world_size: int) -> None:
    """Raises ValueError, naming the options, where ``train.cuda_graph=true`` cannot work."""
    problems = training_option_problems(cfg, world_size)
    if problems:
        raise ValueError("train.cuda_graph=true cannot be used with " + "; ".join(problems))


def resolve_train_cuda_graph(cfg: dict, device: torch.device, world_size: int) -> bool:
    """Whether training replays its steps from a CUDA graph. ``train.cuda_graph``: false (the default), true
    (an error names the options it cannot work with), or auto: on for one process on a CUDA device without
    ``train.compile`` or ``model.grad_checkpointing``, else off with a log line saying why (one config for a
    GPU, a CPU and torchrun). The eager training step is bound by host time: on an H200 the graphed step took
    49.6 ms against 67.8 ms (Kinetics B/16, 16 clips, bf16) and 91 ms against 111-159 ms (Sth-Sth), in a
    third of the memory (benchmarks/results/h200_2026-11-26.md)."""
    setting = cfg["train"].get("cuda_graph", False)  # true, false or "auto": recipes.check_config says so
    if setting == "auto":
        if device.type != "cuda":
            return False
        problems = training_option_problems(cfg, world_size)
        if problems:
            logger.info("train.cuda_graph=auto: the training steps run eagerly (%s)", "; ".join(problems))
            return False
        return True
    if setting:
        check_training_options(cfg, world_size)
        if device.type != "cuda":
            logger.warning("train.cuda_graph=true needs a CUDA device; the steps run eagerly on %s", device)
    return bool(setting)
