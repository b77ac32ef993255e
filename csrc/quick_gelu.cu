// QuickGELU, y = z * sigmoid(1.702 z): the smallest op of the extension, used to check that the build
// and the dispatch from Python work. The FFN epilogue kernels live in their own file.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

template <typename scalar_t>
__global__ void quick_gelu_kernel(const scalar_t* __restrict__ z, scalar_t* __restrict__ y, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float v = static_cast<float>(z[i]);
    y[i] = static_cast<scalar_t>(v / (1.0f + __expf(-1.702f * v)));
  }
}

at::Tensor quick_gelu(const at::Tensor& z) {
  TORCH_CHECK(z.is_cuda(), "quick_gelu: z must be a CUDA tensor, got ", z.device());
  TORCH_CHECK(z.is_contiguous(), "quick_gelu: z must be contiguous");
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = at::empty_like(z);
  const int64_t n = z.numel();
  if (n == 0) return y;
  const int threads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "quick_gelu", [&] {
    quick_gelu_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(uniformerv2_cuda, m) { m.def("quick_gelu(Tensor z) -> Tensor"); }

TORCH_LIBRARY_IMPL(uniformerv2_cuda, CUDA, m) { m.impl("quick_gelu", &quick_gelu); }
