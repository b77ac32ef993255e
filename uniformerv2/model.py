"""UniFormerV2, exactly as the official release defines it (same math, same state-dict keys).

Layout: the token stream is kept as (L, N*T, C) through all blocks: L = 1 + h*w tokens per frame (class
token first), rows n*T + t (video, then frame). Module and parameter names follow the official code so
official, mmaction2 and CLIP weights load unchanged.

Every block has two paths: the reference path (plain PyTorch, literally the official forward) and the
fused path (the ops of `uniformerv2_kernels`, on the backend the registry picks). `model.set_fused(True)`
switches all blocks without touching the weights; both paths compute the same function.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from uniformerv2_kernels import selection


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: computes in fp32 and casts back to the input dtype.

    (float64 stays float64 rather than dropping to fp32 as the official code would, so the model can be
    gradient-checked; for fp32/fp16/bf16 this is the official computation.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        compute = torch.promote_types(orig_type, torch.float32)
        weight = None if self.weight is None else self.weight.to(compute)  # exact: fp16/bf16 -> fp32
        bias = None if self.bias is None else self.bias.to(compute)
        return F.layer_norm(x.to(compute), self.normalized_shape, weight, bias, self.eps).to(orig_type)


def drop_path_scale(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor | None:
    """timm's DropPath mask along dimension 0 of `x` (scaled by 1/keep), or None when inactive.

    Returned as a 1-d tensor so the fused ops can take it as a per-row (or per-video) branch scale; the
    reference path multiplies by it exactly like timm's `drop_path`.
    """
    if drop_prob == 0.0 or not training:
        return None
    keep_prob = 1.0 - drop_prob
    # Drawn in fp32 whatever x's dtype: the same seed gives the same masks for an fp64, fp32 or bf16 model
    # (CUDA's generator draws different streams per dtype), and keep_prob is not rounded to bf16.
    scale = torch.empty(x.shape[0], device=x.device, dtype=torch.float32).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        scale.div_(keep_prob)
    return scale.to(x.dtype)


def spatial_attention_backend(backend: str | dict | None) -> str | None:
    """The spatial (CLIP) attention has Triton and reference kernels only: a model asked for the CUDA
    backend (per call or by UNIFORMERV2_BACKEND) runs it on Triton, and every other op on its CUDA kernel
    (a rule of uniformerv2_kernels.selection.MODEL_RULES)."""
    return selection.spatial_attention_backend(backend)


def apply_scale(branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    if scale is None:
        return branch
    return branch * scale.view((-1,) + (1,) * (branch.dim() - 1)).to(branch.dtype)


_FUSED_OPS = None


def _ops():
    """The fused ops, imported on first use so the reference model never needs Triton."""
    global _FUSED_OPS
    if _FUSED_OPS is None:
        from types import SimpleNamespace

        from uniformerv2_kernels.ops.ffn import fused_ffn
        from uniformerv2_kernels.ops.global_query_attention import global_query_attention
        from uniformerv2_kernels.ops.layer_norm import clip_layer_norm
        from uniformerv2_kernels.ops.local_temporal_mhra import local_temporal_mhra
        from uniformerv2_kernels.ops.spatial_attention import spatial_attention

        _FUSED_OPS = SimpleNamespace(
            fused_ffn=fused_ffn, global_query_attention=global_query_attention, clip_layer_norm=clip_layer_norm,
            local_temporal_mhra=local_temporal_mhra, spatial_attention=spatial_attention)
    return _FUSED_OPS


class LocalTemporalMHRA(nn.Module):
    """Local temporal MHRA: BatchNorm3d -> 1x1x1 conv -> depthwise (3,1,1) conv -> 1x1x1 conv."""

    def __init__(self, d_model: int, dw_reduction: float = 1.5, pos_kernel_size: int = 3):
        super().__init__()
        padding = pos_kernel_size // 2
        re_d_model = int(d_model // dw_reduction)
        self.pos_embed = nn.Sequential(
            nn.BatchNorm3d(d_model),
            nn.Conv3d(d_model, re_d_model, kernel_size=1, stride=1, padding=0),
            nn.Conv3d(re_d_model, re_d_model, kernel_size=(pos_kernel_size, 1, 1), stride=(1, 1, 1),
                      padding=(padding, 0, 0), groups=re_d_model),
            nn.Conv3d(re_d_model, d_model, kernel_size=1, stride=1, padding=0),
        )
        # The block starts as an identity: the last conv is zero-initialised.
        nn.init.constant_(self.pos_embed[3].weight, 0)
        nn.init.constant_(self.pos_embed[3].bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The official module: x of shape (N, C, T, H, W)."""
        return self.pos_embed(x)

    def forward_stream(self, x: torch.Tensor, T: int, drop_prob: float, fused: bool, backend=None) -> torch.Tensor:
        """x (L, N*T, C) -> x with patch tokens += drop_path(lmhra(patch tokens)); class tokens untouched."""
        L, NT, C = x.shape
        N = NT // T
        if fused:
            bn, conv1, dw, conv2 = self.pos_embed
            scale = drop_path_scale(x.new_empty(N), drop_prob, self.training)
            return _ops().local_temporal_mhra(
                x, T, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                conv1.weight, conv1.bias, dw.weight, dw.bias, conv2.weight, conv2.bias,
                training=bn.training or not bn.track_running_stats, momentum=bn.momentum, eps=bn.eps,
                branch_scale=scale, backend=selection.op_backend(backend, "local_temporal_mhra"),
            )
        # The official code views the patches as an (H, W) grid; every layer here (BatchNorm, 1x1x1 and (3,1,1)
        # convs) treats spatial positions alike, so an (L - 1, 1) grid is the same math with no square root
        # of a size (which torch.jit.trace records as a tensor).
        tmp_x = x[1:, :, :].view(L - 1, 1, N, T, C).permute(2, 4, 3, 0, 1).contiguous()
        tmp_x = tmp_x + apply_scale(self(tmp_x), drop_path_scale(tmp_x, drop_prob, self.training))
        tmp_x = tmp_x.view(N, C, T, L - 1).permute(3, 0, 2, 1).contiguous().view(L - 1, NT, C)
        return torch.cat([x[:1, :, :], tmp_x], dim=0)


