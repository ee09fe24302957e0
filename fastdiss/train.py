"""Training loop for the diffusion denoiser and the autoregressive baseline.

AdamW with warmup + inverse-sqrt or cosine decay, gradient clipping, bf16/fp16 autocast on GPU
(fp16 with loss scaling), EMA weights, length-bucketed token-budget batches, periodic validation
BLEU at a few-step setting (EMA weights), atomic best/last checkpoints, exact resume, and data
parallelism with torchrun (DistributedDataParallel; gloo on CPU, NCCL on GPU).

The model is duck-typed: anything with .loss(batch) -> (loss, stats) trains here. For the diffusion
denoiser the loss is fastdiss.diffusion.DiffusionObjective; for the AR model its own .loss.

Exactness: the random draws of step s (noise levels, eps, dropout, self-conditioning coin) come
from a generator reseeded from (seed, step, rank) at every step, and the data order from
(seed, epoch), so a run resumed from its "last" checkpoint computes the same next steps as the
uninterrupted run.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from fastdiss import checkpoint as ckpt
from fastdiss import runlock
from fastdiss.atomic import write_bytes
from fastdiss.config import Config, TrainConfig
from fastdiss.data.batching import TokenBatchSampler, collate


class NonFiniteLossError(RuntimeError):
    """Raised after TrainConfig.max_bad_steps consecutive steps with a non-finite loss or gradient."""


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------

def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then inverse-sqrt, cosine (to min_lr_ratio) or constant."""
    s = step + 1
    if cfg.warmup and s <= cfg.warmup:
        return s / cfg.warmup
    if cfg.decay == "inverse-sqrt":
        return math.sqrt(max(cfg.warmup, 1) / s)
    if cfg.decay == "cosine":
        frac = min(1.0, (s - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1.0


class EMA:
    """Exponential moving average of the weights, with the usual warm start
    decay_s = min(decay, (1 + s) / (10 + s)) so early averages are not dominated by the init."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


class LossModule(nn.Module):
    """Wraps any object with .loss(batch) into a module whose forward is that loss, so
    DistributedDataParallel sees every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, batch):
        return self.inner.loss(batch)


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729 + 1) % (2 ** 62)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def setup_distributed() -> tuple[int, int, torch.device]:
    """Initialise the process group when started by torchrun (WORLD_SIZE > 1): NCCL on GPU, gloo on
    CPU. Returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = _dist_info()
    return rank, world, device


def corpus_bleu(hyps: list, refs: list) -> float:
    """The validation score (a name of its own: benchmarks/kill_test.py pauses inside it)."""
    from fastdiss.evaluate import score
    return score(hyps, refs)["bleu"]


def _decode(tokenizer, ids):
    return tokenizer.decode(list(ids)) if tokenizer is not None else " ".join(map(str, ids))


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    best_bleu: float
    last_path: str | None
    best_path: str | None
    history: list = field(default_factory=list)
    skipped_steps: int = 0
    stopped_by_time: bool = False


class Trainer:
    """Owns model, EMA, optimizer and data position; `train_step(batch)` is one optimizer step,
    `fit(train, valid)` the whole loop. kind: 'diffusion' (model is a Denoiser) or 'ar'."""

    def __init__(self, cfg: Config, model: nn.Module, *, kind: str = "diffusion", tokenizer=None,
                 out_dir: str | None = None, device=None, progress: bool = True):
        if kind not in ckpt.KINDS:
            raise ValueError(f"kind must be one of {ckpt.KINDS}, got {kind!r}")
        self.cfg, self.tcfg, self.kind = cfg, cfg.train, kind
        self.tokenizer, self.out_dir, self.progress = tokenizer, out_dir, progress
        self.rank, self.world = _dist_info()
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        if kind == "diffusion":
            from fastdiss.diffusion import DiffusionObjective
            self.objective = DiffusionObjective(self.model, cfg.diffusion)
        else:
            self.objective = LossModule(self.model)
        self.module = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.module = DDP(self.objective, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self._param_groups(), lr=self.tcfg.lr, betas=tuple(self.tcfg.betas))
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[self.tcfg.amp]
        self.use_amp = self.device.type == "cuda" and self.amp_dtype is not None
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        self.ema = EMA(self.model, self.tcfg.ema_decay) if self.tcfg.ema_decay > 0 else None
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.best_bleu = float("-inf")
        self.bad_streak = 0
        self.bad_total = 0
        self.history: list = []

    def _param_groups(self):
        """Weight decay on matrices only (not on biases, norms, or 1-D parameters)."""
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.tcfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    # -- one step --------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """Forward, backward, clip, optimizer step, EMA update. A non-finite loss or gradient
        skips the update (counted, warned); too many in a row raise NonFiniteLossError."""
        self.model.train()
        torch.manual_seed(step_seed(self.tcfg.seed, self.step, self.rank))
        batch = {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}
        lr = self.tcfg.lr * lr_multiplier(self.step, self.tcfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.use_amp):
            loss, stats = self.module(batch)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        gnorm = torch.nn.utils.clip_grad_norm_(params, self.tcfg.clip if self.tcfg.clip > 0 else float("inf"))
        flags = torch.tensor([float(torch.isfinite(loss.detach()).all()), float(torch.isfinite(gnorm))],
                             device=self.device)
        if self.world > 1:  # every rank must take the same decision
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        loss_ok, grad_ok = bool(flags[0]), bool(flags[1])
        stats = dict(stats, lr=lr, grad_norm=float(gnorm), skipped=0.0)
        if self.scaler is not None and loss_ok:
            # fp16: overflowing gradients are routine; the scaler skips the step and lowers the scale.
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self._after_update(ok=True)
        elif loss_ok and grad_ok:
            self.optimizer.step()
            self._after_update(ok=True)
        else:
            if self.scaler is not None:
                self.scaler.update()
            self._after_update(ok=False)
            stats["skipped"] = 1.0
            what = "loss" if not loss_ok else "gradient norm"
            warnings.warn(f"step {self.step}: non-finite {what}; update skipped "
                          f"({self.bad_streak} in a row, {self.bad_total} in total)", RuntimeWarning, stacklevel=2)
            if self.bad_streak >= self.tcfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"training stopped at step {self.step}: {self.bad_streak} consecutive steps had a non-finite "
                    f"loss or gradient (train.max_bad_steps={self.tcfg.max_bad_steps}). Lower train.lr, use "
                    f"train.amp='bf16' or 'fp32', or check the data; the last good checkpoint is untouched.")
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    def _after_update(self, ok: bool) -> None:
        if ok:
            self.bad_streak = 0
            if self.ema is not None:
                self.ema.update(self.model, self.step)
        else:
            self.bad_streak += 1
            self.bad_total += 1

    # -- data ------------------------------------------------------------------------------------
    def epoch_batches(self, sampler: TokenBatchSampler, epoch: int) -> list:
        """This rank's batches of an epoch: batch i goes to rank i % world (the global batch of a
        step is the union of the ranks' batches); the tail is cut so every rank steps equally."""
        cached = getattr(self, "_epoch_cache", None)
        if cached is not None and cached[0] is sampler and cached[1] == epoch:
            return cached[2]
        sampler.set_epoch(epoch)
        batches = list(sampler)
        usable = len(batches) // self.world * self.world
        if usable == 0:
            raise ValueError(f"the training data give {len(batches)} batch(es) per epoch, fewer than the "
                             f"{self.world} processes; lower train.max_tokens or add data")
        mine = batches[self.rank:usable:self.world]
        self._epoch_cache = (sampler, epoch, mine)
        return mine

    # -- validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, valid: list) -> float:
        """Corpus BLEU of the EMA model on `valid` (list of (src_ids, tgt_ids)), generated by
        fastdiss.evaluate like every other evaluation: diffusion at train.eval_steps steps with one
        candidate per sentence; AR with greedy search."""
        from fastdiss.evaluate import generate
        out = generate(self.eval_model, self.kind, [s for s, _ in valid], cfg=self.cfg, device=self.device,
                       steps=self.tcfg.eval_steps, length_beam=1, noise_draws=1, select="score", seed=self.tcfg.seed)
        hyps = [_decode(self.tokenizer, o) for o in out.ids]
        refs = [_decode(self.tokenizer, t) for _, t in valid]
        return corpus_bleu(hyps, refs)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Resume state: only tensors / primitives / lists / dicts (weights_only loading)."""
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.world, "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best_bleu": self.best_bleu if math.isfinite(self.best_bleu) else None,
            "bad_total": self.bad_total, "rng": _rng_state(), "history": list(self.history),
        }

    def load_state_dict(self, state: dict, weights: dict, ema_weights: dict | None) -> None:
        self.model.load_state_dict(weights)
        if self.ema is not None:
            self.ema.model.load_state_dict(ema_weights if ema_weights is not None else weights)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.best_bleu = state["best_bleu"] if state.get("best_bleu") is not None else float("-inf")
        self.bad_total = state.get("bad_total", 0)
        self.history = list(state.get("history", []))
        if state.get("world_size", 1) != self.world:
            warnings.warn(f"resuming a run saved with {state.get('world_size')} processes on {self.world}: "
                          f"the data order differs from the uninterrupted run", RuntimeWarning, stacklevel=2)
        if "rng" in state:
            _set_rng_state(state["rng"])

    def save(self, path: str, extra: dict | None = None, with_state: bool = True) -> None:
        if self.rank != 0:
            return
        ckpt.save(path, self.model, self.cfg, self.tokenizer, extra=extra, kind=self.kind,
                  ema=self.ema.model if self.ema is not None else None,
                  train_state=self.state_dict() if with_state else None)

    def resume(self, path: str) -> None:
        c = ckpt.load(path, map_location="cpu", expect_cfg=self.cfg)
        if c.kind != self.kind:
            raise ValueError(f"checkpoint {path!r} holds a {c.kind!r} model, not {self.kind!r}")
        if c.train_state is None:
            raise ValueError(f"checkpoint {path!r} has no training state to resume from (a 'best' checkpoint?)")
        self.load_state_dict(c.train_state, c.weights, c.ema_weights)
        if self.out_dir and self.rank == 0 and os.path.isdir(self.out_dir) and \
                os.path.samefile(os.path.dirname(os.path.abspath(path)), self.out_dir):
            trim_log(os.path.join(self.out_dir, "train_log.jsonl"), self.step)

    # -- the loop --------------------------------------------------------------------------------
    def _out_of_time(self, deadline: float) -> bool:
        """Every process takes the same decision (DDP: the slowest clock wins)."""
        up = torch.tensor([float(time.monotonic() >= deadline)], device=self.device)
        if self.world > 1:
            dist.all_reduce(up, op=dist.ReduceOp.MAX)
        return bool(up)

    def fit(self, train: list, valid: list | None = None, max_steps: int | None = None,
            max_seconds: float | None = None) -> TrainResult:
        """Train until max_steps (default train.max_steps) or until max_seconds of wall clock are
        spent, evaluating every eval_every steps and writing out_dir/last.pt (every save_every steps,
        at every eval, at the end) and out_dir/best.pt (on a new best validation BLEU). Stopping on
        time ends like the last step does: validated and saved."""
        from tqdm.auto import tqdm

        tcfg = self.tcfg
        max_steps = tcfg.max_steps if max_steps is None else max_steps
        train, sampler = self._prepare_train(train)
        valid = _filter_examples(valid or [], self.model_max_len, "validation")
        if tcfg.eval_sentences and len(valid) > tcfg.eval_sentences:
            valid = valid[:tcfg.eval_sentences]
        last = os.path.join(self.out_dir, "last.pt") if self.out_dir else None
        best = os.path.join(self.out_dir, "best.pt") if self.out_dir else None
        log_path = os.path.join(self.out_dir, "train_log.jsonl") if self.out_dir else None
        if self.out_dir and self.rank == 0:
            os.makedirs(self.out_dir, exist_ok=True)
        bar = tqdm(total=max_steps, initial=self.step, disable=not (self.progress and self.rank == 0),
                   dynamic_ncols=True, desc=f"train {self.kind}")
        run_loss, run_n, tokens, t0 = 0.0, 0, 0, time.perf_counter()
        pad = self.model.pad_id
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        timed_out = False
        while self.step < max_steps and not timed_out:
            batches = self.epoch_batches(sampler, self.epoch)
            while self.batch_in_epoch < len(batches) and self.step < max_steps:
                if deadline is not None and self._out_of_time(deadline):
                    timed_out = True
                    break
                batch = collate([train[i] for i in batches[self.batch_in_epoch]], pad)
                stats = self.train_step(batch)
                self.batch_in_epoch += 1   # after the step: an exception inside it leaves the position
                tokens += int((~batch["tgt_mask"]).sum()) * self.world
                if not stats["skipped"]:
                    run_loss, run_n = run_loss + stats["loss"], run_n + 1
                bar.update(1)
                done = self.step >= max_steps
                if self.step % tcfg.log_every == 0 or done:
                    dt = max(time.perf_counter() - t0, 1e-9)
                    rec = {"step": self.step, "loss": run_loss / max(run_n, 1), "lr": stats["lr"],
                           "tok_per_s": tokens / dt, "skipped_total": self.bad_total}
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tok_per_s']:.0f}")
                    self.history.append(rec)
                    if log_path and self.rank == 0:
                        with open(log_path, "a") as f:
                            f.write(json.dumps(rec) + "\n")
                    run_loss, run_n, tokens, t0 = 0.0, 0, 0, time.perf_counter()
                if (self.step % tcfg.eval_every == 0 or done) and valid:
                    self._evaluate(valid, best, log_path)
                if last and (self.step % tcfg.save_every == 0 or self.step % tcfg.eval_every == 0 or done):
                    self.save(last, extra={"step": self.step})
            if self.batch_in_epoch >= len(batches):
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        bar.close()
        if timed_out:   # finish like the last step does
            if valid:
                self._evaluate(valid, best, log_path)
            if last:
                self.save(last, extra={"step": self.step})
        return TrainResult(steps=self.step, best_bleu=self.best_bleu, last_path=last,
                           best_path=best if best and os.path.exists(best) else None,
                           history=list(self.history), skipped_steps=self.bad_total, stopped_by_time=timed_out)

    def _prepare_train(self, train: list):
        """Filtered training pairs and their length-bucketed batch sampler, cached per data list
        (fit may be called many times, e.g. in chunks of steps)."""
        cache = getattr(self, "_train_cache", None)
        if cache is None or cache[0] is not train or cache[1] != len(train):
            kept = _filter_examples(train, self.model_max_len, "training")
            sampler = TokenBatchSampler([len(s) for s, _ in kept], [len(t) for _, t in kept], self.tcfg.max_tokens,
                                        shuffle=True, seed=self.tcfg.seed)
            self._train_cache = cache = (train, len(train), kept, sampler)
            self._epoch_cache = None
        return cache[2], cache[3]

    def _evaluate(self, valid, best_path, log_path) -> None:
        score = self.validate(valid) if self.rank == 0 else 0.0
        if self.rank == 0:
            rec = {"step": self.step, "valid_bleu": score, "eval_steps": self.tcfg.eval_steps}
            self.history.append(rec)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            if score > self.best_bleu:
                self.best_bleu = score
                if best_path:
                    self.save(best_path, extra={"step": self.step, "valid_bleu": score}, with_state=False)
        if self.world > 1:
            dist.barrier()

    @property
    def model_max_len(self) -> int:
        return int(self.cfg.model.max_len)


def trim_log(log_path: str, step: int) -> None:
    """Make a run's log continue from its last checkpoint: drop the records of steps after `step` (a
    killed run logged them; the resumed run computes and logs them again) and any line that is not a
    whole JSON record (the run was killed while appending it). Rewritten atomically, only if needed."""
    try:
        with open(log_path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return
    kept, changed = [], False
    for line in raw.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            keep = isinstance(rec, dict) and int(rec.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            changed = True
    if not changed and (not raw or raw.endswith(b"\n")):
        return
    text = b"".join(line + b"\n" for line in kept)
    write_bytes(log_path, text)


def _filter_examples(examples: list, max_len: int, what: str) -> list:
    """Drop pairs with an empty side or a side longer than the model's max_len (with a warning)."""
    kept = [(list(s), list(t)) for s, t in examples if 0 < len(s) <= max_len and 0 < len(t) <= max_len]
    if len(kept) < len(examples):
        warnings.warn(f"{len(examples) - len(kept)} of {len(examples)} {what} pairs dropped: an empty side or a "
                      f"side longer than model.max_len={max_len}", RuntimeWarning, stacklevel=3)
    if what == "training" and not kept:
        raise ValueError("no training pairs left (all empty or longer than model.max_len)")
    return kept


