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
import csv
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn as nn

from . import distributed as du
from .cuda_graph import GraphedTrainStep, resolve_train_cuda_graph
from .data import FailureReporter, VideoListDataset, collate_videos, read_labels
from .recipes import PRESETS, USER_ERRORS, build_config, error_message, save_config
from .synthetic import MovingShapes

logger = logging.getLogger("uniformerv2")


# ----------------------------------------------------------------------------------------------------
# data


class ShardSampler(torch.utils.data.Sampler):
    """Per-rank indices: a (seed, epoch) permutation when shuffling, split into equal strided shards
    (the tail that does not divide evenly is dropped when ``drop_last``), optionally skipping the first
    ``skip`` indices of this rank (mid-epoch resumption)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.drop_last:
            order = order[: self.size // self.world_size * self.world_size]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._indices()[self.skip:])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.skip)


def build_dataset(cfg: dict, train: bool, list_file: str | None = None, num_views: int | None = None):
    d = cfg["data"]
    if d["dataset"] == "synthetic":
        s = d["synthetic"]
        return MovingShapes(s["train_size"] if train else s["val_size"], d["num_frames"], d["crop_size"],
                            "train" if train else "val", s["seed"], s["noise"])
    if d["dataset"] != "video_list":
        raise ValueError(f"data.dataset must be 'synthetic' or 'video_list', got {d['dataset']!r}")
    list_file = list_file or (d["train_list"] if train else d["val_list"])
    if not list_file:
        raise ValueError(f"data.{'train' if train else 'val'}_list is required for data.dataset=video_list")
    e = cfg["eval"]
    return VideoListDataset(
        list_file, num_frames=d["num_frames"], train=train, crop_size=d["crop_size"],
        short_side=d["short_side"], num_clips=e["num_clips"], num_crops=e["num_crops"], scale=d["scale"],
        ratio=d["ratio"], flip=d["flip"], randaugment=d["randaugment"], root=d["root"],
        seed=cfg["train"]["seed"])


def class_names(cfg: dict, dataset) -> list[str] | None:
    if cfg["data"].get("labels"):
        return read_labels(cfg["data"]["labels"])
    return list(getattr(dataset, "classes", [])) or None


def make_loader(dataset, batch_size: int, sampler, num_workers: int, seed: int, pin: bool):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_videos,
        pin_memory=pin, drop_last=False, generator=g, persistent_workers=False)


# ----------------------------------------------------------------------------------------------------
# model


def _index_list(value):
    if value is None or isinstance(value, (list, tuple)):
        return value
    if isinstance(value, str) and value.lower() == "k400":
        return "k400"
    with open(value) as fh:
        return [int(tok) for tok in fh.read().replace(",", " ").split()]


def model_build_args(cfg: dict, num_classes: int) -> dict:
    """The arguments of ``uniformerv2.build_model`` this configuration means (stored in checkpoints)."""
    m, d = cfg["model"], cfg["data"]
    overrides = dict(m.get("overrides") or {})
    overrides.setdefault("input_resolution", d["crop_size"])
    if m.get("grad_checkpointing"):
        overrides["use_checkpoint"] = True
        from .configs import get_config

        layers = overrides.get("layers", get_config(m["name"])["layers"])
        overrides["checkpoint_num"] = m["checkpoint_num"] if m.get("checkpoint_num") is not None else layers
    return {"name": m["name"], "num_classes": num_classes, "num_frames": d["num_frames"], **overrides}


def resolve_fused(value) -> bool:
    """model.fused / --fused: true, false, or auto = the fused kernels on a CUDA machine once they have
    passed their tests on a GPU (uniformerv2_kernels.backends.TRITON_GPU_VERIFIED), else the reference."""
    if value in ("auto", None):
        if not torch.cuda.is_available():
            return False
        from uniformerv2_kernels import backends

        if not backends.TRITON_GPU_VERIFIED:
            logger.warning("model.fused=auto: the fused kernels have not yet passed their tests on a GPU, so "
                           "the reference model runs; model.fused=true uses them anyway")
        return backends.TRITON_GPU_VERIFIED
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes", "on")
    return bool(value)


def build_model(cfg: dict, num_classes: int, log: bool = True) -> tuple[nn.Module, dict]:
    """Builds and initialises the model (CLIP, checkpoint, K710 head mapping). Returns (model, build args)."""
    import uniformerv2

    m = cfg["model"]
    args = model_build_args(cfg, num_classes)
    head = _index_list(m.get("k710_head"))
    build = dict(args)
    if head is not None:
        build["num_classes"] = 710
    model = uniformerv2.build_model(**build)
    if m.get("clip"):
        keys = uniformerv2.load_clip(model, m["clip"])
        if log:
            logger.info("initialised %d tensors from CLIP weights %s", len(keys), m["clip"])
    if m.get("pretrained"):
        report = uniformerv2.load_checkpoint(model, m["pretrained"], strict=m.get("pretrained_strict", True))
        if log:
            logger.info("loaded %s (%s)", m["pretrained"],
                        ", ".join(f"{k}: {len(v)}" for k, v in report.items()) or "exact")
    if head is not None:
        uniformerv2.map_k710_head(model, head)
        out = model.transformer.proj[2].out_features
        if out != num_classes:
            raise ValueError(f"model.k710_head maps to {out} classes but the data has {num_classes}")
    if resolve_fused(m.get("fused", "auto")):
        model.set_fused(True)
    return model, args


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


def autocast_context(device: torch.device, amp: str, cache_enabled: bool | None = None):
    """Autocast for train.amp; ``cache_enabled=False`` for a CUDA-graph capture (PyTorch requires it there:
    the cast-weight cache would hold tensors from outside the graph's memory pool)."""
    if amp in (None, "none", "fp32", False):
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    if dtype is None:
        raise ValueError(f"train.amp must be none, fp16 or bf16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


# ----------------------------------------------------------------------------------------------------
# checkpoints, RNG, metrics


def rng_state() -> dict:
    """This process's RNG streams: CPU, numpy, python, and the CUDA stream of its own device only (the one
    a rank uses; saving every visible GPU's would break a resume with another GPU layout)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, (list, tuple)):  # older checkpoints kept every visible device's state
            device = torch.cuda.current_device()
            cuda = cuda[device] if device < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def atomic_save(obj, path: str) -> None:
    """torch.save to ``path.tmp`` in the same folder, fsync, then rename over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class MetricsLog:
    """Rows in ``metrics.jsonl`` (appended as they come) mirrored to ``metrics.csv``."""

    FIELDS = ["kind", "epoch", "step", "loss", "lr", "clips_per_s", "data_wait", "acc1", "acc5", "time_s"]

    def __init__(self, out_dir: str, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        self.jsonl = os.path.join(out_dir, "metrics.jsonl")
        self.csv = os.path.join(out_dir, "metrics.csv")
        self.rows: list[dict] = []
        if enabled and resume_step is not None and os.path.exists(self.jsonl):
            with open(self.jsonl) as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
            self.rows = [r for r in rows if r["step"] <= resume_step]
        if enabled:
            with open(self.jsonl, "w") as fh:
                for r in self.rows:
                    fh.write(json.dumps(r) + "\n")

    def add(self, **row) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    def write_csv(self) -> None:
        if not self.enabled:
            return
        with open(self.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=self.FIELDS, extrasaction="ignore")
            w.writeheader()
            for r in self.rows:
                w.writerow(r)


def plot_curves(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["kind"] == "train"]
    val = [r for r in rows if r["kind"] == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val loss")
        axes[1].plot([r["step"] for r in val], [r["acc1"] for r in val], "o-", label="val top-1")
        axes[1].plot([r["step"] for r in val], [r["acc5"] for r in val], "s--", label="val top-5")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("cross-entropy")
    axes[0].legend()
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("accuracy (%)")
    axes[1].set_ylim(0, 100)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def param_digest(model: nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# training


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def train(cfg: dict, resume: str | None = None) -> dict:
    """Runs training as configured; returns a summary dict (final/best accuracy, steps, time)."""
    info = du.setup()
    ok = False
    try:
        result = _train(cfg, resume, info)
        ok = True
        return result
    finally:
        du.cleanup(info, sync=ok)


def _train(cfg: dict, resume: str | None, info: du.DistInfo) -> dict:
    t_cfg, o_cfg, d_cfg = cfg["train"], cfg["optim"], cfg["data"]
    out_dir = t_cfg["output_dir"]
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)
        save_config(cfg, os.path.join(out_dir, "config.yaml"))
    du.barrier(info)
    device = info.device
    seed = int(t_cfg["seed"])
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)

    # data
    train_set = build_dataset(cfg, train=True)
    val_set = build_dataset(cfg, train=False) if (d_cfg["dataset"] == "synthetic" or d_cfg["val_list"]) else None
    num_classes = cfg["model"]["num_classes"] or train_set.num_classes
    names = class_names(cfg, train_set)
    global_batch = int(t_cfg["batch_size"])
    if global_batch % info.world_size:
        raise ValueError(f"train.batch_size={global_batch} is not divisible by the {info.world_size} processes")
    local_batch = global_batch // info.world_size
    sampler = ShardSampler(len(train_set), info.rank, info.world_size, shuffle=True, seed=seed)
    iters_per_epoch = len(sampler) // local_batch
    if iters_per_epoch < 1:
        raise ValueError(f"{len(train_set)} training videos give no full batch of {global_batch}")

    # model
    model, build_args = build_model(cfg, num_classes, log=info.is_main)
    model.to(device)
    core = model
    groups = param_groups(core, o_cfg["weight_decay"], o_cfg["no_decay_1d"])
    optimizer = torch.optim.AdamW(groups, lr=o_cfg["lr"], betas=tuple(o_cfg["betas"]), eps=o_cfg["eps"])
    scheduler = WarmupCosine(optimizer, o_cfg["lr"], o_cfg["min_lr"], o_cfg["warmup_start_lr"],
                             o_cfg["warmup_epochs"], t_cfg["epochs"], iters_per_epoch)
    amp = t_cfg["amp"]
    scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))

    # state (loaded before the DDP wrap, whose construction broadcasts rank 0's weights to every rank)
    start_epoch, start_step, global_step, best_acc1 = 0, 0, 0, -1.0
    rng_restore = None
    if resume == "auto":  # decided on rank 0 (node-local folders or a stale NFS cache could disagree)
        last = os.path.join(out_dir, "last.pt")
        resume = du.broadcast_object(last if info.is_main and os.path.exists(last) else None, info)
    if resume:
        ckpt = torch.load(resume, map_location="cpu", weights_only=False)
        core.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer_state"])
        scaler.load_state_dict(ckpt["scaler"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        global_step, best_acc1 = int(ckpt["global_step"]), float(ckpt.get("best_acc1", -1.0))
        states = ckpt["rng"]
        if len(states) != info.world_size:
            logger.warning("checkpoint has RNG states of %d ranks, running %d: RNG streams will differ",
                           len(states), info.world_size)
        rng_restore = states[info.rank % len(states)]
        if start_step >= iters_per_epoch:
            start_epoch, start_step = start_epoch + 1, 0
        if info.is_main:
            logger.info("resumed from %s at epoch %d step %d (global step %d)", resume, start_epoch,
                        start_step, global_step)
        del ckpt
    else:
        torch.manual_seed(seed + info.rank)  # dropout / drop-path streams differ per rank
    if rng_restore is not None:
        set_rng_state(rng_restore)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=bool(t_cfg["find_unused_parameters"]))
    compile_kwargs = compile_options(t_cfg.get("compile"))
    if compile_kwargs is not None:
        model = torch.compile(model, **compile_kwargs)
    label_smoothing = float(t_cfg["label_smoothing"])

    def loss_fn(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.float(), label, label_smoothing=label_smoothing)

    graphed_step = None  # train.cuda_graph: forward, loss and backward replayed from a CUDA graph
    if resolve_train_cuda_graph(cfg, device, info.world_size):
        graphed_step = GraphedTrainStep(core, loss_fn, scale=scaler.scale,
                                        context=lambda: autocast_context(device, amp, cache_enabled=False))

    metrics = MetricsLog(out_dir, info.is_main, resume_step=global_step if resume else None)
    reporter = FailureReporter()
    max_steps = t_cfg.get("max_steps")
    epochs = int(t_cfg["epochs"])
    eval_every = int(t_cfg["eval_every"] or 0)
    ckpt_every = int(t_cfg["checkpoint_every"] or 0)
    log_every = max(1, int(t_cfg["log_every"]))
    rank_losses: list[float] = []
    t_start = time.time()
    last_eval = None

    def save(epoch: int, step_in_epoch: int, name: str = "last.pt") -> None:
        du.broadcast_buffers(core, info)  # the checkpoint holds rank 0's; every rank continues with them
        states = du.all_gather_objects(rng_state(), info)
        if info.is_main:
            atomic_save({
                "model_state": core.state_dict(), "optimizer_state": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                "step_in_epoch": step_in_epoch, "global_step": global_step, "rng": states,
                "best_acc1": best_acc1, "cfg": cfg, "model_build": build_args, "classes": names,
            }, os.path.join(out_dir, name))
        du.barrier(info)

    def run_eval(epoch: int) -> dict | None:
        nonlocal best_acc1, last_eval
        if val_set is None:
            return None
        from .evaluate import evaluate_model

        du.broadcast_buffers(core, info)  # one set of BatchNorm running statistics on every rank
        result = evaluate_model(core, val_set, cfg, info, num_classes, progress=t_cfg["progress"],
                                reporter=reporter, desc=f"eval epoch {epoch + 1}")
        last_eval = global_step
        if info.is_main:
            metrics.add(kind="val", epoch=epoch + 1, step=global_step, loss=result["loss"], lr=None,
                        clips_per_s=result["clips_per_s"], acc1=result["acc1"], acc5=result["acc5"],
                        time_s=time.time() - t_start)
            metrics.write_csv()
            logger.info("epoch %d step %d: val top-1 %.2f%% top-5 %.2f%% loss %.4f", epoch + 1, global_step,
                        result["acc1"], result["acc5"], result["loss"])
        if result["acc1"] > best_acc1:
            best_acc1 = result["acc1"]
            save(epoch + 1, 0, "best.pt")
        return result

    stop = False
    tqdm = _tqdm()
    data_wait = DataWait(warn=info.is_main, num_workers=int(d_cfg["num_workers"]))
    for epoch in range(start_epoch, epochs):
        train_set.set_epoch(epoch)
        skip = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch, skip * local_batch)
        loader = make_loader(train_set, local_batch, sampler, d_cfg["num_workers"], seed * 7919 + epoch,
                             device.type == "cuda")
        model.train()
        bar = tqdm(total=iters_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not (info.is_main and t_cfg["progress"]), dynamic_ncols=True, mininterval=1.0,
                   file=sys.stderr)
        # the window's loss stays on the device until a log step: a .item() per step would stop the host
        # from queueing the next step while the GPU finishes this one
        window_loss, window_n, window_t = torch.zeros((), device=device), 0, time.time()
        step_in_epoch = skip
        for batch in data_wait.batches(loader):
            if step_in_epoch >= iters_per_epoch:
                break
            if max_steps is not None and global_step >= int(max_steps):
                stop = True
                break
            reporter(batch["failed"])
            video = batch["video"].to(device, non_blocking=True)
            label = batch["label"].to(device, non_blocking=True)
            lr = scheduler.get_last_lr()
            if graphed_step is not None:
                loss = graphed_step(video, label)  # rewrites the gradients: no zero_grad
            else:
                with autocast_context(device, amp):
                    loss = loss_fn(model(video), label)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
            # checked once the backward is queued (the check waits for the GPU; before the backward it kept
            # the host idle through the forward's GPU time) and before the optimizer step, which it protects
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {global_step}")
            if o_cfg.get("clip_grad"):
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(core.parameters(), float(o_cfg["clip_grad"]))
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            if t_cfg.get("rank_report"):
                rank_losses.append(loss.item())
            window_loss += loss.detach().float()
            window_n += 1
            bar.update(1)
            if global_step % log_every == 0 or step_in_epoch == iters_per_epoch:
                # every rank reaches the same log steps: the mean over ranks of the window's sum is the sum
                # over its steps of each step's mean over ranks
                mean_loss = du.all_reduce_mean(window_loss, info).item() / window_n
                dt = time.time() - window_t
                cps = window_n * global_batch / max(dt, 1e-9)
                wait = data_wait.share(dt)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", clips_s=f"{cps:.1f}",
                                data_wait=f"{100 * wait:.0f}%")
                metrics.add(kind="train", epoch=epoch + 1, step=global_step, loss=mean_loss,
                            lr=lr, clips_per_s=cps, data_wait=wait, acc1=None, acc5=None,
                            time_s=time.time() - t_start)
                window_loss, window_n, window_t = torch.zeros((), device=device), 0, time.time()
            if max_steps is not None and global_step >= int(max_steps):
                stop = True
                break
            if ckpt_every and global_step % ckpt_every == 0 and step_in_epoch < iters_per_epoch:
                save(epoch, step_in_epoch)
        bar.close()
        if stop and step_in_epoch < iters_per_epoch:
            save(epoch, step_in_epoch)
            break
        save(epoch + 1, 0)
        if eval_every and (epoch + 1) % eval_every == 0:
            run_eval(epoch)
        if stop:
            break
    else:
        epoch = epochs - 1

    if last_eval != global_step and val_set is not None:
        run_eval(epoch)
    elapsed = time.time() - t_start
    summary = {"global_step": global_step, "best_acc1": best_acc1, "time_s": elapsed,
               "final": None}
    val_rows = [r for r in metrics.rows if r["kind"] == "val"]
    if val_rows:
        summary["final"] = {"acc1": val_rows[-1]["acc1"], "acc5": val_rows[-1]["acc5"]}
    if info.is_main:
        metrics.write_csv()
        try:
            plot_curves(metrics.rows, os.path.join(out_dir, "curves.png"))
        except Exception as exc:  # noqa: BLE001 - a plot must never cost a finished run
            logger.warning("could not plot curves: %s", exc)
        with open(os.path.join(out_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        logger.info("done: %d steps in %.1f s; best val top-1 %.2f%%", global_step, elapsed, best_acc1)
    if t_cfg.get("rank_report"):
        with open(os.path.join(out_dir, f"rank{info.rank}.json"), "w") as fh:
            json.dump({"rank": info.rank, "world_size": info.world_size, "local_losses": rank_losses,
                       "mean_losses": [r["loss"] for r in metrics.rows if r["kind"] == "train"]
                       if info.is_main else None, "param_digest": param_digest(core)}, fh)
    return summary


class DataWait:
    """The host's time blocked on the DataLoader for the next batch, per log window: the share of the
    window's wall time, and one warning (main process) the first time it is large after an epoch's first
    window (which includes starting the workers). A step whose host waits for data leaves the GPU idle:
    decoding and augmenting real videos can feed fewer clips per second than a fused step consumes
    (benchmarks/data_pipeline.py)."""

    WARN_SHARE = 0.3

    def __init__(self, warn: bool, num_workers: int):
        self.seconds = 0.0
        self.first_window = True
        self.warn = warn
        self.num_workers = num_workers

    def batches(self, loader):
        """``loader``'s batches (one epoch's), each one's wait added to ``seconds``."""
        self.seconds, self.first_window = 0.0, True
        it = iter(loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.seconds += time.perf_counter() - start
            yield batch

    def share(self, window_seconds: float) -> float:
        """The window's share of waiting (then the count restarts for the next window)."""
        share = min(1.0, self.seconds / max(window_seconds, 1e-9))
        first_window, self.seconds, self.first_window = self.first_window, 0.0, False
        if self.warn and not first_window and share > self.WARN_SHARE:
            self.warn = False
            logger.warning("training waited %.0f%% of the time for data: raise data.num_workers (now %d) on free "
                           "cores, re-encode the videos with a keyframe every 16 frames (uniformerv2-reencode), "
                           "or measure the input pipeline with benchmarks/data_pipeline.py", 100 * share,
                           self.num_workers)
        return share


def _tqdm():
    from tqdm.auto import tqdm

    return tqdm


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
    args = build_parser().parse_intermixed_args(argv)
    overrides = list(args.overrides)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        overrides.append(args.resume)  # `--resume key=value`: the value-less --resume, then an override
        args.resume = "auto"
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    preset = args.preset
    if preset is None and not args.config:
        preset = "synthetic"
    try:
        cfg = build_config(preset, args.config, overrides)
    except USER_ERRORS as exc:
        build_parser().error(error_message(exc))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg, sort_keys=False))
        return 0
    if int(os.environ.get("RANK", "0")) == 0:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    else:
        logging.basicConfig(level=logging.WARNING, format=f"[rank {os.environ.get('RANK')}] %(message)s")
    summary = train(cfg, args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
