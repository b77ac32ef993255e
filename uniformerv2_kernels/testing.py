"""Tolerance rules of DESIGN.md section 5, shared by the tests and the benchmarks' self-checks.

Errors are relative in the Frobenius norm: ||out - ref|| / ||ref||, against a float64 reference.
- fp32: <= 1e-5, or <= 5e-4 where tf32 dot products are used.
- fp16 / bf16: no worse than `factor` x (2 for outputs, 3 for gradients) the error of the reference itself
  run in that dtype, with a floor of one unit of that dtype's precision (a reference that happens to be
  almost exact must not demand more than the format can hold).
"""

from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().double()
    ref = ref.detach().double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    if denom == 0.0:
        return diff
    return diff / denom


def fp32_tolerance(tf32: bool = False) -> float:
    return 5e-4 if tf32 else 1e-5


def assert_close_fp32(out, ref64, name: str = "output", tf32: bool = False) -> None:
    err = rel_error(out, ref64)
    tol = fp32_tolerance(tf32)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e} (fp32{' tf32' if tf32 else ''})"


def assert_close_lowp(out, ref64, ref_lowp, name: str = "output", factor: float = 2.0,
                      floor: float | None = None) -> None:
    """`out` (fp16/bf16 kernel) must be within `factor` x the error of `ref_lowp` (reference in that dtype).

    `floor` defaults to one unit of out's precision (fp16/bf16 eps; 1e-6 for fp32 results of mixed
    precision); pass the low-precision eps explicitly when fp32 tensors carry low-precision errors.
    """
    ref_err = rel_error(ref_lowp, ref64)
    if floor is None:
        floor = torch.finfo(out.dtype).eps if out.dtype in (torch.float16, torch.bfloat16) else 1e-6
    err = rel_error(out, ref64)
    tol = max(factor * ref_err, floor)
    assert err <= tol, (
        f"{name}: relative error {err:.3e} > {tol:.3e} = max({factor} x reference's own {out.dtype} "
        f"error {ref_err:.3e}, floor {floor:.1e})"
    )


def assert_close(out, ref64, ref_lowp=None, name: str = "output", grad: bool = False, tf32: bool = False) -> None:
    """Dispatches on out.dtype: fp32/fp64 absolute rule, fp16/bf16 relative-to-reference rule."""
    if out.dtype in (torch.float16, torch.bfloat16):
        if ref_lowp is None:
            raise ValueError("a low-precision comparison needs the reference run in that dtype")
        assert_close_lowp(out, ref64, ref_lowp, name=name, factor=3.0 if grad else 2.0)
    elif out.dtype == torch.float64:
        err = rel_error(out, ref64)
        assert err <= 1e-10, f"{name}: relative error {err:.3e} > 1e-10 (fp64)"
    else:
        assert_close_fp32(out, ref64, name=name, tf32=tf32)
