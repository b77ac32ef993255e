"""The selection table: which backends implement each fused op, for which inputs, which one automatic
selection prefers and why; and the model's per-path rules. Data, read by :mod:`.backends` (the one
selector), the op modules, ``uniformerv2.model`` and ``python -m uniformerv2_kernels.info``.

Every op has an ``inductor`` backend (:mod:`.inductor`: its pure-PyTorch reference through torch.compile),
opt-in everywhere until a GPU run shows it owning the op pays (``auto_inductor``, ``inductor_why``).

Machine-wide reasons (no extension, no GPU, Triton not importable, tensors on the wrong device) are
:mod:`.backends`'; the reasons here depend on the op and the call (dtype, widths, heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from . import settings

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # of x, for the cuda and triton backends
_BACKEND_TITLES = {"cuda": "CUDA", "triton": "Triton"}

# The one-pass Triton LayerNorm keeps a row in registers (its kernel raises past this width); the FFN and
# the spatial attention run it for their LayerNorms.
LAYER_NORM_MAX_C = 8192
GLOBAL_ATTENTION_TRITON_MAX_C = 2048  # a token row must fit one Triton tile
GLOBAL_ATTENTION_TRITON_MAX_HEADS = 64


@dataclass(frozen=True)
class Limit:
    """A condition a call must meet for ``backend``: ``rule`` as printed, ``reason(**facts)`` the sentence
    when the call breaks it (None when it meets it). Facts: ``x`` and, where the op has them, ``num_heads``."""

    backend: str
    rule: str
    reason: Callable[..., str | None]


# The measurement that decides an op's auto_inductor (benchmarks/README.md, "What the next GPU session runs")
INDUCTOR_DECISION = ("inductor owns the op by default on CUDA once a GPU run shows torch.compile of its reference "
                     "taking less forward+backward GPU time than its best backend at B/16 and L/14 (bench_<op>.py "
                     "rows inductor against cuda / triton) and the fused training step faster with it "
                     "(bench_e2e.py fused+inductor-<op> against fused)")


@dataclass(frozen=True)
class OpEntry:
    backends: tuple[str, ...]  # implemented; the reference runs everywhere
    cuda_ops: tuple[str, ...]  # torch.ops.uniformerv2_cuda operators the cuda backend needs
    auto_cuda: bool  # automatic selection picks cuda where it can run; else cuda is opt-in
    why: str  # why auto_cuda is what it is (GPU evidence lives in benchmarks/results/)
    limits: tuple[Limit, ...] = ()
    # automatic selection picks inductor for CUDA tensors (never for CPU ones); else inductor is opt-in
    auto_inductor: bool = False
    inductor_why: str = "not measured on a GPU yet"  # why auto_inductor is what it is (see INDUCTOR_DECISION)


def _dtype_limit(backend: str) -> Limit:
    title = _BACKEND_TITLES[backend]
    return Limit(backend, "x in fp32 / fp16 / bf16",
                 lambda x, **_: None if x.dtype in KERNEL_DTYPES else
                 f"dtype {x.dtype} is not supported by the {title} kernels (fp32/fp16/bf16)")


_LAYER_NORM_ROW = Limit(
    "triton", f"C <= {LAYER_NORM_MAX_C}",
    lambda x, **_: None if x.shape[-1] <= LAYER_NORM_MAX_C else
    f"C = {x.shape[-1]} > {LAYER_NORM_MAX_C} does not fit the one-pass Triton LayerNorm kernel")


def _global_attention_cuda_smem(x, num_heads, **_) -> str | None:
    """The CUDA backward kernel's shared memory at its smallest token tile (csrc: backward_smem_floats,
    bs = 1): an (H, C) accumulator, two token rows and per-head scalars, against this GPU's per-block limit."""
    if not x.is_cuda:
        return None
    H, C = num_heads, x.shape[-1]
    need = 4 * ((H + 2) * C + 2 * H + 1)
    limit = torch.cuda.get_device_properties(x.device).shared_memory_per_block_optin
    if need > limit:
        return (f"(num_heads + 2) * C = {(H + 2) * C} fp32 values: {need} B of shared memory, more than this "
                f"GPU's {limit} B per block")
    return None


_KERNELS = (_dtype_limit("cuda"), _dtype_limit("triton"))

