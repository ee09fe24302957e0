"""`fastdiss generate`: one output line per input line (a file or stdin) to stdout or, atomically, to
-o FILE. The input limit and the long-job plan here are shared with `fastdiss evaluate`."""
from __future__ import annotations

import os
import sys

from fastdiss import evaluate
from fastdiss.userio import CLIError, encode_sources, load_checkpoint, one_line, read_lines, warn, write_text


def run(args) -> int:
    lines = read_lines(args.input)  # input errors first: they are cheaper to find than a model load
    if args.output not in (None, "-"):   # found now, not after a long generation
        folder = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            raise CLIError(f"-o {args.output}: is a directory, expected a file name")
        if not os.path.isdir(folder):
            raise CLIError(f"-o {args.output}: the folder {folder} does not exist")
    ck = load_checkpoint(args.ckpt, args.device)
    sources = encode_sources(ck.tokenizer, lines, max_input_len(args, ck), strict=args.strict_length)
    steps = args.steps or ck.cfg.sample.steps
    plan = long_job_plan(args, ck, sources, [steps], "generate")
    res = evaluate.generate(ck.model, ck.kind, sources, cfg=ck.cfg, device=args.device, steps=args.steps,
                            beam=args.beam, length_beam=args.length_beam, noise_draws=args.noise_draws,
                            select=args.select, seed=args.seed, batch_size=args.batch_size,
                            progress=plan.job("generate", len(sources), steps))
    texts = [ck.tokenizer.decode(ids) for ids in res.ids]
    text = "".join(one_line(t) + "\n" for t in texts)
    if args.output in (None, "-"):   # UTF-8 whatever the locale says
        out = sys.stdout
        out.flush()
        if hasattr(out, "buffer"):
            out.buffer.write(text.encode("utf-8"))
            out.buffer.flush()
        else:
            out.write(text)
            out.flush()
    else:
        write_text(args.output, text)
    cost = f"{res.calls_per_sentence} network calls/sentence" if res.calls_per_sentence else f"beam {args.beam}"
    print(f"generated {len(texts)} sentences in {res.seconds:.2f} s ({cost})", file=sys.stderr)
    return 0


def max_input_len(args, ck) -> int:
    """--max-input-len, at most (and by default) the model's max_len."""
    model_max = int(ck.cfg.model.max_len)
    if args.max_input_len is None:
        return model_max
    if args.max_input_len > model_max:
        raise CLIError(f"--max-input-len {args.max_input_len} exceeds the model's max_len={model_max}")
    return args.max_input_len


def long_job_plan(args, ck, sources, step_counts, command):
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
