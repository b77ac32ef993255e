"""`python -m uniformerv2_kernels.info`: which backends can run here, and why not."""

from __future__ import annotations

import importlib
import os
import platform

import torch

from . import backends


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__})"


def attention_backend() -> tuple[str, str]:
    try:
        from .ops.spatial_attention import attention_backend as choose
    except ImportError as exc:
        return "sdpa", f"spatial attention op not importable: {exc}"
    return choose()


def report() -> str:
    lines = ["uniformerv2-kernels backends", ""]
    table = backends.status()
    width = max(len(name) for name in table)
    for name in backends.BACKENDS:
        reasons = table[name]
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        lines.append(f"  {name:<{width}}  {state}")
    env = os.environ.get(backends.ENV_BACKEND)
    lines.append("")
    lines.append(f"  selection: per-call backend=, else {backends.ENV_BACKEND}={env or '(unset)'}, "
                 "else the first available above")
    verified = ", ".join(sorted(backends.GPU_VERIFIED_CUDA_OPS)) or "none yet"
    lines.append(f"  CUDA kernels picked automatically (verified on a GPU): {verified}; "
                 "others only with backend='cuda'")
    lines.append("  Triton kernels verified on a GPU: " + ("yes" if backends.TRITON_GPU_VERIFIED else
                 "not yet (interpreter only); model.fused=auto keeps the reference model on CUDA"))
    name, reason = attention_backend()
    lines.append(f"  spatial attention: {name} ({reason})")
    try:
        gemm = backends.triton_gemm()
    except ValueError as exc:
        gemm = f"invalid: {exc}"
    lines.append(f"  Triton backend's fused GEMMs: {gemm} ({backends.ENV_TRITON_GEMM}="
                 f"{os.environ.get(backends.ENV_TRITON_GEMM, '(unset)')}; cublas, the default: cuBLAS + a Triton "
                 "epilogue pass; triton: one autotuned Triton GEMM each)")
    lines.append(f"  Triton GEMM autotuning (UNIFORMERV2_TRITON_GEMM=triton only): UNIFORMERV2_AUTOTUNE="
                 f"{os.environ.get('UNIFORMERV2_AUTOTUNE', '(unset)')} "
                 "(full, the default: nine configurations; quick: two, as the tests set it)")
    lines.append("")
    info = backends.build_info()
    if info:
        lines.append(f"  CUDA extension: built for torch {info.get('TORCH_VERSION')}, CUDA {info.get('CUDA_VERSION')}, "
                     f"archs {info.get('ARCH_LIST')}")
        err = backends.cuda_extension_error()
        if err is None:
            ops = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                         if n.startswith("uniformerv2_cuda::"))
            lines.append(f"  CUDA extension ops: {', '.join(ops) or '(none)'}")
        else:
            lines.append(f"  CUDA extension: {err}")
    else:
        lines.append("  CUDA extension: not built")
    lines.append("")
    lines.append(f"  python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
                 f"triton {_version('triton')}, xformers {_version('xformers')}")
    if torch.cuda.is_available():
        lines.append(f"  device: {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})")
    else:
        lines.append("  device: no CUDA device")
    lines.append(f"  TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '(unset)')}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
