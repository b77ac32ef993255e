"""Global UniBlock op (DPE + ln_3 + folded one-query cross-attention): references, Triton, registration."""

import importlib
import math

import pytest
import torch

from conftest import DEVICE, opcheck, requires_cuda
from uniformerv2_kernels import backends, inductor
from uniformerv2_kernels.ops.global_query_attention import global_query_attention
from uniformerv2_kernels.reference import global_query_attention as ref
from uniformerv2_kernels.testing import assert_close, rel_error

@pytest.fixture(autouse=True)
def _one_thread():
    """The CPU machines are shared: OpenMP barriers of tiny ops under contention cost ~50 ms each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# the module itself (the package may re-export the function under the same name)
op_module = importlib.import_module("uniformerv2_kernels.ops.global_query_attention")

ARG_NAMES = ("x", "dpe_weight", "dpe_bias", "ln_weight", "ln_bias", "query", "in_proj_weight", "in_proj_bias")


def make_inputs(hw, N, T, C, dtype=torch.float64, device=DEVICE):
    """Fresh random inputs; every parameter randomised (DPE bias, ln_3 affine and in_proj biases included)."""
    L = 1 + hw
    g = lambda *s: torch.randn(*s, dtype=torch.float64)  # noqa: E731
    tensors = [
        g(L, N * T, C) * 1.5 + 0.3,  # x, non-zero mean like the real stream
        g(C, 1, 3, 3, 3) * 0.2,  # dpe_weight
        g(C) * 0.5,  # dpe_bias
        1.0 + 0.3 * g(C),  # ln_weight
        0.3 * g(C),  # ln_bias
        g(1, N, C),  # query (= ln_1(g))
        g(3 * C, C) / math.sqrt(C) * 0.8,  # in_proj_weight: scores of std ~1 (a softmax neither flat nor one-hot)
        0.5 * g(3 * C),  # in_proj_bias
    ]
    return [t.to(device=device, dtype=dtype) for t in tensors]


def call(fn, tensors, T, heads, **kw):
    x, dw, db, lw, lb, q, w, b = tensors
    return fn(x, T, dw, db, lw, lb, q, w, b, heads, **kw)


def value_and_grads(fn, tensors, T, heads, grad_out, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = call(fn, leaves, T, heads, **kw)
    grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype))
    return out.detach(), [g.detach() for g in grads]


# ---------------------------------------------------------------------------------------------- references


def test_folded_equals_literal_float64():
    tensors = make_inputs(hw=9, N=3, T=3, C=12, dtype=torch.float64)
    lit = call(ref.global_query_attention_literal, tensors, 3, 3)
    folded = call(ref.global_query_attention_folded, tensors, 3, 3)
    assert lit.shape == (1, 3, 12)
    assert rel_error(folded, lit) < 1e-12
    # the DPE really acts (and only on patch tokens): zeroing its weight and bias changes the result
    x, dw, db = tensors[:3]
    y = ref.dpe_literal(x, 3, dw, db)
    assert torch.equal(y[0], x[0]) and not torch.allclose(y[1:], x[1:])


@pytest.mark.parametrize("form", ["literal", "folded"])
def test_reference_gradcheck_float64(form):
    fn = {"literal": ref.global_query_attention_literal, "folded": ref.global_query_attention_folded}[form]
    tensors = [t.requires_grad_(True) for t in make_inputs(hw=4, N=2, T=3, C=6)]
    assert torch.autograd.gradcheck(lambda *ts: call(fn, ts, 3, 2), tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_analytic_backward_gradcheck_float64():
    """The custom op with backend='reference' runs the analytic (folded) backward: gradcheck it."""
    tensors = [t.requires_grad_(True) for t in make_inputs(hw=4, N=2, T=2, C=6)]
    fn = lambda *ts: call(global_query_attention, ts, 2, 3, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_analytic_backward_matches_autograd_of_literal():
    tensors = make_inputs(hw=9, N=3, T=2, C=12)
    grad_out = torch.randn(1, 3, 12, dtype=torch.float64, device=DEVICE)
    out_lit, grads_lit = value_and_grads(ref.global_query_attention_literal, tensors, 2, 4, grad_out)
    _, z, lse = call(ref.global_query_attention_folded_with_stats, tensors, 2, 4)
    grads = ref.global_query_attention_folded_backward(grad_out, *tensors[:1], 2, *tensors[1:], z, lse, 4)
    for name, a, b in zip(ARG_NAMES, grads, grads_lit):
        assert rel_error(a, b) < 1e-12, name
    # the k bias never matters: the folded backward gives exactly zero there, the literal one ~0
    assert torch.count_nonzero(grads[7][12:24]) == 0
    assert grads_lit[7][12:24].abs().max() < 1e-12


# ------------------------------------------------------------------------------------------------- triton

# (hw, N, T, C, heads, num_splits, block_s, use_dot): covers T {1, 3, 8}, h*w {4, 9, 196}, C {64, 96},
# heads {1, 2, 3}, N {1, 3}; splits > 1 exercise the flash-decoding merge, including a last split that is
# partly empty; use_dot=True runs the tensor-core forward path (used for fp16/bf16) with fp32 operands.
TRITON_CASES = [
    (4, 1, 1, 64, 1, None, None, False),
    (9, 3, 3, 96, 3, 2, 16, False),
    (4, 3, 8, 64, 2, 3, 16, True),
    (196, 1, 1, 96, 2, 2, 64, False),
    (196, 1, 3, 96, 3, 4, 64, True),
    (9, 1, 8, 64, 1, None, None, False),
]


def _triton_value_and_grads(tensors, T, heads, grad_out, num_splits, block_s, use_dot=None):
    """Runs the Triton launchers directly (to pick splits/tile sizes/paths), the way the op does."""
    from uniformerv2_kernels.triton import global_query_attention as tri
    from uniformerv2_kernels.triton import global_query_attention_backward as tri_backward

    out, z, lse = call(tri.forward, tensors, T, heads, num_splits=num_splits, block_s=block_s, use_dot=use_dot)
    grads = tri_backward.backward(grad_out.to(out.dtype), tensors[0], T, *tensors[1:], z, lse, heads,
                         num_splits=num_splits, block_s=block_s)
    return out, list(grads)


@pytest.mark.parametrize("hw,N,T,C,heads,num_splits,block_s,use_dot", TRITON_CASES)
def test_triton_fp32_matches_literal_reference(hw, N, T, C, heads, num_splits, block_s, use_dot):
    tensors64 = make_inputs(hw, N, T, C)
    grad_out = torch.randn(1, N, C, dtype=torch.float64, device=DEVICE)
    out64, grads64 = value_and_grads(ref.global_query_attention_literal, tensors64, T, heads, grad_out)
    tensors = [t.float() for t in tensors64]
    out, grads = _triton_value_and_grads(tensors, T, heads, grad_out, num_splits, block_s, use_dot)
    assert out.dtype == torch.float32 and out.shape == (1, N, C)
    assert_close(out, out64, name="out")
    for name, g, g64, t in zip(ARG_NAMES, grads, grads64, tensors):
        assert g.dtype == t.dtype and g.shape == t.shape, name
        assert_close(g, g64, name=f"grad {name}", grad=True)


@pytest.mark.parametrize("hw,N,T,C,heads,use_dot", [
    (16, 2, 3, 40, 2, False),
    (9, 1, 1, 64, 1, True),
])
def test_triton_two_splits_match_literal_reference(hw, N, T, C, heads, use_dot):
    """Two splits of 16-token tiles on shapes TRITON_CASES lacks: h*w = 16, C = 40 (not a multiple of 16),
    and T = 1 with the tensor-core forward path."""
    tensors64 = make_inputs(hw, N, T, C)
    grad_out = torch.randn(1, N, C, dtype=torch.float64, device=DEVICE)
    out64, grads64 = value_and_grads(ref.global_query_attention_literal, tensors64, T, heads, grad_out)
    tensors = [t.float() for t in tensors64]
    out, grads = _triton_value_and_grads(tensors, T, heads, grad_out, 2, 16, use_dot)
    assert_close(out, out64, name="out")
    for name, g, g64 in zip(ARG_NAMES, grads, grads64):
        assert_close(g, g64, name=f"grad {name}", grad=True)


def test_dpe_kernel_at_the_gpu_tile_sizes(monkeypatch):
    """The DPE kernel with its GPU tiles (16 rows x 128 channels) on C = 200 (a partial channel block) and
    a row count that is not a multiple of 16, against the reference DPE (a depthwise Conv3d)."""
    from uniformerv2_kernels.triton import global_query_attention as tri

    monkeypatch.setattr(tri, "_dpe_blocks", lambda C: (16, 128, 4))
    hw, N, T, C = 9, 1, 3, 200  # L * N*T = 30 rows
    x, dw, db = (t.float() for t in make_inputs(hw, N, T, C)[:3])
    y = tri.apply_dpe(x, T, dw.reshape(C, 27).t().contiguous(), db)
    torch.testing.assert_close(y, ref.dpe_literal(x, T, dw, db), rtol=1e-5, atol=1e-5)


def test_triton_small_tiles_and_partial_channel_blocks():
    """The DPE backward at the GPU's channel block (32) on C = 40 (a partial block) with 4-token tiles and
    3 splits: the masks the interpreter's default whole-row tiles never exercise."""
    from uniformerv2_kernels.triton import global_query_attention as tri
    from uniformerv2_kernels.triton import global_query_attention_backward as tri_backward

    hw, N, T, C, heads = 9, 2, 3, 40, 2
    tensors64 = make_inputs(hw, N, T, C)
    grad_out = torch.randn(1, N, C, dtype=torch.float64, device=DEVICE)
    out64, grads64 = value_and_grads(ref.global_query_attention_literal, tensors64, T, heads, grad_out)
    tensors = [t.float() for t in tensors64]
    out, z, lse = call(tri.forward, tensors, T, heads, num_splits=3, block_s=4)
    grads = tri_backward.backward(grad_out.float(), tensors[0], T, *tensors[1:], z, lse, heads, num_splits=3,
                                  block_s=4, dpe_block_c=32)
    assert_close(out, out64, name="out")
    for name, g, g64 in zip(ARG_NAMES, grads, grads64):
        assert_close(g, g64, name=f"grad {name}", grad=True)


