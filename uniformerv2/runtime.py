"""What training, evaluation and prediction share: data sets and loaders from a configuration, the model
from a configuration, the fused-kernel switch, autocast and the progress bar."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext

import torch
import torch.nn as nn

from .augment import resolve_augment_on
from .data import VideoListDataset, collate_videos, read_labels
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
