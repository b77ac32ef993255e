"""Fused Triton and CUDA C++ kernels for UniFormerV2. Importing the package registers the fused operators
(``torch.ops.uniformerv2.*``), which a saved ExportedProgram that uses them needs before it loads."""

from . import ops  # noqa: F401
