"""Fused FFN (ln_2 + c_fc + QuickGELU + c_proj + drop-path row scale + residual): correctness and registration."""

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, opcheck, requires_cuda
from uniformerv2_kernels import backends, inductor
from uniformerv2_kernels.ops.ffn import OP_NAME as OP, fused_ffn
from uniformerv2_kernels.reference import ffn as reference
from uniformerv2_kernels.reference.layer_norm import clip_layer_norm
from uniformerv2_kernels.testing import assert_close, assert_close_lowp
from uniformerv2_kernels.triton import linear as triton_linear

GRAD_NAMES = ("dx", "d_ln_w", "d_ln_b", "d_fc_w", "d_fc_b", "d_proj_w", "d_proj_b", "d_row_scale")


def _params(C, dtype=torch.float32, device=DEVICE, hidden=None):
    hidden = hidden or 4 * C
    ps = [
        1.0 + 0.5 * torch.randn(C), 0.3 * torch.randn(C),
        torch.randn(hidden, C) / C ** 0.5, 0.3 * torch.randn(hidden),
        torch.randn(C, hidden) / hidden ** 0.5, 0.3 * torch.randn(C),
    ]
    return [p.to(device=device, dtype=dtype) for p in ps]


def _row_scale(n, device=DEVICE):
    keep = 0.7
    mask = (torch.rand(n, device=device) < keep).float()
    mask[0] = 1.0
    mask[-1] = 0.0
    return mask / keep + 0.1 * torch.rand(n, device=device)  # not only 0 and 1/keep: catches index mistakes


def _run(fn, x, params, row_scale, g):
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    inputs = [x, *params]
    if row_scale is not None:
        row_scale = row_scale.detach().requires_grad_()
        inputs.append(row_scale)
    out = fn(x, *params, row_scale=row_scale)
    return (out, *torch.autograd.grad(out, inputs, g))


def test_reference_is_the_official_block_branch():
    C = 32
    x = torch.randn(5, 3, C)
    ln_w, ln_b, fc_w, fc_b, pr_w, pr_b = _params(C, device="cpu")
    c_fc, c_proj, ln = nn.Linear(C, 4 * C), nn.Linear(4 * C, C), nn.LayerNorm(C)
    with torch.no_grad():
        for mod, w, b in ((c_fc, fc_w, fc_b), (c_proj, pr_w, pr_b), (ln, ln_w, ln_b)):
            mod.weight.copy_(w)
            mod.bias.copy_(b)
    rs = _row_scale(5, device="cpu")
    # official: x = x + drop_path(mlp(ln_2(x))), DropPath masks dim 0 of its input
    official = x + rs[:, None, None] * c_proj(reference.quick_gelu(c_fc(ln(x.float()).to(x.dtype))))
    ours = reference.fused_ffn(x, ln_w, ln_b, fc_w, fc_b, pr_w, pr_b, row_scale=rs)
    torch.testing.assert_close(ours, official, rtol=1e-6, atol=1e-6)


def test_reference_gradcheck_float64():
    C, L, B = 6, 3, 2
    x = torch.randn(L, B, C, dtype=torch.float64, requires_grad=True)
    params = [p.double().requires_grad_() for p in _params(C, device="cpu", hidden=8)]
    rs = _row_scale(L, device="cpu").double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, *p: reference.fused_ffn(x, *p[:6], row_scale=p[6]), (x, *params, rs))
    # the registered op's reference backend (explicit backward formulas)
    assert torch.autograd.gradcheck(
        lambda x, *p: fused_ffn(x, *p[:6], row_scale=p[6], backend="reference"), (x, *params, rs))


