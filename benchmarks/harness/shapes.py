"""Real UniFormerV2 problem sizes (``Shape``, ``shapes``), the benchmark modes, and the two things a
benchmark script declares: its ``Case``s and its ``Provider``s."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

MODES = ("forward", "backward", "forward+backward")


# ----------------------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ModelDims:
    """Widths of one UniFormerV2 backbone (DESIGN section 2)."""

    name: str
    C: int           # width
    heads: int       # attention heads (head dim 64)
    side: int        # patches per side: res / patch
    layers: int
    lmhra_dim: int   # int(C // 1.5)

    @property
    def head_dim(self) -> int:
        return self.C // self.heads

    @property
    def L(self) -> int:  # tokens per frame, class token included
        return 1 + self.side * self.side


MODELS = {
    "b16": ModelDims("b16", C=768, heads=12, side=14, layers=12, lmhra_dim=512),      # 224/16: L = 197
    "l14": ModelDims("l14", C=1024, heads=16, side=16, layers=24, lmhra_dim=682),     # 224/14: L = 257
    "l14_336": ModelDims("l14_336", C=1024, heads=16, side=24, layers=24, lmhra_dim=682),  # L = 577
    "tiny": ModelDims("tiny", C=128, heads=2, side=4, layers=2, lmhra_dim=85),        # CPU smoke size
}


@dataclass(frozen=True)
class Shape:
    """A model's widths plus T frames (after the stem) and N clips; the stream is (L, N*T, C)."""

    dims: ModelDims
    T: int
    N: int

    def __getattr__(self, item):  # C, heads, head_dim, L, side, layers, lmhra_dim come from dims
        if item == "dims":
            raise AttributeError(item)
        return getattr(self.dims, item)

    @property
    def model(self) -> str:
        return self.dims.name

    @property
    def hw(self) -> int:  # patch tokens per frame
        return self.dims.side * self.dims.side

    @property
    def NT(self) -> int:  # frame rows of the stream
        return self.N * self.T

    @property
    def S(self) -> int:  # keys per clip for the global block: all T*L tokens
        return self.T * self.dims.L

    @property
    def tokens(self) -> int:  # rows of the (L, N*T, C) stream
        return self.dims.L * self.NT

    @property
    def mlp(self) -> int:
        return 4 * self.dims.C

    @property
    def label(self) -> str:
        return f"{self.model} T={self.T} N={self.N}"

    def as_dict(self) -> dict:
        return {"model": self.model, "T": self.T, "N": self.N, "L": self.L, "C": self.C, "heads": self.heads}


FULL_SHAPES = (("b16", 8, 64), ("b16", 16, 32), ("l14", 8, 32), ("l14", 16, 16))
QUICK_SHAPES = (("tiny", 3, 2), ("b16", 2, 1))


def shapes(args) -> list[Shape]:
    """The shapes to run: --models/--frames/--batch (cross product) if given, else the full or quick set."""
    if args.models or args.frames or args.batch:
        models = args.models or (["tiny"] if args.quick else ["b16", "l14"])
        frames = args.frames or ([3] if args.quick else [8, 16])
        batch = args.batch or ([2] if args.quick else [16])
        return [Shape(MODELS[m], t, n) for m in models for t in frames for n in batch]
    table = QUICK_SHAPES if args.quick else FULL_SHAPES
    return [Shape(MODELS[m], t, n) for m, t, n in table]


# ------------------------------------------------------------------------------------- cases, providers

@dataclass
class Case:
    name: str
    make_inputs: Callable[[torch.device, torch.dtype, bool], dict]
    shape: Shape | None = None
    fwd_bytes: float | None = None
    bwd_bytes: float | None = None
    fwd_flops: float | None = None
    bwd_flops: float | None = None
    items: float | None = None
    items_unit: str = "items"
    params: dict = field(default_factory=dict)

    def work(self, mode: str) -> tuple[float | None, float | None]:
        """(bytes, flops) of one step in ``mode``."""
        def pick(fwd, bwd):
            if mode == "forward":
                return fwd
            if mode == "backward":
                return bwd
            return None if fwd is None or bwd is None else fwd + bwd
        return pick(self.fwd_bytes, self.bwd_bytes), pick(self.fwd_flops, self.bwd_flops)

    def shape_text(self) -> str:
        d = dict(self.shape.as_dict()) if self.shape is not None else {}
        d.update(self.params)
        return " ".join(f"{k}={v}" for k, v in d.items())


@dataclass
class Provider:
    name: str
    fn: Callable[..., Any]
    requires: Sequence[str] = ()
    compile: bool = False
    prepare: Callable[[dict], dict] | None = None
    skip_if: Callable[[Case, Any], str | None] | None = None
    compile_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @functools.cached_property
    def callable(self) -> Callable[..., Any]:
        """``fn``, compiled once per provider when ``compile`` (dynamo re-specialises per shape)."""
        if not self.compile:
            return self.fn
        return torch.compile(self.fn, **dict(self.compile_kwargs))


def with_triton_gemm(fn: Callable[..., Any], gemm: str) -> Callable[..., Any]:
    """``fn`` with UNIFORMERV2_TRITON_GEMM set to ``gemm`` ("triton", "cublas"; "" the default) on every call, for the
    providers that time the Triton backend's two GEMM plans side by side. Left set after the call: the
    backward that autograd runs after ``fn`` returns reads it too, and every such provider sets its own."""
    def wrapped(*args, **kwargs):
        os.environ["UNIFORMERV2_TRITON_GEMM"] = gemm
        return fn(*args, **kwargs)
    return wrapped
