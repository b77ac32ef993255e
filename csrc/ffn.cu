// Fused FFN of the CLIP blocks, out = x + row_scale * c_proj(quick_gelu(c_fc(ln_2(x)))): the CUDA backend
// of uniformerv2_kernels/ops/ffn.py, with the inputs and outputs of triton/ffn.py's forward/backward.
//
//   fused_ffn_fwd(x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale?, eps,
//                 save_for_backward) -> (out, mean, rstd, h)
//   fused_ffn_bwd(grad_out, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale?,
//                 mean, rstd, h, eps, need_row_scale_grad)
//       -> (dx, d_ln_weight, d_ln_bias, d_fc_weight, d_fc_bias, d_proj_weight, d_proj_bias, d_row_scale)
//
// The GEMMs run on cuBLAS through ATen (addmm puts each bias into the GEMM's own epilogue, fp32
// accumulation, one rounding); the elementwise epilogues are the kernels here, vectorised 16-byte passes:
//   forward:  act = quick_gelu(h)                                      (h = c_fc(xn) + b_fc, from addmm)
//             out = x + round(row_scale * branch)                      (branch = c_proj(act) + b_proj)
//   backward: d_branch = dout * row_scale;  dh = (d_branch @ W_proj) * quick_gelu'(h), act = quick_gelu(h)
// The roundings follow the Triton kernels (a low-precision value is rounded where Triton rounds it).
// The LayerNorm is csrc/layer_norm.cu's. Nothing uses atomics: two backward runs are bitwise equal.
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernel_utils.cuh"
#include "layer_norm.h"

namespace uniformerv2 {
namespace {

constexpr float kQuickGeluAlpha = 1.702f;

__device__ __forceinline__ float sigmoid_quick(float z) { return 1.0f / (1.0f + __expf(-kQuickGeluAlpha * z)); }

// act = quick_gelu(h) = h * sigmoid(1.702 h), over n elements (n % V == 0 when V > 1).
template <typename T, int V>
__global__ void quick_gelu_fwd_kernel(const T* __restrict__ h, T* __restrict__ act, int64_t n) {
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    float v[V], o[V];
    load_floats<T, V>(h + p * V, v);
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = v[i] * sigmoid_quick(v[i]);
    store_floats<T, V>(act + p * V, o);
  }
}

// dh = round(d_act) * quick_gelu'(h), act = quick_gelu(h); quick_gelu'(z) = s + 1.702 z s (1 - s).
template <typename T, int V>
__global__ void quick_gelu_bwd_kernel(const T* __restrict__ d_act, const T* __restrict__ h, T* __restrict__ dh,
                                      T* __restrict__ act, int64_t n) {
  const int64_t packs = n / V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    float g[V], z[V], o_dh[V], o_act[V];
    load_floats<T, V>(d_act + p * V, g);
    load_floats<T, V>(h + p * V, z);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float s = sigmoid_quick(z[i]);
      o_act[i] = z[i] * s;
      o_dh[i] = g[i] * (s + kQuickGeluAlpha * z[i] * s * (1.0f - s));
    }
    store_floats<T, V>(dh + p * V, o_dh);
    store_floats<T, V>(act + p * V, o_act);
  }
}

// out[m, c] = round(round(a[m, c] * scale(m)) + res[m, c]) with scale(m) = row_scale[m / rows_per_scale]
// (fp32, rounded to T first like row_scale.to(x.dtype)); without row_scale: round(a + res). With res null:
// out = round(a * scale) (the scaled gradient of the branch). (M, C) row-major, C % V == 0 when V > 1.
template <typename T, int V>
__global__ void row_scale_residual_kernel(const T* __restrict__ a, const T* __restrict__ res,
                                          const float* __restrict__ row_scale, T* __restrict__ out, int64_t M,
                                          int64_t C, int64_t rows_per_scale) {
  const int64_t packs_per_row = C / V;
  const int64_t packs = M * packs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t m = p / packs_per_row;
    float v[V];
    load_floats<T, V>(a + p * V, v);
    if (row_scale != nullptr) {
      const float s = round_to<T>(row_scale[m / rows_per_scale]);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] = round_to<T>(v[i] * s);
    }
    if (res != nullptr) {
      float r[V];
      load_floats<T, V>(res + p * V, r);
#pragma unroll
      for (int i = 0; i < V; ++i) v[i] += r[i];
    }
    store_floats<T, V>(out + p * V, v);
  }
}

template <typename T>
bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (p != nullptr && !aligned_to(p, 16)) return false;
  return true;
}

