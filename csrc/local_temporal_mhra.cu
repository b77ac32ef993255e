// Local temporal MHRA (BatchNorm3d + 1x1 conv + depthwise (3,1,1) temporal conv + 1x1 conv + residual) on
// the stream layout (L, N*T, C): the CUDA backend of uniformerv2_kernels/ops/local_temporal_mhra.py, with the
// inputs and outputs of triton/local_temporal_mhra.py's forward/backward.
//
//   local_temporal_mhra_fwd(x, T, bn_weight, bn_bias, running_mean?, running_var?, conv1_weight, conv1_bias,
//                           dw_weight, dw_bias, conv2_weight, conv2_bias, training, eps, branch_scale?)
//       -> (out, mean, biased var, Y1)
//   local_temporal_mhra_bwd(grad_out, x, y1, mean, var, T, bn_weight, bn_bias, conv1_weight, conv1_bias,
//                           dw_weight, dw_bias, conv2_weight, conv2_bias, training, eps, branch_scale?,
//                           need_branch_scale_grad)
//       -> (dx, d bn_weight, d bn_bias, d conv1_weight, d conv1_bias, d dw_weight, d dw_bias,
//           d conv2_weight, d conv2_bias, d branch_scale or empty)
//
// Patch rows x[1:] are viewed as (M, C), M = (L-1)*N*T, row m = (position, video, frame) with frame
// t = m % T and video (m % NT) / T; the temporal conv mixes rows m-1, m, m+1 (zero outside [0, T)).
// Memory-bound parts are the kernels here; the GEMMs run on cuBLAS through ATen:
//   forward:  BN statistics (training: per-chunk Welford partials, merged in a fixed order), BN folded into
//             conv1 (tiny ATen ops), Y1 = (X - mean) W1'^T (cuBLAS), Z = temporal mix of Y1 + b1' (kernel, rounded to
//             x.dtype like the Triton GEMM operand), acc = Z W2^T (cuBLAS, fp32 output), and the epilogue
//             out = x + branch_scale[video] * (acc + b2) (kernel).
//   backward: dZ = G W2 (cuBLAS); the mix backward (kernel: dY1, Zs = scale * Z recomputed, per-chunk column
//             partial sums for the dw/bias gradients); dW2 = G^T Zs and P = dY1^T (X - mean) (cuBLAS, fp32 out);
//             db2 (kernel, column partials); BN parameter gradients from P (tiny ATen ops); dX = G + dY1 W1'
//             with the BatchNorm-backward correction (cuBLAS, fp32 output, then the epilogue kernel).
// Every reduction is a per-chunk partial buffer summed by torch in a fixed order: no atomics, so two
// backward runs are bitwise equal. fp32 arithmetic and accumulation throughout; int64 offsets.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/mv.h>
#include <ATen/ops/rsqrt.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernel_utils.cuh"

namespace uniformerv2 {
namespace {

// ------------------------------------------------------------------------------------------------------
// kernels

// Per chunk of rows and per channel: Welford mean and sum of squared deviations (M2) of x[r, c].
// grid (channel-group blocks, chunks); a thread owns V consecutive channels.
template <typename T, int V>
__global__ void bn_stats_partial_kernel(const T* __restrict__ x, float* __restrict__ part_mean,
                                        float* __restrict__ part_m2, int64_t M, int64_t C, int64_t rows_per_chunk) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  const int64_t chunk = blockIdx.y;
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = std::min(M, r_begin + rows_per_chunk);
  // statistics of x - x[0]: values near the mean instead of the raw ones, whose |mean| can be ~100x the
  // std in CLIP streams (the updates would round at the mean's magnitude); the combine adds x[0] back
  float mean[V], m2[V], shift[V];
  load_floats<T, V>(x + c0, shift);
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = m2[i] = 0.0f;
  for (int64_t r = r_begin; r < r_end; ++r) {
    const float inv_n = 1.0f / static_cast<float>(r - r_begin + 1);
    float v[V];
    load_floats<T, V>(x + r * C + c0, v);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      v[i] -= shift[i];
      const float d = v[i] - mean[i];
      mean[i] += d * inv_n;
      m2[i] += d * (v[i] - mean[i]);
    }
  }
  store_floats<float, V>(part_mean + chunk * C + c0, mean);
  store_floats<float, V>(part_m2 + chunk * C + c0, m2);
}

// Merges the chunks' partials in chunk order (Chan et al.); mean and biased variance (divisor M).
template <typename T>
__global__ void bn_stats_combine_kernel(const T* __restrict__ x, const float* __restrict__ part_mean,
                                        const float* __restrict__ part_m2, float* __restrict__ mean_out,
                                        float* __restrict__ var_out, int64_t chunks, int64_t M, int64_t C,
                                        int64_t rows_per_chunk) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float mean_a = 0.0f, m2_a = 0.0f;
  for (int64_t r = 0; r < chunks; ++r) {
    const float n_a = static_cast<float>(r * rows_per_chunk);
    const float n_b = static_cast<float>(std::min(M - r * rows_per_chunk, rows_per_chunk));
    const float mean_b = part_mean[r * C + c];
    const float m2_b = part_m2[r * C + c];
    const float frac = n_b / (n_a + n_b);
    const float delta = mean_b - mean_a;
    mean_a += delta * frac;
    m2_a += m2_b + delta * delta * n_a * frac;
  }
  float shift[1];
  load_floats<T, 1>(x + c, shift);
  mean_out[c] = shift[0] + mean_a;  // the partials are of x - x[0]
  var_out[c] = m2_a / static_cast<float>(M);
}