class ResidualAttentionBlock(nn.Module):
    """The local UniBlock: a CLIP block with optional local temporal MHRA before (and after) attention."""

    def __init__(self, d_model: int, n_head: int, drop_path: float = 0.0, dw_reduction: float = 1.5,
                 no_lmhra: bool = False, double_lmhra: bool = True):
        super().__init__()
        self.n_head = n_head
        self.drop_prob = drop_path
        self.no_lmhra = no_lmhra
        self.double_lmhra = double_lmhra
        if not no_lmhra:
            self.lmhra1 = LocalTemporalMHRA(d_model, dw_reduction=dw_reduction)
            if double_lmhra:
                self.lmhra2 = LocalTemporalMHRA(d_model, dw_reduction=dw_reduction)
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.fused = False
        self.backend = None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False, attn_mask=None)[0]

    def _attention_branch(self, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
        if self.fused:
            def fn(x):
                return _ops().spatial_attention(
                    x, self.ln_1.weight, self.ln_1.bias, self.attn.in_proj_weight, self.attn.in_proj_bias,
                    self.attn.out_proj.weight, self.attn.out_proj.bias, self.n_head, eps=self.ln_1.eps,
                    backend=spatial_attention_backend(self.backend))
            if use_checkpoint:
                return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
            return fn(x)
        if use_checkpoint:
            return torch.utils.checkpoint.checkpoint(self.attention, self.ln_1(x), use_reentrant=False)
        return self.attention(self.ln_1(x))

    def _mlp_residual(self, x: torch.Tensor, use_checkpoint: bool) -> torch.Tensor:
        if self.fused:
            scale = drop_path_scale(x, self.drop_prob, self.training)
            def fn(x):
                return _ops().fused_ffn(
                    x, self.ln_2.weight, self.ln_2.bias, self.mlp.c_fc.weight, self.mlp.c_fc.bias,
                    self.mlp.c_proj.weight, self.mlp.c_proj.bias, eps=self.ln_2.eps, row_scale=scale,
                    backend=selection.op_backend(self.backend, "fused_ffn"))
            if use_checkpoint:
                return torch.utils.checkpoint.checkpoint(fn, x, use_reentrant=False)
            return fn(x)
        if use_checkpoint:
            mlp_out = torch.utils.checkpoint.checkpoint(self.mlp, self.ln_2(x), use_reentrant=False)
        else:
            mlp_out = self.mlp(self.ln_2(x))
        return x + apply_scale(mlp_out, drop_path_scale(x, self.drop_prob, self.training))

    def forward(self, x: torch.Tensor, T: int = 8, use_checkpoint: bool = False) -> torch.Tensor:
        # x: (1 + h*w, N*T, C)
        if not self.no_lmhra:
            x = self.lmhra1.forward_stream(x, T, self.drop_prob, self.fused, self.backend)
        attn_out = self._attention_branch(x, use_checkpoint)
        x = x + apply_scale(attn_out, drop_path_scale(x, self.drop_prob, self.training))
        if not self.no_lmhra and self.double_lmhra:
            x = self.lmhra2.forward_stream(x, T, self.drop_prob, self.fused, self.backend)
        return self._mlp_residual(x, use_checkpoint)


class Extractor(nn.Module):
    """The global UniBlock's cross-attention + MLP on the learnable query (official name `Extractor`)."""

    def __init__(self, d_model: int, n_head: int, mlp_factor: float = 4.0, dropout: float = 0.0,
                 drop_path: float = 0.0):
        super().__init__()
        self.drop_prob = drop_path
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = nn.LayerNorm(d_model)
        d_mlp = round(mlp_factor * d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_mlp)),
            ("gelu", QuickGELU()),
            ("dropout", nn.Dropout(dropout)),
            ("c_proj", nn.Linear(d_mlp, d_model)),
        ]))
        self.ln_2 = nn.LayerNorm(d_model)
        self.ln_3 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.attn.in_proj_weight)
        nn.init.constant_(self.attn.out_proj.weight, 0.0)
        nn.init.constant_(self.attn.out_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.mlp[0].weight)
        nn.init.constant_(self.mlp[-1].weight, 0.0)
        nn.init.constant_(self.mlp[-1].bias, 0.0)
        self.fused = False
        self.backend = None

    def attention(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Official cross-attention: x (1, N, C) queries, y (T*L, N, C) keys/values (already normed)."""
        d_model = self.ln_1.weight.size(0)
        q = (x @ self.attn.in_proj_weight[:d_model].T) + self.attn.in_proj_bias[:d_model]
        k = (y @ self.attn.in_proj_weight[d_model:-d_model].T) + self.attn.in_proj_bias[d_model:-d_model]
        v = (y @ self.attn.in_proj_weight[-d_model:].T) + self.attn.in_proj_bias[-d_model:]
        Tx, Ty, N = q.size(0), k.size(0), q.size(1)
        q = q.view(Tx, N, self.attn.num_heads, self.attn.head_dim).permute(1, 2, 0, 3)
        k = k.view(Ty, N, self.attn.num_heads, self.attn.head_dim).permute(1, 2, 0, 3)
        v = v.view(Ty, N, self.attn.num_heads, self.attn.head_dim).permute(1, 2, 0, 3)
        aff = (q @ k.transpose(-2, -1)) / (self.attn.head_dim ** 0.5)
        aff = aff.softmax(dim=-1)
        out = aff @ v
        out = out.permute(2, 0, 1, 3).flatten(2)
        return self.attn.out_proj(out)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        # the fused FFN has no dropout inside (a rule of uniformerv2_kernels.selection.MODEL_RULES)
        if selection.extractor_mlp_fused(self.fused, self.training, self.mlp.dropout.p):
            scale = drop_path_scale(x, self.drop_prob, self.training)
            return _ops().fused_ffn(
                x, self.ln_2.weight, self.ln_2.bias, self.mlp.c_fc.weight, self.mlp.c_fc.bias,
                self.mlp.c_proj.weight, self.mlp.c_proj.bias, eps=self.ln_2.eps, row_scale=scale,
                backend=selection.op_backend(self.backend, "fused_ffn"))
        # Official order: the MLP's dropout draws its mask before drop path does.
        mlp_out = self.mlp(self.ln_2(x))
        return x + apply_scale(mlp_out, drop_path_scale(x, self.drop_prob, self.training))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reference path: x (1, N, C) query stream, y (T*L, N, C) DPE-added tokens."""
        x = x + apply_scale(self.attention(self.ln_1(x), self.ln_3(y)), drop_path_scale(x, self.drop_prob, self.training))
        return self.mlp_residual(x)

    def forward_fused(self, x: torch.Tensor, stream: torch.Tensor, T: int, dpe: nn.Conv3d) -> torch.Tensor:
        """Fused path: DPE + ln_3 + folded cross-attention in one op over the (L, N*T, C) stream."""
        # The op computes in the stream's dtype (under autocast the stream is bf16/fp16 while the query
        # and the parameters stay fp32): cast them as autocast would cast a matmul's operands.
        def cast(t):
            return t if t.dtype == stream.dtype else t.to(stream.dtype)

        attn = _ops().global_query_attention(
            stream, T, cast(dpe.weight), cast(dpe.bias), cast(self.ln_3.weight), cast(self.ln_3.bias),
            cast(self.ln_1(x)), cast(self.attn.in_proj_weight), cast(self.attn.in_proj_bias),
            self.attn.num_heads, eps=self.ln_3.eps,
            backend=selection.op_backend(self.backend, "global_query_attention"))
        x = x + apply_scale(self.attn.out_proj(attn), drop_path_scale(x, self.drop_prob, self.training))
        return self.mlp_residual(x)


def _as_list(value, n: int) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} values, got {len(value)}: {value}")
        return list(value)
    return [value] * n


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, backbone_drop_path_rate: float = 0.0,
                 use_checkpoint: bool = False, checkpoint_num: Sequence[int] | int = (0,), t_size: int = 8,
                 dw_reduction: float = 2, no_lmhra: bool = False, double_lmhra: bool = True,
                 return_list: Sequence[int] = (8, 9, 10, 11), n_layers: int = 4, n_dim: int = 768,
                 n_head: int = 12, mlp_factor: float = 4.0, drop_path_rate: float = 0.0,
                 mlp_dropout: Sequence[float] | float = (0.5, 0.5, 0.5, 0.5), cls_dropout: float = 0.5,
                 num_classes: int = 400, frozen: bool = False):
        super().__init__()
        self.T = t_size
        self.return_list = list(return_list)
        if n_layers != len(self.return_list):
            raise ValueError(f"n_layers={n_layers} must equal len(return_list)={len(self.return_list)}")
        if any(not 0 <= i < layers for i in self.return_list):
            raise ValueError(f"return_list {self.return_list} must index local blocks 0..{layers - 1}")
        if n_dim != width:
            raise ValueError(f"n_dim={n_dim} must equal width={width} (the global blocks read the stream)")
        b_dpr = [x.item() for x in torch.linspace(0, backbone_drop_path_rate, layers, device="cpu")]
        self.resblocks = nn.ModuleList([
            ResidualAttentionBlock(width, heads, drop_path=b_dpr[i], dw_reduction=dw_reduction,
                                   no_lmhra=no_lmhra, double_lmhra=double_lmhra)
            for i in range(layers)
        ])
        self.use_checkpoint = use_checkpoint
        self.checkpoint_num = int(checkpoint_num[0] if isinstance(checkpoint_num, (list, tuple)) else checkpoint_num)
        self.n_layers = n_layers
        self.frozen = frozen
        # Global UniBlocks.
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, n_dim))
        self.dpe = nn.ModuleList([
            nn.Conv3d(n_dim, n_dim, kernel_size=3, stride=1, padding=1, bias=True, groups=n_dim)
            for _ in range(n_layers)
        ])
        for m in self.dpe:
            nn.init.constant_(m.bias, 0.0)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, n_layers, device="cpu")]
        mlp_dropout = _as_list(mlp_dropout, n_layers)
        self.dec = nn.ModuleList([
            Extractor(n_dim, n_head, mlp_factor=mlp_factor, dropout=mlp_dropout[i], drop_path=dpr[i])
            for i in range(n_layers)
        ])
        # Head.
        self.proj = nn.Sequential(nn.LayerNorm(n_dim), nn.Dropout(cls_dropout), nn.Linear(n_dim, num_classes))
        if not frozen:
            self.balance = nn.Parameter(torch.zeros(n_dim))
        self.sigmoid = nn.Sigmoid()
        # Side of the square patch grid; UniFormerV2 sets it from its configuration (input_resolution //
        # patch_size), so the shape arithmetic traces. None: read from the stream's length.
        self.grid_size: int | None = None

    def forward(self, x: torch.Tensor, T: int | None = None) -> torch.Tensor:
        T = self.T if T is None else T
        L, NT, C = x.shape
        N = NT // T
        H = W = self.grid_size if self.grid_size is not None else math.isqrt(int(L - 1))
        cls_token = self.temporal_cls_token.repeat(1, N, 1)
        j = -1
        for i, resblock in enumerate(self.resblocks):
            x = resblock(x, T, use_checkpoint=self.use_checkpoint and i < self.checkpoint_num)
            if i in self.return_list:
                j += 1
                dec = self.dec[j]
                if dec.fused:
                    cls_token = dec.forward_fused(cls_token, x, T, self.dpe[j])
                    continue
                tmp_x = x.clone().view(L, N, T, C)
                # DPE on patch tokens only; the main stream is not modified.
                tmp_feats = tmp_x[1:].permute(1, 3, 2, 0).reshape(N, C, T, H, W)
                tmp_feats = self.dpe[j](tmp_feats.clone()).view(N, C, T, L - 1).permute(3, 0, 2, 1).contiguous()
                tmp_x[1:] = tmp_x[1:] + tmp_feats
                tmp_x = tmp_x.permute(2, 0, 1, 3).flatten(0, 1)  # (T*L, N, C)
                cls_token = dec(cls_token, tmp_x)
        if self.frozen:
            return self.proj(cls_token[0, :, :])
        weight = self.sigmoid(self.balance)
        residual = x.view(L, N, T, C)[0].mean(1)  # final frame class tokens averaged over T: (N, C)
        return self.proj((1 - weight) * cls_token[0, :, :] + weight * residual)


