// CLIP LayerNorm (fp32 math, result in the input dtype): the CUDA backend of
// uniformerv2_kernels/ops/layer_norm.py, same inputs and outputs as triton/layer_norm.py's launchers.
//
//   clip_layer_norm_fwd(x, weight, bias, eps) -> (y, mean, rstd)
//   clip_layer_norm_bwd(grad_y, x, weight, bias, mean, rstd) -> (grad_x, grad_weight, grad_bias)
//
// Rows are the flattened leading dimensions of a contiguous (..., C) tensor.
// Forward: one warp per row, three passes over the row (sum, squared deviations, write), 16-byte loads
// when C and the pointers allow.
// Backward: grad_x with one warp per row; grad_weight / grad_bias as per-chunk column partial sums (one
// thread per channel group, a fixed chunk of rows per block) reduced over the chunks by a torch sum in a
// fixed order: deterministic, no atomics.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernel_utils.cuh"
#include "layer_norm.h"

namespace uniformerv2 {
namespace {

template <typename T, int V>
__global__ void layer_norm_fwd_kernel(const T* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ b, T* __restrict__ y, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, int64_t rows, int64_t C, float eps,
                                      bool store_stats) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int64_t packs = C / V;
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t row = warp; row < rows; row += warp_stride) {
    const T* xr = x + row * C;
    float s = 0.0f;
    for (int64_t p = lane; p < packs; p += 32) {
      float v[V];
      load_floats<T, V>(xr + p * V, v);
#pragma unroll
      for (int i = 0; i < V; ++i) s += v[i];
    }
    const float mean = warp_sum(s) * inv_c;
    float sq = 0.0f;
    for (int64_t p = lane; p < packs; p += 32) {
      float v[V];
      load_floats<T, V>(xr + p * V, v);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float d = v[i] - mean;
        sq += d * d;
      }
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_c + eps);
    T* yr = y + row * C;
    for (int64_t p = lane; p < packs; p += 32) {
      float v[V], wv[V], bv[V], o[V];
      load_floats<T, V>(xr + p * V, v);
      load_floats<float, V>(w + p * V, wv);
      load_floats<float, V>(b + p * V, bv);
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = (v[i] - mean) * rstd * wv[i] + bv[i];
      store_floats<T, V>(yr + p * V, o);
    }
    if (store_stats && lane == 0) {
      mean_out[row] = mean;
      rstd_out[row] = rstd;
    }
  }
}

template <typename T, int V>
__global__ void layer_norm_bwd_dx_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                         const float* __restrict__ w, const float* __restrict__ mean_in,
                                         const float* __restrict__ rstd_in, const T* __restrict__ dres,
                                         T* __restrict__ dx, int64_t rows, int64_t C) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  const int64_t packs = C / V;
  const float inv_c = 1.0f / static_cast<float>(C);
  for (int64_t row = warp; row < rows; row += warp_stride) {
    const T* xr = x + row * C;
    const T* dyr = dy + row * C;
    const float mean = mean_in[row];
    const float rstd = rstd_in[row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t p = lane; p < packs; p += 32) {
      float v[V], g[V], wv[V];
      load_floats<T, V>(xr + p * V, v);
      load_floats<T, V>(dyr + p * V, g);
      load_floats<float, V>(w + p * V, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float dyw = g[i] * wv[i];
        s1 += dyw * ((v[i] - mean) * rstd);
        s2 += dyw;
      }
    }
    const float c1 = warp_sum(s1) * inv_c;
    const float c2 = warp_sum(s2) * inv_c;
    T* dxr = dx + row * C;
    for (int64_t p = lane; p < packs; p += 32) {
      float v[V], g[V], wv[V], o[V];
      load_floats<T, V>(xr + p * V, v);
      load_floats<T, V>(dyr + p * V, g);
      load_floats<float, V>(w + p * V, wv);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float xhat = (v[i] - mean) * rstd;
        o[i] = (g[i] * wv[i] - xhat * c1 - c2) * rstd;
      }
      if (dres != nullptr) {
        float r[V];
        load_floats<T, V>(dres + row * C + p * V, r);
#pragma unroll
        for (int i = 0; i < V; ++i) o[i] += r[i];
      }
      store_floats<T, V>(dxr + p * V, o);
    }
  }
}

