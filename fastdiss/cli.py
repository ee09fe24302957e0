"""The `fastdiss` command: train, generate, evaluate, demo, env, export.

Every user mistake (a missing or unreadable file, bad UTF-8, an empty input line, an unknown task or
preset, --steps 0) ends with one line on stderr and exit code 2, never a traceback; a traceback means
a bug in fastdiss. Inputs longer than the model's max_len are truncated with a warning (or refused
with --strict-length).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
import warnings

EXIT_USAGE = 2

EPILOG_MAIN = """\
examples:
  fastdiss demo                                   # the shipped German->English model: examples + table
  fastdiss train --task kjv2web --preset small --out runs/kjv2web --minutes 30
  fastdiss train --train my.tsv --valid my_valid.tsv --preset base --out runs/mine
  echo "And God said, Let there be light" | fastdiss generate --ckpt runs/kjv2web/last.pt --steps 4
  fastdiss evaluate --ckpt runs/kjv2web/last.pt --task kjv2web --split test --steps 1,2,4,8 --json
  fastdiss env                                    # versions, GPU, extension build, which kernels run

run `fastdiss COMMAND --help` for the options of one command.
"""


class CLIError(Exception):
    """A user error: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `fastdiss train: error: ... (see fastdiss train --help)`."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _fmt_warning(message, category, filename, lineno, line=None):
    return f"fastdiss: warning: {message}\n"


