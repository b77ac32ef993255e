"""Global UniBlock op (DPE + ln_3 + one-query cross-attention, before out_proj): fused vs the official math.

Providers:
- ``eager``:   the literal reference (official math: depthwise Conv3d DPE, LayerNorm, K and V materialised,
               softmax(q k^T / sqrt(d)) v), ``reference.global_query_attention_literal``
- ``compile``: the same under ``torch.compile``
- ``folded``:  the folded formulation in plain PyTorch (no K/V; the algebra the kernels use), eager
- ``triton``:  ``ops.global_query_attention.global_query_attention(..., backend="triton")``
- ``cuda``:    the same op on the CUDA C++ backend (skipped until the extension registers it)
- ``inductor``: the same op on its inductor backend: ``torch.compile`` of the reference backend's folded form
               (fp32 inside) through the public call (``compile`` compiles the literal form). On the CPU only
               when named in --providers

Shapes: the harness's shape set; the stream x is (L, N*T, C), one learnable query per clip, H heads.
All tensors in --dtype (the op requires one dtype).

Work formulas (minimum traffic, es = bytes per element, tokens = L*N*T, P = parameter elements
= 27C + C (DPE) + 2C (ln_3) + 3C*C + 3C (in_proj)):
  forward  bytes = tokens*C*es + P*es + N*C*es + N*C*es        (one read of x, the parameters and the query,
                                                                write the (1, N, C) output)
  backward bytes = 2*tokens*C*es + 2*P*es + 3*N*C*es           (read x, write dx, read the parameters and
                                                                write their grads, read dout and the query,
                                                                write dquery)
The forward GB/s is therefore the "effective bandwidth, one read of x" of the DESIGN target (>= 2 TB/s on
H100 in bf16). No TFLOP/s: the fused op is memory-bound (O(S*C*H) token work).

    python benchmarks/bench_global_query_attention.py                 # CPU: quick shapes (triton skipped)
    python benchmarks/bench_global_query_attention.py --interpret     # CPU smoke test of the Triton kernels
    python benchmarks/bench_global_query_attention.py --models b16,l14 --frames 8 --batch 64   # GPU
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402  (sets TRITON_INTERPRET for --interpret before triton is imported)
import torch  # noqa: E402

EPS = 1e-5


def literal(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads):
    from uniformerv2_kernels.reference.global_query_attention import global_query_attention_literal

    return global_query_attention_literal(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
                                          in_proj_bias, num_heads, EPS)


def folded(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads):
    from uniformerv2_kernels.reference.global_query_attention import global_query_attention_folded

    return global_query_attention_folded(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
                                         in_proj_bias, num_heads, EPS)


def fused(backend):
    def fn(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads):
        from uniformerv2_kernels.ops.global_query_attention import global_query_attention

        return global_query_attention(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
                                      in_proj_bias, num_heads, EPS, backend=backend)
    return fn


def make_case(shape: H.Shape, dtype: torch.dtype) -> H.Case:
    C, N, T, L = shape.C, shape.N, shape.T, shape.L
    tokens = shape.tokens
    es = torch.empty((), dtype=dtype).element_size()
    params = 27 * C + C + 2 * C + 3 * C * C + 3 * C

    def make_inputs(device, dtype, requires_grad):
        def r(*s, scale=1.0, shift=0.0):
            return (torch.randn(*s, device=device) * scale + shift).to(dtype).requires_grad_(requires_grad)

        return dict(
            x=r(L, shape.NT, C, scale=1.5, shift=0.3),
            T=T,
            dpe_weight=r(C, 1, 3, 3, 3, scale=0.2),
            dpe_bias=r(C, scale=0.5),
            ln_weight=r(C, scale=0.3, shift=1.0),
            ln_bias=r(C, scale=0.3),
            query=r(1, N, C),
            in_proj_weight=r(3 * C, C, scale=1.0 / math.sqrt(C)),
            in_proj_bias=r(3 * C, scale=0.5),
            num_heads=shape.heads,
        )

    return H.Case(
        name=shape.label, make_inputs=make_inputs, shape=shape,
        fwd_bytes=tokens * C * es + params * es + 2 * N * C * es,
        bwd_bytes=2 * tokens * C * es + 2 * params * es + 3 * N * C * es,
        items=N, items_unit="clips",
    )


PROVIDERS = [
    H.Provider("eager", literal),
    # dynamic=False: with automatic dynamic shapes inductor fails on the second shape (torch 2.14 CPU)
    H.Provider("compile", literal, compile=True, compile_kwargs={"dynamic": False}),
    H.Provider("folded", folded),
    H.Provider("triton", fused("triton"), requires=("triton",)),
    H.Provider("cuda", fused("cuda"), requires=("cuda_op:global_query_attention_fwd",)),
    H.Provider("inductor", fused("inductor"), requires=("inductor",)),
]


def main(argv=None):
    args = H.parse_args(__doc__.splitlines()[0], argv)
    cases = [make_case(s, args.dtype) for s in H.shapes(args)]
    H.run_benchmark("global_query_attention", cases, PROVIDERS, args,
                    title="Global UniBlock: DPE + ln_3 + query cross-attention (before out_proj)")


if __name__ == "__main__":
    main()
