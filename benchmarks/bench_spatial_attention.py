"""Spatial attention ``attn(ln_1(x))`` within each frame, against eager and torch.compile of the official form.

Providers:
- ``eager``:   the official local-block branch: CLIP LayerNorm, then ``nn.MultiheadAttention``'s functional
               form ``F.multi_head_attention_forward(..., need_weights=False)`` with the packed
               in_proj_weight/bias and out_proj (which runs SDPA inside)
- ``compile``: the same under ``torch.compile``
- ``triton``:  ``uniformerv2_kernels.ops.spatial_attention.spatial_attention(..., backend="triton")``:
               LN kernel writing frame-major rows, the QKV projection, the attention core of
               ``attention_backend()`` (xformers when usable, else SDPA), the out_proj projection writing
               the stream layout; the projections on the default GEMM plan (UNIFORMERV2_TRITON_GEMM=cublas:
               ``torch.addmm``, then a Triton pass for the row reordering / epilogue). The core in use is
               printed and stored in the ``core`` column.
- ``triton-triton-gemm``: the same with UNIFORMERV2_TRITON_GEMM=triton (Triton GEMMs with the reordering
               and epilogue inside; kept to time both plans on each GPU)
- ``cuda``:    the same op on the CUDA C++ backend (skipped until the extension has it)
- ``inductor``: the same op on its inductor backend: ``torch.compile`` of
               ``reference.spatial_attention.spatial_attention_sdpa`` (the SDPA core) through the public call
               (``compile`` compiles the official form). On the CPU only when named in --providers

Shapes: the stream (L, N*T, C) of the harness's shape set (L = 197 for B/16, 257 for L/14, head dim 64).
x and the projection weights in --dtype, the LN weight/bias in fp32.

Work formulas (rows = L*N*T = tokens, es = bytes per element):
  forward  FLOPs = 2*rows*C*3C (QKV) + 2*rows*C*C (out_proj) + 4*rows*L*C (QK^T and PV per frame)
                 = 8 * rows * C^2 + 4 * rows * L * C
  backward FLOPs = 2 * 8 * rows * C^2 (dgrad + wgrad of both projections) + 10 * rows * L * C
                   (the attention backward's five L x L x d products: 2.5x the forward's two)
  forward  bytes = (2 * rows * C + 4 * C^2 + 4 * C) * es        (read x, write out, read the weights)
  backward bytes = (7 * rows * C + 8 * C^2 + 8 * C) * es + 8 * rows
                   (read dout, x, the saved qkv (3) and attention output, write dx; read the weights, write
                   their gradients; read the fp32 LN mean/rstd)

    python benchmarks/bench_spatial_attention.py                      # CPU: quick shapes (triton skipped)
    python benchmarks/bench_spatial_attention.py --interpret --models tiny   # CPU smoke test
    python benchmarks/bench_spatial_attention.py --models b16,l14 --frames 8 --batch 64   # GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402  (sets TRITON_INTERPRET for --interpret before triton is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EPS = 1e-5


def official_fn(heads):
    def fn(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias):
        y = F.layer_norm(x.float(), (x.shape[-1],), ln_weight, ln_bias, EPS).to(x.dtype)
        C = x.shape[-1]
        return F.multi_head_attention_forward(
            y, y, y, C, heads, in_proj_weight, in_proj_bias, None, None, False, 0.0,
            out_proj_weight, out_proj_bias, training=False, need_weights=False, attn_mask=None,
        )[0]
    return fn


def fused_fn(heads, backend):
    def fn(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias):
        from uniformerv2_kernels.ops.spatial_attention import spatial_attention

        return spatial_attention(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                                 out_proj_bias, heads, EPS, backend=backend)
    return fn


class _PerCase:
    """A provider fn that dispatches on the case's head count (the harness calls fn(**inputs))."""

    def __init__(self, factory):
        self.factory = factory
        self.cache = {}

    def __call__(self, heads, **inputs):
        if heads not in self.cache:
            self.cache[heads] = self.factory(heads)
        return self.cache[heads](**inputs)


def make_case(shape: H.Shape, dtype: torch.dtype, core: str) -> H.Case:
    rows, C, L = shape.tokens, shape.C, shape.L
    es = torch.empty((), dtype=dtype).element_size()

    def make_inputs(device, dtype, requires_grad):
        d = dict(
            x=torch.randn(L, shape.NT, C, device=device, dtype=dtype),
            ln_weight=1.0 + 0.5 * torch.randn(C, device=device),
            ln_bias=0.3 * torch.randn(C, device=device),
            in_proj_weight=(torch.randn(3 * C, C, device=device) / C ** 0.5).to(dtype),
            in_proj_bias=(0.3 * torch.randn(3 * C, device=device)).to(dtype),
            out_proj_weight=(torch.randn(C, C, device=device) / C ** 0.5).to(dtype),
            out_proj_bias=(0.3 * torch.randn(C, device=device)).to(dtype),
        )
        d = {k: v.requires_grad_(requires_grad) for k, v in d.items()}
        d["heads"] = shape.heads
        return d

    return H.Case(
        name=shape.label, make_inputs=make_inputs, shape=shape,
        fwd_flops=8 * rows * C * C + 4 * rows * L * C,
        bwd_flops=16 * rows * C * C + 10 * rows * L * C,
        fwd_bytes=(2 * rows * C + 4 * C * C + 4 * C) * es,
        bwd_bytes=(7 * rows * C + 8 * C * C + 8 * C) * es + 8 * rows,
        items=rows, items_unit="tokens", params={"core": core},
    )


def _compiled_official():
    compiled = {}

    def fn(heads, **inputs):
        if heads not in compiled:
            compiled[heads] = torch.compile(official_fn(heads))
        return compiled[heads](**inputs)
    return fn


PROVIDERS = [
    H.Provider("eager", _PerCase(official_fn)),
    H.Provider("compile", _compiled_official()),  # compiled per head count, outside the timing after warm-up
    H.Provider("triton", H.with_triton_gemm(_PerCase(lambda h: fused_fn(h, "triton")), "cublas"),
               requires=("triton",)),
    H.Provider("triton-triton-gemm", H.with_triton_gemm(_PerCase(lambda h: fused_fn(h, "triton")), "triton"),
               requires=("triton",)),
    H.Provider("cuda", _PerCase(lambda h: fused_fn(h, "cuda")), requires=("cuda_op:spatial_attention_qkv_fwd",)),
    H.Provider("inductor", _PerCase(lambda h: fused_fn(h, "inductor")), requires=("inductor",)),
]


def main(argv=None):
    args = H.parse_args(__doc__.splitlines()[0], argv)
    from uniformerv2_kernels.ops.spatial_attention import attention_backend

    if args.device.type == "cuda":
        core, reason = attention_backend()
    else:
        core, reason = "sdpa", "CPU tensors always use SDPA"
    print(f"attention core: {core} ({reason})", file=sys.stderr)
    cases = [make_case(s, args.dtype, core) for s in H.shapes(args)]
    H.run_benchmark("spatial_attention", cases, PROVIDERS, args,
                    title="Spatial attention: ln_1 + packed QKV + per-frame attention + out_proj")


if __name__ == "__main__":
    main()
