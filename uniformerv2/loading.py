"""Loading weights: official / mmaction2 / training checkpoints, CLIP initialisation, K710 head mapping."""

from __future__ import annotations

import os
import pickle
import re
import warnings
import zipfile
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# mmaction2 keeps the head outside the backbone: its LayerNorm as `transformer.norm`, its Linear as
# `cls_head.fc_cls`. Ours (the official layout) is `transformer.proj.0` and `transformer.proj.2`.
_MMACTION_RENAMES = (
    ("backbone.transformer.norm.", "transformer.proj.0."),
    ("cls_head.fc_cls.", "transformer.proj.2."),
)
_STRIP_PREFIXES = ("module.", "backbone.", "model.")


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the model; the message lists every offending key."""


def _numpy_array_globals() -> list:
    """What unpickling numpy arrays, scalars and their dtypes calls (training checkpoints hold numpy's RNG
    state): array and scalar reconstruction build data only, never call user code."""
    import numpy as np

    dtypes = [type(np.dtype(t)) for t in (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16,
                                           np.uint32, np.uint64, np.float16, np.float32, np.float64)]
    return [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, np.float64(0).__reduce__()[0], *dtypes]


def _is_torchscript_archive(path: str) -> bool:
    """A TorchScript archive (OpenAI's CLIP releases): a zip holding compiled code beside the weights."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def read_checkpoint_file(path, mmap: bool = False) -> object:
    """What the checkpoint file ``path`` holds, read without running any code from it: ``torch.load`` with
    ``weights_only=True`` (tensors, numbers, strings, containers and numpy arrays only), or, for a TorchScript
    archive, its state dict (read on the CPU). A missing file is a FileNotFoundError; anything else that keeps
    the file from loading is a CheckpointError naming the file. ``mmap``: map the tensors instead of reading
    them (for a look at the metadata of a large file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: empty file, expected a PyTorch checkpoint")
    if _is_torchscript_archive(path):
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is how these archives load
                warnings.simplefilter("ignore", FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception as exc:  # noqa: BLE001 - any failure inside the archive means "unreadable"
            raise CheckpointError(f"{path}: cannot read this TorchScript archive: {_first_line(exc)}") from exc
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if unsafe:
            raise CheckpointError(f"{path}: refused to load: unpickling it would call {unsafe.group(1)} (only "
                                  "tensors, numbers, strings, containers and numpy arrays are read)") from exc
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (its contents do not unpickle)") from exc
    except Exception as exc:  # noqa: BLE001 - a torn zip, a truncated pickle, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from exc


def _read(path_or_state_dict) -> dict:
    if isinstance(path_or_state_dict, Mapping):
        return dict(path_or_state_dict)
    return read_checkpoint_file(path_or_state_dict)


def _source(path_or_state_dict) -> str:
    """How messages name a checkpoint: its file, or "the state dict" when one was passed."""
    return "the state dict" if isinstance(path_or_state_dict, Mapping) else os.fspath(path_or_state_dict)


def _unwrap(obj, source: str) -> dict:
    """Finds the state dict inside the container formats users hold."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for key in ("model_state", "state_dict", "model", "module"):
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source}: no tensors found in the checkpoint; its top-level keys are "
                              f"{sorted(obj)[:10]}")
    return dict(obj)


def normalise_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps official (`backbone.`), mmaction2, DDP (`module.`) and plain keys to the model's own names."""
    out = {}
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            continue
        for old, new in _MMACTION_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[key] = value
    return out


