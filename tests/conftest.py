import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. It must be set before
# any triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests of the Triton paths run on the GPU where there is one (real kernels), else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def opcheck(op, args):
    """torch.library.opcheck of a fused op's operator on plain (non-grad) copies of its arguments: the
    operators' Autograd key is a fallthrough, their gradients come from the autograd Functions around them
    (uniformerv2_kernels/library.py), which each op's own tests check through the public function."""
    return torch.library.opcheck(op, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
