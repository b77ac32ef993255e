// Global UniBlock attention: DPE + ln_3 + folded one-query cross-attention (DESIGN.md section 3), the CUDA
// backend of uniformerv2_kernels/ops/global_query_attention.py, with the inputs and outputs of
// triton/global_query_attention.py's forward/backward.
//
//   global_query_attention_fwd(x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
//                              in_proj_bias, num_heads, eps) -> (out (1, N, C), z (N, H, C) fp32, lse (N, H) fp32)
//   global_query_attention_bwd(grad_out, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
//                              in_proj_bias, z, lse, num_heads, eps)
//       -> grads of (x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias)
//
// Math and names as in reference/global_query_attention.py: per video n the S = T*L tokens are the keys;
// token j = l*T + t is row l*(N*T) + n*T + t of x (L, N*T, C); xhat_j = LayerNorm without affine of the DPE
// output; u_h = gamma * W_k,h^T q_h / sqrt(d); scores s_h(j) = u_h . xhat_j; z_h = sum_j a_h(j) xhat_j;
// out_h = W_v,h (gamma z_h + beta) + b_v,h.
//
// Kernels (one block of 256 threads per (video, token split); a tile of BS tokens at a time in shared memory):
//   gqa_forward_partial_kernel: per tile, one warp per token computes the DPE (27 taps on the fly, class
//     tokens untouched) and the LayerNorm into shared memory; one warp per head computes the tile's scores;
//     one thread per head runs the online softmax (base 2); one thread per channel updates the (H, C)
//     accumulator in shared memory. Writes flash-decoding partials (max, sum, acc) per split.
//   gqa_merge_kernel: merges the splits in order: z and lse.
//   gqa_backward_tokens_kernel: recomputes xhat per tile, a_h(j) from lse, ds_h(j) = a (dz_h . xhat_j - D_h),
//     du_h += sum_j ds_h(j) xhat_j (shared (H, C) accumulator, written per split), dxhat and the LayerNorm
//     backward to dy (fp32 buffer in the layout of x).
//   gqa_backward_dpe_kernel: one thread per channel: dx = dy + sum_k w_k dy(neighbour), and per-split partial
//     dw_k, db.
// The O(N C^2) per-video algebra (folded query, value projection, query-path gradients) is ATen (cuBLAS).
// Every cross-block reduction is a partial buffer summed in a fixed order: deterministic, no atomics.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/einsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>

#include "kernel_utils.cuh"

