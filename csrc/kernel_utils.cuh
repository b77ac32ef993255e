// Small helpers shared by the op files of the CUDA extension (csrc/<op>.cu): argument checks that name the
// argument, launch-size helpers, 16-byte vector packs, warp reductions. Header-only, included by each .cu.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

// Dispatch over the three dtypes the kernels take (fp32, fp16, bf16); scalar_t is the element type.
#define UV2_DISPATCH_FLOAT_HALF_BF16(TYPE, NAME, ...)                   \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                        \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))

namespace uniformerv2 {

// Threads per block of the extension's row and element kernels (8 warps).
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------------------------
// host helpers

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline void check_cuda_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  check_cuda_tensor(t, op, name);
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16 (the CUDA kernels compute in fp32), got ", st);
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  check_cuda_tensor(t, op, name);
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but x is on ", ref.device());
}

inline void check_numel(const at::Tensor& t, int64_t numel, const char* op, const char* name) {
  TORCH_CHECK(t.numel() == numel, op, ": ", name, " must have ", numel, " elements, got shape ", t.sizes());
}

// A fresh contiguous copy in dtype (outputs of a custom op must not alias each other or the inputs).
inline at::Tensor fresh(const at::Tensor& t, at::ScalarType dtype) {
  return t.contiguous().to(dtype, /*non_blocking=*/false, /*copy=*/true);
}

inline int device_sm_count() {
  int dev = c10::cuda::current_device();
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  return std::max(sms, 1);
}

inline int device_max_shared_optin() {
  int dev = c10::cuda::current_device();
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return bytes;
}

// Held by every op entry point: the ATen calls inside an op (GEMMs, small folds) run in the dtypes the op
// chose, even when the caller has autocast on (custom ops pass autocast through to their bodies).
// Constructed only after the input checks (which make no ATen calls), so that a bad input throws before any
// guard object (this one, the CUDAGuard) exists in the entry point's frame.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Grid size for a grid-stride loop over `work` items with `threads` per block.
inline int grid_for(int64_t work, int threads) {
  const int64_t blocks = ceil_div(std::max<int64_t>(work, 1), threads);
  return static_cast<int>(std::min<int64_t>(blocks, static_cast<int64_t>(device_sm_count()) * 16));
}

// Row chunks for the deterministic column reductions: (rows per chunk, number of chunks), about four
// blocks per SM over all column blocks.
struct RowSplit {
  int64_t rows_per_chunk;
  int64_t chunks;
};

inline RowSplit row_split(int64_t rows, int64_t col_blocks) {
  const int64_t target = std::max<int64_t>(1, (4 * static_cast<int64_t>(device_sm_count())) / std::max<int64_t>(col_blocks, 1));
  const int64_t per = std::max<int64_t>(1, ceil_div(std::max<int64_t>(rows, 1), target));
  return {per, ceil_div(std::max<int64_t>(rows, 1), per)};
}

inline bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Number of elements of T in 16 bytes.
template <typename T>
constexpr int vec16() {
  return static_cast<int>(16 / sizeof(T));
}

// ------------------------------------------------------------------------------------------------------
// device helpers

// V consecutive elements, aligned to their total size: loaded/stored as one (or two) vector accesses.
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* __restrict__ p, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int i = 0; i < V; ++i) out[i] = static_cast<float>(pk.v[i]);
}

template <typename T, int V>
__device__ __forceinline__ void store_floats(T* __restrict__ p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int i = 0; i < V; ++i) pk.v[i] = static_cast<T>(in[i]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

// Rounds an fp32 value to T and back (the rounding a store to T and a reload would do).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace uniformerv2
