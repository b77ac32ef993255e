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


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
