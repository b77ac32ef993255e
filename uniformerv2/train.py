"""``uniformerv2-train``: train UniFormerV2 on the embedded synthetic videos or on real video lists.

Examples::

    uniformerv2-train                                   # the embedded default (synthetic preset)
    uniformerv2-train --preset k400_b16_f8x224 data.train_list=k400/train.txt data.val_list=k400/val.txt \\
        model.clip=ViT-B-16.pt train.output_dir=runs/k400
    torchrun --nproc_per_node 8 -m uniformerv2.train --config configs/k400_b16_f8x224.yaml
    uniformerv2-train --config my.yaml --resume auto    # continue from <output_dir>/last.pt

Outputs in ``train.output_dir``: ``config.yaml``, ``last.pt`` (every ``checkpoint_every`` steps and at
the end of every epoch), ``best.pt`` (best validation top-1), ``metrics.jsonl`` / ``metrics.csv`` and
``curves.png``. Checkpoints are written to a temporary file and renamed, so a crash never leaves a torn
file; they hold the model, optimizer, gradient scaler, lr schedule, position (epoch and step) and the
RNG states of every rank, so ``--resume`` continues exactly where the run stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn

from . import distributed as du
from .augment import to_device
from .checkpointing import atomic_save, remove_stale_temporaries, rng_state, saved_best, set_rng_state
from .cuda_graph import GraphedTrainStep, resolve_train_cuda_graph
from .data import FailureReporter
from .evaluate import evaluate_model
from .loading import CheckpointError, read_checkpoint_file
from .memory_plan import MemoryPlanError, plan_training
from .recipes import PRESETS, build_config, save_config
from .run_log import DataWait, MetricsLog, plot_curves
from .runtime import (INPUT_ERRORS, ShardSampler, autocast_context, build_dataset, check_run_inputs, class_names,
                      input_error_message, logging_beside, make_loader, model_from_config, progress_bar,
                      recording_backends, require_file)

logger = logging.getLogger("uniformerv2")


def param_groups(model: nn.Module, weight_decay: float, no_decay_1d: bool = True) -> list[dict]:
    """AdamW groups: no weight decay on 1-d parameters (biases, norm weights, class embedding, balance)."""
    decay, no_decay = [], []
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (no_decay_1d and p.ndim <= 1) or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class WarmupCosine:
    """Per-iteration lr: linear from ``warmup_start_lr`` to ``lr`` over ``warmup_epochs``, then cosine
    from ``lr`` to ``min_lr`` at the end of ``epochs`` (the official "cosine after warmup")."""

    def __init__(self, optimizer, lr: float, min_lr: float, warmup_start_lr: float, warmup_epochs: float,
                 epochs: float, iters_per_epoch: int):
        self.optimizer = optimizer
        self.lr, self.min_lr, self.warmup_start_lr = lr, min_lr, warmup_start_lr
        self.warmup_epochs, self.epochs, self.iters = warmup_epochs, epochs, max(1, iters_per_epoch)
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        e = step / self.iters
        if e < self.warmup_epochs:
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * e / self.warmup_epochs
        span = max(self.epochs - self.warmup_epochs, 1e-12)
        progress = min(1.0, (e - self.warmup_epochs) / span)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(setting) -> dict | None:
    """``train.compile``: false / null (no compile), true (torch.compile's default mode) or one of its modes;
    returns torch.compile's keyword arguments, or None for no compile."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if isinstance(setting, str) and setting.strip().lower() in COMPILE_MODES:
        return {"mode": setting.strip().lower()}
    raise ValueError(f"train.compile={setting!r}: expected true, false or one of {COMPILE_MODES}")


def param_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# training


def train(cfg: dict, resume: str | None = None) -> dict:
    """Runs training as configured; returns a summary dict (final/best accuracy, steps, time)."""
    info = du.setup()
    ok = False
    try:
        trainer = Trainer(cfg, info)
        trainer.restore(resume)
        with logging_beside(trainer.show_bar):
            result = trainer.run()
        ok = True
        return result
    finally:
        du.cleanup(info, sync=ok)


class Trainer:
    """One training run, in the order it happens: set-up (``__init__``: data, model, optimizer, schedule),
    ``restore`` (a checkpoint, or fresh per-rank random streams), ``run`` (epochs of ``train_epoch``, each
    step a ``train_step``; ``save`` and ``validate`` at their points) and ``finish`` (summary and plots)."""

    def __init__(self, cfg: dict, info: du.DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.t_cfg, self.o_cfg, self.d_cfg = cfg["train"], cfg["optim"], cfg["data"]
        self.out_dir = self.t_cfg["output_dir"]
        self.seed = int(self.t_cfg["seed"])
        torch.manual_seed(self.seed)
        np.random.seed(self.seed)
        random.seed(self.seed)
        self._set_up_data()
        self._set_up_model()
        # the run's position: where the next step starts and the best validation so far (restore() moves it)
        self.start_epoch, self.start_step, self.global_step, self.best_acc1 = 0, 0, 0, -1.0
        self.eval_due = False  # the checkpoint resumed from was saved just before a validation that did not end
        self.stop = False  # train.max_steps reached
        self.last_eval = None  # the global step of the latest validation
        self.rank_losses: list[float] = []  # train.rank_report: this rank's own loss at every step
        self.reporter = FailureReporter()
        self.show_bar = info.is_main and bool(self.t_cfg["progress"])
        self.backend_choices: dict | None = None  # op -> backend, recorded at the run's first step

    def _set_up_data(self) -> None:
        cfg, info, t_cfg = self.cfg, self.info, self.t_cfg
        self.train_set = build_dataset(cfg, train=True, device=self.device)
        has_val = self.d_cfg["dataset"] == "synthetic" or self.d_cfg["val_list"]
        self.val_set = build_dataset(cfg, train=False, device=self.device) if has_val else None
        self.num_classes = cfg["model"]["num_classes"] or self.train_set.num_classes
        self.names = class_names(cfg, self.train_set)
        self.global_batch = int(t_cfg["batch_size"])
        if self.global_batch % info.world_size:
            raise ValueError(f"train.batch_size={self.global_batch} is not divisible by the {info.world_size} "
                             "processes")
        self.local_batch = self.global_batch // info.world_size
        self.sampler = ShardSampler(len(self.train_set), info.rank, info.world_size, shuffle=True, seed=self.seed)
        self.iters_per_epoch = len(self.sampler) // self.local_batch
        if self.iters_per_epoch < 1:
            raise ValueError(f"{len(self.train_set)} training videos give no full batch of {self.global_batch}")

    def _set_up_model(self) -> None:
        t_cfg, o_cfg = self.t_cfg, self.o_cfg
        model, self.build_args = model_from_config(self.cfg, self.num_classes, log=self.info.is_main)
        self.memory_plan = plan_training(self.cfg, self.build_args, model, self.local_batch, self.device,
                                         self.info.world_size, log=self.info.is_main)
        self.core = model.to(self.device)  # the bare module: what checkpoints hold
        self.model = self.core  # what the steps call (wrapped by DDP / torch.compile in _wrap_model)
        groups = param_groups(self.core, o_cfg["weight_decay"], o_cfg["no_decay_1d"])
        self.optimizer = torch.optim.AdamW(groups, lr=o_cfg["lr"], betas=tuple(o_cfg["betas"]), eps=o_cfg["eps"])
        self.scheduler = WarmupCosine(self.optimizer, o_cfg["lr"], o_cfg["min_lr"], o_cfg["warmup_start_lr"],
                                      o_cfg["warmup_epochs"], t_cfg["epochs"], self.iters_per_epoch)
        self.amp = t_cfg["amp"]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=(self.amp == "fp16"))
        self.label_smoothing = float(t_cfg["label_smoothing"])

    # ------------------------------------------------------------------------------------------------ restore

    def restore(self, resume: str | None) -> None:
        """Continues from the checkpoint ``resume`` ('auto': <output_dir>/last.pt if present) or gives each rank
        its own dropout / drop-path stream; then wraps the model (after loading: constructing DDP broadcasts
        rank 0's weights to every rank); then writes the configuration into the output folder and opens the
        metrics log (nothing is written there before: a run that cannot start leaves the folder as it was)."""
        info = self.info
        rng_restore = None
        if resume == "auto":  # decided on rank 0 (node-local folders or a stale NFS cache could disagree)
            last = os.path.join(self.out_dir, "last.pt")
            resume = du.broadcast_object(last if info.is_main and os.path.exists(last) else None, info)
        if resume:
            rng_restore = self._load_checkpoint(resume)
        else:
            torch.manual_seed(self.seed + info.rank)  # dropout / drop-path streams differ per rank
        if rng_restore is not None:
            set_rng_state(rng_restore)
        self._wrap_model()
        if info.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
            remove_stale_temporaries(self.out_dir)
            save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))
        du.barrier(info)
        self.metrics = MetricsLog(self.out_dir, info.is_main, resume_step=self.global_step if resume else None,
                                  redo_val=self.eval_due)

    def _load_checkpoint(self, path: str) -> dict:
        """Loads the run state of ``path``; returns this rank's RNG state to continue with."""
        info = self.info
        ckpt = read_checkpoint_file(path)
        if not isinstance(ckpt, dict) or not {"model_state", "optimizer_state", "rng"} <= set(ckpt):
            raise CheckpointError(f"{path}: not a uniformerv2-train checkpoint (it holds no optimizer and RNG state "
                                  "to resume from); model.pretrained=FILE starts a run from its weights")
        self.core.load_state_dict(ckpt["model_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.start_epoch, self.start_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.global_step, self.best_acc1 = int(ckpt["global_step"]), float(ckpt.get("best_acc1", -1.0))
        self.eval_due = bool(ckpt.get("eval_due", False))
        # a checkpoint saved just before a validation holds the best top-1 as it was before it; best.pt, saved
        # by that validation when it improved, holds the newer one
        best = saved_best(self.out_dir, self.global_step)
        if best is not None:
            self.best_acc1 = max(self.best_acc1, best)
        states = ckpt["rng"]
        if len(states) != info.world_size:
            logger.warning("checkpoint has RNG states of %d ranks, running %d: RNG streams will differ",
                           len(states), info.world_size)
        if self.start_step >= self.iters_per_epoch:
            self.start_epoch, self.start_step = self.start_epoch + 1, 0
        if info.is_main:
            logger.info("resumed from %s at epoch %d step %d (global step %d)", path, self.start_epoch,
                        self.start_step, self.global_step)
        return states[info.rank % len(states)]

    def _wrap_model(self) -> None:
        """DDP across processes, torch.compile (train.compile), the CUDA-graph step (train.cuda_graph)."""
        info, device = self.info, self.device
        if info.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=bool(self.t_cfg["find_unused_parameters"]))
        compile_kwargs = compile_options(self.t_cfg.get("compile"))
        if compile_kwargs is not None:
            self.model = torch.compile(self.model, **compile_kwargs)
        self.graphed_step = None  # forward, loss and backward replayed from a CUDA graph
        if resolve_train_cuda_graph(self.cfg, device, info.world_size):
            self.graphed_step = GraphedTrainStep(
                self.core, self.loss_fn, scale=self.scaler.scale,
                context=lambda: autocast_context(device, self.amp, cache_enabled=False))

    def loss_fn(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), label, label_smoothing=self.label_smoothing)

    # ------------------------------------------------------------------------------------------------ run

    def run(self) -> dict:
        """Trains to train.epochs (or train.max_steps), checkpointing and validating as configured."""
        epochs = int(self.t_cfg["epochs"])
        eval_every = int(self.t_cfg["eval_every"] or 0)
        self.data_wait = DataWait(warn=self.info.is_main, num_workers=int(self.d_cfg["num_workers"]))
        self.t_start = time.time()
        if self.info.is_main:
            self._log_start()
        if self.eval_due:
            self.validate(self.start_epoch - 1)
        epoch = self.start_epoch
        for epoch in range(self.start_epoch, epochs):
            step_in_epoch = self.train_epoch(epoch)
            if self.stop and step_in_epoch < self.iters_per_epoch:
                self.save(epoch, step_in_epoch)
                break
            due = self.val_set is not None and bool(eval_every) and (epoch + 1) % eval_every == 0
            # marked so that a resume from it validates first should this validation not finish
            self.save(epoch + 1, 0, eval_due=due)
            if due:
                self.validate(epoch)
            if self.stop:
                break
        else:
            epoch = epochs - 1
        if self.last_eval != self.global_step and self.val_set is not None:
            self.validate(epoch)
        return self.finish()

    def train_epoch(self, epoch: int) -> int:
        """One epoch, from ``start_step`` in the epoch a resumed run starts in; returns the epoch's steps done
        (fewer than ``iters_per_epoch`` where train.max_steps stopped it: ``stop`` is then set)."""
        t_cfg, info = self.t_cfg, self.info
        max_steps = t_cfg.get("max_steps")
        ckpt_every = int(t_cfg["checkpoint_every"] or 0)
        log_every = max(1, int(t_cfg["log_every"]))
        skip = self.start_step if epoch == self.start_epoch else 0
        self.train_set.set_epoch(epoch)
        self.sampler.set_epoch(epoch, skip * self.local_batch)
        loader = make_loader(self.train_set, self.local_batch, self.sampler, self.d_cfg["num_workers"],
                             self.seed * 7919 + epoch, self.device.type == "cuda")
        self.model.train()
        bar = progress_bar(total=self.iters_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{t_cfg['epochs']}",
                           disable=not self.show_bar)
        # the window's loss stays on the device until a log step: a .item() per step would stop the host
        # from queueing the next step while the GPU finishes this one
        window_loss, window_n = torch.zeros((), device=self.device), 0
        step_in_epoch = skip
        for batch in self.data_wait.batches(loader):
            if step_in_epoch >= self.iters_per_epoch:
                break
            if max_steps is not None and self.global_step >= int(max_steps):
                self.stop = True
                break
            self.reporter(batch["failed"])
            lr = self.scheduler.get_last_lr()
            if self.backend_choices is None:  # the run's first step: which backend each fused op runs on
                with recording_backends({}) as self.backend_choices:
                    loss = self.train_step(batch)
                if info.is_main and self.backend_choices:
                    logger.info("fused ops: %s", ", ".join(f"{op} on {name}" for op, name in
                                                            sorted(self.backend_choices.items())))
            else:
                loss = self.train_step(batch)
            step_in_epoch += 1
            window_loss += loss.detach().float()
            window_n += 1
            bar.update(1)
            if self.global_step % log_every == 0 or step_in_epoch == self.iters_per_epoch:
                self._log_window(epoch, lr, window_loss, window_n, bar)
                window_loss, window_n = torch.zeros((), device=self.device), 0
            if max_steps is not None and self.global_step >= int(max_steps):
                self.stop = True
                break
            if ckpt_every and self.global_step % ckpt_every == 0 and step_in_epoch < self.iters_per_epoch:
                self.save(epoch, step_in_epoch)
        bar.close()
        return step_in_epoch

    def train_step(self, batch: dict) -> torch.Tensor:
        """One optimizer step on ``batch``; returns the loss (on the device)."""
        video = to_device(batch["video"], self.device, self.cfg, train=True)  # augment_on=gpu: transformed there
        label = batch["label"].to(self.device, non_blocking=True)
        if self.graphed_step is not None:
            loss = self.graphed_step(video, label)  # rewrites the gradients: no zero_grad
        else:
            with autocast_context(self.device, self.amp):
                loss = self.loss_fn(self.model(video), label)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
        # checked once the backward is queued (the check waits for the GPU; before the backward it kept
        # the host idle through the forward's GPU time) and before the optimizer step, which it protects
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {self.global_step}")
        if self.o_cfg.get("clip_grad"):
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.core.parameters(), float(self.o_cfg["clip_grad"]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.global_step += 1
        if self.t_cfg.get("rank_report"):
            self.rank_losses.append(loss.item())
        return loss

    def _log_window(self, epoch: int, lr: float, window_loss: torch.Tensor, window_n: int, bar) -> None:
        """The log window's mean loss, throughput and data wait: on the progress bar and in the metrics."""
        # every rank reaches the same log steps: the mean over ranks of the window's sum is the sum over its
        # steps of each step's mean over ranks
        mean_loss = du.all_reduce_mean(window_loss, self.info).item() / window_n
        seconds, wait = self.data_wait.end_window()
        cps = window_n * self.global_batch / max(seconds, 1e-9)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{cps:.1f}", data_wait=f"{100 * wait:.0f}%")
        self.metrics.add(kind="train", epoch=epoch + 1, step=self.global_step, loss=mean_loss, lr=lr,
                         clips_per_s=cps, data_wait=wait, acc1=None, acc5=None, time_s=time.time() - self.t_start)
        if self.info.is_main and not self.show_bar:  # the bar shows these; without it the log does
            logger.info("epoch %d step %d: loss %.4f lr %.2e %.1f clips/s, %.0f%% waiting for data", epoch + 1,
                        self.global_step, mean_loss, lr, cps, 100 * wait)

    def _log_start(self) -> None:
        """What the run is about to do: data, device, model, batch and steps."""
        info, t_cfg = self.info, self.t_cfg
        val = "no validation set" if self.val_set is None else f"{len(self.val_set)} validation videos"
        logger.info("data: %d training videos, %s, %d classes (%s)", len(self.train_set), val, self.num_classes,
                    self.d_cfg["dataset"])
        device = str(self.device) + (f" ({torch.cuda.get_device_name(self.device)})" if self.device.type == "cuda"
                                     else "")
        logger.info("device: %s, %d process%s, amp %s", device, info.world_size, "es" if info.world_size > 1 else "",
                    self.amp)
        params = sum(p.numel() for p in self.core.parameters())
        fused = getattr(self.core, "fused", False)
        logger.info("model: %s, %.2fM parameters, %s", self.cfg["model"]["name"], params / 1e6,
                    "fused ops (backend per op below, at the first step)" if fused else "reference PyTorch ops")
        total = int(t_cfg["epochs"]) * self.iters_per_epoch
        if t_cfg.get("max_steps") is not None:
            total = min(total, int(t_cfg["max_steps"]))
        logger.info("batch %d (%d per process), %d steps per epoch, %d epochs: %d steps in all, from step %d",
                    self.global_batch, self.local_batch, self.iters_per_epoch, int(t_cfg["epochs"]), total,
                    self.global_step)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save(self, epoch: int, step_in_epoch: int, name: str = "last.pt", eval_due: bool = False) -> None:
        """The run's state (rank 0 writes it; every rank takes part) as ``name`` in the output folder;
        ``eval_due``: a validation of this state follows (a run resumed from it does that validation first)."""
        info = self.info
        du.broadcast_buffers(self.core, info)  # the checkpoint holds rank 0's; every rank continues with them
        states = du.all_gather_objects(rng_state(), info)
        if info.is_main:
            atomic_save({
                "model_state": self.core.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "scheduler": self.scheduler.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": self.global_step, "rng": states,
                "best_acc1": self.best_acc1, "cfg": self.cfg, "model_build": self.build_args, "classes": self.names,
                "eval_due": eval_due,
            }, os.path.join(self.out_dir, name))
        du.barrier(info)

    def validate(self, epoch: int) -> dict | None:
        """Evaluates on the validation set, logs the result and saves ``best.pt`` when top-1 improved."""
        if self.val_set is None:
            return None
        info = self.info
        du.broadcast_buffers(self.core, info)  # one set of BatchNorm running statistics on every rank
        result = evaluate_model(self.core, self.val_set, self.cfg, info, self.num_classes,
                                progress=self.t_cfg["progress"], reporter=self.reporter,
                                desc=f"eval epoch {epoch + 1}")
        self.last_eval = self.global_step
        if info.is_main:
            self.metrics.add(kind="val", epoch=epoch + 1, step=self.global_step, loss=result["loss"], lr=None,
                             clips_per_s=result["clips_per_s"], acc1=result["acc1"], acc5=result["acc5"],
                             time_s=time.time() - self.t_start)
            self.metrics.write_csv()
            logger.info("epoch %d step %d: val top-1 %.2f%% top-5 %.2f%% loss %.4f", epoch + 1, self.global_step,
                        result["acc1"], result["acc5"], result["loss"])
        if result["acc1"] > self.best_acc1:
            self.best_acc1 = result["acc1"]
            self.save(epoch + 1, 0, "best.pt")
        return result

    # ------------------------------------------------------------------------------------------------ finish

    def finish(self) -> dict:
        """The summary (returned, and in summary.json), metrics.csv, curves.png and the rank reports."""
        info, out_dir = self.info, self.out_dir
        elapsed = time.time() - self.t_start
        summary = {"global_step": self.global_step, "best_acc1": self.best_acc1, "time_s": elapsed, "final": None}
        val_rows = [r for r in self.metrics.rows if r["kind"] == "val"]
        if val_rows:
            summary["final"] = {"acc1": val_rows[-1]["acc1"], "acc5": val_rows[-1]["acc5"]}
        if info.is_main:
            self.metrics.write_csv()
            try:
                plot_curves(self.metrics.rows, os.path.join(out_dir, "curves.png"))
            except Exception as exc:  # noqa: BLE001 - a plot must never cost a finished run
                logger.warning("could not plot curves: %s", exc)
            with open(os.path.join(out_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            best = f"best val top-1 {self.best_acc1:.2f}%" if self.best_acc1 >= 0 else "no validation"  # -1: none
            logger.info("done: %d steps in %.1f s; %s", self.global_step, elapsed, best)
        if self.t_cfg.get("rank_report"):
            with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as fh:
                json.dump({"rank": info.rank, "world_size": info.world_size, "local_losses": self.rank_losses,
                           "mean_losses": [r["loss"] for r in self.metrics.rows if r["kind"] == "train"]
                           if info.is_main else None, "param_digest": param_digest(self.core)}, fh)
        return summary


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uniformerv2-train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides: section.key=value (YAML values), e.g. optim.lr=1e-4 train.epochs=5 "
               "model.overrides.width=96\npresets: " + ", ".join(sorted(PRESETS)))
    p.add_argument("--config", help="YAML file (sections model, data, optim, train, eval)")
    p.add_argument("--preset", help="named recipe (default: synthetic unless the YAML names one)")
    p.add_argument("--resume", nargs="?", const="auto",
                   help="checkpoint to continue from; 'auto' (or no value) = <output_dir>/last.pt if present")
    p.add_argument("--output-dir", help="shortcut for train.output_dir=...")
    p.add_argument("--print-config", action="store_true", help="print the merged configuration and exit")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        overrides.append(args.resume)  # `--resume key=value`: the value-less --resume, then an override
        args.resume = "auto"
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    preset = args.preset
    if preset is None and not args.config:
        preset = "synthetic"
    try:  # every input checked before anything is written
        if args.config:
            require_file(args.config, "--config")
        cfg = build_config(preset, args.config, overrides)
        check_run_inputs(cfg, args.resume)
    except INPUT_ERRORS as exc:
        parser.error(input_error_message(exc))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK')}] %(message)s")
    try:
        summary = train(cfg, args.resume)
    except CheckpointError as exc:  # a --resume or model.* file that is no usable checkpoint (nothing written)
        parser.error(input_error_message(exc))
    except MemoryPlanError as exc:  # the batch cannot fit: a usage error, before any step
        parser.error(str(exc))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