// partial_dw[chunk, c] = sum over the chunk's rows of dy * xhat; partial_db[chunk, c] = sum of dy.
// grid (channel-group blocks, chunks); thread = V consecutive channels.
template <typename T, int V>
__global__ void layer_norm_bwd_dwdb_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                           float* __restrict__ partial_dw, float* __restrict__ partial_db,
                                           int64_t rows, int64_t C, int64_t rows_per_chunk) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  const int64_t chunk = blockIdx.y;
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = std::min(rows, r_begin + rows_per_chunk);
  float aw[V], ab[V];
#pragma unroll
  for (int i = 0; i < V; ++i) aw[i] = ab[i] = 0.0f;
  for (int64_t r = r_begin; r < r_end; ++r) {
    float v[V], g[V];
    load_floats<T, V>(x + r * C + c0, v);
    load_floats<T, V>(dy + r * C + c0, g);
    const float mean = mean_in[r];
    const float rstd = rstd_in[r];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      aw[i] += g[i] * ((v[i] - mean) * rstd);
      ab[i] += g[i];
    }
  }
  store_floats<float, V>(partial_dw + chunk * C + c0, aw);
  store_floats<float, V>(partial_db + chunk * C + c0, ab);
}

template <typename T>
bool can_vectorize(int64_t C, std::initializer_list<const void*> ptrs16, std::initializer_list<const void*> ptrs_f) {
  constexpr int V = vec16<T>();
  if (C % V != 0) return false;
  for (const void* p : ptrs16)
    if (p != nullptr && !aligned_to(p, 16)) return false;
  for (const void* p : ptrs_f)
    if (p != nullptr && !aligned_to(p, sizeof(float) * V)) return false;
  return true;
}