class UniFormerV2(nn.Module):
    """The official `VisionTransformer` of UniFormerV2 (stem + Transformer with local and global blocks)."""

    def __init__(self, input_resolution: int = 224, patch_size: int = 16, width: int = 768, layers: int = 12,
                 heads: int = 12, output_dim: int = 512, use_checkpoint: bool = False,
                 checkpoint_num: Sequence[int] | int = (0,), t_size: int = 8, kernel_size: int = 3,
                 dw_reduction: float = 1.5, temporal_downsample: bool = True, no_lmhra: bool = False,
                 double_lmhra: bool = True, return_list: Sequence[int] = (8, 9, 10, 11), n_layers: int = 4,
                 n_dim: int = 768, n_head: int = 12, mlp_factor: float = 4.0, drop_path_rate: float = 0.0,
                 backbone_drop_path_rate: float = 0.0, mlp_dropout: Sequence[float] | float = (0.5, 0.5, 0.5, 0.5),
                 cls_dropout: float = 0.5, num_classes: int = 400, frozen: bool = False):
        super().__init__()
        if input_resolution % patch_size:
            raise ValueError(f"input_resolution={input_resolution} must be a multiple of patch_size={patch_size}")
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.config = dict(
            input_resolution=input_resolution, patch_size=patch_size, width=width, layers=layers, heads=heads,
            output_dim=output_dim, use_checkpoint=use_checkpoint, checkpoint_num=checkpoint_num, t_size=t_size,
            kernel_size=kernel_size, dw_reduction=dw_reduction, temporal_downsample=temporal_downsample,
            no_lmhra=no_lmhra, double_lmhra=double_lmhra, return_list=list(return_list), n_layers=n_layers,
            n_dim=n_dim, n_head=n_head, mlp_factor=mlp_factor, drop_path_rate=drop_path_rate,
            backbone_drop_path_rate=backbone_drop_path_rate, mlp_dropout=mlp_dropout, cls_dropout=cls_dropout,
            num_classes=num_classes, frozen=frozen,
        )
        self.input_resolution = input_resolution
        self.output_dim = output_dim
        self.temporal_downsample = temporal_downsample
        padding = (kernel_size - 1) // 2
        if temporal_downsample:
            self.conv1 = nn.Conv3d(3, width, (kernel_size, patch_size, patch_size), (2, patch_size, patch_size),
                                   (padding, 0, 0), bias=False)
            t_size = t_size // 2
        else:
            self.conv1 = nn.Conv3d(3, width, (1, patch_size, patch_size), (1, patch_size, patch_size), (0, 0, 0),
                                   bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(
            width, layers, heads, dw_reduction=dw_reduction, backbone_drop_path_rate=backbone_drop_path_rate,
            use_checkpoint=use_checkpoint, checkpoint_num=checkpoint_num, t_size=t_size, no_lmhra=no_lmhra,
            double_lmhra=double_lmhra, return_list=return_list, n_layers=n_layers, n_dim=n_dim, n_head=n_head,
            mlp_factor=mlp_factor, drop_path_rate=drop_path_rate, mlp_dropout=mlp_dropout,
            cls_dropout=cls_dropout, num_classes=num_classes, frozen=frozen,
        )
        self.transformer.grid_size = input_resolution // patch_size
        self.fused = False
        self.backend = None
        if frozen:
            self.freeze_backbone()

    # -- switches -------------------------------------------------------------------------------------
    def set_fused(self, fused: bool = True, backend: str | dict | None = None) -> "UniFormerV2":
        """Runs every block through the fused ops (True) or the reference PyTorch path (False). ``backend``:
        None (automatic, or UNIFORMERV2_BACKEND), one backend for every op ("cuda", "triton", "inductor",
        "reference"), or a dict from op names (``uniformerv2_kernels.selection.OPS``) to backends, the
        others automatic, e.g. ``{"fused_ffn": "inductor"}``."""
        backend = selection.check_model_backend(backend)
        self.fused = bool(fused)
        self.backend = backend
        if self.fused:  # import the ops now: a first forward inside torch.compile cannot trace the import
            _ops()
        for m in self.modules():
            if isinstance(m, (ResidualAttentionBlock, Extractor)):
                m.fused = self.fused
                m.backend = backend
        return self

    def freeze_backbone(self) -> None:
        """The frozen variant trains only the global blocks and the head."""
        for name, p in self.named_parameters():
            if not (name.startswith("transformer.dec.") or name.startswith("transformer.dpe.")
                    or name.startswith("transformer.proj.") or name == "transformer.temporal_cls_token"):
                p.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True, num_blocks: int | None = None) -> None:
        self.transformer.use_checkpoint = enable
        self.transformer.checkpoint_num = len(self.transformer.resblocks) if num_blocks is None else num_blocks

    # -- forward --------------------------------------------------------------------------------------
    def _check_input_type(self, x: torch.Tensor) -> None:
        """Name the problem where conv1 would only say "expected scalar type ...": raw pixels, or a dtype or
        device other than the weights' (autocast casts the input itself, unless either is float64)."""
        weight = self.conv1.weight
        if not x.is_floating_point():
            raise TypeError(f"input has dtype {x.dtype}; expected floating-point pixels normalised with mean "
                            f"0.45 and std 0.225 on a [0, 1] scale (e.g. (video / 255 - 0.45) / 0.225)")
        if x.device != weight.device:
            raise ValueError(f"input is on {x.device} but the model is on {weight.device}")
        autocast = torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype)
        if x.dtype != weight.dtype and not autocast:
            raise TypeError(f"input has dtype {x.dtype} but the model's weights are {weight.dtype}: cast the "
                            f"input (x.to({weight.dtype})) or run under torch.autocast")

    def stem(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(N, 3, T_in, H, W) -> the token stream (L, N*T, C) after ln_pre, and T."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"input must have shape (N, 3, T, H, W), got {tuple(x.shape)}")
        self._check_input_type(x)
        x = self.conv1(x)
        N, C, T, H, W = x.shape
        # (skipped while torch.jit.trace records, where sizes are tensors; a wrong grid still fails below)
        if not torch.jit.is_tracing() and (H * W + 1) != self.positional_embedding.shape[0]:
            raise ValueError(
                f"input gives a {H}x{W} patch grid but the model was built for "
                f"{self.input_resolution}x{self.input_resolution} (load_checkpoint interpolates weights)")
        x = x.permute(0, 2, 3, 4, 1).reshape(N * T, H * W, C)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        if self.fused:
            # The fused ops take the stream contiguous in (L, N*T, C): permute first, then normalise.
            x = x.permute(1, 0, 2).contiguous()
            return _ops().clip_layer_norm(x, self.ln_pre.weight, self.ln_pre.bias, eps=self.ln_pre.eps,
                                          backend=selection.op_backend(self.backend, "clip_layer_norm")), T
        return self.ln_pre(x).permute(1, 0, 2), T  # NLD -> LND

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, T = self.stem(x)
        return self.transformer(x, T)
