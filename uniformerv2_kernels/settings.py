"""Every ``UNIFORMERV2_*`` environment variable the package reads, parsed in one place.

Each reader parses its variable when called (per op call where that matters: a benchmark switches the GEMM
plan between calls in one process) and names the variable and the accepted values in its error.
:func:`snapshot` reads them all at once (``python -m uniformerv2_kernels.info`` prints it).

``UNIFORMERV2_BUILD_CUDA`` is read by ``setup.py`` at install time only (the package is not importable
then); it is listed here so that the table of settings is complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# in the order automatic selection tries them: inductor only for ops the selection table gives it (none yet),
# cuda only for ops whose CUDA kernels passed on a GPU (uniformerv2_kernels.selection)
BACKENDS = ("inductor", "cuda", "triton", "reference")

ENV_BACKEND = "UNIFORMERV2_BACKEND"
ENV_TRITON_GEMM = "UNIFORMERV2_TRITON_GEMM"
TRITON_GEMMS = ("triton", "cublas")
DEFAULT_TRITON_GEMM = "cublas"
ENV_AUTOTUNE = "UNIFORMERV2_AUTOTUNE"
AUTOTUNE_CHOICES = ("full", "quick")
ENV_ATTENTION = "UNIFORMERV2_ATTENTION"
ATTENTION_CHOICES = ("xformers", "sdpa")
ENV_BUILD_CUDA = "UNIFORMERV2_BUILD_CUDA"

# variable -> what it selects (the values each accepts are in its reader's error)
DESCRIPTIONS = {
    ENV_BACKEND: "backend of every fused op call without backend=: cuda, triton, inductor, reference or auto "
                 "(unset)",
    ENV_TRITON_GEMM: "the Triton backend's fused GEMMs: cublas (default; cuBLAS + a Triton epilogue pass) or "
                     "triton (one autotuned Triton GEMM each)",
    ENV_AUTOTUNE: "Triton GEMM autotuning (UNIFORMERV2_TRITON_GEMM=triton only): full (default, nine "
                  "configurations) or quick (two, as the GPU tests set it)",
    ENV_ATTENTION: "the spatial attention core on CUDA: xformers (required), sdpa, or unset (xformers when it "
                   "passes a probe)",
    ENV_BUILD_CUDA: "install time (setup.py): 0 skips building the CUDA extension, 1 requires it",
}


def _read(name: str, choices: tuple[str, ...], default: str | None) -> str | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    choice = value.strip().lower()
    if choice not in choices:
        raise ValueError(f"{name}={choice!r}: expected one of {choices}")
    return choice


def backend(per_call: str | None = None) -> str | None:
    """The requested backend: ``per_call`` if given, else UNIFORMERV2_BACKEND; None (or "auto") = automatic."""
    choice = per_call if per_call is not None else os.environ.get(ENV_BACKEND)
    if choice is None:
        return None
    choice = choice.strip().lower()
    if choice in ("", "auto"):
        return None
    if choice not in BACKENDS:
        source = "backend" if per_call is not None else ENV_BACKEND
        raise ValueError(f"{source}={choice!r} is not a backend; expected one of {BACKENDS} or 'auto'")
    return choice


def triton_gemm() -> str:
    """UNIFORMERV2_TRITON_GEMM: "cublas" (default) or "triton"."""
    return _read(ENV_TRITON_GEMM, TRITON_GEMMS, DEFAULT_TRITON_GEMM)


def autotune() -> str:
    """UNIFORMERV2_AUTOTUNE: "full" (default) or "quick"."""
    return _read(ENV_AUTOTUNE, AUTOTUNE_CHOICES, "full")


def attention() -> str | None:
    """UNIFORMERV2_ATTENTION: "xformers", "sdpa", or None (automatic)."""
    return _read(ENV_ATTENTION, ATTENTION_CHOICES, None)


def triton_interpret() -> bool:
    """TRITON_INTERPRET (Triton's own variable): the Triton kernels run on the CPU, interpreted."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class Setting:
    name: str
    raw: str | None  # as set in the environment (None: unset)
    value: str  # as the package reads it, or "invalid: <error>"
    description: str


def snapshot() -> list[Setting]:
    """Every UNIFORMERV2_* variable: as set and as read (an invalid value is reported, not raised)."""
    readers = {ENV_BACKEND: lambda: backend() or "auto", ENV_TRITON_GEMM: triton_gemm, ENV_AUTOTUNE: autotune,
               ENV_ATTENTION: lambda: attention() or "auto",
               ENV_BUILD_CUDA: lambda: os.environ.get(ENV_BUILD_CUDA) or "auto (build when nvcc is found)"}
    rows = []
    for name, read in readers.items():
        try:
            value = read()
        except ValueError as exc:
            value = f"invalid: {exc}"
        rows.append(Setting(name, os.environ.get(name), value, DESCRIPTIONS[name]))
    return rows