void check_ln_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_contiguous(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  const int64_t C = x.size(-1);
  check_same_device(weight, x, op, "weight");
  check_same_device(bias, x, op, "bias");
  check_numel(weight, C, op, "weight");
  check_numel(bias, C, op, "bias");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_layer_norm_fwd(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps) {
  return layer_norm_forward_cuda(x, weight, bias, eps, /*store_stats=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_layer_norm_bwd(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                                   const at::Tensor& mean, const at::Tensor& rstd) {
  return layer_norm_backward_cuda(grad_y, x, weight, mean, rstd, weight.scalar_type(), bias.scalar_type(),
                                  std::nullopt);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps,
                                                                       bool store_stats) {
  const char* op = "clip_layer_norm_fwd";
  check_ln_inputs(op, x, weight, bias);
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(-1);
  const int64_t rows = x.numel() / C;
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  const at::Tensor b = bias.to(at::kFloat).contiguous();
  at::Tensor y = at::empty_like(x);
  const auto fopts = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({store_stats ? rows : 0}, fopts);
  at::Tensor rstd = at::empty({store_stats ? rows : 0}, fopts);
  if (rows == 0) return {y, mean, rstd};
  const int blocks = static_cast<int>(std::min<int64_t>(ceil_div(rows, kWarps), static_cast<int64_t>(device_sm_count()) * 32));
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "clip_layer_norm_fwd", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    float* mp = store_stats ? mean.mutable_data_ptr<float>() : nullptr;
    float* rp = store_stats ? rstd.mutable_data_ptr<float>() : nullptr;
    if (can_vectorize<scalar_t>(C, {xp, yp}, {w.const_data_ptr(), b.const_data_ptr()})) {
      layer_norm_fwd_kernel<scalar_t, vec16<scalar_t>()><<<blocks, kThreads, 0, stream>>>(
          xp, w.const_data_ptr<float>(), b.const_data_ptr<float>(), yp, mp, rp, rows, C, static_cast<float>(eps),
          store_stats);
    } else {
      layer_norm_fwd_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(
          xp, w.const_data_ptr<float>(), b.const_data_ptr<float>(), yp, mp, rp, rows, C, static_cast<float>(eps),
          store_stats);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, at::ScalarType weight_grad_dtype, at::ScalarType bias_grad_dtype,
    const std::optional<at::Tensor>& grad_residual) {
  const char* op = "clip_layer_norm_bwd";
  check_contiguous(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dimension, got shape ", x.sizes());
  const int64_t C = x.size(-1);
  const int64_t rows = x.numel() / C;
  check_same_device(grad_y_in, x, op, "grad_y");
  check_numel(grad_y_in, x.numel(), op, "grad_y");
  TORCH_CHECK(grad_y_in.scalar_type() == x.scalar_type(), op, ": grad_y must have the dtype of x (", x.scalar_type(),
              "), got ", grad_y_in.scalar_type());
  check_same_device(weight, x, op, "weight");
  check_numel(weight, C, op, "weight");
  auto check_stat = [&](const at::Tensor& t, const char* name) {
    check_same_device(t, x, op, name);
    check_contiguous(t, op, name);
    check_numel(t, rows, op, name);
    TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  };
  check_stat(mean, "mean");
  check_stat(rstd, "rstd");
  const bool has_residual = grad_residual.has_value() && grad_residual->defined();
  if (has_residual) {
    check_same_device(*grad_residual, x, op, "grad_residual");
    check_numel(*grad_residual, x.numel(), op, "grad_residual");
    TORCH_CHECK(grad_residual->scalar_type() == x.scalar_type(), op, ": grad_residual must have the dtype of x");
  }
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor grad_y = grad_y_in.contiguous();
  at::Tensor dres;
  if (has_residual) dres = grad_residual->contiguous();
  const at::Tensor w = weight.to(at::kFloat).contiguous();
  at::Tensor dx = at::empty_like(x);
  if (rows == 0) {  // two separate tensors: a custom op's outputs must not alias
    return {dx, at::zeros({C}, x.options().dtype(weight_grad_dtype)), at::zeros({C}, x.options().dtype(bias_grad_dtype))};
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor partial_dw, partial_db;
  UV2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "clip_layer_norm_bwd", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.const_data_ptr<scalar_t>();
    const scalar_t* rp = dres.defined() ? dres.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const float* mp = mean.const_data_ptr<float>();
    const float* sp = rstd.const_data_ptr<float>();
    const bool vec = can_vectorize<scalar_t>(C, {xp, gp, rp, dxp}, {w.const_data_ptr()});
    const int blocks =
        static_cast<int>(std::min<int64_t>(ceil_div(rows, kWarps), static_cast<int64_t>(device_sm_count()) * 32));
    if (vec) {
      layer_norm_bwd_dx_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(gp, xp, w.const_data_ptr<float>(), mp,
                                                                            sp, rp, dxp, rows, C);
    } else {
      layer_norm_bwd_dx_kernel<scalar_t, 1><<<blocks, kThreads, 0, stream>>>(gp, xp, w.const_data_ptr<float>(), mp,
                                                                            sp, rp, dxp, rows, C);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int vw = vec ? V : 1;
    const int64_t col_blocks = ceil_div(ceil_div(C, vw), kThreads);
    const RowSplit split = row_split(rows, col_blocks);
    TORCH_CHECK(split.chunks <= 65535, op, ": too many row chunks");
    partial_dw = at::empty({split.chunks, C}, x.options().dtype(at::kFloat));
    partial_db = at::empty({split.chunks, C}, x.options().dtype(at::kFloat));
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(split.chunks));
    const bool vec_partial = vec && aligned_to(partial_dw.const_data_ptr(), sizeof(float) * V) &&
                             aligned_to(partial_db.const_data_ptr(), sizeof(float) * V);
    if (vec_partial) {
      layer_norm_bwd_dwdb_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
          gp, xp, mp, sp, partial_dw.mutable_data_ptr<float>(), partial_db.mutable_data_ptr<float>(), rows, C,
          split.rows_per_chunk);
    } else {
      const dim3 grid1(static_cast<unsigned>(ceil_div(C, kThreads)), static_cast<unsigned>(split.chunks));
      layer_norm_bwd_dwdb_kernel<scalar_t, 1><<<grid1, kThreads, 0, stream>>>(
          gp, xp, mp, sp, partial_dw.mutable_data_ptr<float>(), partial_db.mutable_data_ptr<float>(), rows, C,
          split.rows_per_chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, partial_dw.sum(0).to(weight_grad_dtype), partial_db.sum(0).to(bias_grad_dtype)};
}

}  // namespace uniformerv2

TORCH_LIBRARY_FRAGMENT(uniformerv2_cuda, m) {
  m.def("clip_layer_norm_fwd(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "clip_layer_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor rstd) -> "
      "(Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(uniformerv2_cuda, CUDA, m) {
  m.impl("clip_layer_norm_fwd", &uniformerv2::clip_layer_norm_fwd);
  m.impl("clip_layer_norm_bwd", &uniformerv2::clip_layer_norm_bwd);
}
