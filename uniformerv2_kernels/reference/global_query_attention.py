"""Pure-PyTorch references for the global UniBlock op (DPE + ln_3 + one-query cross-attention).

Three forms, all differentiable and float64-gradcheckable:

- :func:`global_query_attention_literal`: the official math, literally (DESIGN.md section 2): DPE as a
  depthwise Conv3d on the (N, C, T, h, w) view of the patch tokens, LayerNorm ln_3 over all T*L tokens of
  each video (class tokens included, no DPE on them), K and V materialised with the in_proj slices,
  softmax(q k^T / sqrt(d)) v per head. Output before out_proj, shape (1, N, C).
- :func:`global_query_attention_folded`: the folded formulation of DESIGN.md section 3, which the kernels
  implement. K and V are never formed:
      r_h = W_k,h^T q_h / sqrt(d),  u_h = gamma * r_h          (per video and head, length C)
      s_h(j) = u_h . xhat_j          (= the true score minus a per-(video, head) constant)
      a_h = softmax_j(s_h),  z_h = sum_j a_h(j) xhat_j,  lse_h = logsumexp_j s_h(j)
      out_h = W_v,h (gamma * z_h + beta) + b_v,h
  where xhat_j = (y_j - mean_j) * rstd_j is the normalised token before ln_3's affine part.
  :func:`global_query_attention_folded_with_stats` also returns z (N, H, C) and lse (N, H), the state the
  fused backward starts from.
- :func:`global_query_attention_folded_backward`: the analytic backward of the folded form, written with
  dense torch ops. It is the reference backward the custom op runs for ``backend="reference"`` and the
  formula the Triton backward implements (token-heavy parts in kernels, the rest in torch).

Token order inside a video does not matter (softmax and sums are order-free); the helpers here use the
(N, T, L, C) view.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _grid_side(L: int) -> int:
    side = math.isqrt(int(L - 1))
    if side * side != L - 1 or side == 0:
        raise ValueError(f"x: L - 1 = {L - 1} patch tokens is not a square grid")
    return side


def dpe_literal(x: torch.Tensor, T: int, dpe_weight: torch.Tensor, dpe_bias: torch.Tensor) -> torch.Tensor:
    """y = copy of x with y[1:] += depthwise Conv3d(x[1:]) on the (N, C, T, h, w) view; class tokens as is."""
    L, NT, C = x.shape
    N = NT // T
    side = _grid_side(L)
    # (h*w, N*T, C) -> (h, w, N, T, C) -> (N, C, T, h, w); patch index l - 1 = hh * w + ww.
    patches = x[1:].reshape(side, side, N, T, C).permute(2, 4, 3, 0, 1)
    conv = F.conv3d(patches, dpe_weight, dpe_bias, padding=1, groups=C)
    conv = conv.permute(3, 4, 0, 2, 1).reshape(L - 1, NT, C)
    return torch.cat([x[:1], x[1:] + conv], dim=0)


def _keys_per_video(y: torch.Tensor, T: int) -> torch.Tensor:
    """(L, N*T, C) -> (N, T*L, C): all tokens of each video, class tokens included."""
    L, NT, C = y.shape
    N = NT // T
    return y.reshape(L, N, T, C).permute(1, 2, 0, 3).reshape(N, T * L, C)


def global_query_attention_literal(
    x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps=1e-5
):
    """The official math with K and V materialised; returns (1, N, C), before out_proj."""
    L, NT, C = x.shape
    N = NT // T
    H = num_heads
    d = C // H
    y = dpe_literal(x, T, dpe_weight, dpe_bias)
    kv = F.layer_norm(_keys_per_video(y, T), (C,), ln_weight, ln_bias, eps)  # (N, S, C)
    w_q, w_k, w_v = in_proj_weight[:C], in_proj_weight[C : 2 * C], in_proj_weight[2 * C :]
    b_q, b_k, b_v = in_proj_bias[:C], in_proj_bias[C : 2 * C], in_proj_bias[2 * C :]
    q = query[0] @ w_q.t() + b_q  # (N, C)
    k = kv @ w_k.t() + b_k  # (N, S, C)
    v = kv @ w_v.t() + b_v
    qh = q.reshape(N, H, 1, d)
    kh = k.reshape(N, -1, H, d).transpose(1, 2)  # (N, H, S, d)
    vh = v.reshape(N, -1, H, d).transpose(1, 2)
    scores = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)  # (N, H, 1, S)
    attn = torch.softmax(scores, dim=-1)
    out = (attn @ vh).reshape(N, C)  # heads concatenated
    return out.unsqueeze(0)


def normalized_tokens(x, T, dpe_weight, dpe_bias, eps):
    """xhat (N, S, C): DPE then LayerNorm without its affine part."""
    y = _keys_per_video(dpe_literal(x, T, dpe_weight, dpe_bias), T)
    return F.layer_norm(y, (y.shape[-1],), None, None, eps)


def folded_query(query, in_proj_weight, in_proj_bias, ln_weight, num_heads):
    """q_h (N, H, d), r_h = W_k,h^T q_h / sqrt(d) (N, H, C) and u_h = gamma * r_h."""
    C = query.shape[-1]
    H = num_heads
    d = C // H
    q = query[0] @ in_proj_weight[:C].t() + in_proj_bias[:C]
    qh = q.reshape(-1, H, d)
    w_k = in_proj_weight[C : 2 * C].reshape(H, d, C)
    r = torch.einsum("nhd,hdc->nhc", qh, w_k) / math.sqrt(d)
    return qh, r, ln_weight * r


def project_values(z, ln_weight, ln_bias, in_proj_weight, in_proj_bias, num_heads):
    """out_h = W_v,h (gamma * z_h + beta) + b_v,h, heads concatenated: (1, N, C)."""
    N, H, C = z.shape
    d = C // H
    w_v = in_proj_weight[2 * C :].reshape(H, d, C)
    out = torch.einsum("nhc,hdc->nhd", ln_weight * z + ln_bias, w_v) + in_proj_bias[2 * C :].reshape(H, d)
    return out.reshape(1, N, C)


def global_query_attention_folded_with_stats(
    x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps=1e-5
):
    """Folded form; returns (out (1, N, C), z (N, H, C), lse (N, H))."""
    xhat = normalized_tokens(x, T, dpe_weight, dpe_bias, eps)  # (N, S, C)
    _, _, u = folded_query(query, in_proj_weight, in_proj_bias, ln_weight, num_heads)
    scores = torch.einsum("nhc,nsc->nhs", u, xhat)
    lse = torch.logsumexp(scores, dim=-1)  # (N, H)
    attn = torch.exp(scores - lse.unsqueeze(-1))
    z = torch.einsum("nhs,nsc->nhc", attn, xhat)
    out = project_values(z, ln_weight, ln_bias, in_proj_weight, in_proj_bias, num_heads)
    return out, z, lse


def global_query_attention_folded(
    x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps=1e-5
):
    """Folded form; returns (1, N, C). Equal to the literal form up to rounding."""
    return global_query_attention_folded_with_stats(
        x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, num_heads, eps
    )[0]


def small_backward_algebra(grad_out, query, ln_weight, ln_bias, in_proj_weight, in_proj_bias, z, num_heads):
    """The O(N*C^2) per-video part of the backward that does not need the tokens.

    Returns a dict with q_h, r, u (folded query), p = W_v,h^T dout_h, dz = gamma * p, D = dz . z (the
    softmax-backward row constant), and the finished gradients of the value path: grad_w_v, grad_b_v,
    and the value-path parts of grad gamma / beta. Computed in the dtype of z.
    """
    C = query.shape[-1]
    H = num_heads
    d = C // H
    N = z.shape[0]
    dt = z.dtype
    query, ln_weight, ln_bias = query.to(dt), ln_weight.to(dt), ln_bias.to(dt)
    in_proj_weight, in_proj_bias = in_proj_weight.to(dt), in_proj_bias.to(dt)
    qh, r, u = folded_query(query, in_proj_weight, in_proj_bias, ln_weight, num_heads)
    d_out = grad_out.to(dt).reshape(N, H, d)
    w_v = in_proj_weight[2 * C :].reshape(H, d, C)
    p = torch.einsum("nhd,hdc->nhc", d_out, w_v)
    dz = ln_weight * p
    return {
        "qh": qh,
        "r": r,
        "u": u,
        "dz": dz,
        "D": (dz * z).sum(-1),
        "grad_w_v": torch.einsum("nhd,nhc->hdc", d_out, ln_weight * z + ln_bias).reshape(C, C),
        "grad_b_v": d_out.sum(0).reshape(C),
        "grad_ln_bias": p.sum((0, 1)),
        "grad_ln_weight_values": (p * z).sum((0, 1)),
    }


def finish_query_gradients(grad_u, algebra, query, ln_weight, in_proj_weight, num_heads):
    """From du (N, H, C) = sum_j ds_h(j) xhat_j to the gradients of gamma (score part), query and in_proj.

    Returns (grad_ln_weight_scores, grad_query (1, N, C), grad_w_q, grad_w_k, grad_b_q); b_k has zero
    gradient (its score term is the same for every key and cancels in the softmax).
    """
    C = query.shape[-1]
    H = num_heads
    d = C // H
    dt = grad_u.dtype
    scale = 1.0 / math.sqrt(d)
    qh, r = algebra["qh"], algebra["r"]
    dr = ln_weight.to(dt) * grad_u
    w_k = in_proj_weight[C : 2 * C].to(dt).reshape(H, d, C)
    grad_qh = torch.einsum("nhc,hdc->nhd", dr, w_k) * scale
    grad_w_k = (torch.einsum("nhd,nhc->hdc", qh, dr) * scale).reshape(C, C)
    grad_q = grad_qh.reshape(-1, C)
    q_in = query[0].to(dt)
    grad_w_q = grad_q.t() @ q_in
    grad_b_q = grad_q.sum(0)
    grad_query = (grad_q @ in_proj_weight[:C].to(dt)).unsqueeze(0)
    return (grad_u * r).sum((0, 1)), grad_query, grad_w_q, grad_w_k, grad_b_q


def dpe_backward(grad_y, x, T, dpe_weight):
    """Given dL/dy (L, N*T, C) for y = dpe_literal(x): (grad_x, grad_dpe_weight, grad_dpe_bias)."""
    L, NT, C = x.shape
    N = NT // T
    side = _grid_side(L)

    def to_video(t):
        return t[1:].reshape(side, side, N, T, C).permute(2, 4, 3, 0, 1)

    g5 = to_video(grad_y)
    x5 = to_video(x)
    grad_in = torch.nn.grad.conv3d_input(x5.shape, dpe_weight.to(g5.dtype), g5, padding=1, groups=C)
    grad_w = torch.nn.grad.conv3d_weight(x5.to(g5.dtype), dpe_weight.shape, g5, padding=1, groups=C)
    grad_b = g5.sum((0, 2, 3, 4))
    grad_in = grad_in.permute(3, 4, 0, 2, 1).reshape(L - 1, NT, C)
    grad_x = torch.cat([grad_y[:1], grad_y[1:] + grad_in], dim=0)
    return grad_x, grad_w, grad_b


def global_query_attention_folded_backward(
    grad_out, x, T, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias, z, lse,
    num_heads, eps=1e-5,
):
    """Analytic backward of the folded form, dense torch ops, computed in the dtype of z.

    Returns grads for (x, dpe_weight, dpe_bias, ln_weight, ln_bias, query, in_proj_weight, in_proj_bias).
    Per token j and head h (a = softmax weights, recomputed from the saved lse):
        ds_h(j) = a_h(j) (dz_h . xhat_j - D_h),   dxhat_j = sum_h a_h(j) dz_h + ds_h(j) u_h,
        du_h = sum_j ds_h(j) xhat_j,
    then LayerNorm backward to dy_j and the DPE backward to dx.
    """
    L, NT, C = x.shape
    N = NT // T
    dt = z.dtype
    algebra = small_backward_algebra(grad_out, query, ln_weight, ln_bias, in_proj_weight, in_proj_bias, z, num_heads)
    xd = x.to(dt)
    y = dpe_literal(xd, T, dpe_weight.to(dt), dpe_bias.to(dt))
    yv = _keys_per_video(y, T)  # (N, S, C)
    mean = yv.mean(-1, keepdim=True)
    var = (yv - mean).pow(2).mean(-1, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (yv - mean) * rstd
    u, dz, D = algebra["u"], algebra["dz"], algebra["D"]
    attn = torch.exp(torch.einsum("nhc,nsc->nhs", u, xhat) - lse.to(dt).unsqueeze(-1))  # (N, H, S)
    ds = attn * (torch.einsum("nhc,nsc->nhs", dz, xhat) - D.unsqueeze(-1))
    grad_xhat = torch.einsum("nhs,nhc->nsc", attn, dz) + torch.einsum("nhs,nhc->nsc", ds, u)
    grad_u = torch.einsum("nhs,nsc->nhc", ds, xhat)
    grad_yv = rstd * (
        grad_xhat - grad_xhat.mean(-1, keepdim=True) - xhat * (grad_xhat * xhat).mean(-1, keepdim=True)
    )
    grad_y = grad_yv.reshape(N, T, L, C).permute(2, 0, 1, 3).reshape(L, NT, C)
    grad_x, grad_dpe_w, grad_dpe_b = dpe_backward(grad_y, xd, T, dpe_weight)
    g_scores, grad_query, grad_w_q, grad_w_k, grad_b_q = finish_query_gradients(
        grad_u, algebra, query, ln_weight, in_proj_weight, num_heads
    )
    grad_ln_weight = algebra["grad_ln_weight_values"] + g_scores
    grad_in_w = torch.cat([grad_w_q, grad_w_k, algebra["grad_w_v"]], dim=0)
    grad_in_b = torch.cat([grad_b_q, torch.zeros_like(grad_b_q), algebra["grad_b_v"]], dim=0)
    return (
        grad_x.to(x.dtype),
        grad_dpe_w.to(dpe_weight.dtype),
        grad_dpe_b.to(dpe_bias.dtype),
        grad_ln_weight.to(ln_weight.dtype),
        algebra["grad_ln_bias"].to(ln_bias.dtype),
        grad_query.to(query.dtype),
        grad_in_w.to(in_proj_weight.dtype),
        grad_in_b.to(in_proj_bias.dtype),
    )
