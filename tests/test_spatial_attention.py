"""Spatial attention (ln_1 + packed QKV + per-frame attention + out_proj): correctness, registration, backend."""

import importlib

import pytest
import torch
import torch.nn as nn

from conftest import DEVICE, opcheck, requires_cuda
from uniformerv2_kernels import backends, inductor
from uniformerv2_kernels.ops.spatial_attention import attention_backend, spatial_attention
from uniformerv2_kernels.reference import spatial_attention as reference
from uniformerv2_kernels.reference.layer_norm import clip_layer_norm
from uniformerv2_kernels.testing import assert_close

# the module (the package re-exports the function under the same name)
ops_attention = importlib.import_module("uniformerv2_kernels.ops.spatial_attention")
NAMES = ("out", "dx", "d_ln_w", "d_ln_b", "d_in_w", "d_in_b", "d_out_w", "d_out_b")


def _params(C, dtype=torch.float32, device=DEVICE):
    ps = [
        1.0 + 0.5 * torch.randn(C), 0.3 * torch.randn(C),
        torch.randn(3 * C, C) / C ** 0.5, 0.3 * torch.randn(3 * C),
        torch.randn(C, C) / C ** 0.5, 0.3 * torch.randn(C),
    ]
    return [p.to(device=device, dtype=dtype) for p in ps]


def _run(fn, x, params, heads, g):
    x = x.detach().requires_grad_()
    params = [p.detach().requires_grad_() for p in params]
    out = fn(x, *params, heads)
    return (out, *torch.autograd.grad(out, [x, *params], g))


def test_reference_is_nn_multihead_attention_on_ln_1():
    L, B, C, H = 9, 3, 64, 4
    params = _params(C, device="cpu")
    mha = nn.MultiheadAttention(C, H)
    with torch.no_grad():
        mha.in_proj_weight.copy_(params[2])
        mha.in_proj_bias.copy_(params[3])
        mha.out_proj.weight.copy_(params[4])
        mha.out_proj.bias.copy_(params[5])
    x = torch.randn(L, B, C)
    xn = clip_layer_norm(x, params[0], params[1])
    official = mha(xn, xn, xn, need_weights=False, attn_mask=None)[0]
    torch.testing.assert_close(reference.spatial_attention(x, *params, H), official, rtol=1e-5, atol=1e-5)


def test_reference_gradcheck_float64():
    L, B, C, H = 4, 2, 6, 2
    x = torch.randn(L, B, C, dtype=torch.float64, requires_grad=True)
    params = [p.double().requires_grad_() for p in _params(C, device="cpu")]
    assert torch.autograd.gradcheck(lambda x, *p: reference.spatial_attention(x, *p, H), (x, *params))
    # the registered ops' reference backend (explicit projection backward + literal attention core)
    assert torch.autograd.gradcheck(lambda x, *p: spatial_attention(x, *p, H, backend="reference"), (x, *params))