@pytest.mark.parametrize("hw,N,T,C,heads", [(9, 3, 3, 64, 2), (196, 1, 1, 96, 3), (4, 1, 8, 96, 1)])
def test_triton_fp16_matches_literal_reference(hw, N, T, C, heads):
    tensors64 = make_inputs(hw, N, T, C)
    grad_out = torch.randn(1, N, C, dtype=torch.float64, device=DEVICE)
    out64, grads64 = value_and_grads(ref.global_query_attention_literal, tensors64, T, heads, grad_out)
    tensors = [t.half() for t in tensors64]
    out16, grads16 = value_and_grads(ref.global_query_attention_literal, tensors, T, heads, grad_out)
    out, grads = value_and_grads(global_query_attention, tensors, T, heads, grad_out, backend="triton")
    assert out.dtype == torch.float16
    assert_close(out, out64, out16, name="out")
    for name, g, g64, g16 in zip(ARG_NAMES, grads, grads64, grads16):
        assert g.dtype == torch.float16, name
        assert_close(g, g64, g16, name=f"grad {name}", grad=True)


def test_triton_expanded_query_and_odd_head_width():
    """The launchers given a query shared by the videos (one (1, 1, C) vector expanded to (1, N, C): stride 0
    over videos; the public op makes it contiguous first, direct callers need not) and a head width d = 20
    (not a power of two): the per-(video, head) kernels read the query through its strides and mask the
    head's rows."""
    hw, N, T, C, heads = 4, 3, 2, 60, 3
    tensors64 = make_inputs(hw, N, T, C)
    tensors64[5] = torch.randn(1, 1, C, dtype=torch.float64, device=DEVICE).expand(1, N, C)
    grad_out = torch.randn(1, N, C, dtype=torch.float64, device=DEVICE)
    out64, grads64 = value_and_grads(ref.global_query_attention_literal, tensors64, T, heads, grad_out)
    tensors = [t.float() for t in tensors64]
    tensors[5] = tensors64[5][:, :1].float().expand(1, N, C)  # .float() of the expanded one would copy it
    assert tensors[5].stride(1) == 0
    out, grads = _triton_value_and_grads(tensors, T, heads, grad_out, 2, None)
    assert_close(out, out64, name="out")
    for name, g, g64 in zip(ARG_NAMES, grads, grads64):
        assert_close(g, g64, name=f"grad {name}", grad=True)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("hw,N,T,C,heads", [(196, 4, 8, 768, 12), (256, 2, 3, 1024, 16), (9, 3, 1, 96, 3)])
