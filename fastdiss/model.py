"""The denoiser: an encoder-decoder pre-LN Transformer that predicts clean target embeddings.

    z0      = LayerNorm(E[y])                                   (B, Lt, d_e)   embed_target
    h       = Linear([x_t ; sc]) + time_emb(t_i) + pos_i        (B, Lt, d)     self-conditioning input
    h       = decoder(h, encoder(src))                          self-attn (tgt mask) + cross-attn (src mask) + FFN
    x0_hat  = Linear(h)                                         (B, Lt, d_e)   forward
    logits  = x0_hat @ LayerNorm(E)^T                           (B, Lt, V)     tied rounding head
    length  = Linear(mean_pool(encoder(src)))                   (B, max_len+1) length_logits

The encoder output and every decoder layer's cross-attention K/V live in an EncoderState,
computed once per source and reused at every sampling step. All attention, LayerNorm and the
self-conditioning projection go through fastdiss.functional (fast kernels on GPU) unless
ModelConfig.use_kernels is False.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiss import functional
from fastdiss.config import ModelConfig


# ---------------------------------------------------------------------------------------------
# Building blocks (also used by the autoregressive baseline)
# ---------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """LayerNorm with an optional fused residual add: forward(x, residual) returns
    (norm(x + residual), x + residual), the pair a pre-LN block needs."""

    def __init__(self, dim: int, use_kernels: bool = True, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        if affine:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
        else:  # fixed unit scale, zero shift (kept as buffers so every kernel path stays the same)
            self.register_buffer("weight", torch.ones(dim), persistent=False)
            self.register_buffer("bias", torch.zeros(dim), persistent=False)
        self.eps = eps
        self.use_kernels = use_kernels

    def forward(self, x, residual=None):
        if self.use_kernels:
            return functional.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual)
        if residual is None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        h = x + residual
        return F.layer_norm(h, h.shape[-1:], self.weight, self.bias, self.eps), h


def add_and_norm(norm: LayerNorm, x, residual):
    """Residual stream update of a pre-LN block: returns (norm(stream), stream), stream = x + residual."""
    if residual is None:
        return norm(x), x
    return norm(x, residual)


def _sdpa(q, k, v, key_padding_mask=None, is_causal=False):
    """Plain-PyTorch attention with the functional.attention conventions (fully padded rows -> 0)."""
    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask[:, None, None, :]
        if is_causal:
            Lq, Lk = q.shape[-2], k.shape[-2]
            mask = mask & torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril()
            is_causal = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    return out.nan_to_num(0.0) if mask is not None else out


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value projections, so cross-attention
    K/V can be projected once per source (project_kv) and passed in at every step; self-attention
    can append its K/V to a cache for one-token-at-a-time decoding (the AR baseline)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, use_kernels: bool = True):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.use_kernels = use_kernels

    def _heads(self, x):  # (B, L, d) -> (B, H, L, d/H)
        B, L, d = x.shape
        return x.view(B, L, self.n_heads, d // self.n_heads).transpose(1, 2)

    def project_kv(self, x):
        k, v = self.kv_proj(x).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x, k=None, v=None, key_padding_mask=None, is_causal=False, cache=None, pos: int = 0):
        """Self-attention when k, v are None; else attention of x over the given (B, H, Lk, Dh) K/V.
        cache: self-attention K/V of the positions before `pos`; x's own K/V are written at pos
        (cache.write(k, v, pos) returns the K/V of all positions so far)."""
        q = self._heads(self.q_proj(x))
        if k is None:
            k, v = self.project_kv(x)
            if cache is not None:
                k, v = cache.write(k, v, pos)
        if self.use_kernels:
            o = functional.attention(q, k, v, key_padding_mask=key_padding_mask, is_causal=is_causal)
        else:
            o = _sdpa(q, k, v, key_padding_mask, is_causal)
        B, H, L, Dh = o.shape
        return self.dropout(self.out_proj(o.transpose(1, 2).reshape(B, L, H * Dh)))


class FeedForward(nn.Module):
    """fc2(gelu(fc1(x))) with dropout on the output and, if activation_dropout > 0, on the hidden
    activations too (the AR baseline's recipe)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = activation_dropout

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        if self.activation_dropout:
            h = F.dropout(h, self.activation_dropout, self.training)
        return self.dropout(self.fc2(h))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, activation_dropout: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(cfg.d_model, cfg.use_kernels)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.use_kernels)
        self.norm2 = LayerNorm(cfg.d_model, cfg.use_kernels)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, activation_dropout)

    def forward(self, x, residual, src_mask):
        y, residual = add_and_norm(self.norm1, x, residual)
        x = self.attn(y, key_padding_mask=src_mask)
        y, residual = self.norm2(x, residual)
        return self.ffn(y), residual


