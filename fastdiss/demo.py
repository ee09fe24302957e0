"""`fastdiss demo` (`make demo`): few-step translation with the models shipped in the package.

For each shipped task it loads the diffusion model in fastdiss/pretrained/ and its autoregressive
peer of the same size and training budget, then on a fixed subset of the test split (the Gospel of
John) prints a few examples (source, reference, K = 1, K = 4, the many-step output, AR greedy) and a
table: BLEU, chrF, ms per sentence and speed-up for K = 1, 2, 4, 8, 16 and 1000 sampling steps, the
AR greedy row and the identity row (the source copied unchanged). The tasks: elb2web (German ->
English, the real translation task) and kjv2web (King James -> modern English, close to a copy
task: read it against the identity row). No training: minutes on a 2-core CPU.

`fastdiss demo --retrain` trains the diffusion model of one task from scratch instead (with the
shipped model's recipe; the expected time is printed first) and runs the same table on it.
"""
from __future__ import annotations

import argparse
import json
import math
import os

DEMO_STEPS = (1, 2, 4, 8, 16, 1000)
TASKS = {"elb2web": ("elb2web-tiny", "elb2web-tiny-ar"), "kjv2web": ("kjv2web-tiny", "kjv2web-tiny-ar")}
MAX_SUBSET_TOKENS = 32   # subset sentences have at most this many source tokens


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from fastdiss.argtypes import device, int_list, positive_float, positive_int
    p.add_argument("--task", choices=("all", *TASKS), default="all", help="which shipped task(s) to show (default all)")
    p.add_argument("--model", default=None,
                   help="with --task: a model folder or checkpoint instead of the shipped one (no AR row then)")
    p.add_argument("--sentences", type=positive_int, default=48, help="size of the fixed test subset (default 48)")
    p.add_argument("--examples", type=int, default=3, help="example translations to print (default 3)")
    p.add_argument("--steps", type=int_list, default=list(DEMO_STEPS), metavar="K[,K...]",
                   help="step counts of the table (default 1,2,4,8,16,1000)")
    p.add_argument("--no-ar", action="store_true", help="skip the AR peer's row")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: chosen from the free cores, see the first line)")
    p.add_argument("--retrain", action="store_true", help="train the diffusion model from scratch first")
    p.add_argument("--train-steps", type=positive_int, default=None,
                   help="with --retrain: optimizer steps (default: the shipped model's)")
    p.add_argument("--minutes", type=positive_float, default=None, help="with --retrain: a wall-clock budget")
    p.add_argument("--out", default=os.path.join("runs", "demo"), help="with --retrain: output folder")
    p.add_argument("--seed", type=int, default=0, help="sampling (and training) seed (default 0)")
    p.add_argument("--device", type=device, default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--save", default=None, metavar="PATH",
                   help="also write the table, examples and machine as JSON (what the README's demo section is made from)")
    return p


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """Torch threads for a small model on a possibly busy machine, and why. Measured on a 2-core VM:
    a 2-step batch-1 generation took 25 ms with one thread and 2.8 s with two threads when another
    process held a core (OpenMP threads spin-waiting on each other), so only idle cores are used."""
    cores = os.cpu_count() or 1
    if requested:
        return requested, f"{requested} torch thread(s) as requested, {cores} core(s)"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    free = max(1, min(4, int(cores - math.ceil(load - 0.25))))
    return free, f"{free} torch thread(s): {cores} core(s), load average {load:.1f}"


def demo_subset(pairs: list, n: int, tokenizer, max_tokens: int = MAX_SUBSET_TOKENS) -> list:
    """n pairs spread evenly over the split, always the same ones, sources of at most max_tokens tokens
    (short sentences keep the demo to minutes on a CPU)."""
    from fastdiss.evaluate import evenly_spaced
    pairs = [p for p in pairs if len(tokenizer.encode(p[0])) <= max_tokens]
    return [pairs[i] for i in evenly_spaced(len(pairs), n)]