def test_triton_on_gpu_matches_literal_reference(hw, N, T, C, heads, dtype):
    tensors64 = make_inputs(hw, N, T, C, device="cuda")
    grad_out = torch.randn(1, N, C, dtype=torch.float64, device="cuda")
    out64, grads64 = value_and_grads(ref.global_query_attention_literal, tensors64, T, heads, grad_out)
    tensors = [t.to(dtype) for t in tensors64]
    outl, gradsl = value_and_grads(ref.global_query_attention_literal, tensors, T, heads, grad_out)
    out, grads = value_and_grads(global_query_attention, tensors, T, heads, grad_out, backend="triton")
    assert_close(out, out64, outl, name="out")
    for name, g, g64, gl in zip(ARG_NAMES, grads, grads64, gradsl):
        assert_close(g, g64, gl, name=f"grad {name}", grad=True)


def test_triton_backward_is_deterministic():
    tensors = [t.float() for t in make_inputs(hw=9, N=3, T=3, C=64)]
    grad_out = torch.randn(1, 3, 64, device=DEVICE)
    _, first = _triton_value_and_grads(tensors, 3, 2, grad_out, 3, 16)
    _, second = _triton_value_and_grads(tensors, 3, 2, grad_out, 3, 16)
    for name, a, b in zip(ARG_NAMES, first, second):
        assert torch.equal(a, b), name
    _, via_op_1 = value_and_grads(global_query_attention, tensors, 3, 2, grad_out, backend="triton")
    _, via_op_2 = value_and_grads(global_query_attention, tensors, 3, 2, grad_out, backend="triton")
    for name, a, b in zip(ARG_NAMES, via_op_1, via_op_2):
        assert torch.equal(a, b), name