namespace uniformerv2 {
namespace {

constexpr int kMaxTile = 8;  // tokens per tile (reduced when shared memory is short)
constexpr int kDpeThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegBig = -1.0e30f;

struct Dims {
  int64_t T;   // frames per video
  int64_t NT;  // N * T (dimension 1 of x)
  int64_t C;
  int64_t H;
  int64_t W;  // patch grid side, L = 1 + W * W
  int64_t S;  // tokens per video, T * L
};

// Bit k of the result is set when DPE tap k (k = kt*9 + kh*3 + kw, offsets kt-1, kh-1, kw-1 in time and
// space) of a patch token at (t, hh, ww) reads a patch token inside the clip. sign = +1 for the forward
// (the tap reads position + offset), -1 for the backward (position - offset).
__device__ __forceinline__ uint32_t dpe_tap_mask(int64_t t, int64_t hh, int64_t ww, int64_t T, int64_t W, int sign) {
  uint32_t mask = 0;
#pragma unroll
  for (int k = 0; k < 27; ++k) {
    const int64_t tt = t + sign * (k / 9 - 1);
    const int64_t h2 = hh + sign * ((k / 3) % 3 - 1);
    const int64_t w2 = ww + sign * (k % 3 - 1);
    if (tt >= 0 && tt < T && h2 >= 0 && h2 < W && w2 >= 0 && w2 < W) mask |= (1u << k);
  }
  return mask;
}

// Element offset, relative to a token's own element, of the token that tap k reads (forward direction).
__device__ __forceinline__ int64_t dpe_tap_offset(int k, const Dims& d) {
  return ((static_cast<int64_t>((k / 3) % 3 - 1) * d.W + (k % 3 - 1)) * d.NT + (k / 9 - 1)) * d.C;
}

// Tokens [tok0, tok0 + nt) of video n: DPE + LayerNorm without affine into xs[j * C + c] (fp32), and
// rstd_s[j]. One warp per token; the caller synchronises afterwards.
template <typename T>
__device__ void normalize_tile(const T* __restrict__ x, const float* __restrict__ dpe_w,
                               const float* __restrict__ dpe_b, int64_t n, int64_t tok0, int nt, const Dims& d,
                               float eps, float* xs, float* rstd_s) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const float inv_c = 1.0f / static_cast<float>(d.C);
  for (int j = warp; j < nt; j += kWarps) {
    const int64_t tok = tok0 + j;
    const int64_t l = tok / d.T;
    const int64_t t = tok % d.T;
    const bool is_patch = l >= 1;
    const int64_t p = is_patch ? l - 1 : 0;
    const uint32_t mask = is_patch ? dpe_tap_mask(t, p / d.W, p % d.W, d.T, d.W, +1) : 0u;
    const int64_t center = (l * d.NT + n * d.T + t) * d.C;
    float* row = xs + static_cast<int64_t>(j) * d.C;
    float s = 0.0f;
    for (int64_t c = lane; c < d.C; c += 32) {
      float y = static_cast<float>(x[center + c]);
      if (is_patch) {
#pragma unroll
        for (int k = 0; k < 27; ++k) {
          if (mask & (1u << k)) y += static_cast<float>(x[center + dpe_tap_offset(k, d) + c]) * dpe_w[k * d.C + c];
        }
        y += dpe_b[c];
      }
      row[c] = y;
      s += y;
    }
    const float mean = warp_sum(s) * inv_c;
    float sq = 0.0f;
    for (int64_t c = lane; c < d.C; c += 32) {
      const float dv = row[c] - mean;
      sq += dv * dv;
    }
    const float rstd = rsqrtf(warp_sum(sq) * inv_c + eps);
    for (int64_t c = lane; c < d.C; c += 32) row[c] = (row[c] - mean) * rstd;
    if (lane == 0) rstd_s[j] = rstd;
  }
}

size_t forward_smem_floats(int64_t bs, int64_t C, int64_t H) { return bs * C + H * C + 2 * bs * H + 3 * H + bs; }
size_t backward_smem_floats(int64_t bs, int64_t C, int64_t H) { return 2 * bs * C + H * C + 2 * bs * H + bs; }

// grid (splits, N). Partials per (video, split, head): m (running max, base 2), l (sum), acc (H, C).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gqa_forward_partial_kernel(const T* __restrict__ x, const float* __restrict__ dpe_w,
                               const float* __restrict__ dpe_b, const float* __restrict__ u,
                               float* __restrict__ m_part, float* __restrict__ l_part, float* __restrict__ acc_part,
                               Dims d, int64_t tokens_per_split, int bs, float eps) {
  extern __shared__ float smem[];
  const int64_t C = d.C, H = d.H;
  float* xs = smem;              // [bs, C]
  float* acc = xs + bs * C;      // [H, C]
  float* sc = acc + H * C;       // [bs, H] scores (base 2)
  float* pb = sc + bs * H;       // [bs, H] probabilities
  float* m_s = pb + bs * H;      // [H]
  float* l_s = m_s + H;          // [H]
  float* alpha_s = l_s + H;      // [H]
  float* rstd_s = alpha_s + H;   // [bs]
  const int64_t split = blockIdx.x;
  const int64_t n = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const float* u_n = u + n * H * C;

  for (int64_t i = threadIdx.x; i < H * C; i += blockDim.x) acc[i] = 0.0f;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    m_s[h] = kNegBig;
    l_s[h] = 0.0f;
  }
  __syncthreads();

  const int64_t begin = split * tokens_per_split;
  const int64_t end = std::min(d.S, begin + tokens_per_split);
  for (int64_t tok0 = begin; tok0 < end; tok0 += bs) {
    const int nt = static_cast<int>(std::min<int64_t>(bs, end - tok0));
    normalize_tile<T>(x, dpe_w, dpe_b, n, tok0, nt, d, eps, xs, rstd_s);
    __syncthreads();
    // scores: one warp per head, all tokens of the tile at once (u_h is read once per tile)
    for (int64_t h = warp; h < H; h += kWarps) {
      const float* uh = u_n + h * C;
      float s[kMaxTile];
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j) s[j] = 0.0f;
      for (int64_t c = lane; c < C; c += 32) {
        const float uc = uh[c];
#pragma unroll
        for (int j = 0; j < kMaxTile; ++j)
          if (j < nt) s[j] += uc * xs[j * C + c];
      }
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j) {
        if (j < nt) {
          const float total = warp_sum(s[j]);
          if (lane == 0) sc[j * H + h] = total * kLog2e;
        }
      }
    }
    __syncthreads();
    for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
      float mt = kNegBig;
      for (int j = 0; j < nt; ++j) mt = fmaxf(mt, sc[j * H + h]);
      const float m_new = fmaxf(m_s[h], mt);
      const float alpha = exp2f(m_s[h] - m_new);
      float sum = 0.0f;
      for (int j = 0; j < nt; ++j) {
        const float p = exp2f(sc[j * H + h] - m_new);
        pb[j * H + h] = p;
        sum += p;
      }
      l_s[h] = l_s[h] * alpha + sum;
      m_s[h] = m_new;
      alpha_s[h] = alpha;
    }
    __syncthreads();
    // acc_h = alpha_h acc_h + sum_j p_h(j) xhat_j: one thread per channel
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float xv[kMaxTile];
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j) xv[j] = j < nt ? xs[j * C + c] : 0.0f;
      for (int64_t h = 0; h < H; ++h) {
        float a = acc[h * C + c] * alpha_s[h];
#pragma unroll
        for (int j = 0; j < kMaxTile; ++j)
          if (j < nt) a += pb[j * H + h] * xv[j];
        acc[h * C + c] = a;
      }
    }
    __syncthreads();
  }

  const int64_t part = n * gridDim.x + split;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    m_part[part * H + h] = m_s[h];
    l_part[part * H + h] = l_s[h];
  }
  for (int64_t i = threadIdx.x; i < H * C; i += blockDim.x) acc_part[part * H * C + i] = acc[i];
}

