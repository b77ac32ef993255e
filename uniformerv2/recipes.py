"""Training configuration: defaults, named presets for the published recipes, YAML files, overrides.

A configuration is a nested dict with the sections ``model``, ``data``, ``optim``, ``train`` and
``eval`` (see ``DEFAULTS``). It is built in this order, later steps winning:

1. ``DEFAULTS``;
2. a named preset (``PRESETS``; ``--preset NAME`` or ``preset: NAME`` at the top of the YAML file);
3. the YAML file (``--config FILE``), merged key by key;
4. command-line overrides ``section.key=value`` (the value is parsed as YAML: ``1e-4``, ``true``,
   ``[1, 2]``, ``null``); ``model.overrides.width=96`` reaches into the model constructor arguments.

Published recipes (UniFormerV2 paper, appendix A, and the official ``exp/*/run.sh`` files): AdamW
(betas 0.9/0.999) with weight decay 0.05 and no decay on 1-d parameters (biases, norms, embeddings of
rank 1), linear warmup from 1e-6 then cosine decay to 1e-6 (per iteration), gradient clipping at an L2
norm of 20, fp16 autocast with a gradient scaler (bf16 selectable), RandAugment ``rand-m7-n4-mstd0.5-inc1``,
random resized crops, no mixup/cutmix/label smoothing/random erasing. Kinetics: 55 epochs with 5 warmup
from CLIP (5 epochs after K710 post-pretraining), 8x4x3 testing; frozen backbone: lr 4e-4, no warmup;
Something-Something: no flip (left/right matter), 22 epochs, 16x1x3 testing.
"""

from __future__ import annotations

import copy
import os
import re

import yaml

DEFAULTS: dict = {
    "preset": None,
    "model": {
        "name": "tiny",            # any uniformerv2.list_models() name
        "num_classes": None,       # default: the data set's
        "overrides": {},           # official constructor arguments (width, layers, return_list, ...)
        "pretrained": None,        # checkpoint to start from (official, mmaction2, or ours)
        "pretrained_strict": True,
        "clip": None,              # CLIP visual weights to initialise the backbone
        "k710_head": None,         # map a K710 head of `pretrained`: "k400" or a file of indices
        "fused": "auto",           # auto = fused kernels on CUDA once GPU-verified (train.resolve_fused)
        "grad_checkpointing": False,
        "checkpoint_num": None,    # blocks to checkpoint (default: all)
    },
    "data": {
        "dataset": "synthetic",    # synthetic | video_list
        "train_list": None,        # `path label` files for video_list
        "val_list": None,
        "root": None,              # prefix of the listed paths (default: the list file's folder)
        "labels": None,            # class-name file (one per line)
        "num_frames": 8,
        "crop_size": 32,
        "short_side": None,        # test resize of the short side (default: crop_size)
        "scale": [0.08, 1.0],      # random resized crop: area fraction
        "ratio": [0.75, 1.3333],   # random resized crop: aspect ratio
        "flip": True,
        "randaugment": None,       # e.g. "rand-m7-n4-mstd0.5-inc1"
        "num_workers": 0,
        "augment_on": "auto",      # cpu: workers transform; gpu: workers decode, the step transforms the batch
                                   # on its device (uniformerv2/augment.py); auto = gpu when running on CUDA
        "synthetic": {"train_size": 4096, "val_size": 512, "seed": 0, "noise": 12.0},
    },
    "optim": {
        "lr": 1e-3,
        "min_lr": 1e-6,
        "warmup_start_lr": 1e-6,
        "warmup_epochs": 1.0,
        "weight_decay": 0.05,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "no_decay_1d": True,
        "clip_grad": 20.0,         # max L2 norm; null disables
    },
    "train": {
        "epochs": 10,
        "batch_size": 32,          # global batch (divided across processes)
        "amp": "none",             # none | fp16 | bf16 (fp16 uses a gradient scaler)
        "seed": 0,
        "output_dir": "runs/default",
        "eval_every": 1,           # epochs; 0 = only at the end
        "checkpoint_every": 0,     # steps; 0 = at the end of every epoch only
        "max_steps": None,         # stop after this many optimizer steps (the schedule is unchanged)
        "log_every": 10,
        "progress": True,
        "label_smoothing": 0.0,
        "find_unused_parameters": False,
        "compile": False,          # torch.compile the model: false, true, or a mode (e.g. max-autotune)
        "cuda_graph": False,       # forward+loss+backward replayed from a CUDA graph: true, false, or auto = on
                                   # where it can work (one CUDA process; uniformerv2/cuda_graph.py)
        "rank_report": False,      # write rank<r>.json with losses and a parameter digest (tests)
        "memory_budget_gb": None,  # GiB a process may use: the memory plan (uniformerv2/memory_plan.py) picks
                                   # the checkpointing that fits; default: the CUDA device's free memory
    },
    "eval": {
        "batch_size": 32,
        "num_clips": 1,            # temporal views
        "num_crops": 1,            # spatial views (1 = centre, 3 = three crops)
        "cuda_graph": False,       # replay the forward from a CUDA graph (uniformerv2/cuda_graph.py)
    },
}