def build_model(cfg: Config, tokenizer, kind: str = "diffusion", vocab_size: int | None = None,
                pad_id: int | None = None) -> nn.Module:
    """A fresh model for `tokenizer` (or explicit vocab_size/pad_id when there is no tokenizer)."""
    V = vocab_size if vocab_size is not None else tokenizer.vocab_size
    pad = pad_id if pad_id is not None else tokenizer.pad_id
    if kind == "diffusion":
        from fastdiss.model import Denoiser
        model = Denoiser(cfg.model, V, pad)
        if cfg.train.init_from:   # a resumed run overwrites these weights with its own
            from fastdiss.transfer import init_from_ar
            init_from_ar(model, cfg.train.init_from)
        return model
    from fastdiss.ar import ARTransformer
    return ARTransformer(cfg.model, V, pad, tokenizer.bos_id, tokenizer.eos_id)


def train(cfg: Config, train_pairs_encoded: list, valid_pairs_encoded: list, tokenizer, out_dir: str,
          kind: str = "diffusion", *, resume: bool = True, max_steps: int | None = None, device=None,
          progress: bool = True, vocab_size: int | None = None, pad_id: int | None = None) -> TrainResult:
    """Train a model from encoded (src_ids, tgt_ids) pairs and write out_dir/{last,best}.pt.

    resume=True continues from out_dir/last.pt when it exists (same model config required).
    Under torchrun each process calls this; the process group is set up here. Without a
    tokenizer, pass vocab_size and pad_id (BLEU is then computed on id strings)."""
    rank, world, dev = setup_distributed()
    device = torch.device(device) if device is not None else dev
    # one training per out_dir (fastdiss.runlock): a second one raises RunDirBusy instead of racing on last.pt
    with runlock.hold(out_dir) if rank == 0 else contextlib.nullcontext():
        if rank == 0:
            runlock.remove_leftovers(out_dir)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)   # saved in last.pt: a fresh run's state must not depend on the process
        model = build_model(cfg, tokenizer, kind, vocab_size, pad_id)
        trainer = Trainer(cfg, model, kind=kind, tokenizer=tokenizer, out_dir=out_dir, device=device,
                          progress=progress)
        last = os.path.join(out_dir, "last.pt")
        if resume and os.path.exists(last):
            trainer.resume(last)
        elif rank == 0:   # a fresh run: no records of an earlier run killed before its first save
            trim_log(os.path.join(out_dir, "train_log.jsonl"), 0)
        return trainer.fit(train_pairs_encoded, valid_pairs_encoded, max_steps=max_steps)