// grid (N * H): merges the splits of one (video, head) in split order. z = sum_s 2^(m_s - M) acc_s / total,
// lse = (M + log2(total)) ln 2 with total = sum_s 2^(m_s - M) l_s.
__global__ void gqa_merge_kernel(const float* __restrict__ m_part, const float* __restrict__ l_part,
                                 const float* __restrict__ acc_part, float* __restrict__ z, float* __restrict__ lse,
                                 int64_t splits, int64_t H, int64_t C) {
  const int64_t nh = blockIdx.x;
  const int64_t n = nh / H;
  const int64_t h = nh % H;
  float m_max = kNegBig;
  for (int64_t s = 0; s < splits; ++s) m_max = fmaxf(m_max, m_part[(n * splits + s) * H + h]);
  float total = 0.0f;
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t i = (n * splits + s) * H + h;
    total += exp2f(m_part[i] - m_max) * l_part[i];
  }
  const float inv_total = 1.0f / total;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    float acc = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t i = (n * splits + s) * H + h;
      acc += exp2f(m_part[i] - m_max) * acc_part[i * C + c];
    }
    z[nh * C + c] = acc * inv_total;
  }
  if (threadIdx.x == 0) lse[nh] = (m_max + log2f(total)) * kLn2;
}

// grid (splits, N). dy (L, N*T, C) fp32 for every token of video n in the split; du_part per (video, split).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    gqa_backward_tokens_kernel(const T* __restrict__ x, const float* __restrict__ dpe_w,
                               const float* __restrict__ dpe_b, const float* __restrict__ u,
                               const float* __restrict__ dz, const float* __restrict__ lse2,
                               const float* __restrict__ D, float* __restrict__ dy, float* __restrict__ du_part,
                               Dims d, int64_t tokens_per_split, int bs, float eps) {
  extern __shared__ float smem[];
  const int64_t C = d.C, H = d.H;
  float* xs = smem;             // [bs, C] xhat
  float* dxs = xs + bs * C;     // [bs, C] dxhat
  float* du = dxs + bs * C;     // [H, C]
  float* ab = du + H * C;       // [bs, H] attention weights
  float* dsb = ab + bs * H;     // [bs, H] score gradients
  float* rstd_s = dsb + bs * H; // [bs]
  const int64_t split = blockIdx.x;
  const int64_t n = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const float* u_n = u + n * H * C;
  const float* dz_n = dz + n * H * C;
  const float inv_c = 1.0f / static_cast<float>(C);

  for (int64_t i = threadIdx.x; i < H * C; i += blockDim.x) du[i] = 0.0f;
  __syncthreads();

  const int64_t begin = split * tokens_per_split;
  const int64_t end = std::min(d.S, begin + tokens_per_split);
  for (int64_t tok0 = begin; tok0 < end; tok0 += bs) {
    const int nt = static_cast<int>(std::min<int64_t>(bs, end - tok0));
    normalize_tile<T>(x, dpe_w, dpe_b, n, tok0, nt, d, eps, xs, rstd_s);
    __syncthreads();
    // a_h(j) and ds_h(j): one warp per head, all tokens of the tile at once
    for (int64_t h = warp; h < H; h += kWarps) {
      const float* uh = u_n + h * C;
      const float* dzh = dz_n + h * C;
      float s[kMaxTile], g[kMaxTile];
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j) s[j] = g[j] = 0.0f;
      for (int64_t c = lane; c < C; c += 32) {
        const float uc = uh[c];
        const float dzc = dzh[c];
#pragma unroll
        for (int j = 0; j < kMaxTile; ++j) {
          if (j < nt) {
            const float xv = xs[j * C + c];
            s[j] += uc * xv;
            g[j] += dzc * xv;
          }
        }
      }
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j) {
        if (j < nt) {
          const float st = warp_sum(s[j]);
          const float gt = warp_sum(g[j]);
          if (lane == 0) {
            const float a = exp2f(st * kLog2e - lse2[n * H + h]);
            ab[j * H + h] = a;
            dsb[j * H + h] = a * (gt - D[n * H + h]);
          }
        }
      }
    }
    __syncthreads();
    // One thread per channel: du_h += sum_j ds_h(j) xhat_j and dxhat_j = sum_h a_h(j) dz_h + ds_h(j) u_h
    // (dz_h and u_h are read once per tile).
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      float xv[kMaxTile], gx[kMaxTile];
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j) {
        xv[j] = j < nt ? xs[j * C + c] : 0.0f;
        gx[j] = 0.0f;
      }
      for (int64_t h = 0; h < H; ++h) {
        const float dzc = dz_n[h * C + c];
        const float uc = u_n[h * C + c];
        float a = du[h * C + c];
#pragma unroll
        for (int j = 0; j < kMaxTile; ++j) {
          if (j < nt) {
            a += dsb[j * H + h] * xv[j];
            gx[j] += ab[j * H + h] * dzc + dsb[j * H + h] * uc;
          }
        }
        du[h * C + c] = a;
      }