def retrain(args, ck, task: str) -> str:
    """Train the shipped model's recipe from scratch into args.out; returns the checkpoint path."""
    from fastdiss.commands.train import train_into
    from fastdiss.config import Config
    from fastdiss.data import corpus
    from fastdiss.data.batching import encode_pairs

    prov = ck.extra.get("provenance", {})
    cfg = Config.from_dict(ck.cfg.to_dict())
    steps = args.train_steps or int(prov.get("train_steps", cfg.train.max_steps))
    cfg.train.max_steps = steps
    cfg.train.eval_every = cfg.train.save_every = max(1, min(500, steps))
    tok = corpus.load_tokenizer(task)
    train_enc = encode_pairs(corpus.load_pairs(task, "train"), tok, cfg.model.max_len)
    valid_enc = encode_pairs(corpus.load_pairs(task, "valid"), tok, cfg.model.max_len)
    per_step = prov.get("seconds_per_step")
    eta = f"about {steps * per_step / 60:.0f} min at the shipped model's {per_step:.2f} s/step" if per_step else "unknown"
    budget = f", stopping after {args.minutes:g} min" if args.minutes else ""
    print(f"retraining from scratch: {steps} steps of the {prov.get('preset', 'tiny')} preset on {task} "
          f"({len(train_enc)} pairs) into {args.out}/{task}; expected time {eta}{budget}", flush=True)
    if prov.get("train_data", "").startswith("distilled"):
        print("note: the shipped model trained on AR-distilled targets; this retrain uses the references "
              "(distil first with `fastdiss distill` and train with `fastdiss train --train` to match it)")
    out = os.path.join(args.out, task)
    os.makedirs(out, exist_ok=True)
    last = os.path.join(out, "last.pt")
    if os.path.exists(last):
        os.remove(last)
    train_into(cfg, train_enc, valid_enc, tok, out, "diffusion", max_steps=steps, minutes=args.minutes,
                 device=args.device, progress=not args.quiet)
    return last


def run(args) -> int:
    import torch

    from fastdiss.userio import CLIError

    threads, why = choose_threads(args.threads)
    torch.set_num_threads(threads)
    print(f"fastdiss demo on {args.device}: {why}")
    tasks = list(TASKS) if args.task == "all" else [args.task]
    if (args.model or args.retrain) and len(tasks) > 1:
        raise CLIError("--model and --retrain apply to one task: add --task elb2web or --task kjv2web")
    records = [run_task(args, task, why) for task in tasks]
    if args.save:
        from fastdiss.atomic import write_bytes
        write_bytes(args.save, (json.dumps({"tasks": records}, indent=1) + "\n").encode())
    return 0


