"""Triton kernels of the fused ops, one module per op, each with the launchers its op calls."""

from ..backends import triton_interpret

# Whether this package's kernels run interpreted on the CPU. Triton decides it for each kernel when
# @triton.jit decorates it, at this package's import, so the launchers' tile choices read it once, here.
INTERPRETED: bool = triton_interpret()