OPS: dict[str, OpEntry] = {
    "clip_layer_norm": OpEntry(
        ("cuda", "triton", "inductor", "reference"), ("clip_layer_norm_fwd", "clip_layer_norm_bwd"), True,
        "CUDA kernel tested on a GPU and not slower than Triton there", _KERNELS + (_LAYER_NORM_ROW,)),
    "fused_ffn": OpEntry(
        ("cuda", "triton", "inductor", "reference"), ("fused_ffn_fwd", "fused_ffn_bwd"), True,
        "CUDA kernel tested on a GPU and not slower than Triton there", _KERNELS + (_LAYER_NORM_ROW,),
        inductor_why="torch.compile of the official branch took less forward+backward GPU time than every backend "
                     "on the H100 (benchmarks/results/ffn_h100.md: B/16 1.505 ms against 1.673, L/14 3.082 "
                     "against 3.293); through this backend and in the fused training step not measured yet"),
    "local_temporal_mhra": OpEntry(
        ("cuda", "triton", "inductor", "reference"), ("local_temporal_mhra_fwd", "local_temporal_mhra_bwd"), True,
        "CUDA kernel tested on a GPU and not slower than Triton there", _KERNELS),
    "global_query_attention": OpEntry(
        ("cuda", "triton", "inductor", "reference"), ("global_query_attention_fwd", "global_query_attention_bwd"),
        False,
        "CUDA kernel tested on a GPU but slower than Triton there (it computes the DPE on the fly)",
        _KERNELS + (
            Limit("triton", f"C <= {GLOBAL_ATTENTION_TRITON_MAX_C}",
                  lambda x, **_: None if x.shape[-1] <= GLOBAL_ATTENTION_TRITON_MAX_C else
                  f"C = {x.shape[-1]} > {GLOBAL_ATTENTION_TRITON_MAX_C}: a token row must fit one Triton tile"),
            Limit("triton", f"num_heads <= {GLOBAL_ATTENTION_TRITON_MAX_HEADS}",
                  lambda num_heads, **_: None if num_heads <= GLOBAL_ATTENTION_TRITON_MAX_HEADS else
                  f"num_heads = {num_heads} > {GLOBAL_ATTENTION_TRITON_MAX_HEADS} is not supported by the "
                  "Triton kernels"),
            Limit("cuda", "(num_heads + 2) * C fp32 values fit the GPU's shared memory per block",
                  _global_attention_cuda_smem),
        )),
    "spatial_attention": OpEntry(
        ("triton", "inductor", "reference"), (), False, "no CUDA C++ kernel (the projections run on Triton or cuBLAS)",
        (_dtype_limit("triton"), _LAYER_NORM_ROW)),
}


def call_reasons(op: str, **facts) -> dict[str, list[str]]:
    """{backend: why this call of ``op`` cannot run there} from the op's limits (machine reasons aside)."""
    reasons: dict[str, list[str]] = {"cuda": [], "triton": []}
    for limit in OPS[op].limits:
        why = limit.reason(**facts)
        if why:
            reasons[limit.backend].append(why)
    return reasons


# --------------------------------------------------------------------------------------------------------
# The model's per-path rules (uniformerv2/model.py applies them through the functions below)


@dataclass(frozen=True)
class ModelRule:
    path: str  # where in the model
    op: str
    when: str
    runs: str
    why: str


MODEL_RULES = (
    ModelRule("CLIP blocks' attention", "spatial_attention", "the cuda backend is requested (model or "
              f"{settings.ENV_BACKEND})", "triton", "the op has no CUDA kernel; the block's other ops run on CUDA"),
    ModelRule("Extractor (global UniBlock) MLP", "fused_ffn", "training with mlp_dropout > 0 (every published "
              "recipe)", "reference", "the fused FFN has no dropout inside; the official MLP draws its dropout "
              "mask between c_fc and c_proj"),
)


def op_backend(backend: str | dict | None, op: str) -> str | None:
    """The backend a model set to ``backend`` passes to ``op``: one name for every op, or a dict op -> name
    (the ops it does not name: automatic); None: automatic (or UNIFORMERV2_BACKEND)."""
    return backend.get(op) if isinstance(backend, dict) else backend


def check_model_backend(backend) -> str | dict | None:
    """``backend`` as the model keeps it (a mapping becomes a dict), after checking it: None, a backend name
    (or "auto"), or a mapping from fused op names to backends that op implements."""
    if backend is None:
        return None
    if isinstance(backend, str):
        settings.backend(backend)  # raises ValueError naming the accepted values
        return backend
    if not isinstance(backend, Mapping):
        raise TypeError(f"backend must be None, a backend name or a dict op -> backend name, got "
                        f"{type(backend).__name__}")
    unknown = sorted(set(backend) - set(OPS))
    if unknown:
        raise ValueError(f"backend: unknown op(s) {unknown}; the fused ops are {sorted(OPS)}")
    for op, name in backend.items():
        chosen = None if name is None else settings.backend(name)
        if chosen is not None and chosen not in OPS[op].backends:
            raise ValueError(f"backend: {op} has no {chosen!r} backend; it implements {OPS[op].backends}")
    return dict(backend)


def spatial_attention_backend(backend: str | dict | None) -> str | None:
    """The backend the model passes to the spatial attention for its ``backend`` (first MODEL_RULES row)."""
    backend = op_backend(backend, "spatial_attention")
    return "triton" if settings.backend(backend) == "cuda" else backend


def extractor_mlp_fused(fused: bool, training: bool, dropout: float) -> bool:
    """Whether the Extractor's MLP runs the fused FFN (second MODEL_RULES row)."""
    return fused and not (training and dropout > 0)
