"""`fastdiss distill`: an AR teacher's beam-search outputs for a task's or the user's source sentences,
written as a source<TAB>output TSV (fastdiss.distill), the training data of a diffusion student."""
from __future__ import annotations

import sys

from fastdiss.userio import CLIError, load_checkpoint, os_error, read_pairs_or_fail


def run(args) -> int:
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
        raise os_error(args.out, e) from None
    note = f" ({kept} longer than the teacher's max_len kept their reference)" if kept else ""
    print(f"wrote {len(out)} distilled pairs to {args.out}{note}", file=sys.stderr)
    return 0
