"""CLIP LayerNorm (fp32 math, cast back): the fused op against eager and torch.compile of the official form.

Providers:
- ``eager``:       the official CLIP LayerNorm, ``F.layer_norm(x.float(), (C,), w, b, 1e-5).to(x.dtype)``
- ``compile``:     the same under ``torch.compile``
- ``F.layer_norm``: torch's native layer norm in x.dtype (not the CLIP semantics; the speed reference the
                   issue names)
- ``triton``:      ``uniformerv2_kernels.ops.layer_norm.clip_layer_norm(..., backend="triton")``
- ``cuda``:        the same op on the CUDA C++ backend (skipped until the extension has it)
- ``inductor``:    the same op on its inductor backend: ``torch.compile`` of ``reference.layer_norm.clip_layer_norm``
                   through the public call (``compile`` compiles the formula directly). On the CPU only when
                   named in --providers

Shapes: the stream (L, N*T, C) of the harness's shape set (rows = L*N*T; C = 768 for B/16, 1024 for L/14).
x in --dtype; the LN weight and bias in fp32 (CLIP's LayerNorm params stay fp32 under autocast).

Work formulas (minimum traffic; es = bytes per element of x, rows = L*N*T):
  forward  bytes = 2 * rows * C * es + 2 * C * 4                     (read x, write y, read w and b)
  backward bytes = 3 * rows * C * es + 2 * rows * 4 + 2 * C * 4      (read dy and x, write dx, read mean/rstd
                                                                     (8 B/row; the eager form recomputes its
                                                                     own), write dw and db)
No TFLOP/s: the op is memory-bound.

    python benchmarks/bench_layer_norm.py                 # CPU: quick shapes (triton skipped)
    python benchmarks/bench_layer_norm.py --interpret     # CPU smoke test of the Triton kernels
    python benchmarks/bench_layer_norm.py --models b16,l14 --frames 8 --batch 64   # GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402  (sets TRITON_INTERPRET for --interpret before triton is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EPS = 1e-5


def official(x, weight, bias):
    return F.layer_norm(x.float(), (x.shape[-1],), weight, bias, EPS).to(x.dtype)


def native(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), bias.to(x.dtype), EPS)


def fused(backend):
    def fn(x, weight, bias):
        from uniformerv2_kernels.ops.layer_norm import clip_layer_norm

        return clip_layer_norm(x, weight, bias, EPS, backend=backend)
    return fn


def make_case(shape: H.Shape, dtype: torch.dtype) -> H.Case:
    rows, C = shape.tokens, shape.C
    es = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device, dtype, requires_grad):
        x = torch.randn(shape.L, shape.NT, C, device=device, dtype=dtype) * 1.5 + 0.3
        w = 1.0 + 0.5 * torch.randn(C, device=device)
        b = 0.3 * torch.randn(C, device=device)
        return {k: v.requires_grad_(requires_grad) for k, v in dict(x=x, weight=w, bias=b).items()}

    return H.Case(
        name=shape.label, make_inputs=make_inputs, shape=shape,
        fwd_bytes=2 * rows * C * es + 2 * C * 4,
        bwd_bytes=3 * rows * C * es + 2 * rows * 4 + 2 * C * 4,
        items=rows, items_unit="rows",
    )


PROVIDERS = [
    H.Provider("eager", official),
    H.Provider("compile", official, compile=True),
    H.Provider("F.layer_norm", native),
    H.Provider("triton", fused("triton"), requires=("triton",)),
    H.Provider("cuda", fused("cuda"), requires=("cuda_op:clip_layer_norm_fwd",)),
    H.Provider("inductor", fused("inductor"), requires=("inductor",)),
]


def main(argv=None):
    args = H.parse_args(__doc__.splitlines()[0], argv)
    cases = [make_case(s, args.dtype) for s in H.shapes(args)]
    H.run_benchmark("layer_norm", cases, PROVIDERS, args, title="CLIP LayerNorm (fp32 math, cast back)")


if __name__ == "__main__":
    main()
