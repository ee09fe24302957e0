"""Learning curves: BLEU and chrF at K = 1 and 4 against training steps and CPU seconds.

    python -m benchmarks.learning_curve --task kjv2web --variant default --seed 0 --checkpoints 200 400 800
    python -m benchmarks.learning_curve --task elb2web --variant ar --seed 0 --checkpoints 500 1000 2000
    python -m benchmarks.learning_curve --task elb2web --variant default --train-tsv runs/distilled.tsv ...
    python -m benchmarks.learning_curve --merge --tag cpu-tiny      # one JSON + plot from all runs

One process trains one (task, variant, seed) run and scores it at every checkpoint on a fixed,
evenly spaced test subset (single candidate: top-1 predicted length, one noise draw; AR: greedy),
so a learning curve costs one training. At the last checkpoint it also scores the final sweep
(K = 1, 2, 4, 8, 16, 1000 by default, and K = 4 with the true time fed to the network, i.e.
without condition-enhanced sampling). Results go to runs/learning_curve/<run>.json after every
evaluation (atomically); an interrupted run resumes from its last checkpoint. --merge gathers the
run files into benchmarks/results/learning-curve-<tag>.json with means over seeds and a plot.

Variants (the recipe of docs/method.md 1b is "default" = all of it + SCP + MANS):
  default, plain (no SCP, no MANS), scp, mans, old (the recipe before: no source copy, noise
  factor 1, absolute lengths, a learnt LayerNorm on z0, true time at sampling), the ablations
  no-copy, soft-copy, nf1, abs-length, affine-norm, shared-emb, and ar (the autoregressive
  Transformer of the same size).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common, quality
from fastdiss import argtypes
from fastdiss.evaluate import score

IDENTITY_NOTE = "copying the source unchanged (the identity baseline)"
VARIANTS = {  # name -> config overrides on top of the preset (which carries the new default recipe)
    "default": {},
    "plain": {"diffusion": {"scp": False, "mans": False}},
    "scp": {"diffusion": {"scp": True, "mans": False}},
    "mans": {"diffusion": {"scp": False, "mans": True}},
    "old": {"model": {"src_copy": "none", "length_offset": False, "latent_norm_affine": True},
            "diffusion": {"noise_factor": 1.0}, "sample": {"time_shift": 0.0}},
    "old-plain": {"model": {"src_copy": "none", "length_offset": False, "latent_norm_affine": True},
                  "diffusion": {"noise_factor": 1.0, "scp": False, "mans": False}, "sample": {"time_shift": 0.0}},
    "no-copy": {"model": {"src_copy": "none"}},
    "soft-copy": {"model": {"src_copy": "soft"}},
    "nf1": {"diffusion": {"noise_factor": 1.0}},
    "abs-length": {"model": {"length_offset": False}},
    "affine-norm": {"model": {"latent_norm_affine": True}},
    "shared-emb": {"model": {"share_embeddings": True}},
    "ar": {},
}
CURVE_STEPS = (1, 4)
FINAL_STEPS = (1, 2, 4, 8, 16, 1000)
RUN_DIR = common.REPO_ROOT / "runs" / "learning_curve"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def identity_scores(data) -> dict:
    """BLEU/chrF of copying the source unchanged: the floor any kjv2web result must be read against."""
    srcs = [data.tokenizer.decode(s) for s in data.test_src]
    return score(srcs, data.test_ref)


def load_distilled(path: str, tokenizer, max_len: int) -> list:
    """(src_ids, tgt_ids) pairs from a distilled TSV (src<TAB>teacher output), both sides fitting max_len."""
    from fastdiss.data.loader import read_pairs
    pairs = list(read_pairs(path))
    return [(s, t) for _, s, t in quality._fits(pairs, tokenizer, max_len)]


def evaluate(model, cfg, kind, data, device, steps: int, time_shift: float | None = None) -> dict:
    """One curve point's scores (fastdiss.evaluate through benchmarks.quality): AR greedy, or diffusion
    with one candidate (top-1 length, one noise draw), optionally with another sample.time_shift."""
    if kind == "ar":
        return quality.eval_ar(model, data, 1, device, batch_size=96)
    if time_shift is not None:
        cfg = cfg.replace(sample=type(cfg.sample)(**{**cfg.sample.__dict__, "time_shift": time_shift}))
    row = quality.eval_diffusion(model, cfg, data, steps, "single", 1, 1, cfg.train.seed, device, batch_size=96)
    row["time_shift"], row["spacing"] = cfg.sample.time_shift, cfg.sample.spacing
    return row


def reeval(args) -> dict:
    """Score a finished run's last checkpoint again with other sampling settings (--set sample.KEY=VALUE),
    e.g. after a sampler default changed; the earlier sweep is kept as final_before_reeval."""
    from fastdiss import checkpoint
    from fastdiss.config import Config
    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir) / args.name
    result = common.read_json(run_dir / "result.json")
    sample_over = quality.parse_overrides(args.set).get("sample", {})
    d = json.loads(json.dumps(result["config"]))   # a copy: the run's own config stays as it trained
    d["sample"].update(sample_over)
    cfg = Config.from_dict(d)
    data = quality.load_task(result["task"], cfg.model.max_len, args.test_sentences, 0, Path(args.run_dir), False)
    model = checkpoint.load(str(run_dir / "last.pt")).model.eval()
    final = []
    for k in args.final_steps:
        row = evaluate(model, cfg, "diffusion", data, torch.device("cpu"), k)
        final.append({kk: row[kk] for kk in row if kk not in ("bleu_signature", "chrf_signature")})
        _log(f"{args.name} reeval K={k}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.1f}")
    if cfg.sample.time_shift:
        row = evaluate(model, cfg, "diffusion", data, torch.device("cpu"), 4, time_shift=0.0)
        final.append({kk: row[kk] for kk in row if kk not in ("bleu_signature", "chrf_signature")})
    before = result.get("final_sample") or result["config"]["sample"]
    result.setdefault("final_before_reeval", {"sample": before, "final": result["final"]})
    # step counts not scored again keep their earlier row, marked with the grid it used
    kept = [{**r, "spacing": r.get("spacing", before["spacing"])} for r in result["final_before_reeval"]["final"]
            if r["steps"] not in args.final_steps and r.get("time_shift") != 0.0]
    result["final"], result["final_sample"] = final + kept, cfg.to_dict()["sample"]
    result.setdefault("reeval_headers", []).append(common.run_header("learning_curve-reeval", torch.device("cpu"),
                                                                     {"args": vars(args)}))
    common.write_json(result, run_dir / "result.json")
    return result


def run_one(args) -> dict:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    kind = "ar" if args.variant == "ar" else "diffusion"
    overrides = quality.parse_overrides(args.set)
    for section, kv in VARIANTS[args.variant].items():
        overrides.setdefault(section, {}).update(kv)
    checkpoints = sorted(set(args.checkpoints))
    cfg = quality.make_config(args.preset, overrides, None, args.seed, checkpoints[-1], args.max_tokens, args.warmup)
    data = quality.load_task(args.task, cfg.model.max_len, args.test_sentences, 0, Path(args.run_dir), False)
    if args.train_tsv:
        data.train = load_distilled(args.train_tsv, data.tokenizer, cfg.model.max_len)
        data.info["train_data"] = f"distilled: {args.train_tsv} ({len(data.train)} pairs)"
    name = args.name or f"{args.task}-{args.variant}{'-distilled' if args.train_tsv else ''}-s{args.seed}"
    run_dir = Path(args.run_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    out_path = run_dir / "result.json"
    result = common.read_json(out_path) if out_path.is_file() else {
        "header": common.run_header("learning_curve", device, {"args": vars(args)}),
        "task": args.task, "variant": args.variant, "kind": kind, "seed": args.seed, "config": cfg.to_dict(),
        "data": data.info, "identity": identity_scores(data), "points": [], "final": []}
    done = {p["train_steps"] for p in result["points"]}
    spent = max([p["train_seconds"] for p in result["points"]], default=0.0)
    cpu_spent = max([p["train_cpu_seconds"] for p in result["points"]], default=0.0)
    for target in checkpoints:
        if target in done:
            continue
        c0, w0 = time.process_time(), time.perf_counter()
        model, info = quality.train_run(cfg, kind, data, run_dir, target, None, device, log=_log)
        spent, cpu_spent = info["seconds"], cpu_spent + (time.process_time() - c0)
        point = {"train_steps": info["steps"], "train_seconds": spent, "train_cpu_seconds": round(cpu_spent, 1),
                 "final_loss": info["final_loss"], "scores": []}
        for k in ([1] if kind == "ar" else CURVE_STEPS):
            row = evaluate(model, cfg, kind, data, device, k)
            point["scores"].append({kk: row[kk] for kk in row if kk not in ("bleu_signature", "chrf_signature")})
            result["signatures"] = {"bleu": row["bleu_signature"], "chrf": row["chrf_signature"]}
        result["points"].append(point)
        common.write_json(result, out_path)
        s = "  ".join(f"K={r.get('steps', 'greedy')}: BLEU {r['bleu']:.2f} chrF {r['chrf']:.1f}" for r in point["scores"])
        _log(f"{name} step {info['steps']} ({spent:.0f} s): {s}   (identity {result['identity']['bleu']:.2f})")
        del model
    if kind == "diffusion" and not result["final"] and args.final_steps:
        model, _ = quality.train_run(cfg, kind, data, run_dir, checkpoints[-1], None, device, log=_log)
        for k in args.final_steps:
            row = evaluate(model, cfg, kind, data, device, k)
            result["final"].append({kk: row[kk] for kk in row if kk not in ("bleu_signature", "chrf_signature")})
            _log(f"{name} final K={k}: BLEU {row['bleu']:.2f} chrF {row['chrf']:.1f} ({row['ms_per_sentence']:.1f} ms/sent)")
        if cfg.sample.time_shift:
            row = evaluate(model, cfg, kind, data, device, 4, time_shift=0.0)
            result["final"].append({kk: row[kk] for kk in row if kk not in ("bleu_signature", "chrf_signature")})
        result["final_sample"] = cfg.to_dict()["sample"]
        common.write_json(result, out_path)
    return result


# ----------------------------------------------------------------------------- merge

def _mean_sd(vals):
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals),
            "values": vals}


def r0_spacing(run: dict) -> str:
    return (run.get("final_sample") or run["config"]["sample"])["spacing"]


def run_label(run: dict) -> str:
    """The row a run is merged into: its variant, +distilled, its --set overrides (a screen of one
    setting is its own row, never a seed of the default) and "long" for a run continued past the
    others (its run folder's name has "-long"), whose later points are not averaged with shorter seeds,
    and "rerun" for a run trained again on later code (folder name "-rerun"), kept apart from the first."""
    args = run["header"]["config"]["args"]
    distilled = "distilled" in run["data"].get("train_data", "")
    short = [s.split(".", 1)[-1].replace("runs/learning_curve/", "") for s in args.get("set") or []]
    return (run["variant"] + ("+distilled" if distilled else "") + (f" [{', '.join(short)}]" if short else "")
            + (" long" if "-long" in run.get("run", "") else "") + (" rerun" if "-rerun" in run.get("run", "") else ""))


def merge(tag: str, run_dir: Path, out_dir: Path) -> dict:
    runs = [{**common.read_json(p), "run": p.parent.name} for p in sorted(run_dir.glob("*/result.json"))]
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["task"], run_label(r)), []).append(r)
    summary = []
    for (task, variant), rs in sorted(groups.items()):
        entry = {"task": task, "variant": variant, "seeds": sorted(r["seed"] for r in rs),
                 "identity_bleu": rs[0]["identity"]["bleu"], "curve": [], "final": []}
        steps = sorted(set.intersection(*[{p["train_steps"] for p in r["points"]} for r in rs]))
        for s in steps:
            pts = [next(p for p in r["points"] if p["train_steps"] == s) for r in rs]
            row = {"train_steps": s, "train_cpu_seconds": _mean_sd([p["train_cpu_seconds"] for p in pts])}
            for i, sc in enumerate(pts[0]["scores"]):
                key = f"K{sc['steps']}" if "steps" in sc else "greedy"
                row[key] = {m: _mean_sd([p["scores"][i][m] for p in pts]) for m in ("bleu", "chrf")}
            entry["curve"].append(row)
        if all(r["final"] for r in rs):
            # seeds may have swept different step counts (e.g. K = 1000 on seed 0 only): each row averages the
            # seeds that have it, and its n says how many
            def key(f):
                return f["steps"], f.get("time_shift")
            for f in rs[0]["final"]:
                vals = [g for r in rs for g in r["final"] if key(g) == key(f)]
                entry["final"].append({"steps": f["steps"], "time_shift": f.get("time_shift"),
                                       "spacing": f.get("spacing", r0_spacing(rs[0])),
                                       "bleu": _mean_sd([v["bleu"] for v in vals]),
                                       "chrf": _mean_sd([v["chrf"] for v in vals]),
                                       "ms_per_sentence": _mean_sd([v["ms_per_sentence"] for v in vals])})
        summary.append(entry)
    out = {"header": common.run_header("learning_curve-merge", torch.device("cpu"), {"tag": tag}),
           "identity_note": IDENTITY_NOTE, "summary": summary, "runs": runs}
    path = common.write_json(out, out_dir / f"learning-curve-{tag}.json")
    _log(f"wrote {path}")
    try:
        plot(out, out_dir / f"learning-curve-{tag}.png")
    except Exception as e:  # a plot is a convenience; the JSON is the record
        _log(f"plot skipped: {e}")
    return out


def _ms(v: dict | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    return f"{v['mean']:.{digits}f} ± {v['sd']:.{digits}f}" if v["n"] > 1 else f"{v['mean']:.{digits}f}"


def curve_table(merged: dict) -> str:
    """Markdown: BLEU / chrF against training steps (and CPU seconds) per task and variant, the
    identity baseline beside them; then the final sweep over sampling steps. Means ± sd over seeds."""
    out = []
    for task in sorted({e["task"] for e in merged["summary"]}):
        entries = [e for e in merged["summary"] if e["task"] == task]
        out += [f"**{task}** (identity baseline, the source copied unchanged: BLEU {entries[0]['identity_bleu']:.1f})", "",
                "| variant | seeds | steps | CPU s | BLEU K=1 | BLEU K=4 / AR greedy | chrF K=4 / AR greedy |",
                "|---|---|---|---|---|---|---|"]
        for e in entries:
            for p in e["curve"]:
                main = p.get("K4") or p.get("greedy")
                out.append(f"| {e['variant']} | {len(e['seeds'])} | {p['train_steps']} | "
                           f"{p['train_cpu_seconds']['mean']:.0f} | {_ms((p.get('K1') or {}).get('bleu'))} | "
                           f"{_ms(main['bleu'])} | {_ms(main['chrf'])} |")
        finals = [e for e in entries if e["final"]]
        if finals:
            ks = sorted({f["steps"] for e in finals for f in e["final"]})
            out += ["", "Sampling steps at the last checkpoint (BLEU, one candidate; 'true t' = K=4 without "
                        "condition-enhanced sampling; a cell scored on another time grid than its row says so):", "",
                    "| variant | steps | grid | " + " | ".join(f"K={k}" for k in ks) + " | K=4, true t |",
                    "|---|---|---|" + "---|" * (len(ks) + 1)]
            for e in finals:
                cells = {(f["steps"], f.get("time_shift") == 0.0): f for f in e["final"]}
                shifted = any(not t for (_, t) in cells)   # the variant samples with condition-enhanced time
                cell = lambda k: cells.get((k, False)) if shifted else cells.get((k, True))  # noqa: E731
                grid0 = e["final"][0].get("spacing", "uniform")
                mark = lambda f: "" if f.get("spacing", grid0) == grid0 else f" ({f['spacing']})"  # noqa: E731
                row = [_ms(cell(k)["bleu"]) + mark(cell(k)) if cell(k) else "-" for k in ks]
                row.append(_ms(cells[(4, True)]["bleu"]) if shifted and (4, True) in cells else "(= its K=4)")
                steps = e["curve"][-1]["train_steps"] if e["curve"] else "?"
                out.append(f"| {e['variant']} | {steps} | {grid0} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


def plot(merged: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({e["task"] for e in merged["summary"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for e in merged["summary"]:
            if e["task"] != task or not e["curve"]:
                continue
            key = "greedy" if "greedy" in e["curve"][0] else "K4"
            xs = [p["train_steps"] for p in e["curve"]]
            ys = [p[key]["bleu"]["mean"] for p in e["curve"]]
            ax.plot(xs, ys, marker="o", label=f"{e['variant']} ({'AR greedy' if key == 'greedy' else 'K=4'})")
        ident = next(e["identity_bleu"] for e in merged["summary"] if e["task"] == task)
        ax.axhline(ident, color="gray", ls="--", lw=1, label=f"identity (copy source) {ident:.1f}")
        ax.set_title(task)
        ax.set_xlabel("training steps")
        ax.set_ylabel("test BLEU (mean over seeds)")
        ax.legend(fontsize=7)
    from benchmarks.plot import _subtitle, save_figure
    save_figure(fig, path, _subtitle(merged["runs"][0] if merged["runs"] else merged), top=0.92)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="kjv2web")
    p.add_argument("--variant", choices=list(VARIANTS), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--checkpoints", nargs="+", type=int, default=[200, 400, 800])
    p.add_argument("--final-steps", nargs="*", type=int, default=list(FINAL_STEPS))
    p.add_argument("--test-sentences", type=int, default=96)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default: the preset's)")
    p.add_argument("--train-tsv", default=None, help="train on these pairs (e.g. distilled) instead of the task's")
    p.add_argument("--set", nargs="*", default=[], help="config overrides SECTION.KEY=VALUE")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", type=argtypes.device, default="cpu",
                   help="train and evaluate on cpu, cuda[:N] or auto (benchmarks/gpu_learning.sh runs this on a GPU)")
    p.add_argument("--name", default=None)
    p.add_argument("--merge", action="store_true", help="gather finished runs into one results JSON + plot")
    p.add_argument("--reeval", action="store_true",
                   help="score the finished run --name again at --final-steps with --set sample.* overrides")
    p.add_argument("--tag", default="cpu-tiny")
    p.add_argument("--run-dir", default=str(RUN_DIR))
    p.add_argument("--out-dir", default=str(common.RESULTS_DIR))
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.tag, Path(args.run_dir), Path(args.out_dir))
    if args.reeval:
        return reeval(args)
    return run_one(args)


if __name__ == "__main__":
    main()
