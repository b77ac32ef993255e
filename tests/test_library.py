"""uniformerv2_kernels.library: operators defined with torch.library define/impl + register_fake, autograd in a
torch.autograd.Function around the forward operator (how every fused op is registered)."""

import pytest
import torch

from uniformerv2_kernels import library

CALLS = {"forward": 0, "backward": 0}


# A toy op with the fused ops' shape: a main output, an auxiliary output saved for the backward, a float and
# a string argument, an optional tensor.
@library.custom_op("uniformerv2_test::scaled_square_fwd")
def _fwd(x: torch.Tensor, w: torch.Tensor, scale: float, bias: torch.Tensor | None, backend: str
         ) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["forward"] += 1
    y = scale * w * x * x
    if bias is not None:
        y = y + bias
    return y, (2 * scale * w * x).float()  # aux: dy/dx, fp32


@_fwd.register_fake
def _(x, w, scale, bias, backend):
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.float32)


@library.custom_op("uniformerv2_test::scaled_square_bwd")
def _bwd(grad: torch.Tensor, x: torch.Tensor, dydx: torch.Tensor, scale: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["backward"] += 1
    return (grad * dydx).to(x.dtype), (grad * scale * x * x).sum(0)


@_bwd.register_fake
def _(grad, x, dydx, scale):
    return torch.empty_like(x), x.new_empty(x.shape[1:])


def _setup_context(ctx, inputs, output):
    x, w, scale, bias, backend = inputs
    _, dydx = output
    library.skip_aux_grads(ctx, dydx)
    ctx.save_for_backward(x, dydx)
    ctx.scale = scale
    ctx.has_bias = bias is not None


def _backward(ctx, grad, _grad_dydx):
    x, dydx = ctx.saved_tensors
    dx, dw = _bwd(grad, x, dydx, ctx.scale)
    return dx, dw, None, grad.sum(0) if ctx.has_bias else None, None


_fwd.register_autograd(_backward, setup_context=_setup_context)


def scaled_square(x, w, scale=0.5, bias=None):
    return _fwd(x, w, scale, bias, "reference")[0]


def _inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(3, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(3, generator=g, dtype=dtype).requires_grad_(True)
    return x, w, b


def test_schema_is_inferred_from_the_type_hints():
    schema = str(torch.ops.uniformerv2_test.scaled_square_fwd.default._schema)
    assert schema == ("uniformerv2_test::scaled_square_fwd(Tensor x, Tensor w, float scale, Tensor? bias, str backend)"
                      " -> (Tensor, Tensor)")


def test_gradcheck_float64():
    x, w, b = _inputs()
    assert torch.autograd.gradcheck(lambda x, w, b: scaled_square(x, w, 0.7, b), (x, w, b))


def test_forward_and_gradients_match_plain_torch():
    x, w, b = _inputs(torch.float32)
    y = scaled_square(x, w, 0.5, b)
    torch.testing.assert_close(y, 0.5 * w * x * x + b)
    y.sum().backward()
    grads = (x.grad, w.grad, b.grad)
    x2, w2, b2 = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    (0.5 * w2 * x2 * x2 + b2).sum().backward()
    for g, g2 in zip(grads, (x2.grad, w2.grad, b2.grad)):
        torch.testing.assert_close(g, g2)


def test_no_grad_calls_the_operator_directly():
    x, w, _ = _inputs()
    with torch.no_grad():
        y, aux = _fwd(x, w, 0.5, None, "reference")
    assert y.grad_fn is None and not y.requires_grad
    y, aux = _fwd(x, w, 0.5, None, "reference")
    assert y.grad_fn is not None and not aux.requires_grad  # the auxiliary output is non-differentiable


def test_raw_operator_carries_no_gradient():
    """The Autograd key is a fallthrough and the body runs without recording: a raw call neither warns nor
    leaves a graph, even where its body is made of differentiable torch ops (as this one's is)."""
    x, w, _ = _inputs()
    y, _ = torch.ops.uniformerv2_test.scaled_square_fwd(x, w, 0.5, None, "reference")
    assert not y.requires_grad and y.grad_fn is None


def test_auxiliary_gradient_is_not_materialised():
    seen = []
    x, w, _ = _inputs()

    def spy_backward(ctx, grad, grad_aux):
        seen.append(grad_aux)
        return _backward(ctx, grad, grad_aux)

    _fwd.register_autograd(spy_backward, setup_context=_setup_context)
    try:
        scaled_square(x, w).sum().backward()
    finally:
        _fwd.register_autograd(_backward, setup_context=_setup_context)
    assert seen == [None]


def test_opcheck_on_plain_inputs():
    x, w, b = (t.detach() for t in _inputs(torch.float32))
    torch.library.opcheck(torch.ops.uniformerv2_test.scaled_square_fwd.default, (x, w, 0.5, b, "reference"))
    y, aux = torch.ops.uniformerv2_test.scaled_square_fwd(x, w, 0.5, b, "reference")
    torch.library.opcheck(torch.ops.uniformerv2_test.scaled_square_bwd.default, (torch.randn_like(y), x, aux, 0.5))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x, w, b = _inputs(torch.float32)

    def step(fn, x, w, b):
        x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
        y = fn(x, w, b)
        y.sum().backward()
        return y.detach(), x.grad, w.grad, b.grad

    fn = lambda x, w, b: scaled_square(x, w, 0.5, b) * 3.0  # noqa: E731
    eager = step(fn, x, w, b)
    before = dict(CALLS)
    compiled = step(torch.compile(fn, fullgraph=True), x, w, b)
    assert CALLS["forward"] > before["forward"] and CALLS["backward"] > before["backward"]  # the ops ran
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)


def test_a_second_definition_of_the_same_name_fails():
    def again(x: torch.Tensor) -> torch.Tensor:
        return x

    with pytest.raises(RuntimeError, match="scaled_square_fwd"):
        library.custom_op("uniformerv2_test::scaled_square_fwd")(again)