class Encoder(nn.Module):
    """Scaled token embeddings + sinusoidal positions, pre-LN self-attention layers, final LayerNorm."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int, shared_dim: int | None = None):
        super().__init__()
        if shared_dim is None:
            self.embed = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        else:  # source tokens come as rows of a shared (V, shared_dim) table, projected up to d_model
            self.embed_up = nn.Linear(shared_dim, cfg.d_model, bias=False)
        self.embed_scale = math.sqrt(cfg.d_model)
        self.register_buffer("pos", sinusoidal_positions(cfg.max_len, cfg.d_model), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.n_enc))
        self.norm = LayerNorm(cfg.d_model, cfg.use_kernels)
        self.max_len = cfg.max_len

    def forward(self, src, src_mask, shared_table=None):
        """src (B, Ls) ids; shared_table: the (V, shared_dim) table when embeddings are shared."""
        L = src.shape[1]
        if L > self.max_len:
            raise ValueError(f"source length {L} exceeds the model's max_len {self.max_len}")
        tok = self.embed(src) * self.embed_scale if shared_table is None else self.embed_up(F.embedding(src, shared_table))
        x, residual = self.dropout(tok + self.pos[:L].to(tok.dtype)), None
        for layer in self.layers:
            x, residual = layer(x, residual, src_mask)
        return add_and_norm(self.norm, x, residual)[0]


def sinusoidal_positions(n: int, dim: int):
    """(n, dim) fixed sinusoidal position table (Vaswani et al.); the same table on both sides makes
    source-target alignment easy to learn."""
    return sinusoidal_embedding(torch.arange(n, dtype=torch.float32), dim, scale=1.0)


def sinusoidal_embedding(t, dim: int, scale: float = 1000.0):
    """Sinusoidal features of scale * t for t of any shape -> (*t.shape, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (scale * t.float())[..., None] * freqs
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


# ---------------------------------------------------------------------------------------------
# The diffusion denoiser
# ---------------------------------------------------------------------------------------------

@dataclass
class EncoderState:
    """Everything the decoder needs from the source, computed once (Denoiser.encode).

    out (B, Ls, d); src_mask (B, Ls) bool, True = padding; cross_kv: per decoder layer a
    (k, v) pair of shape (B, H, Ls, d/H)."""
    out: torch.Tensor
    src_mask: torch.Tensor
    cross_kv: tuple

    def index_select(self, idx: torch.Tensor) -> "EncoderState":
        """Rows idx of the batch (e.g. one row per candidate: idx = sentence index of each candidate)."""
        return EncoderState(self.out.index_select(0, idx), self.src_mask.index_select(0, idx),
                            tuple((k.index_select(0, idx), v.index_select(0, idx)) for k, v in self.cross_kv))

    def repeat_interleave(self, n: int) -> "EncoderState":
        """Each row repeated n times in a row (row i -> rows i*n .. i*n+n-1)."""
        idx = torch.arange(self.out.shape[0], device=self.out.device).repeat_interleave(n)
        return self.index_select(idx)

    @property
    def batch_size(self) -> int:
        return self.out.shape[0]


class DecoderLayer(nn.Module):
    """Self-attention over the target (bidirectional with a padding mask for the denoiser; causal,
    optionally with a KV cache, for the AR baseline), cross-attention to the source, FFN."""

    def __init__(self, cfg: ModelConfig, activation_dropout: float = 0.0):
        super().__init__()
        self.norm1 = LayerNorm(cfg.d_model, cfg.use_kernels)
        self.self_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.use_kernels)
        self.norm2 = LayerNorm(cfg.d_model, cfg.use_kernels)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads, cfg.dropout, cfg.use_kernels)
        self.norm3 = LayerNorm(cfg.d_model, cfg.use_kernels)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, activation_dropout)

    def forward(self, x, residual, tgt_mask, cross_k, cross_v, src_mask, is_causal=False, cache=None, pos: int = 0):
        y, residual = add_and_norm(self.norm1, x, residual)
        x = self.self_attn(y, key_padding_mask=tgt_mask, is_causal=is_causal, cache=cache, pos=pos)
        y, residual = self.norm2(x, residual)
        x = self.cross_attn(y, cross_k, cross_v, key_padding_mask=src_mask)
        y, residual = self.norm3(x, residual)
        return self.ffn(y), residual


