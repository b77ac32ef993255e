"""Fused FFN ``x + c_proj(quick_gelu(c_fc(ln_2(x))))`` against eager and torch.compile of the official form.

Providers:
- ``eager``:   the official block branch: CLIP LayerNorm (``F.layer_norm(x.float(), ...).to(x.dtype)``),
               ``F.linear`` c_fc, QuickGELU ``z * sigmoid(1.702 z)``, ``F.linear`` c_proj, residual add
- ``compile``: the same under ``torch.compile``
- ``triton``:  ``uniformerv2_kernels.ops.ffn.fused_ffn(..., backend="triton")`` with the default GEMM plan
               (UNIFORMERV2_TRITON_GEMM=cublas): LN kernel, ``torch.addmm`` for the GEMMs and a Triton pass
               for each epilogue (bias/QuickGELU, bias/residual; the CUDA backend's plan)
- ``triton-triton-gemm``: the same with UNIFORMERV2_TRITON_GEMM=triton: Triton GEMMs with the epilogues
               inside (cuBLAS for the weight gradients; kept to time both plans on each GPU)
- ``cuda``:    the same op on the CUDA C++ backend (skipped until the extension has it)
- ``inductor``: the same op on its inductor backend: ``torch.compile`` of ``reference.ffn.fused_ffn`` through
               the public call (what a model with ``backend={"fused_ffn": "inductor"}`` runs; ``compile``
               compiles the branch directly). On the CPU only when named in --providers

Shapes: the stream (L, N*T, C) of the harness's shape set (rows = L*N*T, hidden 4C). x and the Linear
weights in --dtype, the LN weight/bias in fp32.

Work formulas (rows = L*N*T, es = bytes per element):
  forward  FLOPs = 2 GEMMs * 2 * rows * C * 4C          = 16 * rows * C^2
  backward FLOPs = 4 GEMMs * 2 * rows * C * 4C          = 32 * rows * C^2  (dgrad + wgrad of both; the
                   fused backward recomputes no GEMM; elementwise work not counted)
  forward  bytes = (2 * rows * C + 8 * C^2 + 5 * C) * es  (read x, write out, read the weights and biases)
  backward bytes = (3 * rows * C + rows * 4C + 16 * C^2 + 10 * C) * es + 8 * rows
                   (read dout, x and the saved pre-activation h, write dx, read the weights, write their
                   gradients, read the fp32 LN mean/rstd)
The op is GEMM-bound: TFLOP/s is the column to read.

    python benchmarks/bench_ffn.py                        # CPU: quick shapes (triton skipped)
    python benchmarks/bench_ffn.py --interpret --models tiny   # CPU smoke test of the Triton path
    python benchmarks/bench_ffn.py --models b16,l14 --frames 8 --batch 64   # GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402  (sets TRITON_INTERPRET for --interpret before triton is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EPS = 1e-5


def official(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias):
    h = F.layer_norm(x.float(), (x.shape[-1],), ln_weight, ln_bias, EPS).to(x.dtype)
    z = F.linear(h, fc_weight, fc_bias)
    return x + F.linear(z * torch.sigmoid(1.702 * z), proj_weight, proj_bias)


def fused(backend):
    def fn(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias):
        from uniformerv2_kernels.ops.ffn import fused_ffn

        return fused_ffn(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, EPS, backend=backend)
    return fn


def make_case(shape: H.Shape, dtype: torch.dtype) -> H.Case:
    rows, C = shape.tokens, shape.C
    es = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device, dtype, requires_grad):
        d = dict(
            x=torch.randn(shape.L, shape.NT, C, device=device, dtype=dtype),
            ln_weight=1.0 + 0.5 * torch.randn(C, device=device),
            ln_bias=0.3 * torch.randn(C, device=device),
            fc_weight=(torch.randn(4 * C, C, device=device) / C ** 0.5).to(dtype),
            fc_bias=(0.3 * torch.randn(4 * C, device=device)).to(dtype),
            proj_weight=(torch.randn(C, 4 * C, device=device) / (4 * C) ** 0.5).to(dtype),
            proj_bias=(0.3 * torch.randn(C, device=device)).to(dtype),
        )
        return {k: v.requires_grad_(requires_grad) for k, v in d.items()}

    return H.Case(
        name=shape.label, make_inputs=make_inputs, shape=shape,
        fwd_flops=16 * rows * C * C,
        bwd_flops=32 * rows * C * C,
        fwd_bytes=(2 * rows * C + 8 * C * C + 5 * C) * es,
        bwd_bytes=(3 * rows * C + rows * 4 * C + 16 * C * C + 10 * C) * es + 8 * rows,
        items=rows, items_unit="rows",
    )


PROVIDERS = [
    H.Provider("eager", official),
    H.Provider("compile", official, compile=True),
    H.Provider("triton", H.with_triton_gemm(fused("triton"), "cublas"), requires=("triton",)),
    H.Provider("triton-triton-gemm", H.with_triton_gemm(fused("triton"), "triton"), requires=("triton",)),
    H.Provider("cuda", fused("cuda"), requires=("cuda_op:fused_ffn_fwd",)),
    H.Provider("inductor", fused("inductor"), requires=("inductor",)),
]


def main(argv=None):
    args = H.parse_args(__doc__.splitlines()[0], argv)
    cases = [make_case(s, args.dtype) for s in H.shapes(args)]
    H.run_benchmark("ffn", cases, PROVIDERS, args, title="Fused FFN: ln_2 + c_fc + QuickGELU + c_proj + residual")


if __name__ == "__main__":
    main()
