"""The launchers' integer helpers equal triton's (which cost ~100x as much per host call)."""

import triton

from uniformerv2_kernels.triton.host_math import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_equal_triton():
    for a in list(range(0, 300)) + [1023, 1024, 1025, 25216, 2**31 - 1, 2**31, 3 * 2**40 + 7]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 3, 16, 64, 127, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