class Denoiser(nn.Module):
    """x0-predicting denoiser f(x_t, sc, t, src) of self-conditioned embedding diffusion (docs/method.md 1)."""

    kind = "diffusion"

    def __init__(self, model_cfg: ModelConfig, vocab_size: int, pad_id: int):
        super().__init__()
        if not isinstance(model_cfg, ModelConfig):
            raise TypeError(f"model_cfg must be a fastdiss.config.ModelConfig, got {type(model_cfg).__name__}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id must lie in [0, vocab_size={vocab_size}), got {pad_id}")
        cfg = self.cfg = model_cfg
        self.vocab_size, self.pad_id = vocab_size, pad_id
        d, de = cfg.d_model, cfg.d_latent
        self.tgt_embed = nn.Parameter(torch.randn(vocab_size, de))       # E (V, d_e)
        self.tgt_embed_norm = LayerNorm(de, cfg.use_kernels, affine=cfg.latent_norm_affine)  # z0 = norm(E[y])
        self.encoder = Encoder(cfg, vocab_size, pad_id, de if cfg.share_embeddings else None)
        # absolute lengths 0..max_len, or offsets -max_len..max_len from the source length
        self.length_head = nn.Linear(d, 2 * cfg.max_len + 1 if cfg.length_offset else cfg.max_len + 1)
        self.in_proj = nn.Linear(2 * de, d)                               # Linear([x_t ; sc])
        if cfg.src_copy != "none":                                        # source copy into the decoder input
            self.copy_proj = nn.Linear(d, d)
        if cfg.src_copy == "soft":
            self.copy_log_tau = nn.Parameter(torch.zeros(()))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.register_buffer("tgt_pos", sinusoidal_positions(cfg.max_len, d), persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_dec))
        self.dec_norm = LayerNorm(d, cfg.use_kernels)
        self.out_proj = nn.Linear(d, de)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):  # source tokens, scaled by sqrt(d) in the encoder
                nn.init.normal_(m.weight, std=m.weight.shape[1] ** -0.5)
                if m.padding_idx is not None:
                    with torch.no_grad():
                        m.weight[m.padding_idx].zero_()
        if self.cfg.balanced_input and self.cfg.src_copy != "none":  # the copy enters at unit gain
            nn.init.normal_(self.copy_proj.weight, std=self.cfg.d_model ** -0.5)
        if self.cfg.share_embeddings:  # unit-scale source token vectors, like the unshared path
            nn.init.normal_(self.encoder.embed_up.weight, std=self.cfg.d_latent ** -0.5)

    # -- source side, once per batch ---------------------------------------------------------
    def encode(self, src, src_mask) -> EncoderState:
        """Encoder output + per-layer cross-attention K/V. src (B, Ls) int64, src_mask (B, Ls) bool."""
        _check_ids("src", src, self.vocab_size)
        _check_mask("src_mask", src_mask, src.shape)
        out = self.encoder(src, src_mask, self.tgt_embed if self.cfg.share_embeddings else None)
        cross_kv = tuple(layer.cross_attn.project_kv(out) for layer in self.decoder)
        return EncoderState(out, src_mask, cross_kv)

    def length_logits(self, enc: EncoderState):
        """(B, max_len + 1) logits over target lengths 0..max_len, from the mean of non-padding encoder
        outputs. With length_offset the head scores offsets -max_len..max_len from the source length,
        and absolute length l reads the offset class l - src_len."""
        keep = (~enc.src_mask).unsqueeze(-1).to(enc.out.dtype)
        pooled = (enc.out * keep).sum(1) / keep.sum(1).clamp_min(1.0)
        logits = self.length_head(pooled)
        if not self.cfg.length_offset:
            return logits
        n = self.cfg.max_len
        src_len = (~enc.src_mask).sum(1, keepdim=True)
        idx = torch.arange(n + 1, device=logits.device)[None, :] - src_len + n     # in [0, 2n]
        return logits.gather(1, idx)

    def source_copy(self, enc: EncoderState, tgt_mask, B: int, L: int):
        """(B, L, d) encoder outputs copied to the target positions (ModelConfig.src_copy): target
        position j of a length-Lt target reads source position j * Ls / Lt (uniform: that position's
        output; soft: a mix of its neighbours). The decoder thus starts from an aligned guess of the
        source instead of learning the alignment through cross-attention alone."""
        device = enc.out.device
        src_len = (~enc.src_mask).sum(1).clamp_min(1).float()                      # (B,)
        tgt_len = (torch.full((B,), float(L), device=device) if tgt_mask is None
                   else (~tgt_mask).sum(1).clamp_min(1).float())
        pos = torch.arange(L, device=device, dtype=torch.float32)[None, :] * (src_len / tgt_len)[:, None]
        if self.cfg.src_copy == "uniform":
            idx = torch.minimum(pos.floor(), src_len[:, None] - 1).long()          # (B, L)
            copied = enc.out.gather(1, idx[..., None].expand(B, L, enc.out.shape[-1]))
        else:
            src_pos = torch.arange(enc.out.shape[1], device=device, dtype=torch.float32)
            dist = (pos[..., None] - src_pos[None, None, :]).abs()                  # (B, L, Ls)
            score = -dist / self.copy_log_tau.exp()
            score = score.masked_fill(enc.src_mask[:, None, :], float("-inf"))
            copied = torch.softmax(score, -1).to(enc.out.dtype) @ enc.out
        return self.copy_proj(copied)

    # -- target side ---------------------------------------------------------------------------
    def target_embeddings(self):
        """norm(E): (V, d_e), the points x0_hat is pulled towards and the rounding head's weights."""
        return self.tgt_embed_norm(self.tgt_embed)

    def embed_target(self, tgt):
        """z0 = norm(E[tgt]): (B, Lt, d_e)."""
        _check_ids("tgt", tgt, self.vocab_size)
        return self.tgt_embed_norm(F.embedding(tgt, self.tgt_embed))

    def embed_and_noise(self, tgt, t, eps, schedule="sqrt", noise_factor=1.0):
        """(z0, x_t) in one fused call (the training path); t per sequence (B,) or per token (B, Lt)."""
        _check_ids("tgt", tgt, self.vocab_size)
        n = self.tgt_embed_norm
        return functional.embed_and_noise(tgt, self.tgt_embed, t, eps, ln_weight=n.weight, ln_bias=n.bias,
                                          schedule=schedule, noise_factor=noise_factor, ln_eps=n.eps)

    def time_embedding(self, t):
        """Per-token time embedding: (B, Lt) -> (B, Lt, d)."""
        return self.time_mlp(sinusoidal_embedding(t, self.cfg.d_model).to(self.time_mlp[0].weight.dtype))

    def forward(self, x_t, sc, t, enc: EncoderState, tgt_mask=None):
        """Predict x0 from x_t (B, Lt, d_e), self-conditioning sc (same shape, or None for zeros),
        time t (B,) per sequence or (B, Lt) per token, the source's EncoderState, and tgt_mask
        (B, Lt) bool, True = padding (None = no padding). Returns x0_hat (B, Lt, d_e)."""
        B, L, de = x_t.shape
        if de != self.cfg.d_latent:
            raise ValueError(f"x_t has latent size {de}, expected d_latent={self.cfg.d_latent}")
        if L > self.cfg.max_len:
            raise ValueError(f"target length {L} exceeds the model's max_len {self.cfg.max_len}")
        if enc.batch_size != B:
            raise ValueError(f"x_t has batch {B} but the EncoderState has {enc.batch_size} rows; "
                             f"expand it with enc.index_select / enc.repeat_interleave")
        if tgt_mask is not None:
            _check_mask("tgt_mask", tgt_mask, (B, L))
        t = per_token_time(t, B, L).to(x_t.device)
        if sc is None:
            sc = torch.zeros_like(x_t)
        if self.cfg.balanced_input:
            x_t = x_t * torch.rsqrt(x_t.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x_t.dtype)
        add = self.time_embedding(t) + self.tgt_pos[:L].to(x_t.dtype)
        if self.cfg.src_copy != "none":
            add = add + self.source_copy(enc, tgt_mask, B, L)
        if self.cfg.use_kernels:
            h = functional.self_cond_project(x_t, sc, self.in_proj.weight, self.in_proj.bias, add=add)
        else:
            h = self.in_proj(torch.cat([x_t, sc], -1)) + add
        x, residual = self.dropout(h), None
        for layer, (k, v) in zip(self.decoder, enc.cross_kv):
            x, residual = layer(x, residual, tgt_mask, k, v, enc.src_mask)
        return self.out_proj(add_and_norm(self.dec_norm, x, residual)[0])

    def logits(self, x0_hat):
        """Tied rounding head: x0_hat @ norm(E)^T -> (..., V)."""
        return x0_hat @ self.target_embeddings().to(x0_hat.dtype).t()