// The temporal mix of row m (fp32, before rounding), from the (already loaded) rows m-1, m, m+1 of Y1:
//   z = w1 (y[m] + kb) + mb  [+ w0 (y[m-1] + kb) if t > 0]  [+ w2 (y[m+1] + kb) if t < T-1]
// The forward and the backward's recomputation use this one function, so they round identically.
__device__ __forceinline__ float temporal_mix(float prev, float cur, float next, bool has_prev, bool has_next,
                                              float kb, float w0, float w1, float w2, float mb) {
  float z = w1 * (cur + kb) + mb;
  if (has_prev) z += w0 * (prev + kb);
  if (has_next) z += w2 * (next + kb);
  return z;
}

// Z[m, k] = round(temporal_mix of Y1 + k_bias); (M, K) row-major, K % V == 0 when V > 1.
template <typename T, int V>
__global__ void temporal_mix_fwd_kernel(const T* __restrict__ y1, const float* __restrict__ k_bias,
                                        const float* __restrict__ mix_w, const float* __restrict__ mix_b,
                                        T* __restrict__ z, int64_t M, int64_t K, int64_t frames) {
  const int64_t packs_per_row = K / V;
  const int64_t packs = M * packs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t m = p / packs_per_row;
    const int64_t k0 = (p % packs_per_row) * V;
    const int64_t t = m % frames;
    const bool has_prev = t > 0;
    const bool has_next = t < frames - 1;
    float cur[V], prev[V], next[V], out[V];
    load_floats<T, V>(y1 + m * K + k0, cur);
#pragma unroll
    for (int i = 0; i < V; ++i) prev[i] = next[i] = 0.0f;
    if (has_prev) load_floats<T, V>(y1 + (m - 1) * K + k0, prev);
    if (has_next) load_floats<T, V>(y1 + (m + 1) * K + k0, next);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const int64_t k = k0 + i;
      out[i] = temporal_mix(prev[i], cur[i], next[i], has_prev, has_next, k_bias[k], mix_w[k * 3 + 0],
                            mix_w[k * 3 + 1], mix_w[k * 3 + 2], mix_b[k]);
    }
    store_floats<T, V>(z + m * K + k0, out);
  }
}

// out[m, n] = round(((acc[m, n] + col_bias[n]) * row_scale[video(m)]) + res[m, n] + col_coef[n] * e[m, n]),
// the row scale and the e term optional (null pointers). acc fp32; (M, N) row-major, N % V == 0 if V > 1.
template <typename T, int V>
__global__ void rows_epilogue_kernel(const float* __restrict__ acc, const float* __restrict__ col_bias,
                                     const float* __restrict__ row_scale, const T* __restrict__ res,
                                     const float* __restrict__ col_coef, const T* __restrict__ e,
                                     T* __restrict__ out, int64_t M, int64_t N, int64_t frames, int64_t NT) {
  const int64_t packs_per_row = N / V;
  const int64_t packs = M * packs_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < packs; p += stride) {
    const int64_t m = p / packs_per_row;
    const int64_t n0 = (p % packs_per_row) * V;
    const int64_t off = m * N + n0;
    float a[V], r[V], b[V];
    load_floats<float, V>(acc + off, a);
    load_floats<float, V>(col_bias + n0, b);
    load_floats<T, V>(res + off, r);
#pragma unroll
    for (int i = 0; i < V; ++i) a[i] += b[i];
    if (row_scale != nullptr) {
      const float s = row_scale[(m % NT) / frames];
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] *= s;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) a[i] += r[i];
    if (e != nullptr) {
      float ev[V], cv[V];
      load_floats<T, V>(e + off, ev);
      load_floats<float, V>(col_coef + n0, cv);
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] += cv[i] * ev[i];
    }
    store_floats<T, V>(out + off, a);
  }
}

