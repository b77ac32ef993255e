"""Input checks shared by the ops: each error names the argument and says what was expected."""

from __future__ import annotations

import math
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t,
    ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = FLOAT_DTYPES,
) -> None:
    """Checks type, rank, shape (None entries are free) and dtype of one argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        for i, (got, want) in enumerate(zip(t.shape, shape)):
            if want is not None and got != want:
                expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
                raise ValueError(f"{name} must have shape {expected}, got {tuple(t.shape)} (dimension {i})")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(names_and_tensors: Sequence[tuple[str, torch.Tensor]], dtype: bool = True) -> None:
    """All tensors on one device (and, unless dtype=False, of one dtype) as the first one."""
    first_name, first = names_and_tensors[0]
    for name, t in names_and_tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")


def check_positive_int(name: str, value) -> int:
    """The value as an int. Under torch.jit.trace a size read from a tensor's shape is a 0-d integer tensor:
    accepted there, and recorded as the constant it is in the example."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and value.dtype != torch.bool and torch.jit.is_tracing():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def square_side(name: str, count: int) -> int:
    """Side of a square token grid of `count` patches; an error if it is not a perfect square."""
    side = math.isqrt(int(count))
    if side * side != count:
        raise ValueError(f"{name}: {count} patch tokens is not a square grid (expected h*w with h == w)")
    return side