at::Tensor quick_gelu_forward(const at::Tensor& h) {
  at::Tensor act = at::empty_like(h);
  const int64_t n = h.numel();
  if (n == 0) return act;
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(h.scalar_type(), "fused_ffn_fwd", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* ap = act.mutable_data_ptr<scalar_t>();
    if (n % V == 0 && aligned16<scalar_t>({hp, ap})) {
      quick_gelu_fwd_kernel<scalar_t, V><<<grid_for(n / V, kThreads), kThreads, 0, stream>>>(hp, ap, n);
    } else {
      quick_gelu_fwd_kernel<scalar_t, 1><<<grid_for(n, kThreads), kThreads, 0, stream>>>(hp, ap, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return act;
}

std::pair<at::Tensor, at::Tensor> quick_gelu_backward(const at::Tensor& d_act, const at::Tensor& h) {
  at::Tensor dh = at::empty_like(h);
  at::Tensor act = at::empty_like(h);
  const int64_t n = h.numel();
  if (n == 0) return {dh, act};
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(h.scalar_type(), "fused_ffn_bwd", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* gp = d_act.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    scalar_t* dhp = dh.mutable_data_ptr<scalar_t>();
    scalar_t* ap = act.mutable_data_ptr<scalar_t>();
    if (n % V == 0 && aligned16<scalar_t>({gp, hp, dhp, ap})) {
      quick_gelu_bwd_kernel<scalar_t, V><<<grid_for(n / V, kThreads), kThreads, 0, stream>>>(gp, hp, dhp, ap, n);
    } else {
      quick_gelu_bwd_kernel<scalar_t, 1><<<grid_for(n, kThreads), kThreads, 0, stream>>>(gp, hp, dhp, ap, n);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dh, act};
}

// See row_scale_residual_kernel; a, res: contiguous (M, C); row_scale: fp32 contiguous or undefined.
at::Tensor row_scale_residual(const at::Tensor& a, const at::Tensor& res, const at::Tensor& row_scale,
                              int64_t rows_per_scale) {
  at::Tensor out = at::empty_like(a);
  const int64_t M = a.size(0);
  const int64_t C = a.size(1);
  if (M * C == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(a.scalar_type(), "fused_ffn", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* rp = res.defined() ? res.const_data_ptr<scalar_t>() : nullptr;
    const float* sp = row_scale.defined() ? row_scale.const_data_ptr<float>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    if (C % V == 0 && aligned16<scalar_t>({ap, rp, op})) {
      row_scale_residual_kernel<scalar_t, V><<<grid_for(M * C / V, kThreads), kThreads, 0, stream>>>(
          ap, rp, sp, op, M, C, rows_per_scale);
    } else {
      row_scale_residual_kernel<scalar_t, 1><<<grid_for(M * C, kThreads), kThreads, 0, stream>>>(
          ap, rp, sp, op, M, C, rows_per_scale);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

struct FfnShapes {
  int64_t C, M, hidden, rows_per_scale;
};

FfnShapes check_ffn(const char* op, const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                    const at::Tensor& fc_weight, const at::Tensor& fc_bias, const at::Tensor& proj_weight,
                    const at::Tensor& proj_bias, const std::optional<at::Tensor>& row_scale) {
  check_contiguous(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  const int64_t C = x.size(-1);
  const int64_t M = x.numel() / C;
  check_same_device(ln_weight, x, op, "ln_weight");
  check_same_device(ln_bias, x, op, "ln_bias");
  check_numel(ln_weight, C, op, "ln_weight");
  check_numel(ln_bias, C, op, "ln_bias");
  check_same_device(fc_weight, x, op, "fc_weight");
  TORCH_CHECK(fc_weight.dim() == 2 && fc_weight.size(1) == C, op, ": fc_weight must be (hidden, C=", C, "), got ",
              fc_weight.sizes());
  const int64_t hidden = fc_weight.size(0);
  check_same_device(fc_bias, x, op, "fc_bias");
  check_numel(fc_bias, hidden, op, "fc_bias");
  check_same_device(proj_weight, x, op, "proj_weight");
  TORCH_CHECK(proj_weight.dim() == 2 && proj_weight.size(0) == C && proj_weight.size(1) == hidden, op,
              ": proj_weight must be (C, hidden) = (", C, ", ", hidden, "), got ", proj_weight.sizes());
  check_same_device(proj_bias, x, op, "proj_bias");
  check_numel(proj_bias, C, op, "proj_bias");
  for (const auto& [t, name] : {std::pair<const at::Tensor*, const char*>{&fc_weight, "fc_weight"},
                                {&fc_bias, "fc_bias"},
                                {&proj_weight, "proj_weight"},
                                {&proj_bias, "proj_bias"}}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
                "), got ", t->scalar_type());
  }
  int64_t rows_per_scale = 1;
  if (row_scale.has_value() && row_scale->defined()) {
    check_same_device(*row_scale, x, op, "row_scale");
    TORCH_CHECK(x.dim() >= 2 || row_scale->numel() == 1, op, ": row_scale needs x with a leading dimension");
    check_numel(*row_scale, x.size(0), op, "row_scale");
    rows_per_scale = x.size(0) > 0 ? M / x.size(0) : 1;
  }
  return {C, M, hidden, std::max<int64_t>(rows_per_scale, 1)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_ffn_fwd(
    const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& fc_weight,
    const at::Tensor& fc_bias, const at::Tensor& proj_weight, const at::Tensor& proj_bias,
    const std::optional<at::Tensor>& row_scale, double eps, bool save_for_backward) {
  const char* op = "fused_ffn_fwd";
  const FfnShapes s = check_ffn(op, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale);
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({s.M, s.C});
  auto [x_normed, mean, rstd] = layer_norm_forward_cuda(x2, ln_weight, ln_bias, eps, save_for_backward);
  at::Tensor h = at::addmm(fc_bias, x_normed, fc_weight.t());  // (M, hidden), bias in the GEMM epilogue
  x_normed.reset();
  at::Tensor act = quick_gelu_forward(h);
  at::Tensor branch = at::addmm(proj_bias, act, proj_weight.t());  // (M, C)
  act.reset();
  at::Tensor scale;
  if (row_scale.has_value() && row_scale->defined()) scale = row_scale->to(at::kFloat).contiguous();
  at::Tensor out = row_scale_residual(branch, x2, scale, s.rows_per_scale).view(x.sizes());
  const auto fopts = x.options().dtype(at::kFloat);
  if (!save_for_backward) {
    return {out, at::empty({0}, fopts), at::empty({0}, fopts), at::empty({0}, x.options())};
  }
  return {out, mean, rstd, h};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_ffn_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
              const at::Tensor& fc_weight, const at::Tensor& fc_bias, const at::Tensor& proj_weight,
              const at::Tensor& proj_bias, const std::optional<at::Tensor>& row_scale, const at::Tensor& mean,
              const at::Tensor& rstd, const at::Tensor& h_in, double eps, bool need_row_scale_grad) {
  const char* op = "fused_ffn_bwd";
  const FfnShapes s = check_ffn(op, x, ln_weight, ln_bias, fc_weight, fc_bias, proj_weight, proj_bias, row_scale);
  check_same_device(grad_out, x, op, "grad_out");
  check_numel(grad_out, x.numel(), op, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x");
  check_same_device(h_in, x, op, "h");
  check_numel(h_in, s.M * s.hidden, op, "h");
  TORCH_CHECK(h_in.scalar_type() == x.scalar_type(), op, ": h must have the dtype of x");
  const bool has_scale = row_scale.has_value() && row_scale->defined();
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({s.M, s.C});
  const at::Tensor dout = grad_out.contiguous().reshape({s.M, s.C});
  const at::Tensor h = h_in.contiguous().reshape({s.M, s.hidden});
  at::Tensor d_branch = dout;
  if (has_scale) d_branch = row_scale_residual(dout, at::Tensor(), row_scale->to(at::kFloat).contiguous(), s.rows_per_scale);
  at::Tensor d_act = at::mm(d_branch, proj_weight);  // (M, hidden)
  auto [d_h, act] = quick_gelu_backward(d_act, h);
  d_act.reset();
  at::Tensor d_row_scale = at::empty({0}, x.options());
  if (need_row_scale_grad && has_scale) {
    const at::Tensor branch = at::addmm(proj_bias, act, proj_weight.t());
    const at::Tensor per_row = dout.to(at::kFloat).mul(branch.to(at::kFloat)).sum(1);
    d_row_scale = per_row.reshape({x.size(0), -1}).sum(1).to(row_scale->scalar_type());
  }
  at::Tensor d_proj_weight = at::mm(d_branch.t(), act);
  at::Tensor d_proj_bias = at::sum(d_branch, {0}, false, at::kFloat).to(proj_bias.scalar_type());
  act.reset();
  at::Tensor x_normed = std::get<0>(layer_norm_forward_cuda(x2, ln_weight, ln_bias, eps, false));
  at::Tensor d_fc_weight = at::mm(d_h.t(), x_normed);
  x_normed.reset();
  at::Tensor d_fc_bias = at::sum(d_h, {0}, false, at::kFloat).to(fc_bias.scalar_type());
  at::Tensor d_x_normed = at::mm(d_h, fc_weight);
  d_h.reset();
  auto [dx, d_ln_weight, d_ln_bias] = layer_norm_backward_cuda(
      d_x_normed, x2, ln_weight, mean, rstd, ln_weight.scalar_type(), ln_bias.scalar_type(), dout);
  return {dx.view(x.sizes()), d_ln_weight, d_ln_bias, d_fc_weight, d_fc_bias, d_proj_weight, d_proj_bias, d_row_scale};
}

}  // namespace
}  // namespace uniformerv2

TORCH_LIBRARY_FRAGMENT(uniformerv2_cuda, m) {
  m.def(
      "fused_ffn_fwd(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc_weight, Tensor fc_bias, "
      "Tensor proj_weight, Tensor proj_bias, Tensor? row_scale, float eps, bool save_for_backward) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused_ffn_bwd(Tensor grad_out, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor fc_weight, "
      "Tensor fc_bias, Tensor proj_weight, Tensor proj_bias, Tensor? row_scale, Tensor mean, Tensor rstd, "
      "Tensor h, float eps, bool need_row_scale_grad) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(uniformerv2_cuda, CUDA, m) {
  m.impl("fused_ffn_fwd", &uniformerv2::fused_ffn_fwd);
  m.impl("fused_ffn_bwd", &uniformerv2::fused_ffn_bwd);
}
