"""The fused ops. Each is a pair of torch.library operators (forward, backward; registered
by `uniformerv2_kernels.library`) with an autograd Function around them, on the backend the
registry (`uniformerv2_kernels.backends`) picks: cuda, triton or the pure-PyTorch reference; or the
reference under torch.compile (the inductor backend, `uniformerv2_kernels.inductor`), outside the operators."""

from .ffn import fused_ffn
from .global_query_attention import global_query_attention
from .layer_norm import clip_layer_norm
from .local_temporal_mhra import local_temporal_mhra
from .spatial_attention import spatial_attention

__all__ = ["clip_layer_norm", "fused_ffn", "global_query_attention", "local_temporal_mhra", "spatial_attention"]