_KINETICS_DATA = {
    "dataset": "video_list", "num_frames": 8, "crop_size": 224, "short_side": 224, "flip": True,
    "randaugment": "rand-m7-n4-mstd0.5-inc1", "scale": [0.08, 1.0], "ratio": [0.75, 1.3333], "num_workers": 8,
}
_PUBLISHED_OPTIM = {
    "lr": 1e-5, "min_lr": 1e-6, "warmup_start_lr": 1e-6, "warmup_epochs": 5.0, "weight_decay": 0.05,
    "betas": [0.9, 0.999], "no_decay_1d": True, "clip_grad": 20.0,
}

PRESETS: dict[str, dict] = {
    # The embedded default: a small UniFormerV2 on the procedural motion-direction videos (CPU friendly).
    "synthetic": {
        # LMHRA off: its Conv3d layers are slow on CPUs; the stride-2 temporal stem and the DPE of the
        # global blocks still see neighbouring frames.
        "model": {"name": "tiny", "overrides": {
            "width": 64, "layers": 3, "heads": 2, "patch_size": 8, "input_resolution": 32, "no_lmhra": True,
            "return_list": [1, 2], "mlp_dropout": [0.0, 0.0], "cls_dropout": 0.0}},
        "data": {"dataset": "synthetic", "num_frames": 8, "crop_size": 32, "num_workers": 0,
                 "synthetic": {"train_size": 1536, "val_size": 512, "seed": 0, "noise": 12.0}},
        "optim": {"lr": 2e-3, "warmup_epochs": 0.3, "min_lr": 1e-5, "weight_decay": 0.05, "clip_grad": 20.0},
        "train": {"epochs": 2, "batch_size": 32, "amp": "none", "output_dir": "runs/synthetic"},
        "eval": {"batch_size": 64},
    },
    # Kinetics-400, B/16, 8 frames, fine-tuned from CLIP (55 epochs); test 4 clips x 3 crops.
    "k400_b16_f8x224": {
        "model": {"name": "k400_b16_f8x224"},
        "data": dict(_KINETICS_DATA),
        "optim": dict(_PUBLISHED_OPTIM),
        "train": {"epochs": 55, "batch_size": 64, "amp": "fp16", "output_dir": "runs/k400_b16_f8x224"},
        "eval": {"batch_size": 16, "num_clips": 4, "num_crops": 3},
    },
    # Kinetics-400 after K710 post-pretraining: 5 epochs (map the K710 head with model.k710_head=k400).
    "k400_b16_f8x224_from_k710": {
        "model": {"name": "k400_b16_f8x224", "k710_head": "k400"},
        "data": dict(_KINETICS_DATA),
        "optim": dict(_PUBLISHED_OPTIM, warmup_epochs=1.0),
        "train": {"epochs": 5, "batch_size": 64, "amp": "fp16", "output_dir": "runs/k400_b16_from_k710"},
        "eval": {"batch_size": 16, "num_clips": 4, "num_crops": 3},
    },
    "k400_l14_f8x224": {
        "model": {"name": "k400_l14_f8x224"},
        "data": dict(_KINETICS_DATA),
        "optim": dict(_PUBLISHED_OPTIM),
        "train": {"epochs": 55, "batch_size": 64, "amp": "fp16", "output_dir": "runs/k400_l14_f8x224"},
        "eval": {"batch_size": 8, "num_clips": 4, "num_crops": 3},
    },
    # Frozen CLIP-L/14@336 backbone: larger lr (4e-4) without warmup (paper, appendix A).
    "k400_l14_336_frozen": {
        "model": {"name": "k400_l14_336_frozen"},
        "data": dict(_KINETICS_DATA, crop_size=336, short_side=336),
        "optim": dict(_PUBLISHED_OPTIM, lr=4e-4, warmup_epochs=0.0),
        "train": {"epochs": 55, "batch_size": 64, "amp": "fp16", "output_dir": "runs/k400_l14_336_frozen"},
        "eval": {"batch_size": 8, "num_clips": 4, "num_crops": 3},
    },
    # Something-Something V2, B/16, 16 frames in (8 after the stride-2 stem); no flip; test 1 clip x 3 crops.
    "ssv2_b16_f16x224": {
        "model": {"name": "ssv2_b16_f16x224"},
        "data": dict(_KINETICS_DATA, num_frames=16, flip=False),
        "optim": dict(_PUBLISHED_OPTIM, lr=5e-4),
        "train": {"epochs": 22, "batch_size": 64, "amp": "fp16", "output_dir": "runs/ssv2_b16_f16x224"},
        "eval": {"batch_size": 16, "num_clips": 1, "num_crops": 3},
    },
    # The L/14 recipes of the official release (OpenGVLab/UniFormerV2 exp/*/run.sh, which override the
    # lr, epochs, warm-up, batch and views of the config.yaml beside them). Their official runs checkpointed
    # every block; here the memory plan (train.memory_budget_gb) checkpoints only what the device needs.
    # Sth-Sth V2, L/14, 16 frames in, from CLIP ViT-L/14 (exp/sthv2/ssv2_l14_f16x224/run.sh: 2e-5, 22 epochs,
    # 5 warm-up, batch 64, 1 clip x 3 crops). Its config.yaml also draws two augmented views of each video
    # (AUG.NUM_SAMPLE 2), which this trainer does not do.
    "ssv2_l14_f16x224": {
        "model": {"name": "ssv2_l14_f16x224"},
        "data": dict(_KINETICS_DATA, num_frames=16, flip=False),
        "optim": dict(_PUBLISHED_OPTIM, lr=2e-5, warmup_epochs=5.0),
        "train": {"epochs": 22, "batch_size": 64, "amp": "fp16", "output_dir": "runs/ssv2_l14_f16x224"},
        "eval": {"batch_size": 8, "num_clips": 1, "num_crops": 3},
    },
    # Kinetics-400 after K710 post-pretraining, L/14 (exp/k400/k400+k710_l14_f8x224/run.sh: 1.5e-6, 5 epochs,
    # 1 warm-up, batch 128, 4 clips x 3 crops; start from k710_uniformerv2_l14_8x224.pyth).
    "k400_l14_f8x224_from_k710": {
        "model": {"name": "k400_l14_f8x224", "k710_head": "k400"},
        "data": dict(_KINETICS_DATA),
        "optim": dict(_PUBLISHED_OPTIM, lr=1.5e-6, warmup_epochs=1.0),
        "train": {"epochs": 5, "batch_size": 128, "amp": "fp16", "output_dir": "runs/k400_l14_f8x224_from_k710"},
        "eval": {"batch_size": 8, "num_clips": 4, "num_crops": 3},
    },
    # The largest published recipe: L/14@336, 32 frames, after K710 post-pretraining
    # (exp/k400/k400+k710_l14_f32x336/run.sh: 1.5e-6, 5 epochs, 1 warm-up, batch 32 over 32 GPUs, 4 clips x
    # 3 crops; start from k710_uniformerv2_l14_8x336.pyth).
    "k400_l14_f32x336_from_k710": {
        "model": {"name": "k400_l14_f32x336", "k710_head": "k400"},
        "data": dict(_KINETICS_DATA, num_frames=32, crop_size=336, short_side=336),
        "optim": dict(_PUBLISHED_OPTIM, lr=1.5e-6, warmup_epochs=1.0),
        "train": {"epochs": 5, "batch_size": 32, "amp": "fp16", "output_dir": "runs/k400_l14_f32x336_from_k710"},
        "eval": {"batch_size": 4, "num_clips": 4, "num_crops": 3},
    },
}


