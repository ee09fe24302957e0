"""`fastdiss evaluate`: corpus SacreBLEU and chrF (with signatures), latency and network calls per
sentence of a checkpoint, one row per step count (diffusion) or beam size (AR), as a table or JSON."""
from __future__ import annotations

import json

from fastdiss import evaluate
from fastdiss.commands.generate import long_job_plan, max_input_len
from fastdiss.userio import CLIError, encode_sources, load_checkpoint, read_lines, read_pairs_or_fail


def run(args) -> int:
    srcs, refs, what = _evaluation_data(args)
    ck = load_checkpoint(args.ckpt, args.device)
    sources = encode_sources(ck.tokenizer, srcs, max_input_len(args, ck), strict=args.strict_length)
    settings = (args.steps or [ck.cfg.sample.steps]) if ck.kind == "diffusion" else (args.beam or [1])
    plan = long_job_plan(args, ck, sources, settings, "evaluate")
    rows, sigs = evaluate.evaluate_rows(ck, sources, refs, settings, device=args.device, batch_size=args.batch_size,
                                        length_beam=args.length_beam, noise_draws=args.noise_draws,
                                        select=args.select, seed=args.seed, plan=plan)
    if args.json:
        report = {"checkpoint": args.ckpt or ck.path, "kind": ck.kind, "data": what, "sentences": len(refs),
                  "device": args.device, "bleu_signature": sigs["bleu"], "chrf_signature": sigs["chrf"],
                  "results": [{k: v for k, v in r.items() if k != "hypotheses"} for r in rows]}
        print(json.dumps(report, indent=1))
    else:
        print(f"{ck.kind} model {args.ckpt or ck.path} on {what} ({len(refs)} sentences, device {args.device})")
        print(_table(ck.kind, rows))
        print(f"BLEU signature: {sigs['bleu']}")
        print(f"chrF signature: {sigs['chrf']}")
    return 0


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


def _table(kind: str, rows: list) -> str:
    key = "steps" if kind == "diffusion" else "beam"
    single = any("bleu_single" in r for r in rows)
    head = f"{key:>6} {'BLEU':>7} {'chrF':>7} {'ms/sent':>9}"
    head += f" {'calls/sent':>10}" if kind == "diffusion" else ""
    head += f" {'BLEU(1 cand)':>13}" if single else ""
    lines = [head]
    for r in rows:
        line = f"{r[key]:>6} {r['bleu']:7.2f} {r['chrf']:7.2f} {r['latency_ms_per_sentence']:9.2f}"
        if kind == "diffusion":
            line += f" {r['calls_per_sentence']:>10}"
        if single:
            line += f" {r.get('bleu_single', float('nan')):13.2f}"
        lines.append(line)
    return "\n".join(lines)
