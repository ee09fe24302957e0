"""Drop-in layers backed by the fused ops of fastdiss.functional.

Each layer has the parameters (names, shapes, initialisation) of the PyTorch module it mirrors, so
`ours.load_state_dict(theirs.state_dict())` works unchanged and gives the same outputs and
gradients. Which implementation runs (Triton or the PyTorch reference) follows fastdiss.set_backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastdiss import functional

__all__ = ["MultiheadAttention", "LayerNorm", "SelfCondProjection"]


class MultiheadAttention(nn.Module):
    """torch.nn.MultiheadAttention (need_weights=False) on fastdiss.functional.attention.

    Differences from torch, all explicit:
    - `batch_first` defaults to True.
    - A query whose keys are all padding returns out_proj(0) (= out_proj.bias) instead of NaN.
    - `attn_mask` is only accepted together with `is_causal=True`, as torch's "this mask is the
      causal mask" hint; is_causal=True also works without a mask. Other masks: use
      key_padding_mask (bool, True = padding) or is_causal.
    - need_weights=True is refused: the fused kernel never forms the attention matrix.
    - Dropout on the attention probabilities is not in the fused kernel: in training mode with
      dropout > 0 the layer falls back to F.scaled_dot_product_attention (same numbers as torch,
      slower); eval mode or dropout=0 always runs the fused kernel.
    - add_bias_kv / add_zero_attn are not supported.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, kdim=None, vdim=None,
                 batch_first=True, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim = embed_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()

    def _reset_parameters(self):
        """The initialisation of torch.nn.MultiheadAttention."""
        if self._qkv_same_embed_dim:
            nn.init.xavier_uniform_(self.in_proj_weight)
        else:
            for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def _project(self, query, key, value):
        """q, k, v as (B, H, L, Dh) views of the projections; one matmul when inputs coincide."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else (b[:E], b[E:2 * E], b[2 * E:])
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight
            if query is key and key is value:
                qkv = F.linear(query, w, b)
                return qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
            q = F.linear(query, w[:E], bq)
            if key is value:
                kv = F.linear(key, w[E:], None if b is None else b[E:])
                k, v = kv.unflatten(-1, (2, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
                return self._heads(q), k, v
            k, v = F.linear(key, w[E:2 * E], bk), F.linear(value, w[2 * E:], bv)
        else:
            q = F.linear(query, self.q_proj_weight, bq)
            k = F.linear(key, self.k_proj_weight, bk)
            v = F.linear(value, self.v_proj_weight, bv)
        return self._heads(q), self._heads(k), self._heads(v)

    def _heads(self, x):
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Inputs (B, L, E) if batch_first else (L, B, E), or unbatched (L, E). Returns (out, None)."""
        if need_weights:
            raise NotImplementedError("fastdiss.nn.MultiheadAttention never forms the attention "
                                      "weights; call it with need_weights=False")
        for name, x, dim in (("query", query, self.embed_dim), ("key", key, self.kdim),
                             ("value", value, self.vdim)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() not in (2, 3) or x.shape[-1] != dim:
                raise ValueError(f"{name} must have shape (B, L, {dim}), (L, B, {dim}) or (L, {dim}); "
                                 f"got {tuple(x.shape)}")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E) views; keeps `is` identity for fusion
            same_kv = key is value
            same_qkv = query is key and same_kv
            query = query.transpose(0, 1)
            key = query if same_qkv else key.transpose(0, 1)
            value = key if same_kv else value.transpose(0, 1)
        B, Lq, Lk = query.shape[0], query.shape[1], key.shape[1]
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(f"query/key/value batch and key/value lengths must agree; got query "
                             f"{tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}")
        if key_padding_mask is not None:
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
                raise TypeError("key_padding_mask must be a bool tensor (True = padding), got "
                                f"{getattr(key_padding_mask, 'dtype', type(key_padding_mask).__name__)}")
            if tuple(key_padding_mask.shape) != (B, Lk):
                raise ValueError(f"key_padding_mask must have shape (batch, key length) = {(B, Lk)}, "
                                 f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            if not is_causal:
                raise NotImplementedError(
                    "attn_mask is not supported by the fused attention; express padding with "
                    "key_padding_mask (bool, True = padding) and causality with is_causal=True")
            if tuple(attn_mask.shape[-2:]) != (Lq, Lk):
                raise ValueError(f"attn_mask (the causal hint) must end in shape {(Lq, Lk)}, "
                                 f"got {tuple(attn_mask.shape)}")

        q, k, v = self._project(query, key, value)
        if self.training and self.dropout > 0.0:
            o = self._sdpa_with_dropout(q, k, v, key_padding_mask, is_causal)
        else:
            o = functional.attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal)
        out = self.out_proj(o.transpose(1, 2).flatten(2))
        if unbatched:
            return out.squeeze(0), None
        return (out if self.batch_first else out.transpose(0, 1)), None

    def _sdpa_with_dropout(self, q, k, v, key_padding_mask, is_causal):
        """Training-mode fallback: attention-probability dropout needs SDPA. Rows with every key
        masked give 0 like the fused path."""
        if key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout, is_causal=is_causal)
        keep = ~key_padding_mask[:, None, None, :]
        if is_causal:
            keep = keep & torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.dropout)
        return torch.where(keep.any(-1, keepdim=True), o, 0.0)


class LayerNorm(nn.LayerNorm):
    """torch.nn.LayerNorm whose forward takes an optional residual:
    forward(x) = layer_norm(x); forward(x, residual) = (layer_norm(x + residual), x + residual),
    both from one fused kernel (fastdiss.functional.layer_norm)."""

    def forward(self, x, residual=None):
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"input must end in normalized_shape {tuple(self.normalized_shape)}, "
                             f"got {tuple(x.shape)}")
        if residual is not None and residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
        if k == 1:
            return functional.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual)
        # normalising over the last k dims == normalising their flattened product
        flat = lambda t: None if t is None else t.flatten(-k) if t.dim() > k else t.flatten()  # noqa: E731
        y = functional.layer_norm(flat(x), flat(self.weight), flat(self.bias), eps=self.eps,
                                  residual=flat(residual))
        if residual is None:
            return y.unflatten(-1, self.normalized_shape)
        return y[0].unflatten(-1, self.normalized_shape), y[1].unflatten(-1, self.normalized_shape)


class SelfCondProjection(nn.Linear):
    """nn.Linear(2 * d_in, d_out) applied to [x_t ; sc] without building the concatenation:
    forward(x_t, sc, add=None) = linear(cat([x_t, sc], -1)) (+ add). Loads an nn.Linear state_dict."""

    def __init__(self, d_in, d_out, bias=True, device=None, dtype=None):
        super().__init__(2 * d_in, d_out, bias=bias, device=device, dtype=dtype)
        self.d_in = d_in

    def forward(self, x_t, sc, add=None):
        for name, t in (("x_t", x_t), ("sc", sc)):
            if not isinstance(t, torch.Tensor) or t.shape[-1] != self.d_in:
                raise ValueError(f"{name} must be a tensor of shape (..., {self.d_in}), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        return functional.self_cond_project(x_t, sc, self.weight, self.bias, add=add)

    def extra_repr(self):
        return f"d_in={self.d_in}, d_out={self.out_features}, bias={self.bias is not None}"
