"""The ``inductor`` backend: an op's pure-PyTorch reference compiled by ``torch.compile`` (default mode,
static shapes), for the ops where the compiler may beat our kernels (the selection table says which it
owns by default: none until a GPU run has measured it; see :data:`.selection.INDUCTOR_DECISION`).

It runs outside the op's torch.library operators, as a plain call of the compiled function in the op's
public function, so the gradients are the compiled function's own (AOTAutograd's backward graph, compiled
by inductor too); the operators never see the name "inductor". Where a program is being recorded instead:
- inside a ``torch.compile`` trace the plain reference runs inline (no nested compile): the enclosing
  compile traces its torch ops into its own graph and fuses them with the rest;
- under ``torch.export`` / ``torch.jit.trace`` / ONNX export the op's public function calls its operator,
  which records itself as for any other backend (with backend "auto"; ONNX: its reference math;
  :func:`.library.recording_for`), so a saved program does not depend on this process's compiled code.

Recompiles: dynamo keeps its compiled entries, and its recompile limit (8 by default; past it the function
silently runs uncompiled), per code object. The model calls one op at several input signatures (the CLIP
blocks' and the global blocks' FFN, training and inference, a last smaller batch), so each signature gets
its own copy of the reference's code object and compiles once: no call meets the limit.
"""

from __future__ import annotations

import types
from typing import Callable

import torch

# torch.compile's backend for the compiled references. "inductor" is the backend; tests of the wiring and CPU
# smoke runs of the benchmarks may set "aot_eager" (AOTAutograd without code generation: inductor's C++
# compile takes tens of seconds per graph on a small CPU).
COMPILER = "inductor"

_COMPILED: dict[tuple, Callable] = {}


def _signature(args: tuple) -> tuple:
    """What a compiled function specialises on, as far as the ops' calls vary: each tensor's shape, dtype,
    device and requires_grad, every other argument's value, and grad mode."""
    return tuple((a.shape, a.dtype, a.device, a.requires_grad) if isinstance(a, torch.Tensor) else a
                 for a in args) + (torch.is_grad_enabled(),)


def _compile(fn: Callable, name: str) -> Callable:
    code = fn.__code__.replace(co_name=name)  # a new code object: its own dynamo cache and recompile count
    copy = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return torch.compile(copy, backend=COMPILER, dynamic=False)


def run(op: str, fn: Callable, *args):
    """``fn(*args)`` (``fn``: the op's reference, positional arguments only) through torch.compile: compiled
    at the first call with each input signature, then reused; inside a torch.compile trace, ``fn`` inline."""
    if torch.compiler.is_compiling():
        return fn(*args)
    key = (op, fn, COMPILER) + _signature(args)
    compiled = _COMPILED.get(key)
    if compiled is None:
        compiled = _COMPILED[key] = _compile(fn, f"{op}_inductor_{len(_COMPILED)}")
    return compiled(*args)


def compiled_count(op: str | None = None) -> int:
    """How many compiled functions exist (for ``op``, or for every op): one per input signature met."""
    return sum(1 for key in _COMPILED if op is None or key[0] == op)
