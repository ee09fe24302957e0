"""`fastdiss train`: a diffusion or AR model on an embedded task or the user's files, into a folder
that holds its checkpoints (last.pt, best.pt), its log and run.json (which data it trains on, so
`--resume` alone continues on the same data). `train_into` is shared with `fastdiss demo --retrain`."""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys

from fastdiss.userio import CLIError, load_checkpoint, read_pairs_or_fail, write_text

RUN_INFO = "run.json"


def run(args) -> int:
    """Holds OUT's training lock for the whole command, before OUT is looked at: a second training
    into the same folder is refused (exit 2) instead of racing on last.pt. The lock dies with its
    process, so a killed run never blocks the next one; what the killed run was writing is removed."""
    from fastdiss import runlock
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out {args.out}: is a file, expected a folder for checkpoints and logs")
    if args.resume and not os.path.isdir(args.out):
        return _train(args)   # fails with "nothing to resume" without creating the folder
    created = not os.path.exists(args.out)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(runlock.hold_if_rank0(args.out))
        except runlock.RunDirBusy as e:
            raise CLIError(str(e)) from None
        except OSError as e:
            raise CLIError(f"--out {args.out}: cannot create or lock the folder ({e.strerror or e})") from None
        if runlock.is_rank0():
            removed = runlock.remove_leftovers(args.out)
            if removed:
                print(f"removed {len(removed)} temporary file(s) that a killed run left in {args.out}: "
                      f"{', '.join(removed)}", file=sys.stderr)
        try:
            return _train(args)
        except BaseException:
            if created and runlock.is_rank0():   # e.g. bad data: no empty folder left behind
                runlock.discard_if_unused(args.out)
            raise


def _config(args, last: str):
    """(config, kind) of a fresh run (preset + options) or of the run being resumed, re-validated."""
    from fastdiss import checkpoint, config
    if args.resume:
        if not os.path.isfile(last):
            raise CLIError(f"--resume: {last} does not exist (nothing to resume)")
        try:
            payload = checkpoint.read_payload(last)
            cfg = config.Config.from_dict(payload["config"])
        except (ValueError, OSError) as e:
            raise CLIError(str(e)) from None
        kind = payload["kind"]
        print(f"resuming {last} ({kind}); using the configuration saved in it", file=sys.stderr)
    else:
        if os.path.isfile(last):
            raise CLIError(f"{args.out} already holds a run ({last}); pass --resume to continue it "
                           f"or choose another --out")
        cfg = config.preset(args.preset)
        kind = args.kind
        if args.scp is not None:
            cfg.diffusion.scp = args.scp
        if args.mans is not None:
            cfg.diffusion.mans = args.mans
        if args.share_embeddings is not None:
            cfg.model.share_embeddings = args.share_embeddings
    for name in ("lr", "max_tokens", "seed", "eval_every", "warmup", "max_steps"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg.train, name, value)
    try:
        return config.Config.from_dict(cfg.to_dict()), kind   # re-validate after the overrides
    except ValueError as e:
        raise CLIError(str(e)) from None


