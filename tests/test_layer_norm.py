"""Fused CLIP LayerNorm: reference, Triton forward/backward, registration, determinism, input errors."""

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, opcheck, requires_cuda
from uniformerv2_kernels import backends, inductor
import uniformerv2_kernels.ops.layer_norm as ops_layer_norm  # the module, not the re-exported function
from uniformerv2_kernels.ops.layer_norm import clip_layer_norm
from uniformerv2_kernels.reference import layer_norm as reference
from uniformerv2_kernels.testing import assert_close



def _params(C, dtype=torch.float32, device=DEVICE):
    w = (1.0 + 0.5 * torch.randn(C, device=device)).to(dtype).requires_grad_()
    b = (0.3 * torch.randn(C, device=device)).to(dtype).requires_grad_()
    return w, b


def _run(fn, x, w, b, g):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_()
    y = fn(x, w, b)
    return (y, *torch.autograd.grad(y, (x, w, b), g))


def _official(x, w, b):
    # the official CLIP LayerNorm subclass: upcast, nn.LayerNorm, cast back
    return F.layer_norm(x.float(), (x.shape[-1],), w.float(), b.float(), 1e-5).to(x.dtype)


def test_reference_is_the_official_formulation():
    x = torch.randn(5, 3, 96).half()
    w, b = _params(96, device="cpu")
    torch.testing.assert_close(reference.clip_layer_norm(x, w, b), _official(x, w, b), rtol=0, atol=0)


def test_reference_gradcheck_float64():
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.clip_layer_norm(*a, eps=1e-5), (x, w, b))
    # the reference backend through the registered op is gradcheckable too
    assert torch.autograd.gradcheck(lambda *a: clip_layer_norm(*a, backend="reference"), (x, w, b))


@pytest.mark.parametrize(
    "shape,dtype,param_dtype",
    [
        ((37, 3, 64), torch.float32, torch.float32),
        ((11, 7, 96), torch.float16, torch.float32),  # CLIP under autocast: fp16 x, fp32 LN params
        ((13, 768), torch.float32, torch.float32),
        ((5, 3, 768), torch.float16, torch.float16),
        ((301, 96), torch.float32, torch.float32),  # several backward programs, last one partial
    ],
)
def test_triton_matches_float64_reference(shape, dtype, param_dtype):
    C = shape[-1]
    x = (torch.randn(shape, device=DEVICE) * 2 + 0.7).to(dtype)
    w, b = _params(C, param_dtype)
    g = torch.randn(shape, device=DEVICE).to(dtype)
    out = _run(lambda *a: clip_layer_norm(*a, backend="triton"), x, w, b, g)
    ref64 = _run(reference.clip_layer_norm, x.double(), w.double(), b.double(), g.double())
    ref_lowp = _run(_official, x, w, b, g)
    for name, o, r64, rl, is_grad in zip(("y", "dx", "dw", "db"), out, ref64, ref_lowp, (False, True, True, True)):
        assert o.dtype == rl.dtype and o.shape == rl.shape, name
        assert_close(o, r64, rl, name=name, grad=is_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_eps_matters_for_small_variance_rows(dtype):
    # rows whose variance spans eps (1e-5) and below: leaving eps out (or using another one) moves these
    # rows' outputs and gradients far beyond the bound, unlike rows of variance ~1
    C = 96
    row_std = torch.logspace(-3.5, 0, 24, device=DEVICE)
    x = (torch.randn(24, C, device=DEVICE) * row_std[:, None]).to(dtype)
    w, b = _params(C)
    g = torch.randn(24, C, device=DEVICE).to(dtype)
    out = _run(lambda *a: clip_layer_norm(*a, backend="triton"), x, w, b, g)
    ref64 = _run(reference.clip_layer_norm, x.double(), w.double(), b.double(), g.double())
    ref_lowp = _run(_official, x, w, b, g)
    without_eps = _run(lambda *a: reference.clip_layer_norm(*a, eps=0.0), x.double(), w.double(), b.double(),
                       g.double())
    for name, o, r64, rl, r0, is_grad in zip(("y", "dx", "dw", "db"), out, ref64, ref_lowp, without_eps,
                                              (False, True, True, True)):
        if name != "db":  # db = sum(g) does not involve eps; the inputs must tell eps from no eps elsewhere
            with pytest.raises(AssertionError):
                assert_close(r0.to(o.dtype), r64, rl, name=name, grad=is_grad)
        assert_close(o, r64, rl, name=name, grad=is_grad)


@requires_cuda
@pytest.mark.parametrize("C", [768, 1024])
def test_triton_bf16_on_gpu(C):
    x = torch.randn(197 * 3, 2, C, device="cuda").bfloat16()
    w, b = _params(C)
    g = torch.randn_like(x)
    out = _run(lambda *a: clip_layer_norm(*a, backend="triton"), x, w, b, g)
    ref64 = _run(reference.clip_layer_norm, x.double(), w.double(), b.double(), g.double())
    ref_lowp = _run(_official, x, w, b, g)
    for name, o, r64, rl, is_grad in zip(("y", "dx", "dw", "db"), out, ref64, ref_lowp, (False, True, True, True)):
        assert_close(o, r64, rl, name=name, grad=is_grad)


def test_triton_launchers_swap_rows_and_residual_grad():
    # the row reordering and fused residual gradient the attention / FFN ops use
    from uniformerv2_kernels.triton import layer_norm as tln

    L, B, C = 7, 3, 64
    x = torch.randn(L, B, C, device=DEVICE)
    w, b = _params(C)
    y, mean, rstd = tln.forward(x, w.detach(), b.detach(), 1e-5, swap_rows=(L, B))
    expected = reference.clip_layer_norm(x, w, b).transpose(0, 1).reshape(B * L, C)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    gy = torch.randn(B * L, C, device=DEVICE)
    gres = torch.randn(L, B, C, device=DEVICE)
    dx, dw, db = tln.backward(gy, x, w.detach(), mean, rstd, grad_residual=gres, swap_rows=(L, B))
    ref = _run(reference.clip_layer_norm, x.double(), w.double(), b.double(),
               gy.double().view(B, L, C).transpose(0, 1))
    assert_close(dx, ref[1] + gres.double(), name="dx")
    assert_close(dw, ref[2], name="dw")
    assert_close(db, ref[3], name="db")


def test_backward_is_deterministic():
    x = torch.randn(301, 96, device=DEVICE, requires_grad=True)
    w, b = _params(96)
    g = torch.randn(301, 96, device=DEVICE)
    first = torch.autograd.grad(clip_layer_norm(x, w, b, backend="triton"), (x, w, b), g)
    second = torch.autograd.grad(clip_layer_norm(x, w, b, backend="triton"), (x, w, b), g)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend):
    x = torch.randn(9, 64, device=DEVICE, requires_grad=True)
    w, b = _params(64)
    opcheck(torch.ops.uniformerv2.clip_layer_norm_fwd.default, (x, w, b, 1e-5, backend))
    _, mean, rstd = torch.ops.uniformerv2.clip_layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5, backend)
    g = torch.randn(9, 64, device=DEVICE)
    opcheck(
        torch.ops.uniformerv2.clip_layer_norm_bwd.default,
        (g, x.detach(), w.detach(), b.detach(), mean, rstd, 1e-5, backend),
    )


