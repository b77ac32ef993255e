// CLIP LayerNorm launchers (csrc/layer_norm.cu), also used by the fused FFN (csrc/ffn.cu).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace uniformerv2 {

// y = layer_norm(x) over the last dimension, computed in fp32, returned in x.dtype; mean/rstd (rows,) fp32
// (empty when store_stats is false). x contiguous (..., C); weight/bias (C,) in any float dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps,
                                                                       bool store_stats);

// (grad_x in x.dtype, grad_weight in weight_grad_dtype, grad_bias in bias_grad_dtype). grad_residual
// (shaped like x), when given, is added to grad_x in the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& mean,
    const at::Tensor& rstd, at::ScalarType weight_grad_dtype, at::ScalarType bias_grad_dtype,
    const std::optional<at::Tensor>& grad_residual);

}  // namespace uniformerv2