def warn(message: str) -> None:
    """A user-facing warning: one line on stderr (printed, not through `warnings`, so it is never
    filtered or deduplicated)."""
    print(f"fastdiss: warning: {message}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    """Output text on one line: byte-level BPE can decode to any character, including line breaks
    (\r, \x85, \u2028, ...), which would shift every later output against its input line."""
    return " ".join(text.splitlines())


# ---------------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; every entry a positive integer."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return [_positive_int(p) for p in parts]


def _step_count(text: str) -> int:
    """A positive number of sampling steps, at most fastdiss.longjobs.MAX_STEPS."""
    from fastdiss.longjobs import check_steps
    try:
        return check_steps(_positive_int(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _step_list(text: str) -> list[int]:
    return [_step_count(str(k)) for k in _int_list(text)]


def _device(text: str) -> str:
    import torch
    text = text.strip().lower()
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} requested but torch sees no CUDA GPU "
                                             f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        return text
    if text == "cpu":
        return text
    raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")


def _tasks() -> tuple[str, ...]:
    from fastdiss.data.corpus import TASKS
    return TASKS


def _presets() -> list[str]:
    from fastdiss.config import PRESETS
    return list(PRESETS)


# ---------------------------------------------------------------------------------------------
# Input helpers (shared with fastdiss.demo)
# ---------------------------------------------------------------------------------------------

def _os_error(path, e: OSError) -> CLIError:
    if isinstance(e, FileNotFoundError):
        return CLIError(f"{path}: file not found")
    if isinstance(e, IsADirectoryError):
        return CLIError(f"{path}: is a directory, expected a file")
    if isinstance(e, PermissionError):
        return CLIError(f"{path}: cannot read the file (permission denied)")
    return CLIError(f"{path}: cannot read the file ({e.strerror or e})")


def read_lines(path: str) -> list[str]:
    """Lines of a UTF-8 text file ('-' = stdin), one sentence each. Bad UTF-8 and empty lines are
    errors that name the file and line."""
    name = "<stdin>" if path == "-" else path
    try:
        f = sys.stdin.buffer if path == "-" else open(path, "rb")
    except OSError as e:
        raise _os_error(name, e) from None
    lines = []
    try:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\n").rstrip(b"\r")
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CLIError(f"{name}:{lineno}: invalid UTF-8 at byte {e.start} of the line; "
                               f"save the file as UTF-8") from None
            if not text.strip():
                raise CLIError(f"{name}:{lineno}: empty line; every line must hold one sentence")
            lines.append(text.strip())
    except OSError as e:
        raise _os_error(name, e) from None
    finally:
        if f is not sys.stdin.buffer:
            f.close()
    if not lines:
        raise CLIError(f"{name}: no input lines")
    return lines


def read_pairs_or_fail(path: str) -> list[tuple[str, str]]:
    """All pairs of a user TSV / parallel-file set, with loader errors turned into one-line CLI errors."""
    import gzip
    import zlib

    from fastdiss.data.loader import DataError, read_pairs
    gz_fix = "compress it again (gzip FILE) or give the uncompressed file"
    try:
        pairs = list(read_pairs(path))
    except DataError as e:
        raise CLIError(str(e)) from None
    except gzip.BadGzipFile as e:   # a .gz name on other bytes, or a damaged checksum
        what = "is not a gzip file" if "Not a gzipped file" in str(e) else "is a damaged gzip file (checksum)"
        raise CLIError(f"{path}: {what}; {gz_fix}") from None
    except EOFError:   # gzip stream cut short (an interrupted copy or download)
        raise CLIError(f"{path}: the gzip file is cut short (it ends before its end-of-stream marker); "
                       f"{gz_fix}") from None
    except zlib.error:
        raise CLIError(f"{path}: the gzip file is damaged (its compressed data cannot be decoded); {gz_fix}") from None
    except OSError as e:
        raise _os_error(path, e) from None
    if not pairs:
        raise CLIError(f"{path}: no sentence pairs")
    return pairs


def load_checkpoint(path: str | None, device: str = "cpu"):
    """A checkpoint file, a shipped-model folder (model.safetensors + config.json), or with no path
    the model shipped with fastdiss (fastdiss.pretrained.DEFAULT_MODEL)."""
    from fastdiss import checkpoint, pretrained
    if path is None or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
        try:
            return pretrained.load_pretrained(path, device)
        except pretrained.PretrainedError as e:
            raise CLIError(str(e)) from None
    if not os.path.exists(path):
        raise CLIError(f"{path}: checkpoint not found")
    if os.path.isdir(path):
        hint = [f for f in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, f))]
        raise CLIError(f"{path}: is a directory; pass a checkpoint file"
                       + (f" such as {os.path.join(path, hint[0])}" if hint else ""))
    try:
        ck = checkpoint.load(path, map_location=device)
    except (ValueError, OSError) as e:
        raise CLIError(str(e)) from None
    if ck.tokenizer is None or isinstance(ck.tokenizer, str):
        raise CLIError(f"{path}: the checkpoint holds no usable tokenizer; it cannot turn text into ids")
    return ck


def encode_sources(tokenizer, lines: list[str], max_len: int, strict: bool = False,
                   what: str = "input") -> list[list[int]]:
    """Token ids per line, truncated to max_len tokens with one warning (or refused when strict)."""
    ids = tokenizer.encode_batch(lines) if hasattr(tokenizer, "encode_batch") else [tokenizer.encode(x) for x in lines]
    long = [i for i, x in enumerate(ids) if len(x) > max_len]
    if long:
        first = long[0]
        msg = (f"{len(long)} {what} line(s) are longer than the model's max_len={max_len} tokens "
               f"(first: line {first + 1}, {len(ids[first])} tokens)")
        if strict:
            raise CLIError(msg + "; shorten them or drop --strict-length to truncate")
        warn(msg + "; truncated to the first max_len tokens")
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise CLIError(f"{what} line {empty[0] + 1} encodes to no tokens")
    return [list(x[:max_len]) for x in ids]


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize()


def run_generation(ck, sources: list[list[int]], *, device: str = "cpu", steps: int | None = None, beam: int = 1,
                   length_beam: int | None = None, noise_draws: int | None = None, select: str | None = None,
                   batch_size: int = 64, seed: int | None = None, progress=None) -> dict:
    """Generate for encoded sources with a loaded checkpoint (diffusion: `steps` DDIM steps; AR:
    greedy/beam search). Returns ids, single-candidate ids, seconds and calls per sentence.
    progress: a fastdiss.longjobs.JobProgress (its bar), closed at the end."""
    import torch
    model = ck.model.to(device).eval()
    _sync(device)
    start = time.perf_counter()
    if ck.kind == "diffusion":
        from fastdiss.sampling import Sampler
        kwargs = {k: v for k, v in (("length_beam", length_beam), ("noise_draws", noise_draws),
                                    ("select", select), ("seed", seed)) if v is not None}
        sampler = Sampler(model, ck.cfg.sample, ck.cfg.diffusion)
        if progress is not None:
            sampler.on_step = progress.on_step
        try:
            res = sampler.translate(sources, steps, batch_size=batch_size, device=device, **kwargs)
        except BaseException:
            if progress is not None:
                progress.close(done=False)
            raise
        if progress is not None:
            progress.close()
        ids, single, calls = res.ids, res.single_ids, res.calls_per_sentence
    else:
        from fastdiss.sampling import pad_batch
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
        ids = [None] * len(sources)
        with torch.no_grad():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                src, mask = pad_batch([sources[i] for i in idx], model.pad_id, device)
                for i, out in zip(idx, model.generate(src, mask, beam=beam)):
                    ids[i] = out
                if progress is not None:
                    progress.on_batch(len(idx))
        if progress is not None:
            progress.close()
        single, calls = ids, None
    _sync(device)
    seconds = time.perf_counter() - start
    return {"ids": ids, "single_ids": single, "seconds": seconds, "calls_per_sentence": calls}


# ---------------------------------------------------------------------------------------------
# Training with an optional wall-clock budget (shared with fastdiss.demo)
# ---------------------------------------------------------------------------------------------

def run_training(cfg, train_enc, valid_enc, tokenizer, out_dir: str, kind: str = "diffusion", **kwargs):
    """fastdiss.train's Trainer, stopped at max_steps or when `minutes` of wall clock are spent
    (then validated and saved like a normal end of training). Returns (trainer, stopped_by_time).
    Holds out_dir's training lock (fastdiss.runlock): a second training into it is refused."""
    from fastdiss import runlock
    with runlock.hold_if_rank0(out_dir):
        return _run_training(cfg, train_enc, valid_enc, tokenizer, out_dir, kind, **kwargs)


def _run_training(cfg, train_enc, valid_enc, tokenizer, out_dir: str, kind: str = "diffusion", *,
                  resume: bool = False, max_steps: int | None = None, minutes: float | None = None,
                  device: str = "cpu", progress: bool = True):
    import torch

    from fastdiss import train as T

    T.setup_distributed()
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)   # saved in last.pt: a fresh run's state must not depend on the process
    model = T.build_model(cfg, tokenizer, kind)
    trainer = T.Trainer(cfg, model, kind=kind, tokenizer=tokenizer, out_dir=out_dir, device=device,
                        progress=progress)
    last = os.path.join(out_dir, "last.pt")
    if resume:
        try:
            trainer.resume(last)
        except (ValueError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None
    elif trainer.rank == 0:   # a fresh run: no records of an earlier run killed before its first save
        T.trim_log(os.path.join(out_dir, "train_log.jsonl"), 0)
    result = trainer.fit(train_enc, valid_enc, max_steps=max_steps,
                         max_seconds=None if minutes is None else 60.0 * minutes)
    return trainer, result.stopped_by_time


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
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


def _train(args) -> int:
    from fastdiss import checkpoint, config
    from fastdiss.data.batching import encode_pairs

    if args.task and (args.train or args.valid):
        raise CLIError("give either --task (an embedded corpus) or --train/--valid (your files), not both")
    if args.valid and not args.train:
        raise CLIError("--valid needs --train")
    last = os.path.join(args.out, "last.pt")
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
        if not (args.task or args.train):  # same data as the run being resumed
            saved = _read_run_info(args.out)
            args.task, args.train, args.valid = saved.get("task"), saved.get("train"), saved.get("valid")
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
    for name in ("lr", "max_tokens", "seed", "eval_every", "warmup"):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg.train, name, value)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    try:
        cfg = config.Config.from_dict(cfg.to_dict())  # re-validate after the overrides
    except ValueError as e:
        raise CLIError(str(e)) from None

    if args.train:
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
            tokenizer = load_checkpoint(last).tokenizer
        else:
            from fastdiss.data.tokenizer import Tokenizer
            print(f"training a {args.vocab_size}-id byte-level BPE tokenizer on {len(train_pairs)} pairs",
                  file=sys.stderr)
            try:
                tokenizer = Tokenizer.train([x for p in train_pairs for x in p], vocab_size=args.vocab_size)
            except ValueError as e:   # e.g. --vocab-size below the 256 bytes + specials
                raise CLIError(f"--vocab-size {args.vocab_size}: {e}") from None
        data_name = args.train
    else:
        from fastdiss.data import corpus
        task = args.task or corpus.DEFAULT_TASK
        train_pairs, valid_pairs = corpus.load_pairs(task, "train"), corpus.load_pairs(task, "valid")
        tokenizer = load_checkpoint(last).tokenizer if args.resume else corpus.load_tokenizer(task)
        data_name = f"task {task}"
    max_len = cfg.model.max_len
    train_enc = encode_pairs(train_pairs, tokenizer, max_len)
    valid_enc = encode_pairs(valid_pairs, tokenizer, max_len)
    os.makedirs(args.out, exist_ok=True)
    if not args.resume:
        _write_run_info(args.out, {"task": None if args.train else task, "kind": kind, "preset": args.preset,
                                   "train": os.path.abspath(args.train) if args.train else None,
                                   "valid": os.path.abspath(args.valid) if args.valid else None})
    scp_mans = f", scp={cfg.diffusion.scp}, mans={cfg.diffusion.mans}" if kind == "diffusion" else ""
    budget = f", at most {args.minutes:g} min" if args.minutes else ""
    print(f"training {kind} ({args.preset if not args.resume else 'saved config'}{scp_mans}) on {data_name}: "
          f"{len(train_enc)} train / {len(valid_enc)} valid pairs, up to {cfg.train.max_steps} steps{budget}, "
          f"device {args.device}, out {args.out}", file=sys.stderr)
    trainer, by_time = run_training(cfg, train_enc, valid_enc, tokenizer, args.out, kind, resume=args.resume,
                                    max_steps=cfg.train.max_steps, minutes=args.minutes, device=args.device,
                                    progress=not args.quiet)
    best = os.path.join(args.out, "best.pt")
    why = "time budget reached" if by_time else "step budget reached"
    best_txt = f"; best valid BLEU {trainer.best_bleu:.2f} ({best})" if math.isfinite(trainer.best_bleu) else ""
    print(f"done: {trainer.step} steps ({why}); last checkpoint {last}{best_txt}")
    return 0


