"""Whether a provider can run here (``Provider.requires``), and the reason shown when it cannot."""

from __future__ import annotations

import functools
import os

import torch

from .shapes import Case, Provider


# --------------------------------------------------------------------------------- availability checks

def _device_type(args) -> str:
    return torch.device(args.device).type


@functools.lru_cache(maxsize=None)
def xformers_error() -> str | None:
    """Why xformers' memory_efficient_attention cannot be benchmarked here, or None."""
    try:
        import xformers.ops as xops  # noqa: F401
    except Exception as exc:
        return f"xformers is not importable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if not torch.cuda.is_available():
        return "xformers has no CPU path (needs a CUDA GPU)"
    try:
        q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as exc:
        return f"xformers does not run here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def _requirement_reason(req: str, args) -> str | None:
    from uniformerv2_kernels import backends

    dev = _device_type(args)
    if req == "gpu":
        if dev != "cuda":
            return "needs a CUDA device (benchmarking on the CPU)"
        return None
    if req == "triton":
        err = backends._triton_import_error()
        if err:
            return err
        if dev == "cuda":
            return None
        if backends.triton_interpret():
            return None
        return ("Triton timing needs a CUDA GPU (pass --interpret to smoke-test the kernels on the CPU "
                "under TRITON_INTERPRET=1; those times mean nothing)")
    if req == "cuda_ext":
        if dev != "cuda":
            return "the CUDA extension needs a CUDA device"
        return backends.cuda_extension_error()
    if req.startswith("cuda_op:"):
        if dev != "cuda":
            return "the CUDA extension needs a CUDA device"
        err = backends.cuda_extension_error()
        if err:
            return err
        op = req.split(":", 1)[1]
        if not backends.has_cuda_op(op):
            return f"the built extension has no torch.ops.uniformerv2_cuda.{op}"
        return None
    if req == "xformers":
        return xformers_error()
    if req == "inductor":  # the fused ops' inductor backend (torch.compile of their references)
        err = backends.torch_compile_error()
        if err:
            return err
        if dev == "cuda":
            err = backends._triton_import_error()
            return f"inductor generates Triton kernels for CUDA tensors: {err}" if err else None
        if "inductor" not in (args.providers or ()):
            return ("inductor compiles C++ for each shape on the CPU (tens of seconds): name the provider in "
                    "--providers to run it")
        return backends.cpp_compiler_error()
    raise ValueError(f"unknown requirement {req!r}")


def provider_skip_reason(provider: Provider, case: Case | None, args) -> str | None:
    """The first reason ``provider`` cannot run ``case`` here, or None."""
    for req in provider.requires:
        reason = _requirement_reason(req, args)
        if reason:
            return reason
    if provider.skip_if is not None and case is not None:
        return provider.skip_if(case, args)
    return None


def _interpreted(provider: Provider, args) -> bool:
    return _device_type(args) == "cpu" and "triton" in provider.requires and os.environ.get(
        "TRITON_INTERPRET", "0") not in ("", "0")
