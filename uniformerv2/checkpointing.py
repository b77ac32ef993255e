"""Training checkpoints: written atomically, read without running code, and the RNG streams they carry."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


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

