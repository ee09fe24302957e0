"""Why a trained denoiser fails where it fails: per-token diagnostics of its first sampling step.

    python -m benchmarks.nat_diagnostics --run runs/learning_curve/elb2web-default-distilled-long-s0 \
        --run runs/learning_curve/kjv2web-default-long-s0 --out benchmarks/results/nat-diagnostics-cpu.json

For each run's last checkpoint (EMA weights) on the learning curve's test subset, with the reference
lengths (so tokens line up with the reference):
  - token accuracy of the first pass f(noise, 0, t=1) and of a second pass that gets the first as
    its self-conditioning input f(noise, x0_hat, t=1): does self-conditioning refine anything?
  - the share of adjacent positions that predict the same token (the non-autoregressive
    repetition failure), beside the same share in the references;
  - BLEU at K = 1 and 4 with the predicted length and with the reference length (what length
    prediction costs), and the mean absolute length error.
Single candidate, the run's own sampling settings otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks import common, quality


def _adjacent_repeats(ids, keep) -> float:
    same = (ids[:, 1:] == ids[:, :-1]) & keep[:, 1:] & keep[:, :-1]
    return float(same.sum() / (keep[:, 1:] & keep[:, :-1]).sum().clamp_min(1))


@torch.no_grad()
def diagnose(run_dir: Path, n_test: int, seed: int = 0) -> dict:
    from fastdiss import checkpoint
    from fastdiss.data.batching import collate
    from fastdiss.evaluate import score
    from fastdiss.sampling import Sampler

    result = common.read_json(run_dir / "result.json")
    ck = checkpoint.load(str(run_dir / "last.pt"))
    model, cfg, tok = ck.model.eval(), ck.cfg, ck.tokenizer
    data = quality.load_task(result["task"], cfg.model.max_len, n_test, 0, run_dir.parent, False)
    refs = [tok.encode(r)[:cfg.model.max_len] for r in data.test_ref]
    batch = collate(list(zip(data.test_src, refs)), tok.pad_id)
    src, src_mask, tgt, tgt_mask = batch["src"], batch["src_mask"], batch["tgt"], batch["tgt_mask"]
    keep, B, L = ~tgt_mask, tgt.shape[0], tgt.shape[1]

    torch.manual_seed(seed)
    enc = model.encode(src, src_mask)
    t1 = torch.ones(B)
    eps = torch.randn(B, L, cfg.model.d_latent)
    # x_1 exactly as training builds it (the run's schedule and noise factor), not re-derived here
    _, noise = model.embed_and_noise(tgt, t1, eps, schedule=cfg.diffusion.schedule,
                                     noise_factor=cfg.diffusion.noise_factor)
    first = model(noise, None, t1, enc, tgt_mask)
    second = model(noise, first, t1, enc, tgt_mask)
    pred1, pred2 = model.logits(first).argmax(-1), model.logits(second).argmax(-1)
    out = {
        "run": run_dir.name, "task": result["task"], "variant": result["variant"],
        "train_steps": result["points"][-1]["train_steps"] if result["points"] else None,
        "test_sentences": B,
        "token_acc_pass1": float((pred1 == tgt)[keep].float().mean()),
        "token_acc_pass2_selfcond": float((pred2 == tgt)[keep].float().mean()),
        "pass2_changed_tokens": float((pred1 != pred2)[keep].float().mean()),
        "adjacent_repeats_pass1": _adjacent_repeats(pred1, keep),
        "adjacent_repeats_reference": _adjacent_repeats(tgt, keep),
        "bleu": [],
    }
    sampler = Sampler(model, cfg.sample, cfg.diffusion)
    true_len = keep.sum(1)
    for k in (1, 4):
        for oracle in (False, True):
            gen = sampler.generate(src, src_mask, k, length_beam=1, noise_draws=1, select="score", seed=seed,
                                   lengths=true_len if oracle else None)
            hyps = [tok.decode(o) for o in gen.ids]
            s = score(hyps, data.test_ref)
            row = {"steps": k, "length": "reference" if oracle else "predicted", "bleu": s["bleu"], "chrf": s["chrf"]}
            if not oracle:
                row["mean_abs_length_error"] = float((torch.tensor([len(o) for o in gen.ids]) - true_len)
                                                     .abs().float().mean())
            out["bleu"].append(row)
    return out


def table(data: dict) -> str:
    """Markdown rows, one per run (for the README block)."""
    lines = ["| run | steps | token acc. pass 1 | pass 2 (self-cond.) | tokens pass 2 changes | adjacent repeats "
             "(reference) | BLEU K=4 predicted / reference length | length error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        b = {(x["steps"], x["length"]): x for x in r["bleu"]}
        lines.append(f"| {r['run']} | {r['train_steps']} | {100 * r['token_acc_pass1']:.1f}% | "
                     f"{100 * r['token_acc_pass2_selfcond']:.1f}% | {100 * r['pass2_changed_tokens']:.1f}% | "
                     f"{100 * r['adjacent_repeats_pass1']:.1f}% ({100 * r['adjacent_repeats_reference']:.1f}%) | "
                     f"{b[(4, 'predicted')]['bleu']:.2f} / {b[(4, 'reference')]['bleu']:.2f} | "
                     f"{b[(4, 'predicted')]['mean_abs_length_error']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="a learning-curve run folder (repeatable)")
    p.add_argument("--test-sentences", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/nat-diagnostics-cpu.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for r in args.run:
        run_dir = Path(r)
        if not (run_dir / "last.pt").is_file():
            p.error(f"--run {r}: no last.pt there; pass a finished benchmarks.learning_curve run folder")
        runs.append(diagnose(run_dir, args.test_sentences))
        print(table({"runs": runs[-1:]}).splitlines()[-1], flush=True)
    out = {"header": common.run_header("nat_diagnostics", torch.device("cpu"), {"args": vars(args)}), "runs": runs}
    print(f"wrote {common.write_json(out, args.out)}")


if __name__ == "__main__":
    main()
