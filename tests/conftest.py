import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter when there is no GPU. It must be set before
# any triton kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a GPU the Triton GEMM autotunes among two configurations, not the full list: each new shape compiles and
# times every one, which dominated the suite's time on a cold cache (uniformerv2_kernels/triton/linear.py);
# tests/test_ffn.py runs each configuration of the full lists once.
os.environ.setdefault("UNIFORMERV2_AUTOTUNE", "quick")

# Tests of the Triton paths run on the GPU where there is one (real kernels), else interpreted on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# pytest-xdist's workers share the cores: each (and each process a test starts) takes its share of torch's
# CPU threads. More OpenMP threads than cores wait on each other: on the 2-core CI machine two workers of two
# threads each spent ~20% more CPU time on tests/test_model.py than of one thread each.
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _threads = max(1, _cores // _XDIST_WORKERS)
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

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