// Backward of the temporal mix over a chunk of rows, for V channels per thread; grid (channel blocks,
// chunks). With D = row_scale[video(m)] (1 without) and dz = G W2 (unscaled):
//   dY1[m] = w0 D dz[m+1] + w1 D dz[m] + w2 D dz[m-1]  (taps outside the clip dropped)
//   Zs[m]  = round(D * round(Z[m]))                    (Z recomputed from Y1, as in the forward)
//   part[chunk, 0..4, k] = sums over the chunk of (D dz, D dz y[m-1], D dz y[m], D dz y[m+1], dY1),
// y = Y1 + k_bias (zero outside the clip): the gradients of dw_bias, the three taps and b1'.
template <typename T, int V>
__global__ void temporal_mix_bwd_kernel(const T* __restrict__ dz, const T* __restrict__ y1,
                                        const float* __restrict__ k_bias, const float* __restrict__ mix_w,
                                        const float* __restrict__ mix_b, const float* __restrict__ row_scale,
                                        T* __restrict__ dy1, T* __restrict__ zs, float* __restrict__ part, int64_t M,
                                        int64_t K, int64_t frames, int64_t NT, int64_t rows_per_chunk) {
  const int64_t k0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (k0 >= K) return;
  const int64_t chunk = blockIdx.y;
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = std::min(M, r_begin + rows_per_chunk);
  float kb[V], w0[V], w1[V], w2[V], mb[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    kb[i] = k_bias[k0 + i];
    w0[i] = mix_w[(k0 + i) * 3 + 0];
    w1[i] = mix_w[(k0 + i) * 3 + 1];
    w2[i] = mix_w[(k0 + i) * 3 + 2];
    mb[i] = mix_b[k0 + i];
  }
  float acc_db[V], acc_w0[V], acc_w1[V], acc_w2[V], acc_b1[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc_db[i] = acc_w0[i] = acc_w1[i] = acc_w2[i] = acc_b1[i] = 0.0f;
  for (int64_t m = r_begin; m < r_end; ++m) {
    const int64_t t = m % frames;
    const bool has_prev = t > 0;
    const bool has_next = t < frames - 1;
    const float scale = row_scale != nullptr ? row_scale[(m % NT) / frames] : 1.0f;
    const int64_t off = m * K + k0;
    float g[V], g_prev[V], g_next[V], y_cur[V], y_prev[V], y_next[V], o_dy1[V], o_zs[V];
#pragma unroll
    for (int i = 0; i < V; ++i) g_prev[i] = g_next[i] = y_prev[i] = y_next[i] = 0.0f;
    load_floats<T, V>(dz + off, g);
    load_floats<T, V>(y1 + off, y_cur);
    if (has_prev) {
      load_floats<T, V>(dz + off - K, g_prev);
      load_floats<T, V>(y1 + off - K, y_prev);
    }
    if (has_next) {
      load_floats<T, V>(dz + off + K, g_next);
      load_floats<T, V>(y1 + off + K, y_next);
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float z = round_to<T>(temporal_mix(y_prev[i], y_cur[i], y_next[i], has_prev, has_next, kb[i], w0[i],
                                               w1[i], w2[i], mb[i]));
      const float d = g[i] * scale;
      const float d_prev = g_prev[i] * scale;  // rows m-1 and m+1 of the clip belong to the same video
      const float d_next = g_next[i] * scale;
      const float yc = y_cur[i] + kb[i];
      const float yp = has_prev ? y_prev[i] + kb[i] : 0.0f;
      const float yn = has_next ? y_next[i] + kb[i] : 0.0f;
      // dY1 as stored (rounded to T): the BatchNorm backward subtracts these sums from dY1 W1', and both
      // sides must see the same values or the cancellation leaves rounding noise.
      const float dy = round_to<T>(w0[i] * d_next + w1[i] * d + w2[i] * d_prev);
      o_dy1[i] = dy;
      o_zs[i] = z * scale;
      acc_db[i] += d;
      acc_w0[i] += d * yp;
      acc_w1[i] += d * yc;
      acc_w2[i] += d * yn;
      acc_b1[i] += dy;
    }
    store_floats<T, V>(dy1 + off, o_dy1);
    store_floats<T, V>(zs + off, o_zs);
  }
  float* base = part + chunk * 5 * K + k0;
  store_floats<float, V>(base, acc_db);
  store_floats<float, V>(base + K, acc_w0);
  store_floats<float, V>(base + 2 * K, acc_w1);
  store_floats<float, V>(base + 3 * K, acc_w2);
  store_floats<float, V>(base + 4 * K, acc_b1);
}

// rowdot[m] = sum_k dz[m, k] * round(Z[m, k]) (the branch-scale gradient's per-row part); a warp per row.
template <typename T>
__global__ void mix_rowdot_kernel(const T* __restrict__ dz, const T* __restrict__ y1, const float* __restrict__ k_bias,
                                  const float* __restrict__ mix_w, const float* __restrict__ mix_b,
                                  float* __restrict__ rowdot, int64_t M, int64_t K, int64_t frames) {
  const int lane = threadIdx.x % 32;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t m = warp; m < M; m += warp_stride) {
    const int64_t t = m % frames;
    const bool has_prev = t > 0;
    const bool has_next = t < frames - 1;
    float s = 0.0f;
    for (int64_t k = lane; k < K; k += 32) {
      const int64_t off = m * K + k;
      const float prev = has_prev ? static_cast<float>(y1[off - K]) : 0.0f;
      const float next = has_next ? static_cast<float>(y1[off + K]) : 0.0f;
      const float z = round_to<T>(temporal_mix(prev, static_cast<float>(y1[off]), next, has_prev, has_next, k_bias[k],
                                               mix_w[k * 3 + 0], mix_w[k * 3 + 1], mix_w[k * 3 + 2], mix_b[k]));
      s += static_cast<float>(dz[off]) * z;
    }
    s = warp_sum(s);
    if (lane == 0) rowdot[m] = s;
  }
}

