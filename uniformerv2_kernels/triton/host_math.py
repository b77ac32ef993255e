"""Integer arithmetic for the launchers' host code (grids, tile counts, block sizes).

``triton.cdiv`` and ``triton.next_power_of_2`` are ``@constexpr_function``s (triton 3.6 and 3.8): every call
from host code goes through their wrapper, about a hundred times the cost of the same integer arithmetic in
Python, and the launchers call them hundreds of times per training step of the fused model. Inside ``@triton.jit`` kernels keep using ``tl.cdiv``.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1, as ``triton.next_power_of_2`` (0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0
