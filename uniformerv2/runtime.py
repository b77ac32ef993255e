"""What training, evaluation and prediction share: data sets and loaders from a configuration, the model
from a configuration, the fused-kernel switch, autocast and the progress bar."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import yaml

from .augment import collate_fn, resolve_augment_on
from .data import VideoListDataset, read_labels, read_video_list
from .loading import CheckpointError
from .recipes import USER_ERRORS, error_message
from .synthetic import MovingShapes

logger = logging.getLogger("uniformerv2")

# What a command line reports as a usage error (one line, exit status 2) when it comes from the user's input:
# a setting, a file that is missing or is not what the setting expects, a YAML file that does not parse.
INPUT_ERRORS = USER_ERRORS + (CheckpointError, yaml.YAMLError)


def input_error_message(exc: BaseException) -> str:
    """``exc``'s message on one line (YAML and key-report messages span several)."""
    return " ".join(line.strip() for line in error_message(exc).splitlines() if line.strip())


def require_file(path: str, setting: str) -> str:
    """``path``, after checking that it is a file (FileNotFoundError naming ``setting`` otherwise)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{setting}={path}: {'a folder' if os.path.isdir(path) else 'no such file'}, "
                                "expected a file")
    return path


def at_least_one(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


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


def check_data_files(cfg: dict, splits: tuple[str, ...]) -> None:
    """The files the data settings name exist, the video lists of ``splits`` ("train", "val") parse and the
    folders of their videos exist: each problem a usage error before any work, not a failure in a DataLoader
    worker."""
    d = cfg["data"]
    if d.get("labels"):
        require_file(d["labels"], "data.labels")
    if d["dataset"] != "video_list":
        return
    if d.get("root") and not os.path.isdir(d["root"]):
        raise FileNotFoundError(f"data.root={d['root']}: no such folder")
    for split in splits:
        setting, list_file = f"data.{split}_list", d.get(f"{split}_list")
        if not list_file:
            if split == "train":
                raise ValueError(f"{setting} is empty: data.dataset=video_list trains on a `path label` list")
            continue
        items = read_video_list(require_file(list_file, setting), d.get("root"))
        for folder in sorted({os.path.dirname(path) for path, _ in items}):
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"{setting}={list_file}: the folder {folder} of its videos does not exist "
                                        f"(data.root={d.get('root')!r})")


def check_run_inputs(cfg: dict, resume: str | None) -> None:
    """What a training run reads from the user, checked before it writes anything: the data files, the model
    name, the weights files and the checkpoint to resume from."""
    from .configs import get_config

    check_data_files(cfg, ("train", "val"))
    m = cfg["model"]
    try:
        get_config(m["name"])
    except KeyError as exc:
        raise ValueError(f"model.name={m['name']!r}: {error_message(exc)}") from None
    for key in ("clip", "pretrained"):
        if m.get(key):
            require_file(m[key], f"model.{key}")
    if isinstance(m.get("k710_head"), str) and m["k710_head"].lower() != "k400":
        require_file(m["k710_head"], "model.k710_head")
    if resume and resume != "auto":
        require_file(resume, "--resume")


def build_dataset(cfg: dict, train: bool, list_file: str | None = None, num_views: int | None = None,
                  device: torch.device | None = None):
    """``device``: where the batches go; with ``data.augment_on`` resolving to gpu there, the workers only
    decode and ``augment.to_device`` transforms each batch on it."""
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
        seed=cfg["train"]["seed"], raw_frames=resolve_augment_on(cfg, device or torch.device("cpu")) == "gpu")


def class_names(cfg: dict, dataset) -> list[str] | None:
    if cfg["data"].get("labels"):
        return read_labels(cfg["data"]["labels"])
    return list(getattr(dataset, "classes", [])) or None


def make_loader(dataset, batch_size: int, sampler, num_workers: int, seed: int, pin: bool):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate_fn(dataset),
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


def model_from_config(cfg: dict, num_classes: int, log: bool = True) -> tuple[nn.Module, dict]:
    """The model a configuration describes, initialised (CLIP, checkpoint, K710 head mapping) and on the fused
    ops when ``model.fused`` says so. Returns (model, the ``uniformerv2.build_model`` arguments it was built
    with, which checkpoints store)."""
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



def autocast_context(device: torch.device, amp: str, cache_enabled: bool | None = None):
    """Autocast for train.amp; ``cache_enabled=False`` for a CUDA-graph capture (PyTorch requires it there:
    the cast-weight cache would hold tensors from outside the graph's memory pool)."""
    if amp in (None, "none", "fp32", False):
        return nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(amp)
    if dtype is None:
        raise ValueError(f"train.amp must be none, fp16 or bf16, got {amp!r}")
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)



def progress_bar(**kwargs):
    """A tqdm progress bar (on stderr, redrawn at most once a second)."""
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, mininterval=1.0, file=sys.stderr, **kwargs)


@contextmanager
def recording_backends(choices: dict):
    """While the block runs, records in ``choices`` the backend each fused op selects (op name -> backend):
    the selection happens per call, on the call's tensors, so the first step is where it can be seen."""
    from uniformerv2_kernels import backends

    select = backends.select

    def recording(op, *args, **kwargs):
        choices[op] = name = select(op, *args, **kwargs)
        return name

    backends.select = recording
    try:
        yield choices
    finally:
        backends.select = select


@contextmanager
def logging_beside(bar_shown: bool):
    """Log records written above a shown progress bar (through tqdm) instead of over it."""
    if not bar_shown:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