RUN_INFO = "run.json"


def _write_run_info(out_dir: str, info: dict) -> None:
    """OUT/run.json: which data a run trains on, so `--resume` alone continues on the same data."""
    path = os.path.join(out_dir, RUN_INFO)
    _atomic_write_text(path, json.dumps(info, indent=1) + "\n")


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


def cmd_generate(args) -> int:
    lines = read_lines(args.input)  # input errors first: they are cheaper to find than a model load
    if args.output not in (None, "-"):   # found now, not after a long generation
        folder = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            raise CLIError(f"-o {args.output}: is a directory, expected a file name")
        if not os.path.isdir(folder):
            raise CLIError(f"-o {args.output}: the folder {folder} does not exist")
    ck = load_checkpoint(args.ckpt, args.device)
    max_len = _max_input_len(args, ck)
    sources = encode_sources(ck.tokenizer, lines, max_len, strict=args.strict_length)
    steps = args.steps or ck.cfg.sample.steps
    plan = _long_job_plan(args, ck, sources, [steps], "generate")
    res = run_generation(ck, sources, device=args.device, steps=args.steps, beam=args.beam,
                         length_beam=args.length_beam, noise_draws=args.noise_draws, select=args.select,
                         batch_size=args.batch_size, seed=args.seed,
                         progress=plan.job("generate", len(sources), steps))
    out = sys.stdout if args.output in (None, "-") else None
    texts = [ck.tokenizer.decode(ids) for ids in res["ids"]]
    text = "".join(one_line(t) + "\n" for t in texts)
    if out is not None:  # UTF-8 whatever the locale says
        out.flush()
        if hasattr(out, "buffer"):
            out.buffer.write(text.encode("utf-8"))
            out.buffer.flush()
        else:
            out.write(text)
            out.flush()
    else:
        _atomic_write_text(args.output, text)
    cost = (f"{res['calls_per_sentence']} network calls/sentence" if res["calls_per_sentence"] else
            f"beam {args.beam}")
    print(f"generated {len(texts)} sentences in {res['seconds']:.2f} s ({cost})", file=sys.stderr)
    return 0


