"""Operator registration for the fused ops, with ``torch.library.custom_op``'s interface and less host time.

Every fused op is a pair of operators (forward and backward) in the ``uniformerv2`` namespace, defined with
``torch.library.Library.define`` / ``impl`` (schema inferred from the type hints, as custom_op does) and
``register_fake``; their autograd is a ``torch.autograd.Function`` around the forward operator, the
pattern PyTorch's maintainers recommend for low overhead: ``@torch.library.custom_op`` +
``register_autograd`` re-read the schema's argument list per argument on every call (PyTorch issues 139500,
176592, 177109), about twice the host time per op (benchmarks/results/kernel_notes.md).

torch.compile sees what it sees with custom_op: dynamo traces the Function and the operators through their fake
kernels (no graph break). What changes: the operators' Autograd key is a fallthrough and their bodies run
without autograd recording, so ``torch.ops.uniformerv2.<name>`` called directly returns outputs that do not
require grad (no gradient flows through a raw call, not even part of one); the public functions and the
:class:`Operator` objects carry the gradients.

    @custom_op("uniformerv2::my_op_fwd")
    def my_op_fwd(x: torch.Tensor, eps: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]: ...

    @my_op_fwd.register_fake
    def _(x, eps, backend): ...

    my_op_fwd.register_autograd(backward, setup_context=setup_context)  # as torch.library's
    out, aux = my_op_fwd(x, 1e-5, "triton")
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

try:
    from torch.library import infer_schema as _infer_schema
except ImportError:  # torch 2.4: only the private module has it (custom_op's own schema inference)
    from torch._library.infer_schema import infer_schema as _infer_schema

_LIBRARIES: dict[str, torch.library.Library] = {}
_OPERATORS: list["Operator"] = []

# The backend an op records in a program made to run elsewhere (torch.export, torch.jit.trace): its body
# resolves it where the program runs, so a .pt2 made on a GPU machine runs the reference on a CPU one.
AUTO_BACKEND = "auto"


def recording_for() -> str | None:
    """What is recording the ops being called now, for a program that may run on another machine: "onnx"
    (torch.onnx.export, either exporter), "export" (torch.export), "trace" (torch.jit.trace), or None (eager
    calls, and torch.compile, whose graph runs in this process with the backend chosen here)."""
    if torch.compiler.is_exporting():
        recording = "export"
    elif torch.compiler.is_compiling() or not torch.jit.is_tracing():
        return None
    else:
        recording = "trace"
    return "onnx" if torch.onnx.is_in_onnx_export() else recording


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _LIBRARIES:
        _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _LIBRARIES[namespace]


class Operator:
    """One operator ``namespace::name``: its implementation ``fn`` runs on every device (the fused ops'
    bodies dispatch on their ``backend`` argument). Calling the Operator runs it through its autograd
    Function when grad mode is on and an autograd formula is registered, else the operator directly.

    An op whose last argument is ``backend`` is recorded for export as follows: torch.export and
    torch.jit.trace record it with backend "auto" (its body then picks the backend where the program runs;
    torch.jit.trace records the operator itself, not the autograd Function, which it could not serialise);
    torch.onnx.export records ``fn`` on the "reference" backend instead of the operator, so the ONNX
    graph holds the reference math in standard ONNX operators (:func:`reference_decompositions` does the
    same for a program already exported)."""

    def __init__(self, qualname: str, fn: Callable):
        namespace, name = qualname.split("::")
        self._lib = _library(namespace)
        self._lib.define(name + _infer_schema(fn, mutates_args=()))
        # The body runs without autograd recording: through the Function it does anyway (grad mode is off in
        # a Function's forward); called raw, the torch ops inside a body (a class-token copy, a cuBLAS GEMM
        # beside the Triton kernels) must not leave a partial graph on its outputs.
        @functools.wraps(fn)
        def body(*args):
            with torch.no_grad():
                return fn(*args)

        self._lib.impl(name, body, "CompositeExplicitAutograd")
        # Autograd passes straight through (no per-call fallback kernel): the gradient is the Function's job
        self._lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
        self.qualname = qualname
        self.overload = getattr(getattr(torch.ops, namespace), name).default
        self.fn = fn
        self.takes_backend = list(inspect.signature(fn).parameters)[-1] == "backend"
        _OPERATORS.append(self)
        self._function: type[torch.autograd.Function] | None = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if self.takes_backend:
            recording = recording_for()
            if recording == "onnx":
                return self.reference(*args)
            if recording is not None:
                args = (*args[:-1], AUTO_BACKEND)
                if recording == "trace":  # the autograd Function would be recorded as an opaque Python op
                    return self.overload(*args)
        if self._function is not None and torch.is_grad_enabled():
            return self._function.apply(*args)
        return self.overload(*args)

    def reference(self, *args):
        """The op's outputs computed by its body on the reference backend (whatever backend ``args`` name),
        in plain torch operators."""
        return self.fn(*args[:-1], "reference")

    def register_fake(self, fake: Callable) -> Callable:
        """Decorator: the kernel torch.compile and FakeTensor run to get the outputs' shapes and dtypes."""
        torch.library.register_fake(self.qualname, fake, lib=self._lib)
        return fake

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """As ``torch.library.register_autograd``: ``setup_context(ctx, inputs, output)`` after the forward,
        ``backward(ctx, *grads)`` returning one gradient (or None) per input."""
        op = self.overload

        def forward(ctx, *args):
            output = op(*args)
            setup_context(ctx, args, output)
            return output

        def backward_or_none(ctx, *grads):
            # with skip_aux_grads every output's gradient may be None (gradcheck's undefined-gradient check
            # passes that): no gradient reached the op, so none leaves it
            if all(g is None for g in grads):
                return (None,) * len(ctx.needs_input_grad)
            return backward(ctx, *grads)

        self._function = type(
            f"{self.qualname.split('::')[1]}_autograd", (torch.autograd.Function,),
            {"forward": staticmethod(forward), "backward": staticmethod(backward_or_none)},
        )


def reference_decompositions() -> dict:
    """{operator overload: its reference math} for every fused op that takes a backend, for
    ``ExportedProgram.run_decompositions``: a program exported with the fused ops becomes one of standard
    torch operators (e.g. before ``torch.onnx.export`` of a saved .pt2)."""
    return {op.overload: op.reference for op in _OPERATORS if op.takes_backend}


def custom_op(qualname: str) -> Callable[[Callable], Operator]:
    """Decorator: ``fn`` (type-hinted like a ``torch.library.custom_op`` that mutates nothing) becomes the
    operator ``qualname``."""
    return lambda fn: Operator(qualname, fn)


def skip_aux_grads(ctx, *aux: torch.Tensor) -> None:
    """For a fused op's ``setup_context``: its auxiliary outputs (statistics and activations saved for the
    backward, never returned to users) are non-differentiable, and autograd passes None for their gradients
    instead of materialising zero tensors of their shapes. Without this every backward allocated and
    zero-filled them: for the FFN a (rows, 4C) tensor the size of its hidden activation (155 MB at B/16
    with 16 clips in bf16) per layer. (When no output gets a gradient, the Operator's Function returns None
    for every input without calling the op's backward.)

    Under torch.compile the graph's own autograd handles this (dynamo cannot trace
    ``set_materialize_grads``; the non-differentiable outputs get no gradient there)."""
    ctx.mark_non_differentiable(*aux)
    if not torch.compiler.is_compiling():
        ctx.set_materialize_grads(False)