#pragma unroll
      for (int j = 0; j < kMaxTile; ++j)
        if (j < nt) dxs[j * C + c] = gx[j];
    }
    __syncthreads();
    // LayerNorm backward (no affine: gamma is folded into u and dz): one warp per token.
    for (int j = warp; j < nt; j += kWarps) {
      const float* row = xs + static_cast<int64_t>(j) * C;
      const float* drow = dxs + static_cast<int64_t>(j) * C;
      float s1 = 0.0f, s2 = 0.0f;
      for (int64_t c = lane; c < C; c += 32) {
        s1 += drow[c];
        s2 += drow[c] * row[c];
      }
      const float mean_g = warp_sum(s1) * inv_c;
      const float mean_gx = warp_sum(s2) * inv_c;
      const float rstd = rstd_s[j];
      const int64_t tok = tok0 + j;
      const int64_t out_off = ((tok / d.T) * d.NT + n * d.T + tok % d.T) * C;
      for (int64_t c = lane; c < C; c += 32) dy[out_off + c] = rstd * (drow[c] - mean_g - row[c] * mean_gx);
    }
    __syncthreads();
  }
  const int64_t part = n * gridDim.x + split;
  for (int64_t i = threadIdx.x; i < H * C; i += blockDim.x) du_part[part * H * C + i] = du[i];
}

// grid (channel blocks, splits, N); one thread per channel. For y_j = x_j + sum_k w_k x_{j + off_k} + b
// (patch tokens): dx_i = dy_i + sum_k w_k dy_{i - off_k}, dw_k += x_i dy_{i - off_k}, db += dy_i (patch
// tokens); class tokens: dx = dy. Partials per (video, split): dw_part (P, 27, C), db_part (P, C).
template <typename T>
__global__ void __launch_bounds__(kDpeThreads)
    gqa_backward_dpe_kernel(const T* __restrict__ x, const float* __restrict__ dy, const float* __restrict__ dpe_w,
                            T* __restrict__ dx, float* __restrict__ dw_part, float* __restrict__ db_part, Dims d,
                            int64_t tokens_per_split) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= d.C) return;
  const int64_t split = blockIdx.y;
  const int64_t n = blockIdx.z;
  float w[27], aw[27];
