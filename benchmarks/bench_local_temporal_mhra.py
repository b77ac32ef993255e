"""Local temporal MHRA (BatchNorm3d + 1x1 + depthwise temporal conv + 1x1 + residual): the fused op against
the official-style module (permute + BatchNorm3d + Conv3d x3 + residual + permute back) in eager and
torch.compile.

Providers:
- ``eager``:    the official block code: x[1:] -> (N, C, T, h, w) copy, ``F.batch_norm`` + three
                ``F.conv3d`` + residual, permute back, cat with the class tokens
- ``compile``:  the same under ``torch.compile``
- ``native``:   the native-layout reference (two matmuls + temporal shift mix, no permutes), eager
- ``triton``:   ``uniformerv2_kernels.ops.local_temporal_mhra(..., backend="triton")`` with the default GEMM
                plan (UNIFORMERV2_TRITON_GEMM=cublas): the two GEMMs with fused prologue / epilogue run as
                mix kernel -> cuBLAS -> epilogue kernel (the CUDA backend's plan)
- ``triton-triton-gemm``: the same with UNIFORMERV2_TRITON_GEMM=triton: one fused Triton GEMM kernel each
- ``cuda``:     the same op on the CUDA C++ backend (skipped until the extension has it)
- ``inductor``: the same op on its inductor backend: ``torch.compile`` of the native-layout reference (the
                ``native`` row's math) through the public call (``compile`` compiles the official form). On
                the CPU only when named in --providers

Shapes: the harness's shape set, stream (L, N*T, C), C' = int(C // 1.5) (512 for B/16, 682 for L/14).
Each shape runs with BatchNorm in training mode (batch statistics, running statistics updated in place)
and in eval mode (``--bn train,eval``). x and the conv parameters in --dtype; the BatchNorm parameters
and running statistics in fp32 (as nn.BatchNorm3d keeps them under autocast).

Work formulas (M = (L-1)*N*T patch rows, es = bytes per element of x):
  forward  FLOPs = 2 GEMMs of M x C x C' (2 FLOPs per multiply-add) + the 3-tap depthwise conv
                 = 4*M*C*C' + 6*M*C'
  backward FLOPs = 4 GEMMs of M x C x C' (dZ = G W2, dW2 = G^T Z, dW1 = dY1^T X, dX = dY1 W1) + the
                   depthwise conv's input and weight gradients = 8*M*C*C' + 12*M*C'
  forward  bytes = read x + write out (+ a second read of x for the batch statistics in training)
                 = (2 + training) * L*N*T*C*es + parameter bytes
  backward bytes = read dout and x, write dx = 3 * L*N*T*C*es + 2 * parameter bytes
  (minimum traffic of the op's inputs and outputs; the (M, C') intermediate Y1, written in forward and read
  in backward by the fused op, is not counted.)

    python benchmarks/bench_local_temporal_mhra.py                 # CPU: quick shapes (triton skipped)
    python benchmarks/bench_local_temporal_mhra.py --interpret     # CPU smoke test of the Triton kernels
    python benchmarks/bench_local_temporal_mhra.py --models b16,l14 --frames 8 --batch 64   # GPU
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as H  # noqa: E402  (sets TRITON_INTERPRET for --interpret before triton is imported)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

EPS = 1e-5
MOMENTUM = 0.1


def official(x, T, training, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv1_weight,
             conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias, branch_scale):
    """The official UniBlock code around Local_MHRA (nn.BatchNorm3d's running-stat update included)."""
    L, NT, C = x.shape
    N = NT // T
    H_ = W_ = int(round((L - 1) ** 0.5))
    if training:
        num_batches_tracked.add_(1)
    tmp = x[1:].view(H_, W_, N, T, C).permute(2, 4, 3, 0, 1).contiguous()
    y = F.batch_norm(tmp, running_mean, running_var, bn_weight, bn_bias, training, MOMENTUM, EPS)
    y = F.conv3d(y, conv1_weight, conv1_bias)
    y = F.conv3d(y, dw_weight, dw_bias, padding=(1, 0, 0), groups=dw_weight.shape[0])
    y = F.conv3d(y, conv2_weight, conv2_bias)
    tmp = tmp + y * branch_scale.view(N, 1, 1, 1, 1).to(y.dtype)
    tmp = tmp.view(N, C, T, L - 1).permute(3, 0, 2, 1).contiguous().view(L - 1, NT, C)
    return torch.cat([x[:1], tmp], 0)


def native(x, T, training, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv1_weight,
           conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias, branch_scale):
    from uniformerv2_kernels.reference.local_temporal_mhra import local_temporal_mhra_reference

    out, _, _ = local_temporal_mhra_reference(
        x, T, bn_weight, bn_bias, running_mean, running_var, conv1_weight, conv1_bias, dw_weight, dw_bias,
        conv2_weight, conv2_bias, training, EPS, branch_scale)
    return out


def fused(backend):
    def fn(x, T, training, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv1_weight,
           conv1_bias, dw_weight, dw_bias, conv2_weight, conv2_bias, branch_scale):
        from uniformerv2_kernels.ops.local_temporal_mhra import local_temporal_mhra

        return local_temporal_mhra(
            x, T, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv1_weight, conv1_bias,
            dw_weight, dw_bias, conv2_weight, conv2_bias, training, MOMENTUM, EPS, branch_scale, backend=backend)
    return fn


def make_case(shape: H.Shape, dtype: torch.dtype, training: bool) -> H.Case:
    L, NT, C, Cp, T, N = shape.L, shape.NT, shape.C, shape.lmhra_dim, shape.T, shape.N
    M = (L - 1) * NT
    es = torch.empty((), dtype=dtype).element_size()
    param_bytes = (2 * C * 4 + 2 * C * 4) + (C * Cp + Cp + 3 * Cp + Cp + Cp * C + C) * es

    def make_inputs(device, dtype, requires_grad):
        def rnd(*s, scale=1.0, dt=dtype):
            return (torch.randn(*s, device=device) * scale).to(dt)

        x = rnd(L, NT, C, scale=1.5) + 0.3
        inputs = dict(
            x=x,
            bn_weight=1.0 + rnd(C, scale=0.3, dt=torch.float32), bn_bias=rnd(C, scale=0.3, dt=torch.float32),
            conv1_weight=rnd(Cp, C, 1, 1, 1, scale=C ** -0.5), conv1_bias=rnd(Cp, scale=0.1),
            dw_weight=rnd(Cp, 1, 3, 1, 1, scale=0.5), dw_bias=rnd(Cp, scale=0.1),
            conv2_weight=rnd(C, Cp, 1, 1, 1, scale=Cp ** -0.5), conv2_bias=rnd(C, scale=0.1),
        )
        inputs = {k: v.requires_grad_(requires_grad) for k, v in inputs.items()}
        inputs.update(
            T=T, training=training,
            running_mean=rnd(C, scale=0.3, dt=torch.float32),
            running_var=0.5 + torch.rand(C, device=device),
            num_batches_tracked=torch.tensor(5, device=device),
            branch_scale=(torch.rand(N, device=device) < 0.8).to(dtype) / 0.8,
        )
        return inputs

    tokens = L * NT * C * es
    return H.Case(
        name=f"{shape.label} {'train' if training else 'eval'}", make_inputs=make_inputs, shape=shape,
        fwd_bytes=(2 + int(training)) * tokens + param_bytes,
        bwd_bytes=3 * tokens + 2 * param_bytes,
        fwd_flops=4 * M * C * Cp + 6 * M * Cp,
        bwd_flops=8 * M * C * Cp + 12 * M * Cp,
        items=N, items_unit="clips", params={"Cp": Cp, "bn": "train" if training else "eval"},
    )


def _skip_triton_dtype(case, args):
    if args.dtype == torch.float64:
        return "the Triton kernels take fp32, fp16 or bf16"
    return None


PROVIDERS = [
    H.Provider("eager", official),
    H.Provider("compile", official, compile=True),
    H.Provider("native", native),
    H.Provider("triton", H.with_triton_gemm(fused("triton"), "cublas"), requires=("triton",),
               skip_if=_skip_triton_dtype),
    H.Provider("triton-triton-gemm", H.with_triton_gemm(fused("triton"), "triton"), requires=("triton",),
               skip_if=_skip_triton_dtype),
    H.Provider("cuda", fused("cuda"), requires=("cuda_op:local_temporal_mhra_fwd",)),
    H.Provider("inductor", fused("inductor"), requires=("inductor",)),
]


def _extra(parser):
    parser.add_argument("--bn", default="train,eval",
                        help="comma list of BatchNorm modes: train (batch statistics), eval (running ones)")


def main(argv=None):
    args = H.parse_args(__doc__.splitlines()[0], argv, extra=_extra)
    bn_modes = [m.strip() for m in args.bn.split(",") if m.strip()]
    for m in bn_modes:
        if m not in ("train", "eval"):
            raise SystemExit(f"--bn {m!r}: expected train or eval")
    cases = [make_case(s, args.dtype, m == "train") for s in H.shapes(args) for m in bn_modes]
    H.run_benchmark("local_temporal_mhra", cases, PROVIDERS, args,
                    title="Local temporal MHRA (BN + 1x1 + dw temporal + 1x1 + residual)")


if __name__ == "__main__":
    main()