# ----------------------------------------------------------------------------------- registration, compile


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_opcheck(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    x, dw, db, lw, lb, q, w, b = [t.requires_grad_(True) for t in make_inputs(hw=4, N=2, T=2, C=64, dtype=dtype)]
    opcheck(
        torch.ops.uniformerv2.global_query_attention_fwd.default, (x, 2, dw, db, lw, lb, q, w, b, 2, 1e-5, backend)
    )
    with torch.no_grad():
        _, z, lse = torch.ops.uniformerv2.global_query_attention_fwd(x, 2, dw, db, lw, lb, q, w, b, 2, 1e-5, backend)
    opcheck(
        torch.ops.uniformerv2.global_query_attention_bwd.default,
        (torch.randn(1, 2, 64, dtype=dtype, device=DEVICE), x.detach(), 2, dw.detach(), db.detach(), lw.detach(), lb.detach(),
         q.detach(), w.detach(), b.detach(), z, lse, 2, 1e-5, backend),
    )


class _GlobalAttention(torch.nn.Module):
    """A module shaped like the model's global block: it owns the parameters and calls the op."""

    def __init__(self, tensors, heads, backend):
        super().__init__()
        _, dw, db, lw, lb, _, w, b = tensors
        self.dpe_weight, self.dpe_bias = torch.nn.Parameter(dw.clone()), torch.nn.Parameter(db.clone())
        self.ln_weight, self.ln_bias = torch.nn.Parameter(lw.clone()), torch.nn.Parameter(lb.clone())
        self.in_proj_weight, self.in_proj_bias = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
        self.heads, self.backend = heads, backend

    def forward(self, x, query, T: int):
        out = global_query_attention(x, T, self.dpe_weight, self.dpe_bias, self.ln_weight, self.ln_bias, query,
                                     self.in_proj_weight, self.in_proj_bias, self.heads, backend=self.backend)
        return out * 2.0 + query  # something around the op, as in the model


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compiled_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    tensors = [t.float() for t in make_inputs(hw=4, N=3, T=3, C=64)]
    x, q = tensors[0], tensors[5]
    grad_out = torch.randn(1, 3, 64, device=DEVICE)
    results = []
    for compiled in (False, True):
        module = _GlobalAttention(tensors, 2, backend)
        fn = torch.compile(module, fullgraph=True) if compiled else module
        xs, qs = x.clone().requires_grad_(True), q.clone().requires_grad_(True)
        out = fn(xs, qs, 3)
        out.backward(grad_out)
        results.append([out.detach(), xs.grad, qs.grad] + [p.grad for p in module.parameters()])
    for i, (e, c) in enumerate(zip(*results)):
        assert rel_error(c, e) <= 1e-6, f"result {i}: compiled differs from eager"


def test_backend_selection():
    tensors = make_inputs(hw=4, N=1, T=1, C=64, dtype=torch.float64)
    # fp64 is reference-only: automatic selection falls back, an explicit Triton request explains why
    out = call(global_query_attention, tensors, 1, 2)
    assert torch.allclose(out, call(ref.global_query_attention_literal, tensors, 1, 2), rtol=1e-10, atol=1e-12)
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        call(global_query_attention, tensors, 1, 2, backend="triton")
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        call(global_query_attention, tensors, 1, 2, backend="cuda")
    assert "reference" in op_module.IMPLEMENTED and "triton" in op_module.IMPLEMENTED


# ------------------------------------------------------------------------------------------------ errors


def test_bad_inputs_name_the_argument():
    good = make_inputs(hw=4, N=2, T=3, C=12, dtype=torch.float32, device="cpu")

    def run(T=3, heads=3, eps=1e-5, **replace):
        tensors = [replace.get(n, t) for n, t in zip(ARG_NAMES, good)]
        return call(global_query_attention, tensors, T, heads, eps=eps, backend="reference")

    run()  # the good inputs pass
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        run(x=good[0][0])
    with pytest.raises(ValueError, match="num_heads"):
        run(heads=5)
    with pytest.raises(ValueError, match="x: 5 patch tokens is not a square"):
        run(x=torch.randn(6, 6, 12))
    with pytest.raises(ValueError, match="x: dimension 1 is N\\*T"):
        run(T=4)
    with pytest.raises(ValueError, match="T must be a positive int"):
        run(T=0)
    with pytest.raises(ValueError, match="dpe_weight must have 5 dimensions"):
        run(dpe_weight=torch.randn(12, 1, 3, 3))
    with pytest.raises(ValueError, match="query must have shape"):
        run(query=torch.randn(1, 3, 12))
    with pytest.raises(ValueError, match="in_proj_weight must have shape"):
        run(in_proj_weight=torch.randn(36, 13))
    with pytest.raises(ValueError, match="in_proj_bias must have shape"):
        run(in_proj_bias=torch.randn(24))
    with pytest.raises(ValueError, match="ln_weight must have 1 dimensions"):
        run(ln_weight=torch.randn(12, 1))
    with pytest.raises(TypeError, match="ln_bias has dtype torch.float16"):
        run(ln_bias=good[4].half())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        run(x=good[0].numpy())
    with pytest.raises(ValueError, match="eps must be a positive float"):
        run(eps=0.0)
    meta = torch.randn(12, device="meta")
    with pytest.raises(ValueError, match="dpe_bias is on meta"):
        run(dpe_bias=meta)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_does_not_reach_the_op_body(backend):
    """fp16 operands, as the model passes them under autocast: the op's fp32 query folding and value
    projection must not be retyped to fp16 by autocast, so autocast changes nothing."""
    tensors = make_inputs(hw=9, N=2, T=3, C=64, dtype=torch.float16)
    grad_out = torch.randn(1, 2, 64, device=DEVICE)
    results = []
    for amp in (False, True):
        with torch.autocast(device_type=DEVICE, dtype=torch.float16, enabled=amp):
            results.append(value_and_grads(global_query_attention, tensors, 3, 2, grad_out, backend=backend))
    (out, grads), (out_amp, grads_amp) = results
    assert out_amp.dtype == torch.float16 and torch.equal(out_amp, out)
    for name, a, b in zip(ARG_NAMES, grads_amp, grads):
        assert torch.equal(a, b), name


def test_inductor_backend_matches_the_literal_reference(monkeypatch):
    """backend="inductor": the reference backend's folded form compiled (inductor on a GPU; on the CPU
    aot_eager, AOTAutograd without inductor's C++ code generation, which the FFN's tests run): output and
    every gradient against the literal float64 reference."""
    if DEVICE == "cpu":
        monkeypatch.setattr(inductor, "COMPILER", "aot_eager")
    tensors = make_inputs(hw=4, N=2, T=3, C=64)
    grad_out = torch.randn(1, 2, 64, dtype=torch.float64, device=DEVICE)
    ref_out, ref_grads = value_and_grads(ref.global_query_attention_literal, tensors, 3, 2, grad_out)
    out, grads = value_and_grads(global_query_attention, [t.float() for t in tensors], 3, 2, grad_out,
                                 backend="inductor")
    assert out.dtype == torch.float32
    assert_close(out, ref_out, name="out")
    for name, a, b in zip(ARG_NAMES, grads, ref_grads):
        assert_close(a, b, name=name)