#pragma unroll
  for (int k = 0; k < 27; ++k) {
    w[k] = dpe_w[k * d.C + c];
    aw[k] = 0.0f;
  }
  float ab = 0.0f;
  const int64_t begin = split * tokens_per_split;
  const int64_t end = std::min(d.S, begin + tokens_per_split);
  for (int64_t tok = begin; tok < end; ++tok) {
    const int64_t l = tok / d.T;
    const int64_t t = tok % d.T;
    const int64_t off = (l * d.NT + n * d.T + t) * d.C + c;
    const float g = dy[off];
    if (l == 0) {
      dx[off] = static_cast<T>(g);
      continue;
    }
    const int64_t p = l - 1;
    const uint32_t mask = dpe_tap_mask(t, p / d.W, p % d.W, d.T, d.W, -1);
    const float xc = static_cast<float>(x[off]);
    ab += g;
    float acc = g;
#pragma unroll
    for (int k = 0; k < 27; ++k) {
      if (mask & (1u << k)) {
        const float gn = dy[off - dpe_tap_offset(k, d)];
        acc += w[k] * gn;
        aw[k] += xc * gn;
      }
    }
    dx[off] = static_cast<T>(acc);
  }
  const int64_t part = n * gridDim.y + split;
#pragma unroll
  for (int k = 0; k < 27; ++k) dw_part[(part * 27 + k) * d.C + c] = aw[k];
  db_part[part * d.C + c] = ab;
}

// ------------------------------------------------------------------------------------------------------
// host side

struct Checked {
  Dims d;
  int64_t N, L, head_dim;
};

Checked check_gqa(const char* op, const at::Tensor& x, int64_t T, const at::Tensor& dpe_weight,
                  const at::Tensor& dpe_bias, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                  const at::Tensor& query, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
                  int64_t num_heads) {
  check_contiguous(x, op, "x");
  check_float_dtype(x, op, "x");
  TORCH_CHECK(x.dim() == 3, op, ": x must be (L, N*T, C), got shape ", x.sizes());
  TORCH_CHECK(T > 0, op, ": T must be positive, got ", T);
  TORCH_CHECK(num_heads > 0, op, ": num_heads must be positive, got ", num_heads);
  const int64_t L = x.size(0), NT = x.size(1), C = x.size(2);
  TORCH_CHECK(NT > 0 && NT % T == 0, op, ": x dimension 1 (N*T = ", NT, ") must be a positive multiple of T = ", T);
  TORCH_CHECK(L >= 2, op, ": x needs L = 1 + h*w >= 2 tokens, got shape ", x.sizes());
  const int64_t W = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(L - 1))));
  TORCH_CHECK(W * W == L - 1, op, ": x has L - 1 = ", L - 1, " patch tokens, not a square grid");
  TORCH_CHECK(C > 0 && C % num_heads == 0, op, ": num_heads = ", num_heads, " must divide C = ", C);
  const int64_t N = NT / T;
  check_same_device(dpe_weight, x, op, "dpe_weight");
  check_numel(dpe_weight, C * 27, op, "dpe_weight");
  check_same_device(dpe_bias, x, op, "dpe_bias");
  check_numel(dpe_bias, C, op, "dpe_bias");
  check_same_device(ln_weight, x, op, "ln_weight");
  check_numel(ln_weight, C, op, "ln_weight");
  check_same_device(ln_bias, x, op, "ln_bias");
  check_numel(ln_bias, C, op, "ln_bias");
  check_same_device(query, x, op, "query");
  check_numel(query, N * C, op, "query");
  check_same_device(in_proj_weight, x, op, "in_proj_weight");
  TORCH_CHECK(in_proj_weight.dim() == 2 && in_proj_weight.size(0) == 3 * C && in_proj_weight.size(1) == C, op,
              ": in_proj_weight must be (3C, C) = (", 3 * C, ", ", C, "), got ", in_proj_weight.sizes());
  check_same_device(in_proj_bias, x, op, "in_proj_bias");
  check_numel(in_proj_bias, 3 * C, op, "in_proj_bias");
  return {{T, NT, C, num_heads, W, T * L}, N, L, C / num_heads};
}

// Tokens per tile that fit the shared memory (kMaxTile, halved until it fits), or an error naming the sizes.
int tile_tokens(size_t (*smem_floats)(int64_t, int64_t, int64_t), int64_t C, int64_t H, const char* op) {
  const size_t limit = static_cast<size_t>(device_max_shared_optin());
  int bs = kMaxTile;
  while (bs > 1 && smem_floats(bs, C, H) * sizeof(float) > limit) bs /= 2;
  TORCH_CHECK(smem_floats(bs, C, H) * sizeof(float) <= limit, op, ": num_heads * C = ", H * C,
              " needs more shared memory than this GPU has per block (", limit, " bytes)");
  return bs;
}

