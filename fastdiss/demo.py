"""`fastdiss demo` (`make demo`): the few-step claim on a CPU in under ten minutes.

Trains the `small` preset on the embedded kjv2web task (King James -> modern English) for a few
minutes, or reuses the checkpoint a previous demo left in OUT/<variant>/, then samples a fixed subset
of the test split (John) with 1, 2, 4, 8, 16 and 1000 DDIM steps: the same sentences, one candidate
each, so the rows differ only in the number of steps. The table shows BLEU, chrF, latency per
sentence and the speed-up over 1000 steps; three examples follow.

Without the model modules (an install of the data layer only) it describes the corpus instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

DEMO_STEPS = (1, 2, 4, 8, 16, 1000)
VARIANTS = {"scp-mans": (True, True), "plain": (False, False)}
TASK = "kjv2web"
MARKER = "demo.json"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from fastdiss.cli import _device, _int_list, _positive_float, _positive_int
    p.add_argument("--minutes", type=_positive_float, default=4.0,
                   help="training budget in minutes of wall clock (default 4)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop training after N steps instead (or earlier, at the time budget)")
    p.add_argument("--variant", choices=tuple(VARIANTS), default="scp-mans",
                   help="scp-mans (FastDiSS, default) or plain self-conditioned diffusion")
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   help="folder for the checkpoints; OUT/<variant>/last.pt is reused when present (default runs/demo)")
    p.add_argument("--retrain", action="store_true", help="train again even if a finished checkpoint exists")
    p.add_argument("--sentences", type=_positive_int, default=32,
                   help="size of the fixed test subset (default 32; the 1000-step row is the cost: a few "
                        "minutes on 2 CPU cores)")
    p.add_argument("--max-tokens", type=_positive_int, default=None,
                   help="training batch size in tokens (default: the small preset's)")
    p.add_argument("--steps", type=_int_list, default=list(DEMO_STEPS), metavar="K[,K...]",
                   help="step counts of the table (default 1,2,4,8,16,1000)")
    p.add_argument("--seed", type=int, default=0, help="training and sampling seed (default 0)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda, auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _model_available() -> str | None:
    """None when the model modules import, else why not."""
    try:
        import fastdiss.checkpoint  # noqa: F401
        import fastdiss.model  # noqa: F401
        import fastdiss.sampling  # noqa: F401
        import fastdiss.train  # noqa: F401
    except ImportError as e:
        return str(e)
    return None


MAX_SUBSET_TOKENS = 24   # subset sentences have at most this many source tokens (keeps 1000 steps affordable)
MAX_GEN_LEN = 48         # cap on predicted target lengths while sampling the table


def test_subset(pairs: list, n: int, tokenizer=None, max_tokens: int = MAX_SUBSET_TOKENS) -> list:
    """n pairs spread evenly over the split (every chapter represented), always the same ones; with a
    tokenizer, only pairs whose source has at most max_tokens tokens (the 1000-step row costs time
    in proportion to the tokens sampled)."""
    if tokenizer is not None:
        pairs = [p for p in pairs if len(tokenizer.encode(p[0])) <= max_tokens]
    if n >= len(pairs):
        return list(pairs)
    stride = len(pairs) / n
    return [pairs[int(i * stride)] for i in range(n)]


def demo_config(variant: str, seed: int, max_tokens: int | None = None):
    """The small preset with the variant's SCP/MANS switches and a schedule suited to minutes of CPU."""
    from fastdiss import config
    cfg = config.preset("small")
    if max_tokens is not None:
        cfg.train.max_tokens = max_tokens
    cfg.diffusion.scp, cfg.diffusion.mans = VARIANTS[variant]
    cfg.train.seed = seed
    cfg.train.warmup = 100          # the preset's 500 would outlast a few-minute run on CPU
    cfg.train.max_steps = 100_000   # the time budget stops it first
    cfg.train.eval_every = 100_000  # no mid-run validation: the table is the evaluation
    cfg.train.save_every = 50        # an interrupted demo keeps its progress
    cfg.train.log_every = 25
    cfg.sample.seed = seed
    return config.Config.from_dict(cfg.to_dict())


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train_or_reuse(args, out: str) -> dict:
    """Train (or continue an interrupted run) unless OUT holds a finished demo checkpoint."""
    from fastdiss.cli import run_training
    from fastdiss.data import corpus
    from fastdiss.data.batching import encode_pairs

    last, marker = os.path.join(out, "last.pt"), os.path.join(out, MARKER)
    if os.path.isfile(last) and os.path.isfile(marker) and not args.retrain:
        with open(marker) as f:
            info = json.load(f)
        budget = info.get("minutes_budget")
        note = (f"; it was trained with a {budget:g}-min budget, pass --retrain to train with {args.minutes:g}"
                if budget is not None and budget != args.minutes else "; pass --retrain to train again")
        print(f"reusing {last} ({info.get('variant')}, {info.get('steps')} steps in "
              f"{info.get('train_seconds', 0) / 60:.1f} min){note}")
        return info
    resume = os.path.isfile(last) and not args.retrain
    cfg = demo_config(args.variant, args.seed, args.max_tokens)
    tok = corpus.load_tokenizer(TASK)
    train_enc = encode_pairs(corpus.load_pairs(TASK, "train"), tok, cfg.model.max_len)
    os.makedirs(out, exist_ok=True)
    if args.retrain:
        for name in ("last.pt", "best.pt", MARKER, "train_log.jsonl"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
    m = cfg.model
    print(f"training the small preset ({m.n_enc}+{m.n_dec} layers, d_model {m.d_model}, latent {m.d_latent}) on "
          f"{TASK} ({len(train_enc)} pairs), variant {args.variant} (scp={cfg.diffusion.scp}, "
          f"mans={cfg.diffusion.mans}), {args.minutes:g} min on {args.device}"
          + (f", at most {args.max_steps} steps" if args.max_steps else "")
          + (f"; continuing the unfinished run in {out}" if resume else ""))
    start = time.perf_counter()
    trainer, _ = run_training(cfg, train_enc, [], tok, out, "diffusion", resume=resume,
                              max_steps=args.max_steps or cfg.train.max_steps, minutes=args.minutes,
                              device=args.device, progress=not args.quiet)
    info = {"variant": args.variant, "steps": trainer.step, "train_seconds": time.perf_counter() - start,
            "minutes_budget": args.minutes, "seed": args.seed, "device": args.device}
    _write_json(marker, info)
    print(f"trained {trainer.step} steps in {info['train_seconds'] / 60:.1f} min -> {last}")
    return info


def run(args) -> int:
    why = _model_available()
    if why is not None:
        from fastdiss.data.corpus import describe
        print(describe(TASK))
        print(f"\nthe model demo is not available in this build ({why}); showing the corpus only")
        return 0
    from fastdiss.cli import encode_sources, evaluate_rows, load_checkpoint, one_line
    from fastdiss.data import corpus

    out = os.path.join(args.out, args.variant)
    info = train_or_reuse(args, out)
    ck = load_checkpoint(os.path.join(out, "last.pt"), args.device)
    ck.cfg.sample.max_len = min(MAX_GEN_LEN, ck.cfg.model.max_len)  # an undertrained length head may guess long
    subset = test_subset(corpus.load_pairs(TASK, "test"), args.sentences, ck.tokenizer)
    sources = encode_sources(ck.tokenizer, [s for s, _ in subset], int(ck.cfg.model.max_len))
    refs = [t for _, t in subset]
    print(f"sampling {len(subset)} fixed test sentences (John, sources of at most {MAX_SUBSET_TOKENS} tokens) "
          f"with one candidate each (top predicted length, one noise draw), steps "
          f"{', '.join(map(str, args.steps))} ...")
    rows, sigs = evaluate_rows(ck, sources, refs, args.steps, device=args.device, length_beam=1, noise_draws=1,
                               select="score", seed=args.seed)
    print(format_table(rows, args.variant, info))
    print(f"BLEU signature: {sigs['bleu']}")
    by_steps = {r["steps"]: r for r in rows}
    few = 4 if 4 in by_steps else rows[0]["steps"]
    many = max(by_steps)
    for i in (0, len(subset) // 2, len(subset) - 1)[:min(3, len(subset))]:
        print(f"\nexample {i + 1}/{len(subset)}")
        print(f"  source          : {subset[i][0]}")
        print(f"  reference       : {subset[i][1]}")
        print(f"  {few:>4} step{'s' if few > 1 else ' '}      : {one_line(by_steps[few]['hypotheses'][i])}")
        if many != few:
            print(f"  {many:>4} steps      : {one_line(by_steps[many]['hypotheses'][i])}")
    return 0


def format_table(rows: list, variant: str, info: dict) -> str:
    base = max(rows, key=lambda r: r["steps"])
    lines = [f"\nkjv2web test subset ({len(rows[0]['hypotheses'])} sentences), small preset, {variant}, "
             f"training steps: {info.get('steps')}",
             f"{'steps':>6} {'BLEU':>7} {'chrF':>7} {'ms/sentence':>12} {'speed-up vs ' + str(base['steps']):>18}",
             f"{'-' * 6} {'-' * 7} {'-' * 7} {'-' * 12} {'-' * 18}"]
    for r in rows:
        speed = base["latency_ms_per_sentence"] / max(r["latency_ms_per_sentence"], 1e-9)
        lines.append(f"{r['steps']:>6} {r['bleu']:7.2f} {r['chrf']:7.2f} {r['latency_ms_per_sentence']:12.2f} "
                     f"{speed:17.1f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    from fastdiss.cli import main as cli_main
    return cli_main(["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
