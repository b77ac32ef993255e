"""Every fused op's auxiliary outputs (statistics and activations its backward reads, never returned to the
user) must not cost a zero-filled gradient tensor per backward.

autograd materialises zeros for the gradient of every output a custom op returns unless its setup_context
says otherwise (``backends.skip_aux_grads``); for the FFN that was a tensor the size of its (rows, 4C)
hidden activation per layer and step. The materialised zeros show up in the profiler as ``aten::zeros``
under the op's generated backward node and outside the op's own backward custom op (``uniformerv2::*``),
which is what this test looks for. The reference backend runs here (the autograd wiring is the same for
every backend).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from uniformerv2_kernels.ops import (
    clip_layer_norm,
    fused_ffn,
    global_query_attention,
    local_temporal_mhra,
    spatial_attention,
)

L, N, T, C, Cp, H = 5, 2, 3, 32, 24, 2  # 2x2 patches + class token, 2 clips of 3 frames


def _calls():
    gen = torch.Generator().manual_seed(0)

    def p(*shape, scale=0.1):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).requires_grad_(True)

    x = p(L, N * T, C, scale=1.0)
    ln = (1 + p(C), p(C))
    running = (torch.randn(C, generator=gen, dtype=torch.float64), 1 + torch.rand(C, generator=gen, dtype=torch.float64))
    return x, {
        "clip_layer_norm": lambda: clip_layer_norm(x, *ln, backend="reference"),
        "fused_ffn": lambda: fused_ffn(x, *ln, p(4 * C, C), p(4 * C), p(C, 4 * C), p(C), backend="reference"),
        "spatial_attention": lambda: spatial_attention(x, *ln, p(3 * C, C), p(3 * C), p(C, C), p(C), H,
                                                       backend="reference"),
        "local_temporal_mhra": lambda: local_temporal_mhra(
            x, T, 1 + p(C), p(C), *running, None, p(Cp, C, 1, 1, 1), p(Cp), p(Cp, 1, 3, 1, 1), p(Cp),
            p(C, Cp, 1, 1, 1), p(C), True, backend="reference"),
        "global_query_attention": lambda: global_query_attention(
            x, T, p(C, 1, 3, 3, 3), p(C), *ln, p(1, N, C, scale=1.0), p(3 * C, C), p(3 * C), H, backend="reference"),
    }


def _materialised_zeros(prof) -> list[str]:
    """aten::zeros events outside any of this package's custom ops: autograd's zero-filled output grads."""
    found = []
    for e in prof.events():
        if e.name not in ("aten::zeros", "aten::zeros_like"):
            continue
        chain, parent = [], e.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        if not any(name.startswith("uniformerv2::") for name in chain):
            found.append(" <- ".join([e.name] + chain))
    return found


@pytest.mark.parametrize("op", ["clip_layer_norm", "fused_ffn", "spatial_attention", "local_temporal_mhra",
                                "global_query_attention"])
def test_backward_materialises_no_zero_gradients(op):
    x, calls = _calls()
    out = calls[op]()
    grad = torch.randn_like(out)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(grad)
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert _materialised_zeros(prof) == []
