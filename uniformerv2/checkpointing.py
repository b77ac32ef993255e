"""Training checkpoints: written atomically, read without running code, and the RNG streams they carry."""

from __future__ import annotations

import glob
import logging
import os
import random

import numpy as np
import torch

from .loading import read_checkpoint_file

logger = logging.getLogger("uniformerv2")


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


def remove_stale_temporaries(out_dir: str) -> None:
    """Deletes the ``*.pt.tmp.<pid>`` files an interrupted ``atomic_save`` left (each as large as a checkpoint).
    Called as a run starts in ``out_dir``, which one run at a time writes."""
    for path in sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.pt.tmp.*"))):
        os.remove(path)
        logger.info("removed %s, left by an interrupted checkpoint save", path)


def saved_best(out_dir: str, up_to_step: int) -> float | None:
    """The top-1 stored in ``out_dir``/best.pt when that file was saved at or before ``up_to_step`` (a
    resumed run's position), else None. Only the metadata is read (the tensors are memory-mapped)."""
    path = os.path.join(out_dir, "best.pt")
    if not os.path.exists(path):
        return None
    best = read_checkpoint_file(path, mmap=True)
    if not isinstance(best, dict) or int(best.get("global_step", up_to_step + 1)) > up_to_step:
        return None
    return float(best["best_acc1"])