// (tokens per split, splits): about two blocks per SM over all videos; every split non-empty.
std::pair<int64_t, int64_t> token_splits(int64_t S, int64_t N, int64_t bs) {
  const int64_t tiles = ceil_div(S, bs);
  int64_t splits = std::max<int64_t>(1, ceil_div(2 * static_cast<int64_t>(device_sm_count()), N));
  splits = std::min(splits, tiles);
  const int64_t per = ceil_div(tiles, splits) * bs;
  return {per, ceil_div(S, per)};
}

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

struct FoldedQuery {
  at::Tensor q_in, w_q, w_k, w_v, b_v, gamma, beta, qh, r, u;
};

// q_h, r_h = W_k,h^T q_h / sqrt(d), u_h = gamma * r_h (fp32), as reference.folded_query.
FoldedQuery folded_query(const at::Tensor& query, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
                         const at::Tensor& ln_weight, const at::Tensor& ln_bias, int64_t N, int64_t C, int64_t H) {
  const int64_t d = C / H;
  FoldedQuery f;
  const at::Tensor w = in_proj_weight.to(at::kFloat);
  const at::Tensor b = in_proj_bias.to(at::kFloat);
  f.q_in = query.to(at::kFloat).reshape({N, C});
  f.w_q = w.narrow(0, 0, C);
  f.w_k = w.narrow(0, C, C).reshape({H, d, C});
  f.w_v = w.narrow(0, 2 * C, C).reshape({H, d, C});
  f.b_v = b.narrow(0, 2 * C, C).reshape({H, d});
  f.gamma = ln_weight.to(at::kFloat).reshape({C});
  f.beta = ln_bias.to(at::kFloat).reshape({C});
  const at::Tensor q = at::mm(f.q_in, f.w_q.t()).add(b.narrow(0, 0, C));
  f.qh = q.reshape({N, H, d});
  f.r = at::einsum("nhd,hdc->nhc", {f.qh, f.w_k}).div(std::sqrt(static_cast<double>(d)));
  f.u = f.r.mul(f.gamma).contiguous();
  return f;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_query_attention_fwd(
    const at::Tensor& x, int64_t T, const at::Tensor& dpe_weight, const at::Tensor& dpe_bias,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, const at::Tensor& query, const at::Tensor& in_proj_weight,
    const at::Tensor& in_proj_bias, int64_t num_heads, double eps) {
  const char* op = "global_query_attention_fwd";
  const Checked ck = check_gqa(op, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
                               in_proj_bias, num_heads);
  const Dims& d = ck.d;
  const int64_t N = ck.N, C = d.C, H = d.H;
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = x.options().dtype(at::kFloat);
  const FoldedQuery f = folded_query(query, in_proj_weight, in_proj_bias, ln_weight, ln_bias, N, C, H);
  const at::Tensor dpe_w = dpe_weight.reshape({C, 27}).t().to(at::kFloat).contiguous();  // (27, C)
  const at::Tensor dpe_b = dpe_bias.to(at::kFloat).contiguous();

  const int bs = tile_tokens(forward_smem_floats, C, H, op);
  const size_t smem = forward_smem_floats(bs, C, H) * sizeof(float);
  // named variables, not a structured binding: lambdas may capture those only from C++20 (torch 2.11 builds
  // extensions as C++17)
  const std::pair<int64_t, int64_t> split = token_splits(d.S, N, bs);
  const int64_t per_split = split.first, splits = split.second;
  TORCH_CHECK(N <= 65535, op, ": N = ", N, " videos exceed the grid limit 65535");
  at::Tensor m_part = at::empty({N, splits, H}, fopts);
  at::Tensor l_part = at::empty({N, splits, H}, fopts);
  at::Tensor acc_part = at::empty({N, splits, H, C}, fopts);
  UV2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "global_query_attention_fwd", [&] {
    allow_smem(gqa_forward_partial_kernel<scalar_t>, smem);
    gqa_forward_partial_kernel<scalar_t><<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(N)), kThreads,
                                           smem, stream>>>(
        x.const_data_ptr<scalar_t>(), dpe_w.const_data_ptr<float>(), dpe_b.const_data_ptr<float>(),
        f.u.const_data_ptr<float>(), m_part.mutable_data_ptr<float>(), l_part.mutable_data_ptr<float>(),
        acc_part.mutable_data_ptr<float>(), d, per_split, bs, static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor z = at::empty({N, H, C}, fopts);
  at::Tensor lse = at::empty({N, H}, fopts);
  gqa_merge_kernel<<<static_cast<unsigned>(N * H), kThreads, 0, stream>>>(
      m_part.const_data_ptr<float>(), l_part.const_data_ptr<float>(), acc_part.const_data_ptr<float>(),
      z.mutable_data_ptr<float>(), lse.mutable_data_ptr<float>(), splits, H, C);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // out_h = W_v,h (gamma z_h + beta) + b_v,h
  const at::Tensor out =
      at::einsum("nhc,hdc->nhd", {z.mul(f.gamma).add(f.beta), f.w_v}).add(f.b_v).reshape({1, N, C});
  return {fresh(out, x.scalar_type()), z, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
global_query_attention_bwd(const at::Tensor& grad_out, const at::Tensor& x, int64_t T, const at::Tensor& dpe_weight,
                           const at::Tensor& dpe_bias, const at::Tensor& ln_weight, const at::Tensor& ln_bias,
                           const at::Tensor& query, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
                           const at::Tensor& z_in, const at::Tensor& lse_in, int64_t num_heads, double eps) {
  const char* op = "global_query_attention_bwd";
  const Checked ck = check_gqa(op, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight,
                               in_proj_bias, num_heads);
  const Dims& d = ck.d;
  const int64_t N = ck.N, C = d.C, H = d.H, hd = ck.head_dim;
  check_same_device(grad_out, x, op, "grad_out");
  check_numel(grad_out, N * C, op, "grad_out");
  check_same_device(z_in, x, op, "z");
  check_numel(z_in, N * H * C, op, "z");
  check_same_device(lse_in, x, op, "lse");
  check_numel(lse_in, N * H, op, "lse");
  const NoAutocast no_autocast;
  const c10::cuda::CUDAGuard guard(x.device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto fopts = x.options().dtype(at::kFloat);
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));

  // Per-video algebra that does not need the tokens (reference.small_backward_algebra), fp32.
  const FoldedQuery f = folded_query(query, in_proj_weight, in_proj_bias, ln_weight, ln_bias, N, C, H);
  const at::Tensor z = z_in.to(at::kFloat).reshape({N, H, C}).contiguous();
  const at::Tensor d_out = grad_out.to(at::kFloat).reshape({N, H, hd});
  const at::Tensor p = at::einsum("nhd,hdc->nhc", {d_out, f.w_v});
  const at::Tensor dz = p.mul(f.gamma).contiguous();
  const at::Tensor D = dz.mul(z).sum(-1).contiguous();  // (N, H)
  const at::Tensor grad_w_v = at::einsum("nhd,nhc->hdc", {d_out, z.mul(f.gamma).add(f.beta)}).reshape({C, C});
  const at::Tensor grad_b_v = d_out.sum(0).reshape({C});
  const at::Tensor grad_ln_bias = p.sum(at::IntArrayRef{0, 1});
  const at::Tensor grad_ln_weight_values = p.mul(z).sum(at::IntArrayRef{0, 1});
  const at::Tensor lse2 = lse_in.to(at::kFloat).mul(static_cast<double>(kLog2e)).contiguous();
  const at::Tensor dpe_w = dpe_weight.reshape({C, 27}).t().to(at::kFloat).contiguous();  // (27, C)
  const at::Tensor dpe_b = dpe_bias.to(at::kFloat).contiguous();

  const int bs = tile_tokens(backward_smem_floats, C, H, op);
  const size_t smem = backward_smem_floats(bs, C, H) * sizeof(float);
  // named variables, not a structured binding: lambdas may capture those only from C++20 (torch 2.11 builds
  // extensions as C++17)
  const std::pair<int64_t, int64_t> split = token_splits(d.S, N, bs);
  const int64_t per_split = split.first, splits = split.second;
  TORCH_CHECK(N <= 65535, op, ": N = ", N, " videos exceed the grid limit 65535");
  at::Tensor dy = at::empty({ck.L, d.NT, C}, fopts);
  at::Tensor du_part = at::empty({N, splits, H, C}, fopts);
  at::Tensor dx = at::empty_like(x);
  // DPE backward split: about four blocks per SM over (videos, channel blocks).
  const int64_t c_blocks = ceil_div(C, kDpeThreads);
  int64_t dpe_splits = std::max<int64_t>(1, ceil_div(4 * static_cast<int64_t>(device_sm_count()), N * c_blocks));
  dpe_splits = std::min(dpe_splits, d.S);
  const int64_t dpe_per_split = ceil_div(d.S, dpe_splits);
  dpe_splits = ceil_div(d.S, dpe_per_split);
  at::Tensor dw_part = at::empty({N * dpe_splits, 27, C}, fopts);
  at::Tensor db_part = at::empty({N * dpe_splits, C}, fopts);
  UV2_DISPATCH_FLOAT_HALF_BF16(x.scalar_type(), "global_query_attention_bwd", [&] {
    allow_smem(gqa_backward_tokens_kernel<scalar_t>, smem);
    gqa_backward_tokens_kernel<scalar_t><<<dim3(static_cast<unsigned>(splits), static_cast<unsigned>(N)), kThreads,
                                           smem, stream>>>(
        x.const_data_ptr<scalar_t>(), dpe_w.const_data_ptr<float>(), dpe_b.const_data_ptr<float>(),
        f.u.const_data_ptr<float>(), dz.const_data_ptr<float>(), lse2.const_data_ptr<float>(),
        D.const_data_ptr<float>(), dy.mutable_data_ptr<float>(), du_part.mutable_data_ptr<float>(), d, per_split, bs,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(c_blocks), static_cast<unsigned>(dpe_splits), static_cast<unsigned>(N));
    gqa_backward_dpe_kernel<scalar_t><<<grid, kDpeThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), dy.const_data_ptr<float>(), dpe_w.const_data_ptr<float>(),
        dx.mutable_data_ptr<scalar_t>(), dw_part.mutable_data_ptr<float>(), db_part.mutable_data_ptr<float>(), d,
        dpe_per_split);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor du = du_part.sum(1);  // (N, H, C), fixed order
  const at::Tensor grad_dpe_w = dw_part.sum(0).t().contiguous().reshape({C, 1, 3, 3, 3});
  const at::Tensor grad_dpe_b = db_part.sum(0);

  // Query-path gradients from du (reference.finish_query_gradients).
  const at::Tensor dr = du.mul(f.gamma);
  const at::Tensor grad_qh = at::einsum("nhc,hdc->nhd", {dr, f.w_k}).mul(scale);
  const at::Tensor grad_w_k = at::einsum("nhd,nhc->hdc", {f.qh, dr}).mul(scale).reshape({C, C});
  const at::Tensor grad_q = grad_qh.reshape({N, C});
  const at::Tensor grad_w_q = at::mm(grad_q.t(), f.q_in);
  const at::Tensor grad_b_q = grad_q.sum(0);
  const at::Tensor grad_query = at::mm(grad_q, f.w_q).unsqueeze(0);
  const at::Tensor g_scores = du.mul(f.r).sum(at::IntArrayRef{0, 1});
  const at::Tensor grad_ln_weight = grad_ln_weight_values.add(g_scores);
  const at::Tensor grad_in_w = at::cat({grad_w_q, grad_w_k, grad_w_v}, 0);
  const at::Tensor grad_in_b = at::cat({grad_b_q, at::zeros_like(grad_b_q), grad_b_v}, 0);
  return {dx,
          fresh(grad_dpe_w, dpe_weight.scalar_type()).view(dpe_weight.sizes()),
          fresh(grad_dpe_b, dpe_bias.scalar_type()).view(dpe_bias.sizes()),
          fresh(grad_ln_weight, ln_weight.scalar_type()).view(ln_weight.sizes()),
          fresh(grad_ln_bias, ln_bias.scalar_type()).view(ln_bias.sizes()),
          fresh(grad_query, query.scalar_type()).view(query.sizes()),
          fresh(grad_in_w, in_proj_weight.scalar_type()),
          fresh(grad_in_b, in_proj_bias.scalar_type()).view(in_proj_bias.sizes())};
}

}  // namespace
}  // namespace uniformerv2

TORCH_LIBRARY_FRAGMENT(uniformerv2_cuda, m) {
  m.def(
      "global_query_attention_fwd(Tensor x, int T, Tensor dpe_weight, Tensor dpe_bias, Tensor ln_weight, "
      "Tensor ln_bias, Tensor query, Tensor in_proj_weight, Tensor in_proj_bias, int num_heads, float eps) -> "
      "(Tensor, Tensor, Tensor)");
  m.def(
      "global_query_attention_bwd(Tensor grad_out, Tensor x, int T, Tensor dpe_weight, Tensor dpe_bias, "
      "Tensor ln_weight, Tensor ln_bias, Tensor query, Tensor in_proj_weight, Tensor in_proj_bias, Tensor z, "
      "Tensor lse, int num_heads, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(uniformerv2_cuda, CUDA, m) {
  m.impl("global_query_attention_fwd", &uniformerv2::global_query_attention_fwd);
  m.impl("global_query_attention_bwd", &uniformerv2::global_query_attention_bwd);
}