def run_task(args, task: str, threads_note: str) -> dict:
    from fastdiss import pretrained
    from fastdiss.data import corpus
    from fastdiss.evaluate import evaluate_rows, evenly_spaced, score
    from fastdiss.userio import encode_sources, load_checkpoint, one_line

    device = args.device
    model_name, ar_name = TASKS[task]
    ck = load_checkpoint(args.model or str(pretrained.shipped_path(model_name)), device)
    if args.retrain:
        ck = load_checkpoint(retrain(args, ck, task), device)
    prov = ck.extra.get("provenance", {})
    print(f"\n=== {task}: {DESCRIPTIONS[task]} ===")
    if prov:
        print(f"model: {ck.path} ({prov.get('preset', '?')} preset, {prov.get('params', 0) / 1e6:.1f} M parameters, "
              f"{prov.get('train_steps', '?')} training steps, {prov.get('train_hours', 0):.2f} h on "
              f"{prov.get('machine', {}).get('cpu', '?') if isinstance(prov.get('machine'), dict) else prov.get('machine')}"
              f"; trained on {prov.get('train_data', '?')})")
    pairs = demo_subset(corpus.load_pairs(task, "test"), args.sentences, ck.tokenizer)
    refs = [t for _, t in pairs]
    sources = encode_sources(ck.tokenizer, [s for s, _ in pairs], int(ck.cfg.model.max_len))
    print(f"translating {len(pairs)} fixed test sentences (John) with one candidate each "
          f"(top predicted length, one noise draw), K = {', '.join(map(str, args.steps))} ...", flush=True)
    rows, sigs = evaluate_rows(ck, sources, refs, args.steps, device=device, length_beam=1, noise_draws=1,
                               select="score", seed=args.seed)
    ar_row = None
    if not args.no_ar and args.model is None:
        ar = load_checkpoint(str(pretrained.shipped_path(ar_name)), device)
        ar_row = evaluate_rows(ar, encode_sources(ar.tokenizer, [s for s, _ in pairs], int(ar.cfg.model.max_len)),
                               refs, [1], device=device)[0][0]
    identity = {k: v for k, v in score([s for s, _ in pairs], refs).items() if k in ("bleu", "chrf")}

    by_steps = {r["steps"]: r for r in rows}
    few, many = (4 if 4 in by_steps else min(by_steps)), max(by_steps)
    shown = sorted({1, few, many} & set(by_steps))
    n_ex = max(0, min(args.examples, len(pairs)))
    for i in evenly_spaced(len(pairs), n_ex) if n_ex else []:
        print(f"\nexample {i + 1}/{len(pairs)}")
        print(f"  source       : {pairs[i][0]}")
        print(f"  reference    : {pairs[i][1]}")
        for k in shown:
            print(f"  K = {k:<4}     : {one_line(by_steps[k]['hypotheses'][i])}")
        if ar_row is not None:
            print(f"  AR greedy    : {one_line(ar_row['hypotheses'][i])}")
    table = format_table(task, rows, ar_row, identity, len(pairs))
    print(table)
    print(f"BLEU signature: {sigs['bleu']}")
    return make_record(task, rows, ar_row, identity, pairs, ck, threads_note, table, sigs)


DESCRIPTIONS = {"elb2web": "German (Elberfelder 1932) -> English (World English Bible), the real translation task",
                "kjv2web": "King James English -> modern English (WEB); close to a copy task, read it against the identity row"}


def make_record(task, rows, ar_row, identity, pairs, ck, threads_note, table, sigs) -> dict:
    import platform

    import torch
    strip = lambda r: {k: v for k, v in r.items() if k != "hypotheses"}   # noqa: E731
    return {"task": task, "sentences": len(pairs), "model": ck.path, "provenance": ck.extra.get("provenance", {}),
            "rows": [strip(r) for r in rows], "ar": strip(ar_row) if ar_row else None, "identity": identity,
            "examples": [{"source": s, "reference": t, **{f"K{r['steps']}": r["hypotheses"][i] for r in rows},
                          **({"ar": ar_row["hypotheses"][i]} if ar_row else {})}
                         for i, (s, t) in enumerate(pairs[:5])],
            "table": table, "signatures": sigs, "threads": threads_note,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "torch": torch.__version__, "python": platform.python_version()}}


def format_table(task: str, rows: list, ar_row: dict | None, identity: dict, n: int) -> str:
    base = max(rows, key=lambda r: r["steps"])
    lines = [f"\n{task} test subset ({n} sentences), one candidate per sentence",
             f"{'decoder':>16} {'BLEU':>6} {'chrF':>6} {'ms/sentence':>12} {'speed-up vs K=' + str(base['steps']):>18}",
             f"{'-' * 16} {'-' * 6} {'-' * 6} {'-' * 12} {'-' * 18}"]

    def line(name, r):
        ms = r.get("latency_ms_per_sentence")
        speed = f"{base['latency_ms_per_sentence'] / max(ms, 1e-9):17.1f}x" if ms else f"{'-':>18}"
        lines.append(f"{name:>16} {r['bleu']:6.2f} {r['chrf']:6.2f} {(f'{ms:12.2f}' if ms else f'{chr(45):>12}')} {speed}")
    for r in rows:
        line(f"diffusion K={r['steps']}", r)
    if ar_row is not None:
        line("AR greedy", ar_row)
    line("identity (copy)", identity)
    return "\n".join(lines)