def per_token_time(t, B: int, L: int):
    """Accept t as a float, (B,) or (B, L); return (B, L) float32."""
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    t = t.float()
    if t.dim() == 0:
        return t.expand(B, L)
    if t.dim() == 1:
        if t.shape[0] != B:
            raise ValueError(f"t has shape {tuple(t.shape)}; expected (B,)=({B},) or (B, L)=({B}, {L})")
        return t[:, None].expand(B, L)
    if tuple(t.shape) != (B, L):
        raise ValueError(f"t has shape {tuple(t.shape)}; expected (B,)=({B},) or (B, L)=({B}, {L})")
    return t


def _check_ids(name, ids, vocab_size):
    """Type and shape always; the id range only where reading it is free: on CPU tensors, outside
    tracing. On a GPU, int(ids.max()) would stall the host on every call, so the range is asserted
    on the device (asynchronously); torch.compile / torch.export trace no value check at all (the
    C++ sampler checks ids itself)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer token ids (int64), got dtype {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, length), got {tuple(ids.shape)}")
    if ids.numel() == 0 or torch.compiler.is_compiling():
        return
    if ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(), f"{name} holds ids outside [0, {vocab_size})")
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} holds ids in [{lo}, {hi}], outside the vocabulary [0, {vocab_size})")


def _check_mask(name, mask, shape):
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = type(mask).__name__ if not isinstance(mask, torch.Tensor) else f"dtype {mask.dtype}"
        raise TypeError(f"{name} must be a bool tensor (True = padding), got {got}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