def merge(base: dict, update: dict, path: str = "") -> dict:
    """Deep-merge ``update`` into a copy of ``base``; unknown keys are errors (typos), except inside
    free-form dicts (``model.overrides``)."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        where = f"{path}{key}"
        if key not in out and path != "model.overrides.":
            raise KeyError(f"unknown config key {where!r}")
        if isinstance(value, dict) and isinstance(out.get(key), dict) and where != "model.overrides":
            out[key] = merge(out[key], value, where + ".")
        elif isinstance(value, dict) and where == "model.overrides":
            out[key] = {**out.get(key, {}), **copy.deepcopy(value)}
        else:
            out[key] = copy.deepcopy(value)
    return out


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)$")


def _numbers(value):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; such strings become floats."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_numbers(v) for v in value]
    return value


def load_yaml(path: str) -> dict:
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return _numbers(data)


def parse_override(text: str) -> dict:
    """``a.b.c=value`` -> {"a": {"b": {"c": parsed value}}}."""
    if "=" not in text:
        raise ValueError(f"override must look like section.key=value, got {text!r}")
    key, raw = text.split("=", 1)
    value = _numbers(yaml.safe_load(raw)) if raw.strip() else None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def build_config(preset: str | None = None, config_file: str | None = None,
                 overrides: list[str] | None = None) -> dict:
    file_cfg = {}
    if config_file:
        file_cfg = load_yaml(config_file)
    parsed = [parse_override(o) for o in overrides or []]
    name = preset
    for src in [file_cfg] + parsed:
        if src.get("preset"):
            name = src["preset"]
    cfg = copy.deepcopy(DEFAULTS)
    if name:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        cfg = merge(cfg, PRESETS[name])
    cfg = merge(cfg, file_cfg)
    for p in parsed:
        cfg = merge(cfg, p)
    cfg["preset"] = name
    check_config(cfg)
    return cfg


# Settings that may be null although their default is not.
_NULLABLE = {"optim.clip_grad"}
# Settings whose default is null but which take a number when set.
_NULLABLE_NUMBERS = {"train.memory_budget_gb"}
# Settings whose type is not their default's: `fused` and `compile` take true/false or a name.
_BOOL_OR_STR = {"model.fused", "train.compile", "train.cuda_graph"}
# (lowest allowed value, whether it is allowed itself): numbers out of range are errors before training starts
_RANGES = {
    "data.num_frames": (1, True), "data.crop_size": (1, True), "data.num_workers": (0, True),
    "optim.lr": (0, True), "optim.min_lr": (0, True), "optim.warmup_start_lr": (0, True),
    "optim.warmup_epochs": (0, True), "optim.weight_decay": (0, True), "optim.eps": (0, False),
    "optim.clip_grad": (0, True),  # 0 (or null) switches clipping off
    "train.epochs": (1, True), "train.batch_size": (1, True), "train.eval_every": (0, True),
    "train.checkpoint_every": (0, True), "train.max_steps": (0, True), "train.log_every": (1, True),
    "train.label_smoothing": (0, True), "train.memory_budget_gb": (0, False),
    "eval.batch_size": (1, True), "eval.num_clips": (1, True), "eval.num_crops": (1, True),
}
_CHOICES = {"train.amp": ("none", "fp16", "bf16"), "data.dataset": ("synthetic", "video_list"),
            "data.augment_on": ("cpu", "gpu", "auto"),
            "eval.num_crops": (1, 3), "train.cuda_graph": (True, False, "auto")}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_name(default) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(type(default), type(default).__name__)


def _check_crop_fits_model(cfg: dict) -> None:
    """The model takes crops of its input resolution (its positional embedding has one row per patch)."""
    resolution = ((cfg.get("model") or {}).get("overrides") or {}).get("input_resolution")
    crop = (cfg.get("data") or {}).get("crop_size")
    if resolution is not None and crop is not None and resolution != crop:
        raise ValueError(f"config data.crop_size={crop} but model.overrides.input_resolution={resolution}: the "
                         "model takes crops of its input resolution; set both (or only data.crop_size)")


def check_config(cfg: dict, defaults: dict | None = None, path: str = "") -> None:
    """Raise ValueError naming the setting whose value has the wrong type or is out of range, so that a typo
    such as ``optim.lr=1e-4x`` or ``train.epochs=-1`` fails before any work, not deep inside training."""
    defaults = DEFAULTS if defaults is None else defaults
    for key, default in defaults.items():
        where = f"{path}{key}"
        if key not in cfg or where == "model.overrides":
            continue
        value = cfg[key]
        if isinstance(default, dict):
            if not isinstance(value, dict):
                raise ValueError(f"config {where}: expected a mapping, got {value!r}")
            check_config(value, default, where + ".")
            continue
        if where in _NULLABLE_NUMBERS and not (value is None or _is_number(value)):
            raise ValueError(f"config {where}={value!r}: expected a number or null")
        if default is None or (value is None and where in _NULLABLE):
            continue
        if where in _BOOL_OR_STR:
            ok = isinstance(value, (bool, str))
        elif isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise ValueError(f"config {where}={value!r}: expected {_type_name(default)}")
        if where in _CHOICES and value not in _CHOICES[where]:
            shown = ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in _CHOICES[where])
            raise ValueError(f"config {where}={value!r}: expected one of {shown}")
    if not path:  # the checks across sections, once, on the whole configuration
        _check_ranges(cfg)
        _check_crop_fits_model(cfg)


def _check_ranges(cfg: dict) -> None:
    for where, (low, inclusive) in _RANGES.items():
        section, _, key = where.partition(".")
        value = cfg.get(section, {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < low or (value == low and not inclusive):
                raise ValueError(f"config {where}={value!r}: expected a value {'>=' if inclusive else '>'} {low}")


# What a command line reports as a usage error (before any work starts) rather than as a traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def error_message(exc: BaseException) -> str:
    """The message of ``exc`` without the quotes ``str(KeyError)`` adds."""
    if isinstance(exc, KeyError) and exc.args:
        return str(exc.args[0])
    return str(exc)


def save_config(cfg: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        yaml.safe_dump(cfg, fh, sort_keys=False)