@pytest.mark.parametrize(
    "shape,heads,dtype",
    [
        ((7, 3, 64), 4, torch.float32),  # 21 rows: one partial row tile
        ((37, 2, 64), 2, torch.float16),  # 74 rows: several row tiles
        ((9, 1, 64), 1, torch.float32),  # a single frame (T = 1, N = 1), one head
        ((5, 3, 96), 3, torch.float16),
        ((5, 2, 768), 12, torch.float32),
        ((3, 2, 768), 12, torch.float16),
        ((3, 2, 1024), 16, torch.float32),  # the L/14 width: 16 heads of 64
    ],
)
@pytest.mark.parametrize("gemm", ["triton", "cublas"])  # UNIFORMERV2_TRITON_GEMM: both plans are kept
def test_triton_matches_float64_reference(monkeypatch, shape, heads, dtype, gemm):
    monkeypatch.setenv("UNIFORMERV2_TRITON_GEMM", gemm)
    C = shape[-1]
    x = torch.randn(shape, device=DEVICE).to(dtype)
    params = _params(C, dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    out = _run(lambda *a: spatial_attention(*a, backend="triton"), x, params, heads, g)
    ref64 = _run(reference.spatial_attention, x.double(), [p.double() for p in params], heads, g.double())
    ref_lowp = _run(reference.spatial_attention, x, params, heads, g)
    for i, (name, o, r64, rl) in enumerate(zip(NAMES, out, ref64, ref_lowp)):
        assert o.dtype == rl.dtype and o.shape == rl.shape, name
        assert_close(o, r64, rl, name=name, grad=i > 0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_triton_on_gpu_real_shape(monkeypatch, dtype, gemm):
    monkeypatch.setenv("UNIFORMERV2_TRITON_GEMM", gemm)
    L, B, C, H = 197, 4, 768, 12
    x = torch.randn(L, B, C, device="cuda").to(dtype)
    params = _params(C, dtype)
    g = torch.randn_like(x)
    out = _run(lambda *a: spatial_attention(*a, backend="triton"), x, params, H, g)
    ref64 = _run(reference.spatial_attention, x.double(), [p.double() for p in params], H, g.double())
    ref_lowp = _run(reference.spatial_attention, x, params, H, g)
    for i, (name, o, r64, rl) in enumerate(zip(NAMES, out, ref64, ref_lowp)):
        assert_close(o, r64, rl, name=name, grad=i > 0)


def test_attention_backend_is_reported(monkeypatch):
    name, reason = attention_backend()
    assert name in ("xformers", "sdpa") and isinstance(reason, str) and reason
    try:
        import xformers.ops  # noqa: F401

        importable = True
    except Exception:
        importable = False
    if not importable or not torch.cuda.is_available():
        assert name == "sdpa" and "xformers" in reason
    # the environment override forces SDPA (the probe is cached per process: reset it around the check)
    monkeypatch.setattr(ops_attention, "_backend_choice", None)
    monkeypatch.setenv(ops_attention.ENV_ATTENTION, "sdpa")
    assert attention_backend() == ("sdpa", f"{ops_attention.ENV_ATTENTION}=sdpa")
    monkeypatch.setattr(ops_attention, "_backend_choice", None)


def test_backward_is_deterministic():
    x = torch.randn(37, 2, 64, device=DEVICE, requires_grad=True)
    params = [p.requires_grad_() for p in _params(64)]
    g = torch.randn_like(x)
    runs = [torch.autograd.grad(spatial_attention(x, *params, 4, backend="triton"), [x, *params], g) for _ in range(2)]
    for name, a, b in zip(NAMES[1:], *runs):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_opcheck(backend):
    L, B, C = 5, 3, 64
    x = torch.randn(L, B, C, device=DEVICE, requires_grad=True)
    ln_w, ln_b, in_w, in_b, out_w, out_b = [p.requires_grad_() for p in _params(C)]
    opcheck(torch.ops.uniformerv2.spatial_attention_qkv_fwd.default,
                          (x, ln_w, ln_b, in_w, in_b, 1e-5, backend))
    qkv, mean, rstd = torch.ops.uniformerv2.spatial_attention_qkv_fwd(
        x.detach(), ln_w.detach(), ln_b.detach(), in_w.detach(), in_b.detach(), 1e-5, backend)
    opcheck(torch.ops.uniformerv2.spatial_attention_qkv_bwd.default,
                          (torch.randn_like(qkv), x.detach(), ln_w.detach(), ln_b.detach(), in_w.detach(), mean,
                           rstd, 1e-5, backend))
    o = torch.randn(B * L, C, device=DEVICE, requires_grad=True)
    opcheck(torch.ops.uniformerv2.spatial_attention_out_fwd.default, (o, out_w, out_b, L, B, backend))
    opcheck(torch.ops.uniformerv2.spatial_attention_out_bwd.default,
                          (torch.randn(L, B, C, device=DEVICE), o.detach(), out_w.detach(), backend))


def test_compiled_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(5, 3, 64, device=DEVICE)
    params = _params(64)
    g = torch.randn_like(x)

    def fn(x, *p):
        return spatial_attention(x, *p[:6], p[6], backend="triton") + x

    eager = _run(fn, x, params, 4, g)
    compiled = _run(torch.compile(fn, fullgraph=True), x, params, 4, g)
    for name, e, c in zip(NAMES, eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5, msg=name)


def test_unavailable_backend_lists_reasons():
    x = torch.randn(5, 3, 64)
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        spatial_attention(x, *_params(64, device="cpu"), 4, backend="cuda")


def test_bad_inputs_name_the_argument():
    x = torch.randn(5, 3, 64)
    ln_w, ln_b, in_w, in_b, out_w, out_b = _params(64, device="cpu")
    with pytest.raises(ValueError, match="num_heads"):
        spatial_attention(x, ln_w, ln_b, in_w, in_b, out_w, out_b, 5)
    with pytest.raises(ValueError, match="num_heads"):
        spatial_attention(x, ln_w, ln_b, in_w, in_b, out_w, out_b, 0)
    with pytest.raises(ValueError, match="in_proj_weight"):
        spatial_attention(x, ln_w, ln_b, in_w[:64], in_b, out_w, out_b, 4)
    with pytest.raises(ValueError, match="out_proj_bias"):
        spatial_attention(x, ln_w, ln_b, in_w, in_b, out_w, out_b[:3], 4)
    with pytest.raises(ValueError, match="x"):
        spatial_attention(x[0], ln_w, ln_b, in_w, in_b, out_w, out_b, 4)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_autocast_does_not_retype_the_op(backend):
    x = torch.randn(5, 3, 64, device=DEVICE)
    params = _params(64)
    plain = spatial_attention(x, *params, 4, backend=backend)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
        autocast = spatial_attention(x, *params, 4, backend=backend)
    assert autocast.dtype == torch.float32 and torch.equal(autocast, plain)


def test_inductor_backend_matches_float64_reference():
    """backend="inductor": torch.compile (inductor's C++ on the CPU, Triton on a GPU) of the reference with
    the SDPA core, its own backward: output and every gradient within the fp32 bound. One compile."""
    x = torch.randn(5, 3, 32, device=DEVICE)
    params = _params(32)
    g = torch.randn_like(x)
    before = inductor.compiled_count("spatial_attention")
    out = _run(lambda x, *p: spatial_attention(x, *p, backend="inductor"), x, params, 2, g)
    assert inductor.compiled_count("spatial_attention") == before + 1
    ref64 = _run(reference.spatial_attention, x.double(), [p.double() for p in params], 2, g.double())
    for name, o, r64 in zip(NAMES, out, ref64):
        assert o.dtype == torch.float32, name
        assert_close(o, r64, name=name)