def test_compiled_matches_eager():
    torch._dynamo.reset()
    x = torch.randn(2, 9, 96, device=DEVICE)
    w, b = _params(96)
    g = torch.randn_like(x)
    fn = lambda x, w, b: clip_layer_norm(x, w, b, backend="triton") * 2.0  # noqa: E731
    eager = _run(fn, x, w, b, g)
    compiled = _run(torch.compile(fn, fullgraph=True), x, w, b, g)
    for name, e, c in zip(("y", "dx", "dw", "db"), eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=name)


def test_default_backend_and_unavailable_backend():
    x = torch.randn(4, 64)
    w, b = _params(64, device="cpu")
    expected = "triton" if backends.triton_interpret() else "reference"
    assert ops_layer_norm.select_backend(x, w, b) == expected
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        clip_layer_norm(x, w, b, backend="cuda")
    with pytest.raises(backends.BackendUnavailableError, match="float64"):
        clip_layer_norm(x.double(), w.double(), b.double(), backend="triton")


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 64)
    w, b = _params(64, device="cpu")
    with pytest.raises(ValueError, match="weight"):
        clip_layer_norm(x, w[:32], b)
    with pytest.raises(ValueError, match="bias"):
        clip_layer_norm(x, w, torch.randn(2, 32))
    with pytest.raises(TypeError, match="x"):
        clip_layer_norm(x.int(), w, b)
    with pytest.raises(ValueError, match="eps"):
        clip_layer_norm(x, w, b, eps=0.0)


def test_empty_input_gives_separate_zero_gradients():
    """No rows: zero weight/bias gradients, as two tensors (a custom op's outputs must not alias)."""
    x = torch.randn(0, 64, device=DEVICE, requires_grad=True)
    w, b = (p.requires_grad_() for p in _params(64))
    for backend in ("triton", "reference"):
        w.grad = b.grad = None
        clip_layer_norm(x, w, b, backend=backend).sum().backward()
        assert torch.count_nonzero(w.grad) == 0 and torch.count_nonzero(b.grad) == 0, backend


def test_inductor_backend_matches_float64_reference():
    """backend="inductor": torch.compile (inductor's C++ on the CPU, Triton on a GPU) of the reference, its
    own backward; fp16 x with fp32 weight/bias, as in the model under autocast. One compile."""
    x = torch.randn(7, 3, 48, device=DEVICE).half()
    w, b = _params(48)
    g = torch.randn_like(x)
    before = inductor.compiled_count("clip_layer_norm")
    out = _run(lambda x, w, b: clip_layer_norm(x, w, b, backend="inductor"), x, w, b, g)
    assert inductor.compiled_count("clip_layer_norm") == before + 1
    ref64 = _run(reference.clip_layer_norm, x.double(), w.double(), b.double(), g.double())
    ref_lowp = _run(reference.clip_layer_norm, x, w, b, g)
    for i, (name, o, r64, rl) in enumerate(zip(("y", "dx", "dw", "db"), out, ref64, ref_lowp)):
        assert o.dtype == rl.dtype, name
        assert_close(o, r64, rl, name=name, grad=i > 0)
