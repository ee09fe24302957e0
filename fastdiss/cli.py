"""The `fastdiss` command: train, generate, evaluate, demo, env, export.

Every user mistake (a missing or unreadable file, bad UTF-8, an empty input line, an unknown task or
preset, --steps 0) ends with one line on stderr and exit code 2, never a traceback; a traceback means
a bug in fastdiss. Inputs longer than the model's max_len are truncated with a warning (or refused
with --strict-length).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from fastdiss.argtypes import int_list, positive_float, positive_int, step_count, step_list
from fastdiss.argtypes import device as device_arg
from fastdiss.commands import distill as distill_command
from fastdiss.commands import evaluate as evaluate_command
from fastdiss.commands import generate as generate_command
from fastdiss.commands import train as train_command
from fastdiss.userio import CLIError

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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `fastdiss train: error: ... (see fastdiss train --help)`."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _fmt_warning(message, category, filename, lineno, line=None):
    return f"fastdiss: warning: {message}\n"


# ---------------------------------------------------------------------------------------------
# Commands (bodies in fastdiss.commands)
# ---------------------------------------------------------------------------------------------

def cmd_env(args) -> int:
    from fastdiss import env
    return env.main(as_json=args.json)


def cmd_demo(args) -> int:
    from fastdiss import demo
    return demo.run(args)


def cmd_export(args) -> int:
    from fastdiss import export
    from fastdiss.userio import load_checkpoint
    load_checkpoint(args.ckpt)  # the one-line errors for a missing or broken checkpoint
    try:
        return int(export.run(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------

def _tasks() -> tuple[str, ...]:
    from fastdiss.data.corpus import TASKS
    return TASKS


def _presets() -> list[str]:
    from fastdiss.config import PRESETS
    return list(PRESETS)


def _add_device(p):
    p.add_argument("--device", type=device_arg, default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")


def _add_sampling(p, steps_list: bool):
    if steps_list:
        p.add_argument("--steps", type=step_list, default=None, metavar="K[,K...]",
                       help="diffusion sampling steps, e.g. 1,2,4,8 (one result row each; default: the "
                            "checkpoint's sample.steps; at most 10000, a warning above 1000)")
        p.add_argument("--beam", type=int_list, default=None, metavar="B[,B...]",
                       help="AR models: beam sizes, one row each (default 1 = greedy)")
    else:
        p.add_argument("--steps", type=step_count, default=None, metavar="K",
                       help="diffusion sampling steps (default: the checkpoint's sample.steps; at most 10000, "
                            "a warning above 1000)")
        p.add_argument("--beam", type=positive_int, default=1, help="AR models: beam size (1 = greedy)")
    p.add_argument("--quiet", action="store_true",
                   help="no time estimate and no progress bar (shown for long jobs: many steps or sentences)")
    p.add_argument("--length-beam", type=positive_int, default=None, metavar="B",
                   help="diffusion: candidates from the top-B predicted lengths (default: checkpoint setting)")
    p.add_argument("--noise-draws", type=positive_int, default=None, metavar="N",
                   help="diffusion: noise samples per length (default: checkpoint setting)")
    p.add_argument("--select", choices=("mbr", "score"), default=None,
                   help="diffusion: pick a candidate by MBR (mutual BLEU) or by model score")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sentences per batch (default 64)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the checkpoint's sample.seed)")
    p.add_argument("--max-input-len", type=positive_int, default=None, metavar="N",
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
  fastdiss train --task kjv2web --preset tiny --share-embeddings --out runs/kjv2web-share  # same-language task
  fastdiss train --train data/train.tsv --valid data/valid.tsv --out runs/mine     # src<TAB>tgt lines
  fastdiss train --train data/train.src --out runs/mine        # parallel files train.src / train.tgt
  fastdiss train --out runs/kjv2web --resume --max-steps 40000  # continue a run
""")
    data = p.add_argument_group("data (an embedded task, or your own files)")
    data.add_argument("--task", choices=_tasks(), default=None, help="embedded corpus (default kjv2web)")
    data.add_argument("--train", metavar="PATH", help="your training pairs: TSV (src<TAB>tgt) or x.src/x.tgt")
    data.add_argument("--valid", metavar="PATH", help="your validation pairs (default: hold out 2%% of --train)")
    data.add_argument("--vocab-size", type=positive_int, default=8000,
                      help="tokenizer size when training on your files (default 8000)")
    p.add_argument("--preset", choices=_presets(), default="small", help="model size (default small)")
    p.add_argument("--kind", choices=("diffusion", "ar"), default="diffusion",
                   help="diffusion (FastDiSS) or the autoregressive Transformer baseline")
    p.add_argument("--scp", action=argparse.BooleanOptionalAction, default=None,
                   help="Self-Conditioning Perturbation (default on)")
    p.add_argument("--mans", action=argparse.BooleanOptionalAction, default=None,
                   help="Model-Aware Noise Scaling (default on)")
    p.add_argument("--share-embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="one embedding table for source and target (default off; for same-language tasks such as "
                        "kjv2web: measured 3x BLEU there, half on German->English)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder for checkpoints and logs")
    p.add_argument("--max-steps", type=positive_int, default=None, help="optimizer steps (default: the preset's)")
    p.add_argument("--minutes", type=positive_float, default=None, help="wall-clock budget; stops and saves after it")
    p.add_argument("--resume", action="store_true", help="continue OUT/last.pt (same config, exact data position)")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--warmup", type=positive_int, default=None, help="warmup steps (default: the preset's)")
    p.add_argument("--max-tokens", type=positive_int, default=None, help="tokens per batch (default: the preset's)")
    p.add_argument("--eval-every", type=positive_int, default=None, help="validate every N steps")
    p.add_argument("--seed", type=int, default=None, help="training seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=train_command.run)

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
    p.set_defaults(func=generate_command.run)

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
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N sentences")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_sampling(p, steps_list=True)
    _add_device(p)
    p.set_defaults(func=evaluate_command.run)

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
    p.add_argument("--beam", type=positive_int, default=4, help="teacher beam size (default 4)")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N pairs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_device(p)
    p.set_defaults(func=distill_command.run)

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
    from fastdiss import export as _export
    _export.add_arguments(p)
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
