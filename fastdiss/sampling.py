"""Generation with the denoiser, for K = 1 (one-step) up to 2000 (the many-step baseline) DDIM steps.

    x_{t_0} = F eps, K steps on the grid t_0 = 1 > ... > t_K = 0 (the engine's loop, by default
    fastdiss.python_engine), output argmax(x0_hat @ norm(E)^T) of the last step

Each sentence gets C = length_beam x noise_draws candidates (its top-b predicted lengths, each
with n noise draws); one is chosen by MBR (mutual BLEU) or by model score. Encoder, cross-attention
K/V and length prediction run once per batch (per chunk of a batch larger than the memory budget,
see fastdiss.resources). All randomness comes from one torch.Generator seeded per call, so
generation is deterministic on CPU for the same inputs and seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fastdiss import resources
from fastdiss.config import DiffusionConfig, SampleConfig
from fastdiss.engines import make_engine
from fastdiss.lengths import length_cap, predict_lengths
from fastdiss.metrics import mbr_select
from fastdiss.schedule import time_grid


@dataclass
class GenerationResult:
    ids: list                 # selected candidate per sentence: list[list[int]]
    single_ids: list          # the first candidate (top-1 length, first noise draw): single-candidate quality
    candidates: list          # every candidate per sentence: list[list[list[int]]]
    calls_per_sentence: int   # denoiser calls per sentence = steps x candidates
    steps: int
    latents: torch.Tensor | None = None   # final x_{t_K} of every candidate (B*C, Lmax, d_e), engine comparison
    scores: torch.Tensor | None = None    # (B, C) mean token log-prob of each candidate


class Sampler:
    """Generates target token ids from source ids with a trained Denoiser.

    engine: who runs the encoder and the K-step loop (fastdiss.engines): None / "python" (the eager
    loop of fastdiss.python_engine), "cpp" (exported graphs, all steps in C++;
    engine_options={"export_dir": ...}), "cuda-graph", or an object with encode() and denoise().
    Length prediction, the seeded noise, the time grid, rounding and selection stay here, so every
    engine sees the same inputs.

    Memory (fastdiss.resources): a batch larger than the memory budget (memory_budget_mb, else
    $FASTDISS_GEN_MEMORY_BUDGET_MB, else the free CUDA memory; none on CPU) runs in chunks of
    sentences with the same ids as one batch, or with split_oversize=False is refused with a message
    that says which batch size fits."""

    # progress hook (fastdiss.longjobs), set on an instance: on_step(sentences, steps) after `steps`
    # denoising steps of `sentences` sentences; None costs nothing
    on_step = None

    def __init__(self, model, sample_cfg: SampleConfig | None = None, diffusion_cfg: DiffusionConfig | None = None,
                 engine=None, engine_options: dict | None = None, *, memory_budget_mb: float | None = None,
                 split_oversize: bool = True):
        self.model = model
        self.cfg = sample_cfg or SampleConfig()
        self.dcfg = diffusion_cfg or DiffusionConfig()
        self.memory_budget_mb = memory_budget_mb
        self.split_oversize = split_oversize
        self.engine = make_engine(engine, model, self.dcfg, **(engine_options or {}))

    def _lengths(self, enc, length_beam: int):
        """Top-b predicted lengths per sentence, (B, b), restricted to 1..cap."""
        return predict_lengths(self.model.length_logits(enc), length_cap(self.model, self.cfg), length_beam)

    @torch.no_grad()
    def generate(self, src, src_mask, steps: int | None = None, *, length_beam: int | None = None,
                 noise_draws: int | None = None, select: str | None = None, clamp: bool | None = None,
                 spacing: str | None = None, time_shift: float | None = None, lengths=None,
                 seed: int | None = None) -> GenerationResult:
        """Sample targets for a padded source batch. Keyword arguments override the SampleConfig;
        `lengths` (B,) forces the target lengths (oracle-length analysis; one length per sentence)."""
        cfg, model = self.cfg, self.model
        steps = cfg.steps if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        b = cfg.length_beam if length_beam is None else length_beam
        n = cfg.noise_draws if noise_draws is None else noise_draws
        select = cfg.select if select is None else select
        clamp = cfg.clamp if clamp is None else clamp
        spacing = cfg.spacing if spacing is None else spacing
        time_shift = cfg.time_shift if time_shift is None else time_shift
        seed = cfg.seed if seed is None else seed
        if b < 1 or n < 1:
            raise ValueError(f"length_beam and noise_draws must be >= 1, got {b} and {n}")
        if select not in ("mbr", "score"):
            raise ValueError(f"select must be 'mbr' or 'score', got {select!r}")
        was_training = model.training
        model.eval()
        try:
            return self._generate(src, src_mask, steps, b, n, select, clamp, spacing, time_shift, lengths, seed)
        finally:
            model.train(was_training)

    def _generate(self, src, src_mask, steps, b, n, select, clamp, spacing, time_shift, lengths, seed):
        model, device = self.model, src.device
        B, Ls = src.shape
        engine = self.engine
        if lengths is not None:
            given = torch.as_tensor(lengths, device=device).long().view(B, 1)
            if int(given.min()) < 1 or int(given.max()) > model.cfg.max_len:
                raise ValueError(f"lengths must lie in [1, {model.cfg.max_len}], got {given.view(-1).tolist()}")
        budget, where = resources.memory_budget(device, self.memory_budget_mb)
        elem = model.tgt_embed.element_size()
        whole = {}   # the whole batch's EncoderState, kept when one chunk covers the batch

        # 1. encoder + target lengths, in chunks of sentences when the batch exceeds the budget
        def lengths_of(i, j):
            enc = engine.encode(src[i:j], src_mask[i:j])
            if j - i == B:
                whole["enc"] = enc
            return given[i:j] if lengths is not None else self._lengths(enc, b)
        chunk = resources.sentences_per_chunk(B, resources.encoder_bytes(model.cfg, Ls, elem), budget, where,
                                              what=f"{Ls} source tokens")
        lens = torch.cat(resources.run_in_chunks(B, chunk, lengths_of, what=f"{Ls} source tokens"))
        lens = lens.repeat_interleave(n, dim=1)                  # (B, C): length-major, draws inner
        C = lens.shape[1]
        cand_len = lens.reshape(-1)                              # (B*C,)
        L = int(cand_len.max())
        tgt_mask = torch.arange(L, device=device)[None, :] >= cand_len[:, None]

        # the noise of the whole batch in one draw, so that a split batch sees the same noise
        gen = torch.Generator(device=device).manual_seed(int(seed))
        # drawn in fp32, then held in the weights' dtype: a seed gives the same noise for an fp32 and a bf16 model
        x_all = (self.dcfg.noise_factor * torch.randn(B * C, L, model.cfg.d_latent, device=device, generator=gen)
                 ).to(model.tgt_embed.dtype)
        grid = time_grid(steps, spacing, device=device)

        # 2. K denoising steps and rounding, per chunk of sentences
        def decode(i, j):
            enc = whole.pop("enc", None) if j - i == B else None
            if enc is None:
                enc = engine.encode(src[i:j], src_mask[i:j])
            enc = enc.repeat_interleave(C)
            rows = slice(i * C, j * C)
            x, mask = x_all[rows], tgt_mask[rows]
            on_step = None if self.on_step is None else (lambda done: self.on_step(j - i, done))
            x, sc = engine.denoise(enc, x, mask, grid, clamp=clamp, time_shift=time_shift, on_step=on_step)
            logp = torch.log_softmax(model.logits(sc).float(), dim=-1)
            tok_logp, ids = logp.max(-1)                         # (rows, L)
            return x, tok_logp, ids
        what = f"{C} candidate(s) x {L} target tokens, {Ls} source tokens"
        chunk = resources.sentences_per_chunk(
            B, resources.decoder_bytes(model.cfg, model.vocab_size, Ls, L, C, elem), budget, where,
            split=self.split_oversize, what=what)
        if chunk < B:
            whole.pop("enc", None)   # each chunk encodes its own sentences
        parts = resources.run_in_chunks(B, chunk, decode, what=what)
        x, tok_logp, ids = (torch.cat(p) for p in zip(*parts))
        keep = ~tgt_mask
        scores = ((tok_logp * keep).sum(1) / keep.sum(1)).view(B, C)
        ids_list, lens_list = ids.tolist(), cand_len.tolist()
        cands = [[ids_list[i * C + c][:lens_list[i * C + c]] for c in range(C)] for i in range(B)]
        chosen = []
        for i in range(B):
            if C == 1:
                chosen.append(0)
            elif select == "score":
                chosen.append(int(scores[i].argmax()))
            else:
                chosen.append(mbr_select([" ".join(map(str, c)) for c in cands[i]]))
        return GenerationResult(ids=[cands[i][chosen[i]] for i in range(B)], single_ids=[c[0] for c in cands],
                                candidates=cands, calls_per_sentence=steps * C, steps=steps, latents=x,
                                scores=scores)

    @torch.no_grad()
    def translate(self, sources: list, steps: int | None = None, *, batch_size: int = 64, device=None,
                  **kwargs) -> GenerationResult:
        """Generate for a list of source id lists, batched by length (sorted, padded per batch),
        results in input order. `latents` is None here (batches differ in shape)."""
        device = device or next(self.model.parameters()).device
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        ids, single, cands = [None] * len(sources), [None] * len(sources), [None] * len(sources)
        calls, used_steps = 0, steps or self.cfg.steps
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            src, src_mask = pad_batch([sources[i] for i in idx], self.model.pad_id, device)
            res = self.generate(src, src_mask, steps, **kwargs)
            for j, i in enumerate(idx):
                ids[i], single[i], cands[i] = res.ids[j], res.single_ids[j], res.candidates[j]
            calls, used_steps = res.calls_per_sentence, res.steps
        return GenerationResult(ids=ids, single_ids=single, candidates=cands, calls_per_sentence=calls,
                                steps=used_steps)


def pad_batch(seqs: list, pad_id: int, device=None):
    """(ids (B, Lmax) int64, mask (B, Lmax) bool True = padding) from lists of ids."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("pad_batch needs a non-empty list of non-empty id sequences")
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
    mask = torch.arange(L)[None, :] >= torch.tensor([len(s) for s in seqs])[:, None]
    return ids.to(device), mask.to(device)
