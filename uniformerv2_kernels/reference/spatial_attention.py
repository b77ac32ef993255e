"""Pure-PyTorch reference of the local blocks' spatial attention branch, ``attn(ln_1(x))`` (DESIGN section 2).

x is the stream (L, B, C) (L tokens of a frame, B = N*T frames). ln_1 is the CLIP LayerNorm (fp32 math,
cast back to x.dtype); attn is ``nn.MultiheadAttention(C, num_heads)`` self-attention within each frame:
packed ``in_proj_weight`` (3C, C) with rows q, k, v and ``in_proj_bias`` (3C,), head_dim = C // heads,
scores scaled by 1/sqrt(head_dim), softmax over the L keys, no mask, no dropout, then ``out_proj``.
The block adds the residual and drop path itself.

Besides the literal formulation (:func:`spatial_attention`), this module holds the explicit forward and
backward pieces the registered ops run for the "reference" backend. Those work in the fused layout: the
projections keep their rows in (frame, token) order, ``qkv`` is (B*L, 3C) with row ``b*L + l``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import layer_norm as ref_layer_norm


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (..., L, d) tensors, literal math."""
    scores = (q * (1.0 / math.sqrt(q.shape[-1]))) @ k.transpose(-2, -1)
    return torch.softmax(scores, dim=-1) @ v


def spatial_attention(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                      num_heads: int, eps: float = 1e-5, core=attention_core):
    """attn(ln_1(x)) for x (L, B, C), as nn.MultiheadAttention computes it (need_weights aside); ``core``
    maps q, k, v (B*H, L, d) to the attention output."""
    L, B, C = x.shape
    d = C // num_heads
    x_normed = ref_layer_norm.clip_layer_norm(x, ln_weight, ln_bias, eps)
    q, k, v = F.linear(x_normed, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    # (L, B, C) -> (B*H, L, d), the layout nn.MultiheadAttention uses
    q, k, v = (t.reshape(L, B * num_heads, d).transpose(0, 1) for t in (q, k, v))
    o = core(q, k, v)  # (B*H, L, d)
    o = o.transpose(0, 1).reshape(L, B, C)
    return F.linear(o, out_proj_weight, out_proj_bias)


def spatial_attention_sdpa(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                           num_heads: int, eps: float = 1e-5):
    """:func:`spatial_attention` with the core nn.MultiheadAttention runs when no weights are asked for,
    ``F.scaled_dot_product_attention`` (the form the op's inductor backend compiles)."""
    return spatial_attention(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias,
                             num_heads, eps, core=F.scaled_dot_product_attention)


# ---- explicit pieces in the fused layout (the registered ops' reference backend) ----

def frames_major(t: torch.Tensor) -> torch.Tensor:
    """(L, B, ...) stream -> (B*L, ...) matrix with row b*L + l."""
    return t.transpose(0, 1).reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def qkv_forward(x, ln_weight, ln_bias, in_proj_weight, in_proj_bias, eps):
    """(qkv (B*L, 3C) in frame-major rows, mean, rstd (L*B,) in stream rows)."""
    mean, rstd = ref_layer_norm.layer_norm_stats(x, eps)
    x_normed = frames_major(ref_layer_norm.clip_layer_norm(x, ln_weight, ln_bias, eps))
    return F.linear(x_normed, in_proj_weight, in_proj_bias), mean, rstd


def qkv_backward(grad_qkv, x, ln_weight, ln_bias, in_proj_weight, eps):
    """(dx, d_ln_weight, d_ln_bias, d_in_proj_weight, d_in_proj_bias) for grad_qkv (B*L, 3C)."""
    L, B, C = x.shape
    x_normed = frames_major(ref_layer_norm.clip_layer_norm(x, ln_weight, ln_bias, eps))
    d_in_w = grad_qkv.t() @ x_normed
    d_in_b = grad_qkv.sum(dim=0)
    d_x_normed = (grad_qkv @ in_proj_weight).reshape(B, L, C).transpose(0, 1)
    dx, d_ln_w, d_ln_b = ref_layer_norm.backward(d_x_normed, x, ln_weight, ln_bias, eps)
    return dx, d_ln_w, d_ln_b, d_in_w, d_in_b


def core_forward(qkv, L: int, B: int, num_heads: int):
    """Attention over each frame's L tokens; qkv (B*L, 3C) frame-major -> o (B*L, C) frame-major."""
    C = qkv.shape[1] // 3
    d = C // num_heads
    q, k, v = qkv.reshape(B, L, 3, num_heads, d).permute(2, 0, 3, 1, 4)  # each (B, H, L, d)
    return attention_core(q, k, v).transpose(1, 2).reshape(B * L, C)


def out_forward(o, out_proj_weight, out_proj_bias, L: int, B: int):
    """out_proj of o (B*L, C) frame-major, returned as the stream (L, B, C)."""
    return F.linear(o, out_proj_weight, out_proj_bias).reshape(B, L, -1).transpose(0, 1).contiguous()


def out_backward(grad_out, o, out_proj_weight):
    """(d_o (B*L, C), d_out_proj_weight, d_out_proj_bias) for grad_out (L, B, C)."""
    g = frames_major(grad_out)
    return g @ out_proj_weight, g.t() @ o, g.sum(dim=0)
