import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. It must be set before
# any triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a GPU the Triton GEMM autotunes among two configurations, not nine: each new shape compiles and times
# every one, which dominated the suite's time on a cold cache (uniformerv2_kernels/triton/ffn.py);
# tests/test_ffn.py runs each of the nine once.
os.environ.setdefault("UNIFORMERV2_AUTOTUNE", "quick")

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
