"""The autoregressive baseline: a standard pre-LN Transformer encoder-decoder of the same size and
depth as the denoiser, built from the denoiser's layers (fastdiss.model: causal self-attention in
the decoder), trained by the same loop, decoded with greedy or beam search and a KV cache.

It is what users compare diffusion against: the diffusion model's claim is AR-like quality with a few
parallel steps instead of one step per token.

Decoding: the encoder runs once; each decoder layer's cross-attention keys/values are computed once
per source; self-attention keys/values of the tokens generated so far are kept in a per-layer cache,
so each step feeds only the newest token. Beam search follows the common fairseq recipe: expand the
top 2*beam candidates, those ending in eos within the top `beam` become finished hypotheses
(scored by log-prob / length**length_penalty, length counting the eos), the best `beam` others stay
alive; a sentence is done once it has `beam` finished hypotheses, or at max_len, where eos is forced.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiss.config import ModelConfig
from fastdiss.model import DecoderLayer, EncoderLayer, LayerNorm, add_and_norm

__all__ = ["ARTransformer", "Hypothesis"]


def _upcast(x):
    """Losses and log-probs in at least fp32 (bf16/fp16 logits would round the scores)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@dataclass
class _LayerCache:
    """Per decoder layer: cross-attention K/V (computed once) and the self-attention K/V so far."""
    cross_k: torch.Tensor
    cross_v: torch.Tensor
    self_k: torch.Tensor  # (B, H, T_max, Dh), filled up to the current position
    self_v: torch.Tensor

    def write(self, k, v, pos: int):
        """Store the newest token's K/V at `pos`; return the K/V of positions 0..pos (what
        fastdiss.model.Attention attends to when given this cache)."""
        self.self_k[:, :, pos:pos + 1] = k
        self.self_v[:, :, pos:pos + 1] = v
        return self.self_k[:, :, :pos + 1], self.self_v[:, :, :pos + 1]

    def reorder(self, index: torch.Tensor) -> None:
        """Follow the surviving beams. Cross K/V stay: every beam of a sentence shares its source."""
        self.self_k = self.self_k.index_select(0, index)
        self.self_v = self.self_v.index_select(0, index)


# Weights saved before the AR model shared fastdiss.model's layers (shipped models, older runs):
# per layer a fused (3d, d) self-attention `qkv` / `self_qkv` and other sublayer names.
_RENAMED = {"ln1": "norm1", "ln2": "norm2", "ln3": "norm3", "out": "attn.out_proj", "self_out": "self_attn.out_proj",
            "cross_q": "cross_attn.q_proj", "cross_kv": "cross_attn.kv_proj", "cross_out": "cross_attn.out_proj"}
_FUSED_QKV = {"qkv": "attn", "self_qkv": "self_attn"}   # rows [0, d) -> q_proj, rows [d, 3d) -> kv_proj


def upgrade_state_dict(state: dict, prefix: str = "") -> dict:
    """Rename, in place, the parameters of an older-layout AR state dict to the current names (a
    fused qkv projection is split into q_proj and kv_proj rows; values are unchanged). A current
    state dict is left as it is. Returns `state`."""
    for key in [k for k in state if k.startswith((prefix + "encoder.", prefix + "decoder."))]:
        layer, name, kind = key.rsplit(".", 2)   # e.g. "encoder.0", "qkv", "weight"
        if name in _RENAMED:
            state[f"{layer}.{_RENAMED[name]}.{kind}"] = state.pop(key)
        elif name in _FUSED_QKV:
            qkv = state.pop(key)
            d = qkv.shape[0] // 3
            state[f"{layer}.{_FUSED_QKV[name]}.q_proj.{kind}"] = qkv[:d]
            state[f"{layer}.{_FUSED_QKV[name]}.kv_proj.{kind}"] = qkv[d:]
    return state


@dataclass
class Hypothesis:
    tokens: list[int]      # without bos/eos
    logprob: float         # sum of token log-probs, eos included
    score: float           # logprob / (len(tokens) + 1) ** length_penalty


