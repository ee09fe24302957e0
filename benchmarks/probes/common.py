"""What the training probes share: their command line and the tiny config with the distilled elb2web data."""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
from benchmarks import learning_curve, quality  # noqa: E402


def parse_args(name: str, add_own) -> argparse.Namespace:
    """--steps, --checkpoints, --seed, --name, --task, --train-tsv, --set, plus the probe's own (add_own(parser))."""
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--checkpoints", type=int, nargs="*", default=[])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=name)
    p.add_argument("--task", default="elb2web")
    p.add_argument("--train-tsv", default="runs/elb2web.distilled.tsv")
    p.add_argument("--set", nargs="*", default=[])
    add_own(p)
    args = p.parse_args()
    torch.set_num_threads(1)
    return args


def config_and_data(args, diffusion: dict | None = None):
    """The learning curve's tiny config (with --set and `diffusion` overrides) and task data, trained on --train-tsv."""
    cfg = quality.make_config("tiny", quality.parse_overrides(args.set), None, args.seed, args.steps, None, None)
    if diffusion:
        cfg = cfg.replace(diffusion=type(cfg.diffusion)(**{**cfg.diffusion.__dict__, **diffusion}))
    data = quality.load_task(args.task, cfg.model.max_len, 96, 0, Path("runs/learning_curve"), False)
    if args.train_tsv:
        data.train = learning_curve.load_distilled(args.train_tsv, data.tokenizer, cfg.model.max_len)
    return cfg, data
