"""Which kernel backends exist here, and which one an op call runs on.

Backends, in order of preference:
- ``inductor``: the op's pure-PyTorch reference compiled by ``torch.compile`` (:mod:`.inductor`), for CUDA
  tensors (inductor generates Triton kernels) or CPU tensors (C++; needs a compiler). Automatic selection
  picks it only for ops the selection table gives it (``auto_inductor``), and only for CUDA tensors.
- ``cuda``: the compiled extension ``uniformerv2_kernels._C`` (ops in ``torch.ops.uniformerv2_cuda``),
  for CUDA tensors, when it was built for the running torch.
- ``triton``: the Triton kernels, for CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
- ``reference``: the pure-PyTorch reference; runs everywhere.

Selection for one call: the per-call ``backend=`` argument, else the ``UNIFORMERV2_BACKEND``
environment variable, else the first backend that automatic selection may pick for the op and that has no
reason not to run. Asking for a backend that cannot run raises :class:`BackendUnavailableError` listing
every backend's reasons.

What each op implements, its limits and whether automatic selection prefers its CUDA kernel are the
table in :mod:`.selection`; :func:`select_op` applies it (:func:`select` is the mechanism, for any op).
The environment variables are read by :mod:`.settings`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Iterable, Mapping, Sequence

import torch

from . import selection, settings
from .settings import BACKENDS, ENV_BACKEND, ENV_TRITON_GEMM  # noqa: F401  (callers read them here too)

# Ops whose CUDA C++ kernels automatic selection picks (the table's auto_cuda; GPU evidence in
# benchmarks/results/); the others' run only when asked for (per call or UNIFORMERV2_BACKEND=cuda).
GPU_VERIFIED_CUDA_OPS: frozenset[str] = frozenset(op for op, entry in selection.OPS.items() if entry.auto_cuda)
# Ops that automatic selection runs through inductor on CUDA tensors (the table's auto_inductor); the others'
# inductor backend runs only when asked for.
INDUCTOR_OWNED_OPS: frozenset[str] = frozenset(op for op, entry in selection.OPS.items() if entry.auto_inductor)

# Whether the Triton kernels have passed tests/ on a GPU (benchmarks/results/): with it set,
# `model.fused=auto` in the training / evaluation scripts uses the kernels on CUDA.
TRITON_GPU_VERIFIED: bool = True


class op_body:
    """Context for a custom op's body, from its first tensor argument:
    - autocast off: autocast reaches the bodies of custom ops (they have no autocast kernel), where it would
      retype their internal torch matmuls to 16 bits; each op picks its own precision (fp32 folding,
      statistics and small products; the input's dtype for the big GEMMs);
    - the tensors' CUDA device current: Triton launches on the current device, which need not be theirs.
    A class that enters only what is needed (autocast on, another device current): ~300 op bodies run per
    training step, and a @contextmanager costs host time on every one even with nothing to change."""

    __slots__ = ("_autocast_off", "_device")

    def __init__(self, t: torch.Tensor):
        kind = t.device.type
        self._autocast_off = torch.autocast(device_type=kind, enabled=False) if torch.is_autocast_enabled(kind) \
            else None
        self._device = torch.cuda.device(t.device) if t.is_cuda and t.device.index != torch.cuda.current_device() \
            else None

    def __enter__(self) -> None:
        if self._autocast_off is not None:
            self._autocast_off.__enter__()
        if self._device is not None:
            self._device.__enter__()

    def __exit__(self, *exc) -> bool:
        if self._device is not None:
            self._device.__exit__(*exc)
        if self._autocast_off is not None:
            self._autocast_off.__exit__(*exc)
        return False


def triton_gemm() -> str:
    """Where the Triton backend runs its GEMMs that carry fused prologues / epilogues (the FFN and the
    attention projections' ``linear``, the local MHRA's ``fused_matmul``): "cublas" (default; cuBLAS for the
    product, a Triton kernel for the elementwise work around it: the CUDA backend's plan) or "triton" (one
    Triton kernel each, autotuned). Read per call from UNIFORMERV2_TRITON_GEMM, so a benchmark can time both
    in one process. Both are tested; cuBLAS is the default because it took less GPU time wherever it was
    measured and needs no autotuning at the first call (benchmarks/results/)."""
    return settings.triton_gemm()


def tf32_allowed() -> bool:
    """Whether fp32 matmuls may use TF32, as torch.matmul decides it. Reads the fp32_precision settings of
    torch >= 2.9 (reading the legacy ``allow_tf32`` flag raises once those are set), else ``allow_tf32``."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message lists every backend's reasons."""


def triton_interpret() -> bool:
    return settings.triton_interpret()


# Probed once per process. Plain module-level caches (not functools.lru_cache) so that torch.compile
# traces through backend selection without warnings.
_CACHE: dict[str, object] = {}


def _triton_import_error() -> str | None:
    if "triton" not in _CACHE:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _CACHE["triton"] = None
        except Exception as exc:  # ImportError, or a broken install
            _CACHE["triton"] = f"triton is not importable ({type(exc).__name__}: {exc})"
    return _CACHE["triton"]


def _load_extension() -> tuple[object | None, str | None]:
    if "extension" not in _CACHE:
        _CACHE["extension"] = _import_extension()
    return _CACHE["extension"]


def _import_extension() -> tuple[object | None, str | None]:
    """Imports the compiled extension; returns (module, None) or (None, why not)."""
    if importlib.util.find_spec("uniformerv2_kernels._C") is not None and _csrc_changed_since_build():
        return None, ("the CUDA extension is stale: csrc/ changed since it was built "
                      "(rebuild: pip install --no-build-isolation -e .)")
    try:
        module = importlib.import_module("uniformerv2_kernels._C")
    except ModuleNotFoundError:
        return None, "the CUDA extension is not built (install with nvcc and a CUDA build of torch)"
    except (ImportError, OSError) as exc:
        built_for = build_info().get("TORCH_VERSION")
        hint = f" (built for torch {built_for}, running {torch.__version__})" if built_for else ""
        return None, f"the CUDA extension does not load{hint}: {exc}"
    built_for = build_info().get("TORCH_VERSION")
    if built_for and built_for != torch.__version__:
        return None, f"the CUDA extension was built for torch {built_for}, running {torch.__version__}"
    return module, None


def build_info() -> dict:
    """What setup.py recorded when it built the extension (torch version, CUDA, archs), or {}."""
    try:
        info = importlib.import_module("uniformerv2_kernels._build_info")
    except ImportError:
        return {}
    return {k: v for k, v in vars(info).items() if k.isupper()}


def _csrc_changed_since_build() -> bool:
    """True when setup.py recorded a digest of csrc/ and this checkout's csrc/ differs (kernels edited but
    not rebuilt). A wheel install has no csrc/ to compare against."""
    recorded = build_info().get("CSRC_SHA256")
    if recorded is None:
        return False
    from ._sources import csrc_digest

    current = csrc_digest(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return current is not None and current != recorded


def cuda_extension_error() -> str | None:
    return _load_extension()[1]


def has_cuda_op(name: str) -> bool:
    """True when the extension loaded and registers ``torch.ops.uniformerv2_cuda.<name>``."""
    if _load_extension()[0] is None:
        return False
    try:
        getattr(torch.ops.uniformerv2_cuda, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def torch_compile_error() -> str | None:
    """Why torch.compile cannot run in this Python / on this platform, or None (probed once; imports dynamo,
    which takes seconds, so only when the inductor backend is asked about)."""
    if "torch.compile" not in _CACHE:
        try:
            from torch._dynamo.eval_frame import check_if_dynamo_supported

            check_if_dynamo_supported()
            _CACHE["torch.compile"] = None
        except Exception as exc:  # unsupported Python, platform or build
            _CACHE["torch.compile"] = f"torch.compile is not available here ({type(exc).__name__}: {exc})"
    return _CACHE["torch.compile"]


def cpp_compiler_error() -> str | None:
    """Why inductor cannot compile for CPU tensors (it generates C++), or None (probed once)."""
    if "c++" not in _CACHE:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
            _CACHE["c++"] = None
        except Exception as exc:  # no compiler found, or an inductor without this helper
            _CACHE["c++"] = (f"inductor on the CPU needs a C++ compiler ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'none found'}; set CXX)")
    return _CACHE["c++"]


def _devices(tensors: Iterable[torch.Tensor]) -> set[str]:
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def generic_reasons(backend: str, tensors: Sequence[torch.Tensor], cuda_ops: Sequence[str] = ()) -> list[str]:
    """Reasons, independent of the op's math, why ``backend`` cannot run on these tensors."""
    devices = _devices(tensors)
    reasons: list[str] = []
    if backend == "cuda":
        err = cuda_extension_error()
        if err:
            reasons.append(err)
        elif not cuda_ops:
            reasons.append("this op has no CUDA C++ kernel")
        else:
            missing = [op for op in cuda_ops if not has_cuda_op(op)]
            if missing:
                reasons.append(f"the built extension lacks {', '.join(missing)} (rebuild it)")
        if devices != {"cuda"}:
            reasons.append(f"inputs are on {sorted(devices) or 'no device'}, the CUDA kernels need CUDA tensors")
    elif backend == "triton":
        err = _triton_import_error()
        if err:
            reasons.append(err)
        if devices - {"cuda", "cpu"}:
            reasons.append(f"inputs are on {sorted(devices)}, Triton runs on CUDA (or CPU when interpreted)")
        elif "cpu" in devices and not triton_interpret():
            reasons.append("inputs are on the CPU and TRITON_INTERPRET is not set")
        if len(devices) > 1:
            reasons.append(f"inputs are on several devices: {sorted(devices)}")
    elif backend == "inductor":
        # Inside a torch.compile trace this backend runs the plain reference inline (the enclosing compile
        # fuses it; no nested compile), so there is no compiler to probe (nor can the probes be traced);
        # torch.export and torch.jit.trace record the op's operator with backend "auto".
        tracing = torch.compiler.is_compiling()
        err = None if tracing else torch_compile_error()
        if err:
            reasons.append(err)
        if devices - {"cuda", "cpu"}:
            reasons.append(f"inputs are on {sorted(devices)}, inductor compiles for CUDA or CPU tensors")
        elif len(devices) > 1:
            reasons.append(f"inputs are on several devices: {sorted(devices)}")
        elif tracing:
            pass
        elif devices == {"cuda"} and _triton_import_error():
            reasons.append("inductor generates Triton kernels for CUDA tensors: " + _triton_import_error())
        elif devices == {"cpu"} and cpp_compiler_error():
            reasons.append(cpp_compiler_error())
    elif backend != "reference":
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    return reasons


def requested_backend(backend: str | None) -> str | None:
    """The per-call choice, else the environment's; None or 'auto' means automatic."""
    return settings.backend(backend)


def backend_reasons(
    name: str,
    tensors: Sequence[torch.Tensor],
    implemented: Sequence[str] = BACKENDS,
    cuda_ops: Sequence[str] = (),
    extra_reasons: Mapping[str, Sequence[str]] | None = None,
) -> list[str]:
    """Why backend ``name`` cannot run this call (empty: it can)."""
    if name not in implemented:
        return ["this op has no such backend"]
    return generic_reasons(name, tensors, cuda_ops) + list((extra_reasons or {}).get(name, ()))


def reasons_by_backend(
    tensors: Sequence[torch.Tensor],
    implemented: Sequence[str] = BACKENDS,
    cuda_ops: Sequence[str] = (),
    extra_reasons: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    return {name: backend_reasons(name, tensors, implemented, cuda_ops, extra_reasons) for name in BACKENDS}


def select(
    op: str,
    tensors: Sequence[torch.Tensor],
    backend: str | None = None,
    implemented: Sequence[str] = BACKENDS,
    cuda_ops: Sequence[str] = (),
    extra_reasons: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Chooses the backend for one call of ``op``; see the module docstring for the rules."""
    wanted = requested_backend(backend)

    def reasons(name: str) -> list[str]:  # each backend's only when the choice needs it (host time per call)
        return backend_reasons(name, tensors, implemented, cuda_ops, extra_reasons)

    if wanted is None:
        for name in BACKENDS:
            if name == "cuda" and op not in GPU_VERIFIED_CUDA_OPS:
                continue  # compiled but never run on a GPU: opt-in only (see GPU_VERIFIED_CUDA_OPS)
            if name == "inductor" and (op not in INDUCTOR_OWNED_OPS or _devices(tensors) != {"cuda"}):
                continue  # opt-in unless the table gives it the op; never chosen for CPU tensors
            if not reasons(name):
                return name
        wanted = "reference"  # never reached: the reference has no generic reasons
    if reasons(wanted):
        table = reasons_by_backend(tensors, implemented, cuda_ops, extra_reasons)
        lines = [f"{op}: backend {wanted!r} cannot run this call."]
        for name in BACKENDS:
            lines.append(f"  {name}: " + ("; ".join(table[name]) if table[name] else "available"))
        raise BackendUnavailableError("\n".join(lines))
    return wanted


def select_op(op: str, tensors: Sequence[torch.Tensor], backend: str | None = None, **facts) -> str:
    """:func:`select` for one of the package's ops, with what it implements and its limits from the table
    (:data:`.selection.OPS`); ``facts`` are the call's (``x``, and ``num_heads`` where the op has heads)."""
    entry = selection.OPS[op]
    return select(op, tensors, backend, implemented=entry.backends, cuda_ops=entry.cuda_ops,
                  extra_reasons=selection.call_reasons(op, **facts))


def status() -> dict[str, list[str]]:
    """Global availability of each backend on this machine (reasons it cannot run; empty = available)."""
    table: dict[str, list[str]] = {name: [] for name in BACKENDS}
    err = torch_compile_error()
    if err:
        table["inductor"].append(err)
    elif not torch.cuda.is_available():
        err = cpp_compiler_error()
        if err:
            table["inductor"].append(err)
    elif _triton_import_error():
        table["inductor"].append("inductor generates Triton kernels for CUDA tensors: " + _triton_import_error())
    err = cuda_extension_error()
    if err:
        table["cuda"].append(err)
    if not torch.cuda.is_available():
        table["cuda"].append("no CUDA device")
    err = _triton_import_error()
    if err:
        table["triton"].append(err)
    elif not torch.cuda.is_available() and not triton_interpret():
        table["triton"].append("no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU, slowly)")
    return table