// part[chunk, c] = sum over the chunk's rows of row_scale[video(m)] * g[m, c]; grid (channel blocks, chunks).
template <typename T, int V>
__global__ void scaled_column_sum_kernel(const T* __restrict__ g, const float* __restrict__ row_scale,
                                         float* __restrict__ part, int64_t M, int64_t C, int64_t frames, int64_t NT,
                                         int64_t rows_per_chunk) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V;
  if (c0 >= C) return;
  const int64_t chunk = blockIdx.y;
  const int64_t r_begin = chunk * rows_per_chunk;
  const int64_t r_end = std::min(M, r_begin + rows_per_chunk);
  float acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0.0f;
  for (int64_t m = r_begin; m < r_end; ++m) {
    float v[V];
    load_floats<T, V>(g + m * C + c0, v);
    const float s = row_scale != nullptr ? row_scale[(m % NT) / frames] : 1.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] += v[i] * s;
  }
  store_floats<float, V>(part + chunk * C + c0, acc);
}

// ------------------------------------------------------------------------------------------------------
// launchers

bool all_aligned(std::initializer_list<const void*> ptrs, size_t bytes) {
  for (const void* p : ptrs)
    if (p != nullptr && !aligned_to(p, bytes)) return false;
  return true;
}

std::pair<at::Tensor, at::Tensor> bn_stats(const at::Tensor& xp) {
  const int64_t M = xp.size(0);
  const int64_t C = xp.size(1);
  const auto fopts = xp.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({C}, fopts);
  at::Tensor var = at::empty({C}, fopts);
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(xp.scalar_type(), "local_temporal_mhra_fwd", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* xptr = xp.const_data_ptr<scalar_t>();
    const bool vec = C % V == 0 && aligned_to(xptr, 16);
    const int vw = vec ? V : 1;
    const int64_t col_blocks = ceil_div(ceil_div(C, vw), kThreads);
    const RowSplit split = row_split(M, col_blocks);
    TORCH_CHECK(split.chunks <= 65535, "local_temporal_mhra_fwd: too many row chunks");
    at::Tensor part_mean = at::empty({split.chunks, C}, fopts);
    at::Tensor part_m2 = at::empty({split.chunks, C}, fopts);
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(split.chunks));
    if (vec && all_aligned({part_mean.const_data_ptr(), part_m2.const_data_ptr()}, sizeof(float) * V)) {
      bn_stats_partial_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
          xptr, part_mean.mutable_data_ptr<float>(), part_m2.mutable_data_ptr<float>(), M, C, split.rows_per_chunk);
    } else {
      const dim3 grid1(static_cast<unsigned>(ceil_div(C, kThreads)), static_cast<unsigned>(split.chunks));
      bn_stats_partial_kernel<scalar_t, 1><<<grid1, kThreads, 0, stream>>>(
          xptr, part_mean.mutable_data_ptr<float>(), part_m2.mutable_data_ptr<float>(), M, C, split.rows_per_chunk);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_stats_combine_kernel<scalar_t><<<static_cast<unsigned>(ceil_div(C, kThreads)), kThreads, 0, stream>>>(
        xptr, part_mean.const_data_ptr<float>(), part_m2.const_data_ptr<float>(), mean.mutable_data_ptr<float>(),
        var.mutable_data_ptr<float>(), split.chunks, M, C, split.rows_per_chunk);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

at::Tensor temporal_mix_forward(const at::Tensor& y1, const at::Tensor& k_bias, const at::Tensor& mix_w,
                                const at::Tensor& mix_b, int64_t frames) {
  const int64_t M = y1.size(0);
  const int64_t K = y1.size(1);
  at::Tensor z = at::empty_like(y1);
  if (M * K == 0) return z;
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(y1.scalar_type(), "local_temporal_mhra_fwd", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* yp = y1.const_data_ptr<scalar_t>();
    scalar_t* zp = z.mutable_data_ptr<scalar_t>();
    if (K % V == 0 && all_aligned({yp, zp}, 16)) {
      temporal_mix_fwd_kernel<scalar_t, V><<<grid_for(M * K / V, kThreads), kThreads, 0, stream>>>(
          yp, k_bias.const_data_ptr<float>(), mix_w.const_data_ptr<float>(), mix_b.const_data_ptr<float>(), zp, M,
          K, frames);
    } else {
      temporal_mix_fwd_kernel<scalar_t, 1><<<grid_for(M * K, kThreads), kThreads, 0, stream>>>(
          yp, k_bias.const_data_ptr<float>(), mix_w.const_data_ptr<float>(), mix_b.const_data_ptr<float>(), zp, M,
          K, frames);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return z;
}

// out (M, N), a row-major view into a contiguous tensor; see rows_epilogue_kernel.
void rows_epilogue(const at::Tensor& acc, const at::Tensor& col_bias, const at::Tensor& row_scale,
                   const at::Tensor& res, const at::Tensor& col_coef, const at::Tensor& e, at::Tensor& out,
                   int64_t frames, int64_t NT) {
  const int64_t M = acc.size(0);
  const int64_t N = acc.size(1);
  if (M * N == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  UV2_DISPATCH_FLOAT_HALF_BF16(out.scalar_type(), "local_temporal_mhra", [&] {
    constexpr int V = vec16<scalar_t>();
    const float* ap = acc.const_data_ptr<float>();
    const float* bp = col_bias.const_data_ptr<float>();
    const float* sp = row_scale.defined() ? row_scale.const_data_ptr<float>() : nullptr;
    const scalar_t* rp = res.const_data_ptr<scalar_t>();
    const float* cp = col_coef.defined() ? col_coef.const_data_ptr<float>() : nullptr;
    const scalar_t* ep = e.defined() ? e.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const bool vec = N % V == 0 && all_aligned({rp, ep, op}, 16) && all_aligned({ap, bp, cp}, sizeof(float) * V);
    if (vec) {
      rows_epilogue_kernel<scalar_t, V><<<grid_for(M * N / V, kThreads), kThreads, 0, stream>>>(
          ap, bp, sp, rp, cp, ep, op, M, N, frames, NT);
    } else {
      rows_epilogue_kernel<scalar_t, 1><<<grid_for(M * N, kThreads), kThreads, 0, stream>>>(
          ap, bp, sp, rp, cp, ep, op, M, N, frames, NT);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// a @ b with an fp32 result (cuBLAS accumulates in fp32; no rounding of the result to 16 bits).
at::Tensor mm_fp32_out(const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() == at::kFloat) return at::mm(a, b);
  return at::mm(a, b, at::kFloat);
}

// X - mean per channel, computed in fp32 and stored in X's dtype.
at::Tensor centre(const at::Tensor& xp, const at::Tensor& mean) {
  return xp.to(at::kFloat).sub(mean.unsqueeze(0)).to(xp.scalar_type()).contiguous();
}

struct Folded {
  at::Tensor rstd, s, w1, w1_folded, b1_folded;
};

// BatchNorm folded into the first 1x1 conv, applied to the centred rows X - mean:
// Y1 = (X - mean) W1'^T + b1', W1' = W1 * (gamma * rstd) per input channel (in dtype), b1' = b1 + W1 beta
// (fp32). Folding the mean into b1' instead cancels when a channel's |mean| >> std (CLIP streams).
Folded fold(const at::Tensor& mean, const at::Tensor& var, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
            const at::Tensor& conv1_weight, const at::Tensor& conv1_bias, double eps, at::ScalarType dtype, int64_t Cp,
            int64_t C) {
  Folded f;
  f.rstd = at::rsqrt(var.add(eps));
  f.s = bn_weight.to(at::kFloat).mul(f.rstd);
  f.w1 = conv1_weight.reshape({Cp, C}).to(at::kFloat);
  f.w1_folded = f.w1.mul(f.s).to(dtype).contiguous();
  f.b1_folded = conv1_bias.to(at::kFloat).add(at::mv(f.w1, bn_bias.to(at::kFloat))).contiguous();
  return f;
}

struct MhraShapes {
  int64_t L, NT, C, M, Cp, N;
};

MhraShapes check_mhra(const char* op, const at::Tensor& x, int64_t frames, const at::Tensor& bn_weight,
                      const at::Tensor& bn_bias, const at::Tensor& conv1_weight, const at::Tensor& conv1_bias,
                      const at::Tensor& dw_weight, const at::Tensor& dw_bias, const at::Tensor& conv2_weight,
                      const at::Tensor& conv2_bias, const std::optional<at::Tensor>& branch_scale) {
  check_contiguous(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 3, op, ": x must be (L, N*T, C), got shape ", x.sizes());
  TORCH_CHECK(frames > 0, op, ": T must be positive, got ", frames);
  const int64_t L = x.size(0), NT = x.size(1), C = x.size(2);
  TORCH_CHECK(L >= 2, op, ": x needs L >= 2 (a class token and patch tokens), got shape ", x.sizes());
  TORCH_CHECK(NT > 0 && NT % frames == 0, op, ": x dimension 1 (N*T = ", NT, ") must be a positive multiple of T = ",
              frames);
  TORCH_CHECK(C > 0, op, ": x must have C > 0 channels");
  check_same_device(conv1_weight, x, op, "conv1_weight");
  TORCH_CHECK(conv1_weight.dim() >= 2 && conv1_weight.numel() == conv1_weight.size(0) * C && conv1_weight.size(0) > 0,
              op, ": conv1_weight must be (C', C, 1, 1, 1) with C = ", C, ", got ", conv1_weight.sizes());
  const int64_t Cp = conv1_weight.size(0);
  const std::pair<const at::Tensor*, std::pair<const char*, int64_t>> params[] = {
      {&bn_weight, {"bn_weight", C}},     {&bn_bias, {"bn_bias", C}},       {&conv1_bias, {"conv1_bias", Cp}},
      {&dw_weight, {"dw_weight", Cp * 3}}, {&dw_bias, {"dw_bias", Cp}},     {&conv2_weight, {"conv2_weight", C * Cp}},
      {&conv2_bias, {"conv2_bias", C}}};
  for (const auto& [t, name_numel] : params) {
    check_same_device(*t, x, op, name_numel.first);
    check_numel(*t, name_numel.second, op, name_numel.first);
  }
  if (branch_scale.has_value() && branch_scale->defined()) {
    check_same_device(*branch_scale, x, op, "branch_scale");
    check_numel(*branch_scale, NT / frames, op, "branch_scale");
  }
  return {L, NT, C, (L - 1) * NT, Cp, NT / frames};
}

// ------------------------------------------------------------------------------------------------------
// ops

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> local_temporal_mhra_fwd(
    const at::Tensor& x, int64_t T, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
    const at::Tensor& conv1_weight, const at::Tensor& conv1_bias, const at::Tensor& dw_weight,
    const at::Tensor& dw_bias, const at::Tensor& conv2_weight, const at::Tensor& conv2_bias, bool training,
    double eps, const std::optional<at::Tensor>& branch_scale) {
  const char* op = "local_temporal_mhra_fwd";
  const MhraShapes sh = check_mhra(op, x, T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
                                   conv2_weight, conv2_bias, branch_scale);
  const int64_t C = sh.C, Cp = sh.Cp, M = sh.M;
  if (training) {
    TORCH_CHECK(M > 1, op, ": expected more than 1 value per channel when training, got ", M, " patch rows");
  } else {
    TORCH_CHECK(running_mean.has_value() && running_mean->defined(), op, ": running_mean is required in eval mode");
    TORCH_CHECK(running_var.has_value() && running_var->defined(), op, ": running_var is required in eval mode");
    check_same_device(*running_mean, x, op, "running_mean");
    check_same_device(*running_var, x, op, "running_var");
    check_numel(*running_mean, C, op, "running_mean");
    check_numel(*running_var, C, op, "running_var");
  }
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dtype = x.scalar_type();
  const at::Tensor xp = x.narrow(0, 1, sh.L - 1).view({M, C});
  at::Tensor mean, var;
  if (training) {
    std::tie(mean, var) = bn_stats(xp);
  } else {
    mean = fresh(running_mean->reshape({C}), at::kFloat);
    var = fresh(running_var->reshape({C}), at::kFloat);
  }
  const Folded f = fold(mean, var, bn_weight, bn_bias, conv1_weight, conv1_bias, eps, dtype, Cp, C);
  at::Tensor y1 = at::mm(centre(xp, mean), f.w1_folded.t());  // (M, C') cuBLAS
  const at::Tensor mix_w = dw_weight.reshape({Cp, 3}).to(at::kFloat).contiguous();
  const at::Tensor mix_b = dw_bias.to(at::kFloat).contiguous();
  at::Tensor z = temporal_mix_forward(y1, f.b1_folded, mix_w, mix_b, T);
  const at::Tensor w2 = conv2_weight.reshape({C, Cp}).to(dtype);
  at::Tensor acc = mm_fp32_out(z, w2.t());  // (M, C) fp32
  z.reset();
  at::Tensor out = at::empty_like(x);
  out.select(0, 0).copy_(x.select(0, 0));
  at::Tensor out_rows = out.narrow(0, 1, sh.L - 1).view({M, C});
  at::Tensor scale;
  if (branch_scale.has_value() && branch_scale->defined()) scale = branch_scale->to(at::kFloat).contiguous();
  rows_epilogue(acc, conv2_bias.to(at::kFloat).contiguous(), scale, xp, at::Tensor(), at::Tensor(), out_rows, T, sh.NT);
  return {out, mean, var, y1};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
local_temporal_mhra_bwd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y1_in,
                        const at::Tensor& mean_in, const at::Tensor& var_in, int64_t T, const at::Tensor& bn_weight,
                        const at::Tensor& bn_bias, const at::Tensor& conv1_weight, const at::Tensor& conv1_bias,
                        const at::Tensor& dw_weight, const at::Tensor& dw_bias, const at::Tensor& conv2_weight,
                        const at::Tensor& conv2_bias, bool training, double eps,
                        const std::optional<at::Tensor>& branch_scale, bool need_branch_scale_grad) {
  const char* op = "local_temporal_mhra_bwd";
  const MhraShapes sh = check_mhra(op, x, T, bn_weight, bn_bias, conv1_weight, conv1_bias, dw_weight, dw_bias,
                                   conv2_weight, conv2_bias, branch_scale);
  const int64_t C = sh.C, Cp = sh.Cp, M = sh.M, NT = sh.NT;
  const auto dtype = x.scalar_type();
  check_same_device(grad_out, x, op, "grad_out");
  check_numel(grad_out, x.numel(), op, "grad_out");
  TORCH_CHECK(grad_out.scalar_type() == dtype, op, ": grad_out must have the dtype of x");
  check_same_device(y1_in, x, op, "y1");
  check_numel(y1_in, M * Cp, op, "y1");
  TORCH_CHECK(y1_in.scalar_type() == dtype, op, ": y1 must have the dtype of x");
  check_same_device(mean_in, x, op, "mean");
  check_same_device(var_in, x, op, "var");
  check_numel(mean_in, C, op, "mean");
  check_numel(var_in, C, op, "var");
  const bool has_scale = branch_scale.has_value() && branch_scale->defined();
  TORCH_CHECK(!need_branch_scale_grad || has_scale, op, ": need_branch_scale_grad needs a branch_scale");
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = x.options().dtype(at::kFloat);

  const at::Tensor g = grad_out.contiguous();
  const at::Tensor gp = g.narrow(0, 1, sh.L - 1).view({M, C});
  const at::Tensor xp = x.narrow(0, 1, sh.L - 1).view({M, C});
  const at::Tensor y1 = y1_in.contiguous().view({M, Cp});
  const at::Tensor mean = mean_in.to(at::kFloat).reshape({C});
  const at::Tensor var = var_in.to(at::kFloat).reshape({C});
  const Folded f = fold(mean, var, bn_weight, bn_bias, conv1_weight, conv1_bias, eps, dtype, Cp, C);
  const at::Tensor w2 = conv2_weight.reshape({C, Cp}).to(dtype);
  at::Tensor scale;
  if (has_scale) scale = branch_scale->to(at::kFloat).contiguous();
  const at::Tensor mix_w = dw_weight.reshape({Cp, 3}).to(at::kFloat).contiguous();
  const at::Tensor mix_b = dw_bias.to(at::kFloat).contiguous();

  const at::Tensor dz = at::mm(gp, w2);  // (M, C') cuBLAS
  at::Tensor dy1 = at::empty({M, Cp}, x.options());
  at::Tensor zs = at::empty({M, Cp}, x.options());
  at::Tensor part, rowdot, part_c;
  UV2_DISPATCH_FLOAT_HALF_BF16(dtype, "local_temporal_mhra_bwd", [&] {
    constexpr int V = vec16<scalar_t>();
    const scalar_t* dzp = dz.const_data_ptr<scalar_t>();
    const scalar_t* yp = y1.const_data_ptr<scalar_t>();
    const float* sp = has_scale ? scale.const_data_ptr<float>() : nullptr;
    scalar_t* dy1p = dy1.mutable_data_ptr<scalar_t>();
    scalar_t* zsp = zs.mutable_data_ptr<scalar_t>();
    // mix backward
    {
      const bool vec = Cp % V == 0 && all_aligned({dzp, yp, dy1p, zsp}, 16);
      const int vw = vec ? V : 1;
      const int64_t k_blocks = ceil_div(ceil_div(Cp, vw), kThreads);
      const RowSplit split = row_split(M, k_blocks);
      TORCH_CHECK(split.chunks <= 65535, op, ": too many row chunks");
      part = at::empty({split.chunks, 5, Cp}, fopts);
      const dim3 grid(static_cast<unsigned>(k_blocks), static_cast<unsigned>(split.chunks));
      if (vec && aligned_to(part.const_data_ptr(), sizeof(float) * V)) {
        temporal_mix_bwd_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
            dzp, yp, f.b1_folded.const_data_ptr<float>(), mix_w.const_data_ptr<float>(),
            mix_b.const_data_ptr<float>(), sp, dy1p, zsp, part.mutable_data_ptr<float>(), M, Cp, T, NT,
            split.rows_per_chunk);
      } else {
        const dim3 grid1(static_cast<unsigned>(ceil_div(Cp, kThreads)), static_cast<unsigned>(split.chunks));
        temporal_mix_bwd_kernel<scalar_t, 1><<<grid1, kThreads, 0, stream>>>(
            dzp, yp, f.b1_folded.const_data_ptr<float>(), mix_w.const_data_ptr<float>(),
            mix_b.const_data_ptr<float>(), sp, dy1p, zsp, part.mutable_data_ptr<float>(), M, Cp, T, NT,
            split.rows_per_chunk);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // per-row dot products for the branch-scale gradient
    if (need_branch_scale_grad) {
      rowdot = at::empty({M}, fopts);
      const int blocks = static_cast<int>(
          std::min<int64_t>(ceil_div(M, kThreads / 32), static_cast<int64_t>(device_sm_count()) * 32));
      mix_rowdot_kernel<scalar_t><<<std::max(blocks, 1), kThreads, 0, stream>>>(
          dzp, yp, f.b1_folded.const_data_ptr<float>(), mix_w.const_data_ptr<float>(), mix_b.const_data_ptr<float>(),
          rowdot.mutable_data_ptr<float>(), M, Cp, T);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // db2 partials: column sums of the scaled output gradient
    {
      const scalar_t* gpp = gp.const_data_ptr<scalar_t>();
      const bool vec = C % V == 0 && aligned_to(gpp, 16);
      const int vw = vec ? V : 1;
      const int64_t c_blocks = ceil_div(ceil_div(C, vw), kThreads);
      const RowSplit split = row_split(M, c_blocks);
      TORCH_CHECK(split.chunks <= 65535, op, ": too many row chunks");
      part_c = at::empty({split.chunks, C}, fopts);
      const dim3 grid(static_cast<unsigned>(c_blocks), static_cast<unsigned>(split.chunks));
      if (vec && aligned_to(part_c.const_data_ptr(), sizeof(float) * V)) {
        scaled_column_sum_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(
            gpp, sp, part_c.mutable_data_ptr<float>(), M, C, T, NT, split.rows_per_chunk);
      } else {
        const dim3 grid1(static_cast<unsigned>(ceil_div(C, kThreads)), static_cast<unsigned>(split.chunks));
        scaled_column_sum_kernel<scalar_t, 1><<<grid1, kThreads, 0, stream>>>(
            gpp, sp, part_c.mutable_data_ptr<float>(), M, C, T, NT, split.rows_per_chunk);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const at::Tensor sums = part.sum(0);  // (5, C') in a fixed order
  const at::Tensor d_dw_bias = sums.select(0, 0);
  const at::Tensor d_dw_weight = sums.narrow(0, 1, 3).t();  // (C', 3)
  const at::Tensor d_b1_folded = sums.select(0, 4).contiguous();
  const at::Tensor d_b2 = part_c.sum(0);

  const at::Tensor d_w2 = mm_fp32_out(gp.t(), zs);  // (C, C')
  zs.reset();
  // BatchNorm and conv1 parameters from P = dY1^T (X - mean) (fp32, C' x C); X centred first, as in the forward.
  const at::Tensor xc = centre(xp, mean);
  const at::Tensor p = mm_fp32_out(dy1.t(), xc);
  const at::Tensor d_s = f.w1.mul(p).sum(0);
  const at::Tensor d_bn_weight = d_s.mul(f.rstd);
  const at::Tensor d_bn_bias = at::mv(f.w1.t(), d_b1_folded);
  const at::Tensor d_w1 = p.mul(f.s).add(d_b1_folded.unsqueeze(1).mul(bn_bias.to(at::kFloat).unsqueeze(0)));

  at::Tensor dx = at::empty_like(x);
  dx.select(0, 0).copy_(g.select(0, 0));
  at::Tensor dx_rows = dx.narrow(0, 1, sh.L - 1).view({M, C});
  const at::Tensor acc = mm_fp32_out(dy1, f.w1_folded);  // (M, C) fp32
  if (training) {
    // dX = G + dY1 W1' - s * (dbeta + (x - mean) * rstd * dgamma) / M
    const double inv_m = 1.0 / static_cast<double>(M);
    const at::Tensor coef = f.s.mul(f.rstd).mul(d_bn_weight).mul(inv_m);
    // s * dbeta taken with the rounded W1' the GEMM used, so the rows of dX sum as they should.
    const at::Tensor col_bias = at::mv(f.w1_folded.to(at::kFloat).t(), d_b1_folded).mul(inv_m).neg().contiguous();
    rows_epilogue(acc, col_bias, at::Tensor(), gp, coef.neg().contiguous(), xc, dx_rows, T, NT);
  } else {
    rows_epilogue(acc, at::zeros({C}, fopts), at::Tensor(), gp, at::Tensor(), at::Tensor(), dx_rows, T, NT);
  }

  at::Tensor d_branch_scale = at::empty({0}, x.options());
  if (need_branch_scale_grad) {
    const at::Tensor per_row = rowdot.add(at::mv(gp.to(at::kFloat), conv2_bias.to(at::kFloat)));
    d_branch_scale = per_row.view({sh.L - 1, sh.N, T}).sum(at::IntArrayRef{0, 2}).to(branch_scale->scalar_type());
  }
  return {dx,
          fresh(d_bn_weight, bn_weight.scalar_type()),
          fresh(d_bn_bias, bn_bias.scalar_type()),
          fresh(d_w1, conv1_weight.scalar_type()).view(conv1_weight.sizes()),
          fresh(d_b1_folded, conv1_bias.scalar_type()),
          fresh(d_dw_weight, dw_weight.scalar_type()).view(dw_weight.sizes()),
          fresh(d_dw_bias, dw_bias.scalar_type()),
          fresh(d_w2, conv2_weight.scalar_type()).view(conv2_weight.sizes()),
          fresh(d_b2, conv2_bias.scalar_type()),
          d_branch_scale};
}

}  // namespace
}  // namespace uniformerv2

TORCH_LIBRARY_FRAGMENT(uniformerv2_cuda, m) {
  m.def(
      "local_temporal_mhra_fwd(Tensor x, int T, Tensor bn_weight, Tensor bn_bias, Tensor? running_mean, "
      "Tensor? running_var, Tensor conv1_weight, Tensor conv1_bias, Tensor dw_weight, Tensor dw_bias, "
      "Tensor conv2_weight, Tensor conv2_bias, bool training, float eps, Tensor? branch_scale) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "local_temporal_mhra_bwd(Tensor grad_out, Tensor x, Tensor y1, Tensor mean, Tensor var, int T, "
      "Tensor bn_weight, Tensor bn_bias, Tensor conv1_weight, Tensor conv1_bias, Tensor dw_weight, Tensor dw_bias, "
      "Tensor conv2_weight, Tensor conv2_bias, bool training, float eps, Tensor? branch_scale, "
      "bool need_branch_scale_grad) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(uniformerv2_cuda, CUDA, m) {
  m.impl("local_temporal_mhra_fwd", &uniformerv2::local_temporal_mhra_fwd);
  m.impl("local_temporal_mhra_bwd", &uniformerv2::local_temporal_mhra_bwd);
}
