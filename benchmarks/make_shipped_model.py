"""Package a trained run as a shipped model (fastdiss/pretrained/<name>/), with its provenance.

    python -m benchmarks.make_shipped_model --run runs/learning_curve/elb2web-default-distilled-s0 \
        --name elb2web-tiny
    python -m benchmarks.make_shipped_model --run runs/learning_curve/elb2web-ar-s0 --name elb2web-tiny-ar

Reads the run's last.pt (EMA weights) and result.json (written by benchmarks/learning_curve.py:
the command, commit, machine, training steps and seconds), scores the model once on the whole
validation split (K = 4, one candidate; AR: greedy) and writes model.safetensors (fp16),
config.json, tokenizer.json and provenance.json. Refuses a model over the 10 MB size limit.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks import common

SIZE_LIMIT = 10 * 1024 * 1024


def valid_bleu(ck, task: str) -> float:
    from fastdiss.data import corpus
    from fastdiss.evaluate import evaluate_rows
    from fastdiss.userio import encode_sources
    pairs = corpus.load_pairs(task, "valid")
    srcs = encode_sources(ck.tokenizer, [s for s, _ in pairs], int(ck.cfg.model.max_len))
    settings = [4] if ck.kind == "diffusion" else [1]
    rows, _ = evaluate_rows(ck, srcs, [t for _, t in pairs], settings, device="cpu", length_beam=1, noise_draws=1,
                            select="score", seed=0)
    return rows[0]["bleu"]


def main(argv=None):
    from fastdiss import checkpoint, pretrained
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a learning_curve run folder (last.pt + result.json)")
    p.add_argument("--name", required=True, help="folder name under fastdiss/pretrained/")
    p.add_argument("--out", default=None, help="write here instead of fastdiss/pretrained/<name> (e.g. on a lent GPU, "
                                                 "into the folder that comes back)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--note", default=None, help="how the run was made, where its header's command is not the whole "
                                                  "story (e.g. a run continued past its first command)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    result = json.loads((run / "result.json").read_text())
    ck = checkpoint.load(str(run / "last.pt"))
    params = sum(t.numel() for t in ck.model.state_dict().values())
    fp16_bytes = 2 * params
    if fp16_bytes > SIZE_LIMIT:   # refuse before anything is written
        raise SystemExit(f"{run}: {fp16_bytes / 2**20:.1f} MiB of fp16 weights, over the 10 MB limit of shipped files "
                         f"(the tiny preset is 4.9 MiB; the small one 16 MiB)")
    if result.get("final_sample"):   # sampling settings of the run's final sweep (after a --reeval, the new defaults)
        from fastdiss.config import SampleConfig
        ck.cfg.sample = SampleConfig(**result["final_sample"])
    last = max(result["points"], key=lambda q: q["train_steps"])
    ck_step = (ck.extra or {}).get("step")
    if ck_step is not None and int(ck_step) != last["train_steps"]:
        raise SystemExit(f"{run}/last.pt holds step {ck_step} but the run's last scored point is step "
                         f"{last['train_steps']} (a run stopped between checkpoints): score it first with "
                         f"`python -m benchmarks.learning_curve ... --name {run.name} --checkpoints {ck_step}`")
    losses = [h["loss"] for h in (ck.train_state or {}).get("history", []) if "loss" in h]
    head = result["header"]
    provenance = {
        "task": result["task"], "kind": ck.kind, "variant": result["variant"], "preset": head["config"]["args"]["preset"],
        "train_command": head.get("command"), "git": head.get("git"), "machine": head.get("machine"),
        "train_steps": last["train_steps"], "train_hours": last["train_seconds"] / 3600,
        "seconds_per_step": last["train_seconds"] / max(1, last["train_steps"]),
        "train_data": result["data"].get("train_data", "references of the embedded corpus"),
        "params": params,
        "valid_bleu": valid_bleu(ck, result["task"]),
        "valid_bleu_setting": "whole valid split, K = 4, one candidate" if ck.kind == "diffusion" else "greedy",
        "test_subset_scores": last["scores"],
        "train_log": {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                      "logged_points": len(losses)},
        "packaged_at": common.git_info(),
    }
    if args.note:
        provenance["note"] = args.note
    out = pretrained.save_pretrained(ck, args.out or pretrained.shipped_path(args.name), provenance)
    size = (out / "model.safetensors").stat().st_size
    if size > SIZE_LIMIT:
        raise SystemExit(f"{out}/model.safetensors is {size / 2**20:.1f} MiB, over the 10 MB limit of shipped files")
    print(f"wrote {out} ({size / 2**20:.1f} MiB weights, valid BLEU {provenance['valid_bleu']:.2f})")


if __name__ == "__main__":
    main()
