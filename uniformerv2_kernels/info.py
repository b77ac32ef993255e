"""`python -m uniformerv2_kernels.info`: which backends can run here and why not, the selection table as it
applies on this machine (with the model's per-path rules), and every UNIFORMERV2_* setting."""

from __future__ import annotations

import importlib
import os
import platform

import torch

from . import backends, selection, settings


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


def _automatic_choice(op: str, machine: dict[str, list[str]]) -> str:
    """The backend automatic selection gives this op's calls on CUDA tensors here (fp32/fp16/bf16 within its
    limits), or on CPU tensors where there is no CUDA device."""
    entry = selection.OPS[op]
    for name in backends.BACKENDS:
        allowed = {"cuda": entry.auto_cuda, "inductor": entry.auto_inductor and torch.cuda.is_available()}
        if name in entry.backends and not machine[name] and allowed.get(name, True):
            return name
    return "reference"


def _selection_lines(machine: dict[str, list[str]]) -> list[str]:
    lines = ["  ops (selection.OPS): backends implemented, limits, and what automatic selection picks here"]
    try:
        forced = settings.backend()
    except ValueError as exc:
        forced = f"invalid ({exc})"
    for op, entry in selection.OPS.items():
        if not forced:
            chosen = f"{_automatic_choice(op, machine)} (automatic)"
        elif forced in entry.backends:
            chosen = f"{forced} ({settings.ENV_BACKEND})"
        else:
            chosen = f"none: {settings.ENV_BACKEND}={forced} is not implemented (a direct call raises)"
        lines.append(f"    {op}: {' / '.join(entry.backends)}; here: {chosen}")
        for name in entry.backends:
            rules = [limit.rule for limit in entry.limits if limit.backend == name]
            note = f" [opt-in: {entry.why}]" if name == "cuda" and not entry.auto_cuda else ""
            if name == "inductor":
                note = f" [{'CUDA tensors' if entry.auto_inductor else 'opt-in'}: {entry.inductor_why}]"
            lines.append(f"      {name:<9} " + ("; ".join(rules) if rules else "any float input") + note)
    lines.append("  inductor: torch.compile (default mode, static shapes) of the op's pure-PyTorch reference, run "
                 "outside its operators with the compiled function's own backward; inside a torch.compile trace "
                 "the reference runs inline (the enclosing compile fuses it); torch.export records the operator "
                 "with backend auto")
    lines.append(f"    decision (auto_inductor): {selection.INDUCTOR_DECISION}")
    lines.append("  a model's backend: one name for every op, or a dict op -> name (e.g. {'fused_ffn': 'inductor'}; "
                 "the others automatic)")
    lines.append("  the model's per-path rules (selection.MODEL_RULES), as they apply here:")
    for rule in selection.MODEL_RULES:
        lines.append(f"    {rule.path}: runs {rule.runs} when {rule.when} ({rule.why})")
    if forced == "cuda":
        lines.append(f"    -> with {settings.ENV_BACKEND}=cuda the CLIP blocks' attention runs "
                     f"{selection.spatial_attention_backend(None)}")
    lines.append("    -> a model in training with dropout in its Extractor MLPs runs them on the reference; "
                 "evaluation and dropout 0 run them fused")
    return lines


def report() -> str:
    lines = ["uniformerv2-kernels backends", ""]
    table = backends.status()
    width = max(len(name) for name in table)
    for name in backends.BACKENDS:
        reasons = table[name]
        state = "available" if not reasons else "unavailable: " + "; ".join(reasons)
        lines.append(f"  {name:<{width}}  {state}")
    lines.append("")
    lines.append(f"  selection: per-call backend=, else {backends.ENV_BACKEND}, else the first available "
                 "backend that the op implements, whose limits the call meets and that automatic selection may "
                 "pick for it (inductor: never on the CPU)")
    lines.append("  Triton kernels verified on a GPU: " + ("yes" if backends.TRITON_GPU_VERIFIED else
                 "not yet (interpreter only); model.fused=auto keeps the reference model on CUDA"))
    name, reason = attention_backend()
    lines.append(f"  spatial attention: {name} ({reason})")
    try:
        gemm = backends.triton_gemm()
    except ValueError as exc:
        gemm = f"invalid: {exc}"
    lines.append(f"  Triton backend's fused GEMMs: {gemm}")
    lines.append("")
    lines += _selection_lines(table)
    lines.append("")
    lines.append("  settings (every UNIFORMERV2_* variable, uniformerv2_kernels.settings):")
    for row in settings.snapshot():
        raw = row.raw if row.raw is not None else "(unset)"
        lines.append(f"    {row.name}={raw} -> {row.value}: {row.description}")
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