def _max_input_len(args, ck) -> int:
    model_max = int(ck.cfg.model.max_len)
    if args.max_input_len is None:
        return model_max
    if args.max_input_len > model_max:
        raise CLIError(f"--max-input-len {args.max_input_len} exceeds the model's max_len={model_max}")
    return args.max_input_len


def _atomic_write_text(path: str, text: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise CLIError(f"{path}: cannot write the output ({e.strerror or e})") from None


def _evaluation_data(args):
    """(sources, references, description) from --task/--split, --src/--ref or --data."""
    if args.src or args.ref:
        if not (args.src and args.ref):
            raise CLIError("--src and --ref go together (one sentence per line each)")
        if args.data:
            raise CLIError("give either --data or --src/--ref, not both")
        srcs, refs = read_lines(args.src), read_lines(args.ref)
        if len(srcs) != len(refs):
            raise CLIError(f"{args.src} has {len(srcs)} lines but {args.ref} has {len(refs)}; they must be parallel")
        what = f"{args.src} / {args.ref}"
    elif args.data:
        pairs = read_pairs_or_fail(args.data)
        srcs, refs, what = [s for s, _ in pairs], [t for _, t in pairs], args.data
    else:
        from fastdiss.data import corpus
        # the shipped model translates elb2web (German -> English): its task is the default without --ckpt
        task = args.task or (corpus.DEFAULT_TASK if args.ckpt else "elb2web")
        pairs = corpus.load_pairs(task, args.split)
        srcs, refs, what = [s for s, _ in pairs], [t for _, t in pairs], f"{task}/{args.split}"
    if args.limit:
        srcs, refs = srcs[:args.limit], refs[:args.limit]
    return srcs, refs, what


def _long_job_plan(args, ck, sources, step_counts, command):
    """fastdiss.longjobs.plan for a generate / evaluate command: warn above the usual step counts,
    estimate the time of a long job (a probe of 3 steps) and say whether to show a progress bar."""
    from fastdiss import longjobs
    from fastdiss.sampling import Sampler
    kwargs = {k: v for k, v in (("length_beam", args.length_beam), ("noise_draws", args.noise_draws),
                                ("select", args.select), ("seed", args.seed)) if v is not None}
    return longjobs.plan(ck, sources, step_counts if ck.kind == "diffusion" else None, batch_size=args.batch_size,
                         device=args.device, quiet=args.quiet, command=command, gen_kwargs=kwargs, warn=warn,
                         make_sampler=lambda: Sampler(ck.model.to(args.device).eval(), ck.cfg.sample,
                                                      ck.cfg.diffusion))


def evaluate_rows(ck, srcs_ids, refs, settings, *, device, batch_size=64, length_beam=None, noise_draws=None,
                  select=None, seed=None, plan=None):
    """One row per setting (diffusion: steps; AR: beam size): BLEU, chrF, latency, cost. plan: a
    fastdiss.longjobs.Plan whose progress bar each row shows."""
    from fastdiss.metrics import bleu, chrf
    rows, sigs = [], {}
    # Warm-up (first calls allocate, pick kernels, fill caches): keeps it out of the first row's latency.
    warm = srcs_ids[:min(len(srcs_ids), 8)]
    if ck.kind == "diffusion":
        run_generation(ck, warm, device=device, steps=1, length_beam=1, noise_draws=1, batch_size=batch_size)
    else:
        run_generation(ck, warm, device=device, beam=1, batch_size=batch_size)
    for value in settings:
        key = "steps" if ck.kind == "diffusion" else "beam"
        progress = plan.job(f"{key}={value}", len(srcs_ids), value) if plan is not None else None
        if ck.kind == "diffusion":
            res = run_generation(ck, srcs_ids, device=device, steps=value, length_beam=length_beam,
                                 noise_draws=noise_draws, select=select, batch_size=batch_size, seed=seed,
                                 progress=progress)
        else:
            res = run_generation(ck, srcs_ids, device=device, beam=value, batch_size=batch_size, progress=progress)
        hyps = [ck.tokenizer.decode(x) for x in res["ids"]]
        b, sigs["bleu"] = bleu(hyps, refs)
        c, sigs["chrf"] = chrf(hyps, refs)
        row = {("steps" if ck.kind == "diffusion" else "beam"): value, "bleu": b, "chrf": c,
               "latency_ms_per_sentence": 1000.0 * res["seconds"] / len(refs),
               "calls_per_sentence": res["calls_per_sentence"], "hypotheses": hyps}
        if ck.kind == "diffusion" and res["single_ids"] is not res["ids"]:
            row["bleu_single"] = bleu([ck.tokenizer.decode(x) for x in res["single_ids"]], refs)[0]
        rows.append(row)
    return rows, sigs


def cmd_evaluate(args) -> int:
    srcs, refs, what = _evaluation_data(args)
    ck = load_checkpoint(args.ckpt, args.device)
    sources = encode_sources(ck.tokenizer, srcs, _max_input_len(args, ck), strict=args.strict_length)
    if ck.kind == "diffusion":
        settings = args.steps or [ck.cfg.sample.steps]
    else:
        settings = args.beam or [1]
    plan = _long_job_plan(args, ck, sources, settings, "evaluate")
    rows, sigs = evaluate_rows(ck, sources, refs, settings, device=args.device, batch_size=args.batch_size,
                               length_beam=args.length_beam, noise_draws=args.noise_draws, select=args.select,
                               seed=args.seed, plan=plan)
    if args.json:
        report = {"checkpoint": args.ckpt or ck.path, "kind": ck.kind, "data": what, "sentences": len(refs),
                  "device": args.device, "bleu_signature": sigs["bleu"], "chrf_signature": sigs["chrf"],
                  "results": [{k: v for k, v in r.items() if k != "hypotheses"} for r in rows]}
        print(json.dumps(report, indent=1))
        return 0
    key = "steps" if ck.kind == "diffusion" else "beam"
    print(f"{ck.kind} model {args.ckpt or ck.path} on {what} ({len(refs)} sentences, device {args.device})")
    single = any("bleu_single" in r for r in rows)
    head = f"{key:>6} {'BLEU':>7} {'chrF':>7} {'ms/sent':>9}"
    head += f" {'calls/sent':>10}" if ck.kind == "diffusion" else ""
    head += f" {'BLEU(1 cand)':>13}" if single else ""
    print(head)
    for r in rows:
        line = f"{r[key]:>6} {r['bleu']:7.2f} {r['chrf']:7.2f} {r['latency_ms_per_sentence']:9.2f}"
        if ck.kind == "diffusion":
            line += f" {r['calls_per_sentence']:>10}"
        if single:
            line += f" {r.get('bleu_single', float('nan')):13.2f}"
        print(line)
    print(f"BLEU signature: {sigs['bleu']}")
    print(f"chrF signature: {sigs['chrf']}")
    return 0


def cmd_demo(args) -> int:
    from fastdiss import demo
    return demo.run(args)


def cmd_distill(args) -> int:
    from fastdiss import distill

    ck = load_checkpoint(args.ckpt, args.device)
    if ck.kind != "ar":
        raise CLIError(f"{args.ckpt}: the teacher must be an autoregressive checkpoint (fastdiss train --kind ar), "
                       f"not a {ck.kind!r} one")
    if args.data:
        pairs = read_pairs_or_fail(args.data)
    else:
        from fastdiss.data import corpus
        pairs = corpus.load_pairs(args.task or corpus.DEFAULT_TASK, args.split)
    if args.limit:
        pairs = pairs[:args.limit]
    out, kept = distill.distill_pairs(ck.model, ck.tokenizer, pairs, beam=args.beam, batch_size=args.batch_size,
                                      device=args.device, progress=not args.quiet)
    try:
        distill.write_tsv(out, args.out)
    except OSError as e:
        raise _os_error(args.out, e) from None
    note = f" ({kept} longer than the teacher's max_len kept their reference)" if kept else ""
    print(f"wrote {len(out)} distilled pairs to {args.out}{note}", file=sys.stderr)
    return 0


def cmd_env(args) -> int:
    from fastdiss import env
    return env.main(as_json=args.json)


def cmd_export(args) -> int:
    try:
        from fastdiss import export
    except ImportError as e:
        if getattr(e, "name", "") == "fastdiss.export":
            raise CLIError("`fastdiss export` is not built yet in this version (no fastdiss.export module)") from None
        raise
    load_checkpoint(args.ckpt)  # the one-line errors for a missing or broken checkpoint
    try:
        if hasattr(export, "run"):
            return int(export.run(args) or 0)
        export.export_model(args.ckpt, args.out)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    return 0


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

def _add_device(p):
    p.add_argument("--device", type=_device, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")


def _add_sampling(p, steps_list: bool):
    if steps_list:
        p.add_argument("--steps", type=_step_list, default=None, metavar="K[,K...]",
                       help="diffusion sampling steps, e.g. 1,2,4,8 (one result row each; default: the "
                            "checkpoint's sample.steps; at most 10000, a warning above 1000)")
        p.add_argument("--beam", type=_int_list, default=None, metavar="B[,B...]",
                       help="AR models: beam sizes, one row each (default 1 = greedy)")
    else:
        p.add_argument("--steps", type=_step_count, default=None, metavar="K",
                       help="diffusion sampling steps (default: the checkpoint's sample.steps; at most 10000, "
                            "a warning above 1000)")
        p.add_argument("--beam", type=_positive_int, default=1, help="AR models: beam size (1 = greedy)")
    p.add_argument("--quiet", action="store_true",
                   help="no time estimate and no progress bar (shown for long jobs: many steps or sentences)")
    p.add_argument("--length-beam", type=_positive_int, default=None, metavar="B",
                   help="diffusion: candidates from the top-B predicted lengths (default: checkpoint setting)")
    p.add_argument("--noise-draws", type=_positive_int, default=None, metavar="N",
                   help="diffusion: noise samples per length (default: checkpoint setting)")
    p.add_argument("--select", choices=("mbr", "score"), default=None,
                   help="diffusion: pick a candidate by MBR (mutual BLEU) or by model score")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the checkpoint's sample.seed)")
    p.add_argument("--max-input-len", type=_positive_int, default=None, metavar="N",
                   help="truncate inputs to N tokens (default and maximum: the model's max_len); longer "
                        "inputs are truncated with a warning")
    p.add_argument("--strict-length", action="store_true",
                   help="refuse (exit 2) inputs longer than the limit instead of truncating them")


def build_parser() -> argparse.ArgumentParser:
    import fastdiss

    parser = _Parser(prog="fastdiss", description="FastDiSS: few-step continuous diffusion for "
                     "sequence-to-sequence generation (SCP + MANS), with an autoregressive baseline.",
                     epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastdiss {fastdiss.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter

    # train
    p = sub.add_parser("train", help="train a diffusion or AR model on an embedded task or your files",
                       formatter_class=raw, description="Train a model; writes OUT/last.pt (resumable), "
                       "OUT/best.pt (best validation BLEU) and OUT/train_log.jsonl.",
                       epilog="""examples:
  fastdiss train --task kjv2web --preset small --out runs/kjv2web --minutes 30
  fastdiss train --task elb2web --preset base --kind ar --out runs/elb2web-ar --device cuda
  fastdiss train --task kjv2web --preset small --no-scp --no-mans --out runs/plain   # the baseline
  fastdiss train --train data/train.tsv --valid data/valid.tsv --out runs/mine     # src<TAB>tgt lines
  fastdiss train --train data/train.src --out runs/mine        # parallel files train.src / train.tgt
  fastdiss train --out runs/kjv2web --resume --max-steps 40000  # continue a run
""")
    data = p.add_argument_group("data (an embedded task, or your own files)")
    data.add_argument("--task", choices=_tasks(), default=None, help="embedded corpus (default kjv2web)")
    data.add_argument("--train", metavar="PATH", help="your training pairs: TSV (src<TAB>tgt) or x.src/x.tgt")
    data.add_argument("--valid", metavar="PATH", help="your validation pairs (default: hold out 2%% of --train)")
    data.add_argument("--vocab-size", type=_positive_int, default=8000,
                      help="tokenizer size when training on your files (default 8000)")
    p.add_argument("--preset", choices=_presets(), default="small", help="model size (default small)")
    p.add_argument("--kind", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion (FastDiSS) or the autoregressive Transformer baseline")
    p.add_argument("--scp", action=argparse.BooleanOptionalAction, default=None,
                   help="Self-Conditioning Perturbation (default on)")
    p.add_argument("--mans", action=argparse.BooleanOptionalAction, default=None,
                   help="Model-Aware Noise Scaling (default on)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for checkpoints and logs")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--minutes", type=_positive_float, default=None, help="wall-clock budget; stops and saves after it")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt (same config, exact data position)")
    p.add_argument("--lr", type=_positive_float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup", type=_positive_int, default=None, help="warmup steps (default: the preset's)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="tokens per batch (default: the preset's)")
    p.add_argument("--eval-every", type=_positive_int, default=None, help="validate every N steps")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=cmd_train)

    # generate
    p = sub.add_parser("generate", help="generate outputs for input lines (file or stdin) to stdout",
                       formatter_class=raw, description="Read one source sentence per line (UTF-8), write one "
                       "output per line. Inputs longer than the model's max_len are truncated with a warning "
                       "(--strict-length refuses them instead).",
                       epilog="""examples:
  fastdiss generate --ckpt runs/kjv2web/last.pt input.txt > output.txt
  echo "In the beginning was the Word" | fastdiss generate --ckpt runs/kjv2web/last.pt --steps 2
  fastdiss generate --ckpt model.pt input.txt --steps 4 --length-beam 3 --noise-draws 2 --select mbr
  fastdiss generate --ckpt runs/ar/last.pt input.txt --beam 5        # an AR checkpoint
""")
    p.add_argument("input", nargs="?", default="-", help="input file, one sentence per line ('-' or absent: stdin)")
    p.add_argument("--ckpt", default=None, help="checkpoint file or shipped-model folder (diffusion or AR; "
                   "default: the shipped elb2web German->English model)")
    p.add_argument("-o", "--output", default=None, help="write here (atomically) instead of stdout")
    _add_sampling(p, steps_list=False)
    _add_device(p)
    p.set_defaults(func=cmd_generate)

    # evaluate
    p = sub.add_parser("evaluate", help="SacreBLEU (with signature) and chrF at several step counts",
                       formatter_class=raw, description="Score a checkpoint: corpus SacreBLEU and chrF, "
                       "latency per sentence and network calls per sentence, one row per step count.",
                       epilog="""examples:
  fastdiss evaluate --ckpt runs/kjv2web/last.pt --task kjv2web --split test --steps 1,2,4,8,16
  fastdiss evaluate --ckpt model.pt --src test.de --ref test.en --steps 4 --json
  fastdiss evaluate --ckpt model.pt --data test.tsv --steps 2,4 --length-beam 3 --noise-draws 2
  fastdiss evaluate --ckpt runs/ar/last.pt --task kjv2web --beam 1,5
""")
    p.add_argument("--ckpt", default=None, help="checkpoint file or shipped-model folder (diffusion or AR; "
                   "default: the shipped elb2web German->English model)")
    p.add_argument("--task", choices=_tasks(), default=None, help="embedded corpus (default kjv2web)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="test", help="split of --task (default test)")
    p.add_argument("--src", help="source sentences, one per line")
    p.add_argument("--ref", help="reference sentences, one per line (parallel to --src)")
    p.add_argument("--data", help="pairs as TSV (src<TAB>tgt) or x.src/x.tgt")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N sentences")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p, steps_list=True)
    _add_device(p)
    p.set_defaults(func=cmd_evaluate)

    # demo
    p = sub.add_parser("demo", help="few-step translation with the shipped trained models: examples and a table",
                       formatter_class=raw, description="The demo (`make demo`): loads the shipped elb2web and kjv2web models "
                       "and their AR peers, prints example translations and a table of BLEU, "
                       "chrF, latency and speed-up for 1, 2, 4, 8, 16 and 1000 sampling steps on a fixed test "
                       "subset, with the AR greedy and identity rows. No training unless --retrain.",
                       epilog="""examples:
  fastdiss demo
  fastdiss demo --sentences 200 --steps 1,2,4,1000
  fastdiss demo --retrain --minutes 60            # train the recipe from scratch first
""")
    from fastdiss import demo as _demo
    _demo.add_arguments(p)
    p.set_defaults(func=cmd_demo)

    # distill
    p = sub.add_parser("distill", help="sequence-level distillation: an AR teacher's beam outputs as training data",
                       formatter_class=raw, description="Translate the training sources with an autoregressive "
                       "teacher (beam search) and write source<TAB>output pairs, the training data of "
                       "non-autoregressive and diffusion students.",
                       epilog="""examples:
  fastdiss distill --ckpt runs/elb2web-ar/best.pt --task elb2web --out runs/elb2web.distilled.tsv
  fastdiss train --train runs/elb2web.distilled.tsv --valid valid.tsv --preset tiny --out runs/student
""")
    p.add_argument("--ckpt", required=True, help="the AR teacher checkpoint")
    p.add_argument("--task", choices=_tasks(), default=None, help="embedded corpus (default kjv2web)")
    p.add_argument("--split", choices=("train", "valid", "test"), default="train", help="split of --task (default train)")
    p.add_argument("--data", help="your pairs instead of --task: TSV (src<TAB>tgt) or x.src/x.tgt")
    p.add_argument("--out", required=True, help="output TSV (written atomically)")
    p.add_argument("--beam", type=_positive_int, default=4, help="teacher beam size (default 4)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N pairs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=cmd_distill)

    # env
    p = sub.add_parser("env", help="versions, GPU, extension build and which kernels each op uses",
                       description="Print torch, triton, CUDA, GPU, the fastdiss._C build and the backend of "
                       "every op on CPU and CUDA.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_env)

    # export
    p = sub.add_parser("export", help="export a diffusion checkpoint for the C++ sampler",
                       description="Export a trained denoiser as AOTInductor packages for the C++ sampler.",
                       formatter_class=raw, epilog="example:\n  fastdiss export --ckpt runs/kjv2web/last.pt "
                       "--out exported/\n")
    try:
        from fastdiss import export as _export
        _export.add_arguments(p)
    except (ImportError, AttributeError):
        p.add_argument("--ckpt", required=True, help="diffusion checkpoint")
        p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv=None) -> int:
    from fastdiss.resources import GenerationMemoryError
    from fastdiss.runlock import RunDirBusy
    from fastdiss.train import NonFiniteLossError

    warnings.formatwarning = _fmt_warning
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed, one line)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except (CLIError, RunDirBusy) as e:   # RunDirBusy: `fastdiss demo` training into a folder in use
        print(f"fastdiss {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (GenerationMemoryError, NonFiniteLossError) as e:  # clear runtime failures: one line, no traceback
        print(f"fastdiss {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"fastdiss {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `fastdiss generate ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
