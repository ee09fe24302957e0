"""argparse types of the `fastdiss` options (fastdiss.cli, fastdiss.demo): a bad value is refused while
parsing, with a message that names what was expected and what was given."""
from __future__ import annotations

import argparse
import math

MAX_STEPS = 10_000   # the most sampling steps any command accepts (few-step models need 1-16; the baseline 1000)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; every entry a positive integer."""
    parts = [p.strip() for p in text.split(",")]
    if not parts or any(not p for p in parts):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of positive integers, got {text!r}")
    return [positive_int(p) for p in parts]


def step_count(text: str) -> int:
    """A positive number of sampling steps, at most MAX_STEPS."""
    value = positive_int(text)
    if value > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"{value} sampling steps is above the limit of {MAX_STEPS} (few-step "
                                         f"models need 1-16; the many-step baseline is 1000)")
    return value


def step_list(text: str) -> list[int]:
    return [step_count(str(k)) for k in int_list(text)]


def device(text: str) -> str:
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