@pytest.mark.parametrize(
    "shape,dtype,use_row_scale",
    [
        ((7, 3, 64), torch.float32, True),  # 21 rows: one partial row tile
        ((37, 2, 64), torch.float16, True),  # 74 rows: three row tiles
        ((5, 3, 96), torch.float16, False),
        ((13, 96), torch.float32, False),  # (..., C) without row scale
        ((3, 2, 2, 64), torch.float32, True),  # (L, N, T, C): row_scale along dim 0 only
        ((3, 2, 768), torch.float32, True),
        ((2, 3, 768), torch.float16, False),
        ((2, 3, 1024), torch.float16, True),  # the L/14 width (hidden 4096)
    ],
)
@pytest.mark.parametrize("gemm", ["triton", "cublas"])  # UNIFORMERV2_TRITON_GEMM: both plans are kept
def test_triton_matches_float64_reference(monkeypatch, shape, dtype, use_row_scale, gemm):
    monkeypatch.setenv("UNIFORMERV2_TRITON_GEMM", gemm)
    C = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    params = _params(C, dtype)
    rs = _row_scale(shape[0]).to(dtype) if use_row_scale else None
    g = torch.randn(shape, device=DEVICE).to(dtype)
    out = _run(lambda *a, **k: fused_ffn(*a, **k, backend="triton"), x, params, rs, g)
    ref64 = _run(reference.fused_ffn, x.double(), [p.double() for p in params],
                 rs.double() if rs is not None else None, g.double())
    ref_lowp = _run(reference.fused_ffn, x, params, rs, g)
    for i, (o, r64, rl) in enumerate(zip(out, ref64, ref_lowp)):
        name = "out" if i == 0 else GRAD_NAMES[i - 1]
        assert o.dtype == rl.dtype and o.shape == rl.shape, name
        assert_close(o, r64, rl, name=name, grad=i > 0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_triton_on_gpu_real_width(monkeypatch, dtype, gemm):
    monkeypatch.setenv("UNIFORMERV2_TRITON_GEMM", gemm)
    _check_real_width_on_gpu("triton", dtype)


def _check_real_width_on_gpu(backend, dtype):
    """At the B/16 width on the GPU: forward and every gradient within the low-precision rule of the
    reference. Returns (inputs x, params, row_scale, grad_out) and the backend's (out, *grads)."""
    L, B, C = 197, 6, 768
    x = torch.randn(L, B, C, device="cuda").to(dtype)
    params = _params(C, dtype)
    rs = _row_scale(L).to(dtype)
    g = torch.randn_like(x)
    out = _run(lambda *a, **k: fused_ffn(*a, **k, backend=backend), x, params, rs, g)
    ref64 = _run(reference.fused_ffn, x.double(), [p.double() for p in params], rs.double(), g.double())
    ref_lowp = _run(reference.fused_ffn, x, params, rs, g)
    for i, (o, r64, rl) in enumerate(zip(out, ref64, ref_lowp)):
        assert_close(o, r64, rl, name="out" if i == 0 else GRAD_NAMES[i - 1], grad=i > 0)
    return (x, params, rs, g), out


# The GPU tests autotune among two configurations (UNIFORMERV2_AUTOTUNE=quick, tests/conftest.py); this runs
# every configuration of the full lists, which the benchmarks and training autotune among, once each: the
# tensor-core list in 16 bits, the FMA list in fp32 without TF32.
GEMM_CASES = ([(shape, "16-bit") for shape in triton_linear.GEMM_CONFIG_SHAPES]
              + [(shape, "fp32") for shape in triton_linear.FP32_FMA_CONFIG_SHAPES])


@pytest.mark.parametrize("shape,operands", GEMM_CASES, ids=[f"{'x'.join(map(str, s))}-{o}" for s, o in GEMM_CASES])
def test_every_gemm_configuration_matches_float64(shape, operands):
    config = triton_linear._config(shape)
    if operands == "fp32":
        dtype = torch.float32
        assert triton_linear.input_precision(dtype) == "ieee"  # TF32 off: the FMA list
    else:
        dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16  # bf16 is wrong under the interpreter
    tol = dict(rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    if dtype == torch.float32:  # fp32 products summed in another order than float64's: K rounding steps
        tol = dict(rtol=1e-5, atol=1e-5)
    M, N = 70, 96  # not multiples of any tile; K = 96: a partial last K block (EVEN_K off), K = 128: even

    def operands(K):
        a = torch.randn(M, K, device=DEVICE).to(dtype)
        w = (torch.randn(N, K, device=DEVICE) / K ** 0.5).to(dtype)
        return a, w, (a.double() @ w.double().t())

    a, w, ab = operands(96)
    bias = (0.3 * torch.randn(N, device=DEVICE)).to(dtype)
    act, pre = triton_linear.linear(a, w, bias, epilogue=triton_linear.EPI_QUICK_GELU, store_pre=True, config=config)
    pre64 = ab + bias.double()
    torch.testing.assert_close(pre.double(), pre64, **tol)
    torch.testing.assert_close(act.double(), reference.quick_gelu(pre64), **tol)

    residual = torch.randn(M, N, device=DEVICE).to(dtype)
    row_scale = torch.rand(M // 7, device=DEVICE).to(dtype)
    out = triton_linear.linear(a, w, bias, residual=residual, row_scale=row_scale, rows_per_scale=7, config=config)
    scale64 = row_scale.double().repeat_interleave(7)[:, None]
    torch.testing.assert_close(out.double(), residual.double() + scale64 * pre64, **tol)

    a, w, ab = operands(128)
    out = triton_linear.linear(a, w, swap_out_rows=(5, 14), config=config)  # GEMM row m = b * 14 + l -> l * 5 + b
    torch.testing.assert_close(out.double(), ab.view(5, 14, N).transpose(0, 1).reshape(M, N), **tol)

    h = torch.randn(M, N, device=DEVICE).to(dtype)
    grad_pre, act = triton_linear.linear(a, w, epilogue=triton_linear.EPI_QUICK_GELU_GRAD, aux=h, config=config)
    h64 = h.double()
    torch.testing.assert_close(grad_pre.double(), ab * reference.quick_gelu_grad(h64), **tol)
    torch.testing.assert_close(act.double(), reference.quick_gelu(h64), **tol)


def test_autotune_setting_reads_the_environment_and_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("UNIFORMERV2_AUTOTUNE", " Quick ")
    assert triton_linear.autotune_setting() == "quick"
    monkeypatch.delenv("UNIFORMERV2_AUTOTUNE")
    assert triton_linear.autotune_setting() == "full"
    monkeypatch.setenv("UNIFORMERV2_AUTOTUNE", "fast")
    with pytest.raises(ValueError, match="UNIFORMERV2_AUTOTUNE='fast'"):
        triton_linear.autotune_setting()
    # the tests' subsets: configurations of the full lists
    assert set(triton_linear.gemm_config_shapes("tf32", quick=True)) <= set(triton_linear.GEMM_CONFIG_SHAPES)
    assert set(triton_linear.gemm_config_shapes("ieee", quick=True)) <= set(triton_linear.FP32_FMA_CONFIG_SHAPES)


def test_the_autotuner_times_only_the_configurations_of_the_call_precision():
    """The one autotuned kernel holds both lists; its early pruning keeps the list of the call's precision."""
    for quick in (False, True):
        every = triton_linear.autotuned_configs(quick)
        for precision in ("ieee", "tf32"):
            kept = triton_linear._configs_for_the_call_precision(every, {}, quick=quick, INPUT_PRECISION=precision)
            shapes = [triton_linear.config_shape(c) for c in kept]
            assert sorted(shapes) == sorted(triton_linear.gemm_config_shapes(precision, quick)), (precision, quick)


def test_inference_path_matches_training_path():
    x = torch.randn(5, 3, 64, device=DEVICE)
    params = _params(64)
    with torch.no_grad():
        inference = fused_ffn(x, *params, backend="triton")
    training = fused_ffn(x.requires_grad_(), *params, backend="triton")
    assert torch.equal(inference, training.detach())


def _reference_with_linear_weights_cast(x, ln_w, ln_b, *linear_params, row_scale=None):
    # autocast's view of fp32 master weights: the Linear weights rounded to fp16, computed in x.dtype;
    # their gradients flow back through the cast to the fp32 parameters
    return reference.fused_ffn(x, ln_w, ln_b, *(p.half().to(x.dtype) for p in linear_params), row_scale=row_scale)


def test_linear_weights_in_another_dtype_are_cast_like_autocast():
    x = torch.randn(4, 3, 64, device=DEVICE).half()
    params = _params(64)  # fp32 master weights
    g = torch.randn_like(x)
    out = _run(lambda *a, **k: fused_ffn(*a, **k, backend="triton"), x, params, None, g)
    expected = reference.fused_ffn(x, *params[:2], *(p.half() for p in params[2:]))
    torch.testing.assert_close(out[0], expected, rtol=2e-3, atol=2e-3)
    assert all(gr.dtype == torch.float32 for gr in out[2:])
    # the whole output and every gradient's values, against float64 (fp32 gradients carry fp16 errors:
    # the fp16 floor)
    ref64 = _run(_reference_with_linear_weights_cast, x.double(), [p.double() for p in params], None, g.double())
    ref_fp16 = _run(_reference_with_linear_weights_cast, x, params, None, g)
    for name, o, r64, r16 in zip(("out", *GRAD_NAMES), out, ref64, ref_fp16):
        assert o.dtype == r16.dtype and o.shape == r16.shape, name
        assert_close_lowp(o, r64, r16, name=name, factor=2.0 if name == "out" else 3.0,
                          floor=torch.finfo(torch.float16).eps)


def test_backward_is_deterministic():
    x = torch.randn(37, 2, 64, device=DEVICE, requires_grad=True)
    params = [p.requires_grad_() for p in _params(64)]
    rs = _row_scale(37).requires_grad_()
    g = torch.randn_like(x)
    runs = [torch.autograd.grad(fused_ffn(x, *params, row_scale=rs, backend="triton"), [x, *params, rs], g)
            for _ in range(2)]
    for name, a, b in zip(GRAD_NAMES, *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    C = 64
    x = torch.randn(3, 2, C, device=DEVICE, requires_grad=True)
    params = [p.requires_grad_() for p in _params(C)]
    rs = _row_scale(3)
    d = [t.detach() for t in (x, *params)]
    opcheck(torch.ops.uniformerv2.fused_ffn_fwd.default, (x, *params, rs, 1e-5, True, backend))
    # inference form (nothing saved): only differentiable when called with save_for_backward=True
    opcheck(torch.ops.uniformerv2.fused_ffn_fwd.default, (*d, rs, 1e-5, False, backend))
    _, mean, rstd, h = torch.ops.uniformerv2.fused_ffn_fwd(*d, rs, 1e-5, True, backend)
    g = torch.randn_like(x)
    opcheck(torch.ops.uniformerv2.fused_ffn_bwd.default,
                          (g, *d, rs, mean, rstd, h, 1e-5, True, backend))


def test_compiled_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(3, 2, 64, device=DEVICE)
    params = _params(64)
    rs = _row_scale(3)
    g = torch.randn_like(x)

    def fn(x, *p, row_scale):
        return fused_ffn(x, *p, row_scale=row_scale, backend="triton") * 1.5

    eager = _run(fn, x, params, rs, g)
    compiled = _run(torch.compile(fn, fullgraph=True), x, params, rs, g)
    for i, (e, c) in enumerate(zip(eager, compiled)):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg="out" if i == 0 else GRAD_NAMES[i - 1])


def test_unavailable_backend_lists_reasons():
    x = torch.randn(3, 2, 64)
    params = _params(64, device="cpu")
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        fused_ffn(x, *params, backend="cuda")


def test_bad_inputs_name_the_argument():
    x = torch.randn(3, 2, 64)
    ln_w, ln_b, fc_w, fc_b, pr_w, pr_b = _params(64, device="cpu")
    with pytest.raises(ValueError, match="fc_weight"):
        fused_ffn(x, ln_w, ln_b, fc_w[:, :32], fc_b, pr_w, pr_b)
    with pytest.raises(ValueError, match="proj_weight"):
        fused_ffn(x, ln_w, ln_b, fc_w, fc_b, pr_w[:, :100], pr_b)
    with pytest.raises(ValueError, match="fc_bias"):
        fused_ffn(x, ln_w, ln_b, fc_w, fc_b[:5], pr_w, pr_b)
    with pytest.raises(ValueError, match="ln_weight"):
        fused_ffn(x, ln_w[:3], ln_b, fc_w, fc_b, pr_w, pr_b)
    with pytest.raises(ValueError, match="row_scale"):
        fused_ffn(x, ln_w, ln_b, fc_w, fc_b, pr_w, pr_b, row_scale=torch.ones(2))
    with pytest.raises(TypeError, match="x"):
        fused_ffn(x.long(), ln_w, ln_b, fc_w, fc_b, pr_w, pr_b)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_does_not_retype_the_op(backend):
    # the op computes in x.dtype: an fp32 x under autocast (a global block's query) stays fp32 inside
    x = torch.randn(3, 2, 64, device=DEVICE)
    params = _params(64)
    plain = fused_ffn(x, *params, backend=backend)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        autocast = fused_ffn(x, *params, backend=backend)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


# ---- the inductor backend: torch.compile of the reference, outside the operators ----

def test_inductor_backend_matches_float64_reference():
    """backend="inductor" (inductor's C++ on the CPU, Triton on a GPU): the output and every gradient, row
    scale included, from the compiled reference's own backward, within the fp32 bound. One compile."""
    x = torch.randn(5, 3, 32, device=DEVICE)
    params = _params(32)
    rs = _row_scale(5)
    g = torch.randn_like(x)
    before = inductor.compiled_count(OP)
    out = _run(lambda *a, **k: fused_ffn(*a, **k, backend="inductor"), x, params, rs, g)
    assert inductor.compiled_count(OP) == before + 1
    ref64 = _run(reference.fused_ffn, x.double(), [p.double() for p in params], rs.double(), g.double())
    for name, o, r64 in zip(("out", *GRAD_NAMES), out, ref64):
        assert o.dtype == torch.float32, name
        assert_close(o, r64, name=name)


def test_inductor_backend_compiles_each_input_signature_once(monkeypatch):
    """dynamo counts recompiles per code object, and past its limit runs the function uncompiled: each input
    signature (shape, grad mode, ...) gets its own compiled function, so the limit is never met. Here the
    limit is 2 and meeting it raises, where by default it is 8 and the fallback is silent."""
    monkeypatch.setattr(inductor, "COMPILER", "eager")  # dynamo alone: the signatures, not the code generation
    params = [p.requires_grad_() for p in _params(16, device="cpu")]
    before = inductor.compiled_count(OP)
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        for _ in range(2):
            for rows in (2, 3, 4):
                x = torch.randn(rows, 2, 16)
                fused_ffn(x, *params, backend="inductor").sum().backward()
                with torch.no_grad():
                    torch.testing.assert_close(fused_ffn(x, *params, backend="inductor"),
                                               reference.fused_ffn(x, *params), rtol=1e-6, atol=1e-6)
            assert inductor.compiled_count(OP) == before + 6  # the second round compiles nothing


def test_inductor_backend_computes_in_x_dtype_under_autocast(monkeypatch):
    """As the other backends: autocast does not reach the op (an fp32 x stays fp32 inside)."""
    monkeypatch.setattr(inductor, "COMPILER", "eager")  # dynamo alone: the context the function runs in
    x = torch.randn(3, 2, 16)
    params = _params(16, device="cpu")
    plain = fused_ffn(x, *params, backend="inductor")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = fused_ffn(x, *params, backend="inductor")
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_inductor_backend_inside_torch_compile_runs_the_reference_inline():
    """Inside a torch.compile trace the backend does not compile again: the plain reference's torch ops land
    in the enclosing graph (for its compiler to fuse), not the operator and not a nested compiled call."""
    graphs = []

    def recording_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(3, 2, 16)
    params = _params(16, device="cpu")
    before = inductor.compiled_count()
    fn = torch.compile(lambda x, *p: fused_ffn(x, *p, backend="inductor") * 2.0, backend=recording_backend,
                       fullgraph=True)
    torch.testing.assert_close(fn(x, *params), 2.0 * reference.fused_ffn(x, *params), rtol=1e-6, atol=1e-6)
    targets = [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]
    assert not any("uniformerv2" in t for t in targets), targets
    assert any("linear" in t for t in targets), targets
    assert inductor.compiled_count() == before


def test_inductor_backend_records_the_operator_for_export():
    """torch.export and torch.jit.trace record the FFN's operator with backend "auto" (as for every backend),
    not the compiled function of this process."""
    class Branch(torch.nn.Module):
        def forward(self, x, *params):
            return fused_ffn(x, *params, backend="inductor")

    x = torch.randn(3, 2, 16)
    params = _params(16, device="cpu")
    expected = reference.fused_ffn(x, *params)
    before = inductor.compiled_count()
    program = torch.export.export(Branch(), (x, *params))
    ops = [n for n in program.graph.nodes if n.target is torch.ops.uniformerv2.fused_ffn_fwd.default]
    assert len(ops) == 1 and ops[0].args[-1] == "auto", [n.target for n in program.graph.nodes]
    torch.testing.assert_close(program.module()(x, *params), expected, rtol=1e-6, atol=1e-6)
    traced = torch.jit.trace(Branch(), (x, *params), check_trace=False)
    assert 'uniformerv2::fused_ffn_fwd' in str(traced.graph) and '"auto"' in str(traced.graph), traced.graph
    torch.testing.assert_close(traced(x, *params), expected, rtol=1e-6, atol=1e-6)
    assert inductor.compiled_count() == before


@requires_cuda
def test_inductor_backend_bf16_real_width_and_cuda_graph_replay():
    """At the B/16 width in bf16: within the low-precision rule of the reference; and the compiled forward
    and backward, warmed up on a side stream, replay from a CUDA graph (the graphed training step's path)."""
    (x, params, rs, g), out = _check_real_width_on_gpu("inductor", torch.bfloat16)

    leaves = [t.detach().requires_grad_() for t in (x, *params, rs)]

    def step():
        for t in leaves:
            t.grad = None
        y = fused_ffn(*leaves[:7], row_scale=leaves[7], backend="inductor")
        y.backward(g)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    graph.replay()
    torch.cuda.synchronize()
    for i, (o, e) in enumerate(zip((static_out, *(t.grad for t in leaves)), out)):
        torch.testing.assert_close(o, e, rtol=0, atol=0, msg="out" if i == 0 else GRAD_NAMES[i - 1])