def _data(args, last: str):
    """(train pairs, valid pairs, tokenizer, description) from --train/--valid or --task."""
    if not args.train:
        from fastdiss.data import corpus
        task = args.task or corpus.DEFAULT_TASK
        tokenizer = load_checkpoint(last).tokenizer if args.resume else corpus.load_tokenizer(task)
        return corpus.load_pairs(task, "train"), corpus.load_pairs(task, "valid"), tokenizer, f"task {task}"
    train_pairs = read_pairs_or_fail(args.train)
    if args.valid:
        valid_pairs = read_pairs_or_fail(args.valid)
    else:
        n = min(500, max(1, len(train_pairs) // 50))
        train_pairs, valid_pairs = train_pairs[:-n], train_pairs[-n:]
        print(f"no --valid given: holding out the last {n} training pairs for validation", file=sys.stderr)
    if not train_pairs:
        raise CLIError(f"{args.train}: too few pairs to train on")
    if args.resume:
        return train_pairs, valid_pairs, load_checkpoint(last).tokenizer, args.train
    from fastdiss.data.tokenizer import Tokenizer
    print(f"training a {args.vocab_size}-id byte-level BPE tokenizer on {len(train_pairs)} pairs", file=sys.stderr)
    try:
        tokenizer = Tokenizer.train([x for p in train_pairs for x in p], vocab_size=args.vocab_size)
    except ValueError as e:   # e.g. --vocab-size below the 256 bytes + specials
        raise CLIError(f"--vocab-size {args.vocab_size}: {e}") from None
    return train_pairs, valid_pairs, tokenizer, args.train


def _train(args) -> int:
    from fastdiss.data.batching import encode_pairs

    if args.task and (args.train or args.valid):
        raise CLIError("give either --task (an embedded corpus) or --train/--valid (your files), not both")
    if args.valid and not args.train:
        raise CLIError("--valid needs --train")
    last = os.path.join(args.out, "last.pt")
    cfg, kind = _config(args, last)
    if args.resume and not (args.task or args.train):  # same data as the run being resumed
        saved = _read_run_info(args.out)
        args.task, args.train, args.valid = saved.get("task"), saved.get("train"), saved.get("valid")
    train_pairs, valid_pairs, tokenizer, data_name = _data(args, last)
    max_len = cfg.model.max_len
    train_enc = encode_pairs(train_pairs, tokenizer, max_len)
    valid_enc = encode_pairs(valid_pairs, tokenizer, max_len)
    os.makedirs(args.out, exist_ok=True)
    if not args.resume:
        from fastdiss.data import corpus
        _write_run_info(args.out, {"task": None if args.train else (args.task or corpus.DEFAULT_TASK), "kind": kind,
                                   "preset": args.preset,
                                   "train": os.path.abspath(args.train) if args.train else None,
                                   "valid": os.path.abspath(args.valid) if args.valid else None})
    scp_mans = f", scp={cfg.diffusion.scp}, mans={cfg.diffusion.mans}" if kind == "diffusion" else ""
    budget = f", at most {args.minutes:g} min" if args.minutes else ""
    print(f"training {kind} ({args.preset if not args.resume else 'saved config'}{scp_mans}) on {data_name}: "
          f"{len(train_enc)} train / {len(valid_enc)} valid pairs, up to {cfg.train.max_steps} steps{budget}, "
          f"device {args.device}, out {args.out}", file=sys.stderr)
    trainer, by_time = train_into(cfg, train_enc, valid_enc, tokenizer, args.out, kind, resume=args.resume,
                                  max_steps=cfg.train.max_steps, minutes=args.minutes, device=args.device,
                                  progress=not args.quiet)
    best = os.path.join(args.out, "best.pt")
    why = "time budget reached" if by_time else "step budget reached"
    best_txt = f"; best valid BLEU {trainer.best_bleu:.2f} ({best})" if math.isfinite(trainer.best_bleu) else ""
    print(f"done: {trainer.step} steps ({why}); last checkpoint {last}{best_txt}")
    return 0


def train_into(cfg, train_enc, valid_enc, tokenizer, out_dir: str, kind: str = "diffusion", *,
               resume: bool = False, max_steps: int | None = None, minutes: float | None = None,
               device: str = "cpu", progress: bool = True):
    """fastdiss.train's Trainer into out_dir, stopped at max_steps or when `minutes` of wall clock are
    spent (then validated and saved like a normal end of training). Returns (trainer, stopped_by_time).
    Holds out_dir's training lock (fastdiss.runlock): a second training into it is refused."""
    import torch

    from fastdiss import runlock
    from fastdiss import train as T

    with runlock.hold_if_rank0(out_dir):
        T.setup_distributed()
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)   # saved in last.pt: a fresh run's state must not depend on the process
        trainer = T.Trainer(cfg, T.build_model(cfg, tokenizer, kind), kind=kind, tokenizer=tokenizer,
                            out_dir=out_dir, device=device, progress=progress)
        if resume:
            try:
                trainer.resume(os.path.join(out_dir, "last.pt"))
            except (ValueError, FileNotFoundError) as e:
                raise CLIError(str(e)) from None
        elif trainer.rank == 0:   # a fresh run: no records of an earlier run killed before its first save
            T.trim_log(os.path.join(out_dir, "train_log.jsonl"), 0)
        result = trainer.fit(train_enc, valid_enc, max_steps=max_steps,
                             max_seconds=None if minutes is None else 60.0 * minutes)
        return trainer, result.stopped_by_time


def _write_run_info(out_dir: str, info: dict) -> None:
    write_text(os.path.join(out_dir, RUN_INFO), json.dumps(info, indent=1) + "\n")


def _read_run_info(out_dir: str) -> dict:
    path = os.path.join(out_dir, RUN_INFO)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise CLIError(f"{path}: unreadable ({e}); give the data again with --task or --train") from None
    return info if isinstance(info, dict) else {}