def interpolate_positional_embedding(pos: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Bicubic resize of a (1 + g*g, C) positional embedding to `num_tokens` = 1 + g'*g' rows."""
    old_grid = int(round((pos.shape[0] - 1) ** 0.5))
    new_grid = int(round((num_tokens - 1) ** 0.5))
    if old_grid * old_grid + 1 != pos.shape[0] or new_grid * new_grid + 1 != num_tokens:
        raise CheckpointError(f"positional_embedding: cannot resize {tuple(pos.shape)} to {num_tokens} tokens")
    cls, grid = pos[:1], pos[1:]
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([cls, grid], dim=0)


def _adapt_positional_embedding(state: dict, model: nn.Module) -> None:
    key = "positional_embedding"
    if key in state and state[key].shape != model.positional_embedding.shape and state[key].dim() == 2:
        want = model.positional_embedding.shape
        if state[key].dim() == 2 and state[key].shape[1] == want[1]:
            warnings.warn(f"{key}: interpolating {tuple(state[key].shape)} -> {tuple(want)} (bicubic) "
                          f"for input resolution {model.input_resolution}", stacklevel=3)
            state[key] = interpolate_positional_embedding(state[key], want[0])


def load_checkpoint(model: nn.Module, path_or_state_dict, strict: bool = True) -> dict[str, list[str]]:
    """Loads official, mmaction2, training (`{model_state: ...}`) or plain checkpoints into `model`.

    With strict=True (default) any missing, unexpected or misshaped key raises one CheckpointError that
    lists them all; with strict=False the matching tensors load and the report is returned (and warned).
    BatchNorm `num_batches_tracked` counters may be absent (older checkpoints) without complaint.
    """
    state = normalise_keys(_unwrap(_read(path_or_state_dict), _source(path_or_state_dict)))
    _adapt_positional_embedding(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    report = {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}
    problems = [f"{name} keys ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
                for name, keys in report.items() if keys]
    if problems and strict:
        raise CheckpointError("checkpoint does not fit the model:\n  " + "\n  ".join(problems))
    if problems:
        warnings.warn("checkpoint loaded partially:\n  " + "\n  ".join(problems), stacklevel=2)
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    return report


def _inflate_conv1(weight_2d: torch.Tensor, target_shape: torch.Size) -> torch.Tensor:
    """CLIP's (C, 3, p, p) patch conv -> (C, 3, k, p, p): the 2-d kernel in the middle time slice, zeros elsewhere."""
    kt = target_shape[2]
    weight_3d = torch.zeros(target_shape, dtype=weight_2d.dtype)
    weight_3d[:, :, kt // 2] = weight_2d
    return weight_3d


def load_clip(model: nn.Module, path_or_state_dict) -> list[str]:
    """Initialises the backbone from CLIP visual weights; returns the model keys that were set.

    Accepts a full CLIP state dict (`visual.*` keys; text keys ignored), a TorchScript CLIP archive, or a
    visual-only state dict. `proj` and `ln_post` are ignored; `conv1` is inflated in time; the positional
    embedding is interpolated when the resolution differs. Every other CLIP key must exist in the model
    with the right shape, else a CheckpointError names it.
    """
    raw = _unwrap(_read(path_or_state_dict), _source(path_or_state_dict))
    if any(k.startswith("visual.") for k in raw):
        raw = {k[len("visual."):]: v for k, v in raw.items() if k.startswith("visual.")}
    state = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)
             and k != "proj" and not k.startswith("ln_post.")}
    own = model.state_dict()
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.dim() == 4 and conv1.shape[:2] + conv1.shape[2:] == (
            own["conv1.weight"].shape[:2] + own["conv1.weight"].shape[3:]):
        state["conv1.weight"] = _inflate_conv1(conv1, own["conv1.weight"].shape)
    _adapt_positional_embedding(state, model)
    bad = [k for k in state if k not in own]
    bad += [f"{k}: CLIP {tuple(v.shape)} vs model {tuple(own[k].shape)}"
            for k, v in state.items() if k in own and v.shape != own[k].shape]
    if bad:
        raise CheckpointError("CLIP weights do not fit the model: " + ", ".join(bad[:20]))
    if "conv1.weight" not in state:
        raise CheckpointError("no CLIP visual weights found (expected conv1.weight or visual.conv1.weight)")
    model.load_state_dict(state, strict=False)
    return sorted(state)


def map_k710_head(state_dict_or_model, target: str | Sequence[int] = "k400"):
    """Maps a Kinetics-710 head to a subset: 'k400' keeps the first 400 rows, else an index per target class.

    Takes a state dict (returns a new one) or a model (its head Linear is replaced in place).
    """
    if isinstance(target, str):
        if target.lower() != "k400":
            raise ValueError(f"target must be 'k400' or a list of K710 class indices, got {target!r}")
        index = torch.arange(400)
    else:
        index = torch.as_tensor(list(target), dtype=torch.long)
    if isinstance(state_dict_or_model, nn.Module):
        head = state_dict_or_model.transformer.proj[2]
        if int(index.max()) >= head.out_features:
            raise ValueError(f"index {int(index.max())} out of range for a head of {head.out_features} classes")
        new = nn.Linear(head.in_features, len(index), device=head.weight.device, dtype=head.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(head.weight[index])
            new.bias.copy_(head.bias[index])
        state_dict_or_model.transformer.proj[2] = new
        return state_dict_or_model
    state = dict(state_dict_or_model)
    keys = [k for k in state if k.endswith("transformer.proj.2.weight") or k.endswith("transformer.proj.2.bias")
            or k.endswith("cls_head.fc_cls.weight") or k.endswith("cls_head.fc_cls.bias")]
    if not keys:
        raise CheckpointError("no head (transformer.proj.2.* or cls_head.fc_cls.*) in the state dict")
    for k in keys:
        if int(index.max()) >= state[k].shape[0]:
            raise ValueError(f"{k}: index {int(index.max())} out of range for {state[k].shape[0]} classes")
        state[k] = state[k][index].clone()
    return state