class ARTransformer(nn.Module):
    """Pre-LN Transformer seq2seq with tied input/output embeddings (shared by encoder and decoder:
    the tokenizer's vocabulary is joint)."""

    kind = "ar"

    def __init__(self, model_cfg, vocab_size: int, pad_id: int, bos_id: int, eos_id: int,
                 label_smoothing: float = 0.1):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(f"{name} must be a non-negative int, got {value!r}")
        for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
            if value >= vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (vocab_size={vocab_size})")
        if not isinstance(model_cfg, ModelConfig):
            raise TypeError(f"model_cfg must be a fastdiss.config.ModelConfig, got {type(model_cfg).__name__}")
        cfg = self.cfg = model_cfg
        d, dropout = cfg.d_model, cfg.dropout
        self.max_len = cfg.max_len
        self.vocab_size, self.pad_id, self.bos_id, self.eos_id = vocab_size, pad_id, bos_id, eos_id
        self.d_model, self.n_heads, self.dropout = d, cfg.n_heads, dropout
        ls = getattr(model_cfg, "label_smoothing", None)
        self.label_smoothing = float(label_smoothing if ls is None else ls)

        self.embed = nn.Embedding(vocab_size, d)  # tied with the output layer (logits), so no padding_idx
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        self.src_pos = nn.Embedding(self.max_len, d)
        self.tgt_pos = nn.Embedding(self.max_len + 2, d)  # bos + max_len tokens + eos
        nn.init.normal_(self.src_pos.weight, std=0.02)
        nn.init.normal_(self.tgt_pos.weight, std=0.02)
        # the denoiser's pre-LN layers; the FFN also drops its hidden activations (fairseq's recipe)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, activation_dropout=dropout) for _ in range(cfg.n_enc))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, activation_dropout=dropout) for _ in range(cfg.n_dec))
        self.enc_ln, self.dec_ln = LayerNorm(d, cfg.use_kernels), LayerNorm(d, cfg.use_kernels)
        self.register_load_state_dict_pre_hook(
            lambda module, state, prefix, *args: upgrade_state_dict(state, prefix))

    # ---- network ----------------------------------------------------------------------------
    def _embed(self, tokens, pos_table, offset=0):
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) * math.sqrt(self.d_model) + pos_table(pos)
        return F.dropout(x, self.dropout, self.training)

    def encode(self, src, src_mask):
        """(B, Ls) ids, (B, Ls) padding mask -> encoder output (B, Ls, d)."""
        self._check_src(src, src_mask)
        delta, residual = self._embed(src, self.src_pos), None
        for layer in self.encoder:
            delta, residual = layer(delta, residual, src_mask)
        return add_and_norm(self.enc_ln, delta, residual)[0]

    def logits(self, h):
        return F.linear(h, self.embed.weight)

    def decode(self, dec_in, memory, src_mask):
        """Teacher-forced decoder over a whole prefix (no cache) -> logits (B, L, V)."""
        delta, residual = self._embed(dec_in, self.tgt_pos), None
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(memory)
            delta, residual = layer(delta, residual, None, k, v, src_mask, is_causal=True)
        return self.logits(add_and_norm(self.dec_ln, delta, residual)[0])

    def _check_src(self, src, src_mask):
        if not isinstance(src, torch.Tensor) or src.dtype != torch.int64 or src.dim() != 2:
            raise TypeError(f"src must be an int64 tensor of shape (B, Ls), got "
                            f"{getattr(src, 'dtype', type(src).__name__)} {tuple(getattr(src, 'shape', ()))}")
        if not isinstance(src_mask, torch.Tensor) or src_mask.dtype != torch.bool or src_mask.shape != src.shape:
            raise TypeError(f"src_mask must be a bool tensor of shape {tuple(src.shape)} (True = padding), got "
                            f"{getattr(src_mask, 'dtype', type(src_mask).__name__)} "
                            f"{tuple(getattr(src_mask, 'shape', ()))}")
        if src.shape[1] > self.max_len:
            raise ValueError(f"source length {src.shape[1]} exceeds the model's max_len={self.max_len}; "
                             f"truncate the input")

    # ---- training ---------------------------------------------------------------------------
    def teacher_forcing(self, tgt, tgt_mask):
        """Decoder input bos + tgt and labels tgt + eos (pad positions -> label -100)."""
        B = tgt.shape[0]
        lengths = (~tgt_mask).sum(1)
        tgt = tgt.masked_fill(tgt_mask, self.pad_id)
        bos = torch.full((B, 1), self.bos_id, dtype=tgt.dtype, device=tgt.device)
        dec_in = torch.cat([bos, tgt], 1)
        labels = torch.cat([tgt, torch.full_like(bos, self.pad_id)], 1)
        labels[torch.arange(B, device=tgt.device), lengths] = self.eos_id
        positions = torch.arange(labels.shape[1], device=tgt.device)
        labels = labels.masked_fill(positions[None, :] > lengths[:, None], -100)
        return dec_in, labels

    def loss(self, batch):
        """Label-smoothed cross-entropy per target token (eos included) -> (loss, stats)."""
        for key in ("src", "src_mask", "tgt", "tgt_mask"):
            if key not in batch:
                raise ValueError(f"batch is missing {key!r}; expected keys src, src_mask, tgt, tgt_mask")
        tgt, tgt_mask = batch["tgt"], batch["tgt_mask"]
        if tgt.shape[1] > self.max_len:
            raise ValueError(f"target length {tgt.shape[1]} exceeds the model's max_len={self.max_len}")
        memory = self.encode(batch["src"], batch["src_mask"])
        dec_in, labels = self.teacher_forcing(tgt, tgt_mask)
        logits = _upcast(self.decode(dec_in, memory, batch["src_mask"]))
        flat_logits, flat_labels = logits.view(-1, logits.shape[-1]), labels.view(-1)
        loss = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            valid = flat_labels != -100
            ntok = int(valid.sum())
            nll = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
            acc = (flat_logits.argmax(-1)[valid] == flat_labels[valid]).float().mean()
        return loss, {"loss": float(loss.detach()), "nll": float(nll), "acc": float(acc), "ntokens": float(ntok)}

    @torch.no_grad()
    def sequence_logprob(self, src, src_mask, hyps: list[list[int]]) -> list[float]:
        """Sum of log p(token) over each hypothesis plus eos, by full recompute (a scorer and the
        test oracle for the cached search). Like decoding, pad and bos get probability 0."""
        if len(hyps) != src.shape[0]:
            raise ValueError(f"hyps has {len(hyps)} entries but src has batch size {src.shape[0]}")
        L = max(len(h) for h in hyps) if hyps else 0
        tgt = torch.full((len(hyps), max(L, 1)), self.pad_id, dtype=torch.long, device=src.device)
        tgt_mask = torch.ones_like(tgt, dtype=torch.bool)
        for i, h in enumerate(hyps):
            tgt[i, :len(h)] = torch.tensor(h, dtype=torch.long)
            tgt_mask[i, :len(h)] = False
        was_training = self.training
        self.eval()
        try:
            dec_in, labels = self.teacher_forcing(tgt, tgt_mask)
            logits = _upcast(self.decode(dec_in, self.encode(src, src_mask), src_mask))
            lp = self._mask_specials(logits.reshape(-1, logits.shape[-1])).view_as(logits)
            lp = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).masked_fill(labels == -100, 0.0)
        finally:
            self.train(was_training)
        return lp.sum(1).tolist()

    # ---- decoding ---------------------------------------------------------------------------
    def _start_cache(self, memory, batch: int, steps: int) -> list[_LayerCache]:
        Dh = self.d_model // self.n_heads
        caches = []
        for layer in self.decoder:
            k, v = layer.cross_attn.project_kv(memory)
            empty = k.new_zeros(batch, self.n_heads, steps, Dh)  # k's dtype: bf16 under autocast
            caches.append(_LayerCache(k, v, empty, empty.clone()))
        return caches

    def _step(self, tokens, pos, caches, src_mask):
        """One decoder step on the newest tokens (B,) at position pos -> log-probs (B, V)."""
        delta, residual = self._embed(tokens[:, None], self.tgt_pos, offset=pos), None
        for layer, cache in zip(self.decoder, caches):
            delta, residual = layer(delta, residual, None, cache.cross_k, cache.cross_v, src_mask, cache=cache, pos=pos)
        return self._mask_specials(_upcast(self.logits(add_and_norm(self.dec_ln, delta, residual)[0][:, 0])))

    def _mask_specials(self, logits):
        logits[:, self.pad_id] = float("-inf")
        if self.bos_id != self.eos_id:
            logits[:, self.bos_id] = float("-inf")
        return logits.log_softmax(-1)

    def _max_steps(self, max_len):
        limit = self.max_len  # tgt_pos holds bos + max_len tokens + eos
        if max_len is None:
            return limit
        if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        return min(max_len, limit)

    @torch.no_grad()
    def generate(self, src, src_mask, beam: int = 1, max_len: int | None = None, use_cache: bool = True,
                 length_penalty: float = 1.0) -> list[list[int]]:
        """Token ids per sentence (no bos/eos), at most max_len tokens (default: the model's max_len).
        beam=1 is greedy search; use_cache=False recomputes the whole prefix each step (test oracle)."""
        if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
            raise ValueError(f"beam must be a positive int, got {beam!r}")
        if beam == 1:
            return self._greedy(src, src_mask, self._max_steps(max_len), use_cache)
        return [hyps[0].tokens for hyps in self.beam_search(src, src_mask, beam, max_len, length_penalty)]

    def _greedy(self, src, src_mask, max_steps, use_cache):
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(src, src_mask)
            B = src.shape[0]
            out = torch.full((B, max_steps + 1), self.bos_id, dtype=torch.long, device=src.device)
            done = torch.zeros(B, dtype=torch.bool, device=src.device)
            caches = self._start_cache(memory, B, max_steps) if use_cache else None
            for pos in range(max_steps):  # after max_steps tokens the eos is forced: no step needed
                if use_cache:
                    lp = self._step(out[:, pos], pos, caches, src_mask)
                else:
                    lp = self._mask_specials(_upcast(self.decode(out[:, :pos + 1], memory, src_mask)[:, -1]))
                nxt = lp.argmax(-1).masked_fill(done, self.eos_id)
                done |= nxt == self.eos_id
                out[:, pos + 1] = nxt
                if bool(done.all()):
                    break
        finally:
            self.train(was_training)
        result = []
        for row in out[:, 1:].tolist():
            result.append(row[:row.index(self.eos_id)] if self.eos_id in row else row)
        return result

    @torch.no_grad()
    def beam_search(self, src, src_mask, beam: int = 4, max_len: int | None = None,
                    length_penalty: float = 1.0) -> list[list[Hypothesis]]:
        """Finished hypotheses per sentence, best first (ties: the one finished first)."""
        if not isinstance(beam, int) or isinstance(beam, bool) or beam < 1:
            raise ValueError(f"beam must be a positive int, got {beam!r}")
        max_steps = self._max_steps(max_len)
        was_training = self.training
        self.eval()
        try:
            return self._beam_search(src, src_mask, beam, max_steps, length_penalty)
        finally:
            self.train(was_training)

    def _beam_search(self, src, src_mask, K, max_steps, length_penalty):
        B, dev = src.shape[0], src.device
        memory = self.encode(src, src_mask)
        flat = torch.arange(B, device=dev).repeat_interleave(K)
        caches = self._start_cache(memory.index_select(0, flat), B * K, max_steps + 1)
        mask = src_mask.index_select(0, flat)
        tokens = torch.full((B * K, max_steps + 1), self.bos_id, dtype=torch.long, device=dev)
        score_dtype = torch.float64 if memory.dtype == torch.float64 else torch.float32
        scores = torch.zeros(B, K, device=dev, dtype=score_dtype)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        finished: list[list[Hypothesis]] = [[] for _ in range(B)]
        done = [False] * B
        V = self.vocab_size
        for pos in range(max_steps + 1):
            lp = self._step(tokens[:, pos], pos, caches, mask)  # (B*K, V)
            if pos == max_steps:  # out of room: every alive hypothesis ends here
                forced = torch.full_like(lp, float("-inf"))
                forced[:, self.eos_id] = lp[:, self.eos_id]
                lp = forced
            cand = (scores.unsqueeze(-1) + lp.view(B, K, V)).view(B, K * V)
            top_scores, top_idx = cand.topk(min(2 * K, K * V), dim=1)  # sorted, best first
            parent, word = top_idx // V, top_idx % V
            new_parent = torch.zeros(B, K, dtype=torch.long, device=dev)
            new_word = torch.full((B, K), self.eos_id, dtype=torch.long, device=dev)
            new_scores = torch.full((B, K), float("-inf"), device=dev, dtype=score_dtype)
            ts, pa, wo = top_scores.tolist(), parent.tolist(), word.tolist()
            for b in range(B):
                if done[b]:
                    continue
                alive = 0
                for rank in range(len(ts[b])):
                    s, p, w = ts[b][rank], pa[b][rank], wo[b][rank]
                    if s == float("-inf"):
                        break
                    if w == self.eos_id:
                        if rank < K:
                            toks = tokens[b * K + p, 1:pos + 1].tolist()
                            finished[b].append(Hypothesis(toks, s, s / (len(toks) + 1) ** length_penalty))
                    elif alive < K:
                        new_parent[b, alive], new_word[b, alive], new_scores[b, alive] = p, w, s
                        alive += 1
                if len(finished[b]) >= K or pos == max_steps or alive == 0:
                    done[b] = True
            if all(done):
                break
            index = (torch.arange(B, device=dev)[:, None] * K + new_parent).view(-1)
            tokens = tokens.index_select(0, index)
            tokens[:, pos + 1] = new_word.view(-1)
            for cache in caches:
                cache.reorder(index)
            scores = new_scores
        # stable sort: equal scores keep the order in which they finished
        return [sorted(hyps, key=lambda h: -h.score) for hyps in finished]
