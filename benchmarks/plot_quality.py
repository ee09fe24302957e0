"""Plots and tables for the quality and latency benchmarks (matplotlib, Agg backend: no display).

    python -m benchmarks.plot_quality benchmarks/results/quality-<tag>.json [latency-<tag>.json]
    python -m benchmarks.plot_quality --tables benchmarks/results/quality-<tag>.json   # markdown tables

From a quality JSON, per task:
  <stem>-<task>-bleu-vs-steps.png    mean BLEU (band: min..max over seeds) per variant; AR as horizontal lines
  <stem>-<task>-bleu-vs-latency.png  BLEU against ms per sentence, every (variant, steps, mode) point and AR,
                                     with the Pareto front (the best BLEU reachable at each latency)
From a latency JSON:
  <stem>-speedup.png                 speed-up of K steps (each engine) over the Python loop at 1000 / 2000 steps
  <stem>-ms-vs-steps.png             ms per sentence against steps; AR greedy / beam as horizontal lines
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import common  # noqa: E402
from benchmarks.plot import save_figure  # noqa: E402

VARIANT_ORDER = ("plain", "scp", "mans", "scp+mans")
COLORS = {"plain": "tab:gray", "scp": "tab:blue", "mans": "tab:orange", "scp+mans": "tab:red"}
AR_STYLES = {"greedy": ":", "beam": "--"}


def _subtitle(result: dict) -> str:
    h = result.get("header", {})
    m = h.get("machine", {})
    where = (m.get("gpu") or {}).get("name") or m.get("cpu") or "?"
    commit = (h.get("git", {}).get("commit") or "?")[:10]
    cfg = h.get("config", {})
    key = cfg.get("key", cfg)
    budget = (f"{key.get('train_steps')} steps" if key.get("train_steps") else
              f"{key.get('train_minutes')} min" if key.get("train_minutes") else "")
    preset = key.get("preset", "?")
    return f"{where} | torch {m.get('torch')} | preset {preset} {budget} | commit {commit}"


def _variants(diff: dict) -> list[str]:
    return [v for v in VARIANT_ORDER if v in diff] + [v for v in diff if v not in VARIANT_ORDER]


def _steps_axis(ax, ks) -> None:
    """Log x axis with a plain tick at every measured step count."""
    ks = sorted(ks)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks], fontsize=7)
    ax.minorticks_off()


def _mean(cell: dict, metric: str = "bleu"):
    v = (cell.get(metric) or {}).get("mean")
    return v if isinstance(v, (int, float)) else math.nan


# ----------------------------------------------------------------------------- quality

def plot_bleu_vs_steps(result: dict, task: str, path: Path) -> Path | None:
    summ = result.get("summary", {}).get(task)
    if not summ or not summ.get("diffusion"):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for v in _variants(summ["diffusion"]):
        for mode, ls, marker in (("single", "-", "o"), ("mbr", "--", "s")):
            cells = summ["diffusion"][v].get(mode, {})
            if not cells:
                continue
            ks = sorted(int(k) for k in cells)
            mean = [_mean(cells[str(k)]) for k in ks]
            lo = [cells[str(k)]["bleu"]["min"] for k in ks]
            hi = [cells[str(k)]["bleu"]["max"] for k in ks]
            n = max(cells[str(k)]["bleu"]["n"] for k in ks)
            label = f"{v} ({'1 candidate' if mode == 'single' else 'length beam + MBR'}, {n} seeds)"
            ax.plot(ks, mean, ls=ls, marker=marker, ms=4, color=COLORS.get(v), label=label,
                    alpha=1.0 if mode == "single" else 0.7)
            if mode == "single" and n > 1:
                ax.fill_between(ks, lo, hi, color=COLORS.get(v), alpha=0.12, lw=0)
    for dec, cell in summ.get("ar", {}).items():
        ax.axhline(_mean(cell), color="black", ls=AR_STYLES.get("greedy" if dec == "greedy" else "beam"), lw=1,
                   label=f"AR {dec}: {_mean(cell):.2f} ({cell['bleu']['n']} seeds)")
    _steps_axis(ax, {int(k) for v in summ["diffusion"].values() for m in v.values() for k in m})
    ax.set_xlabel("sampling steps K (network calls per candidate)")
    ax.set_ylabel("SacreBLEU (mean over seeds; band = min..max)")
    ax.set_title(f"{task}: BLEU against sampling steps", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, _subtitle(result), fontsize=7, top=0.96)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, quality) not beaten by any point that is both faster and at least as good."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_bleu_vs_latency(result: dict, task: str, path: Path) -> Path | None:
    summ = result.get("summary", {}).get(task)
    if not summ or not summ.get("diffusion"):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    points = []
    for v in _variants(summ["diffusion"]):
        for mode, marker in (("single", "o"), ("mbr", "s")):
            cells = summ["diffusion"][v].get(mode, {})
            xs, ys, ks = [], [], []
            for k in sorted(cells, key=int):
                x, y = cells[k].get("ms_per_sentence"), _mean(cells[k])
                if x and not math.isnan(y):
                    xs.append(x), ys.append(y), ks.append(k)
            if not xs:
                continue
            points += list(zip(xs, ys))
            ax.scatter(xs, ys, marker=marker, s=22, color=COLORS.get(v), alpha=1.0 if mode == "single" else 0.6,
                       label=f"{v} {'1 cand.' if mode == 'single' else 'MBR'}")
            if mode == "single":
                for x, y, k in zip(xs, ys, ks):
                    ax.annotate(k, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for dec, cell in summ.get("ar", {}).items():
        x, y = cell.get("ms_per_sentence"), _mean(cell)
        if x and not math.isnan(y):
            points.append((x, y))
            ax.scatter([x], [y], marker="*", s=90, color="black", zorder=3)
            ax.annotate(f"AR {dec}", (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
    front = pareto_front(points)
    if front:
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="green", lw=1, alpha=0.7,
                label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel("ms per sentence (batched generation during evaluation; label = steps K)")
    ax.set_ylabel("SacreBLEU (mean over seeds)")
    ax.set_title(f"{task}: BLEU against latency", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, _subtitle(result), fontsize=7, top=0.96)


def plot_quality(result: dict, out_dir, stem: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for task in result.get("summary", {}):
        made.append(plot_bleu_vs_steps(result, task, out_dir / f"{stem}-{task}-bleu-vs-steps.png"))
        made.append(plot_bleu_vs_latency(result, task, out_dir / f"{stem}-{task}-bleu-vs-latency.png"))
    return [m for m in made if m is not None]


# ----------------------------------------------------------------------------- latency

def _diffusion_series(result: dict):
    """{(engine, batch): {K: median ms per call}} from a latency JSON."""
    series: dict = {}
    for r in result.get("diffusion", []):
        if r.get("median_ms"):
            series.setdefault((r["engine"], r["batch"]), {})[r["steps"]] = r["median_ms"]
    return series


def plot_speedup(result: dict, path: Path) -> Path | None:
    """Speed-up of every (engine, batch, K) over the Python loop at 1000 and 2000 steps, same batch:
    the many-step sampler as usually run. Engines other than Python thus show both effects, fewer
    steps and a faster loop."""
    series = _diffusion_series(result)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    drew = False
    for (engine, batch), pts in sorted(series.items()):
        base_pts = series.get(("python", batch), {})
        for base, ls in ((1000, "-"), (2000, "--")):
            if base not in base_pts:
                continue
            ks = sorted(pts)
            ax.plot(ks, [base_pts[base] / pts[k] for k in ks], ls=ls, marker="o", ms=3,
                    label=f"{engine}, batch {batch}: vs Python loop at {base} steps")
            drew = True
    if not drew:
        plt.close(fig)
        return None
    ax.axhline(1.0, color="black", lw=0.8)
    _steps_axis(ax, {k for pts in series.values() for k in pts})
    ax.set_yscale("log")
    ax.set_xlabel("sampling steps K")
    ax.set_ylabel("speed-up over the many-step sampler (x)")
    ax.set_title("Speed-up of K-step sampling over the 1000 / 2000-step Python loop (measured)", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, _latency_subtitle(result), fontsize=7, top=0.96)


def plot_ms_vs_steps(result: dict, path: Path) -> Path | None:
    series = _diffusion_series(result)
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), squeeze=False)
    batches = sorted({b for _, b in series})
    for ax, batch in zip(axes[0], batches[:2]):
        for (engine, b), pts in sorted(series.items()):
            if b != batch:
                continue
            ks = sorted(pts)
            ax.plot(ks, [pts[k] / batch for k in ks], marker="o", ms=3, label=f"diffusion, {engine}")
        for r in result.get("ar", []):
            if r["batch"] == batch and r.get("median_ms"):
                ax.axhline(r["median_ms"] / batch, ls=AR_STYLES["greedy" if r["beam"] == 1 else "beam"],
                           color="black", lw=1, label=f"AR {r['decoder']} ({r.get('output_tokens')} tokens)")
        _steps_axis(ax, {k for (e, b), pts in series.items() if b == batch for k in pts})
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps K")
        ax.set_ylabel("ms per sentence (median)")
        ax.set_title(f"batch {batch}", fontsize=9)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path, _latency_subtitle(result), fontsize=7, top=0.95)


def _latency_subtitle(result: dict) -> str:
    h = result.get("header", {})
    m = h.get("machine", {})
    where = (m.get("gpu") or {}).get("name") or m.get("cpu") or "?"
    c = h.get("config", {})
    return (f"{where} | torch {m.get('torch')} | preset {c.get('preset')} {c.get('dtype')} | "
            f"{'random init' if c.get('random_init') else 'trained'} | "
            f"commit {(h.get('git', {}).get('commit') or '?')[:10]}")


def plot_latency(result: dict, out_dir, stem: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [plot_speedup(result, out_dir / f"{stem}-speedup.png"),
            plot_ms_vs_steps(result, out_dir / f"{stem}-ms-vs-steps.png")]
    return [m for m in made if m is not None]


# ----------------------------------------------------------------------------- tables

def _fmt(x, nd=2):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _metric_table(diff: dict, ar: dict, ks: list, metric: str) -> list[str]:
    """Rows of one metric (mean ± std over seeds) per variant and mode, then the AR rows."""
    lines = [f"{metric} | variant | mode | " + " | ".join(f"K={k}" for k in ks) + " |",
             "|---|---|---|" + "---|" * len(ks)]
    lines[0] = "| " + lines[0]
    for v in _variants(diff):
        for mode in ("single", "mbr"):
            cells = diff[v].get(mode)
            if not cells:
                continue
            row = []
            for k in ks:
                c = cells.get(str(k))
                row.append(f"{_fmt(c[metric]['mean'])} ± {_fmt(c[metric]['std'])}" if c and metric in c else "-")
            lines.append(f"| {metric} | {v} | {mode} | " + " | ".join(row) + " |")
    for dec, c in ar.items():
        if metric in c:
            lines.append(f"| {metric} | AR | {dec} | {_fmt(c[metric]['mean'])} ± {_fmt(c[metric]['std'])} "
                         f"({_fmt(c['ms_per_sentence'], 1)} ms/sent) |" + " |" * (len(ks) - 1))
    return lines


def quality_tables(result: dict) -> str:
    """Markdown: BLEU and chrF mean ± std per variant and steps (single and MBR), AR rows, and the headline."""
    lines = []
    for task, summ in result.get("summary", {}).items():
        diff = summ.get("diffusion", {})
        ks = sorted({int(k) for v in diff.values() for m in v.values() for k in m})
        lines += [f"### {task}", ""]
        lines += _metric_table(diff, summ.get("ar", {}), ks, "bleu") + [""]
        lines += _metric_table(diff, summ.get("ar", {}), ks, "chrf")
        lines += ["", "| variant | BLEU few (K=1/2/4) | BLEU at K_max | fewest K within tol of plain@K_max | "
                      "speed-up (calls) | speed-up (measured) |", "|---|---|---|---|---|---|"]
        for v, h in summ.get("headline", {}).items():
            few = "/".join(_fmt(h["bleu_by_steps"].get(str(k))) for k in (1, 2, 4))
            lines.append(f"| {v} | {few} | {_fmt(h['bleu_many'])} (K={h['many_steps']}) | "
                         f"{h.get('fewest_steps_matching_reference')} | {_fmt(h.get('speedup_in_calls'), 0)} | "
                         f"{_fmt(h.get('speedup_in_measured_time'), 1)} |")
        caveats = sorted({h["caveat"] for h in summ.get("headline", {}).values() if h.get("caveat")})
        lines += [""] + [f"Caveat: {c}." for c in caveats]
        lines.append("")
    return "\n".join(lines)


def latency_tables(result: dict) -> str:
    lines = ["| engine | batch | " + " | ".join(f"K={k}" for k in result["header"]["config"].get("steps", [])) + " |"]
    ks = result["header"]["config"].get("steps", [])
    lines.append("|---|---|" + "---|" * len(ks))
    for (engine, batch), pts in sorted(_diffusion_series(result).items()):
        lines.append(f"| {engine} | {batch} | " + " | ".join(_fmt(pts[k] / batch) if k in pts else "-"
                                                             for k in ks) + " |")
    lines += ["", "| AR decoder | batch | ms/sentence | sentences/s | output tokens |", "|---|---|---|---|---|"]
    for r in result.get("ar", []):
        if r.get("median_ms"):
            lines.append(f"| {r['decoder']} | {r['batch']} | {_fmt(r['ms_per_sentence'])} | "
                         f"{_fmt(r['sentences_per_s'], 1)} | {r.get('output_tokens')} |")
    return "\n".join(lines)


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", nargs="+", help="quality-*.json and/or latency-*.json files")
    p.add_argument("--out-dir", help="where to write the PNGs (default: next to each JSON)")
    p.add_argument("--tables", action="store_true", help="print markdown tables instead of plotting")
    args = p.parse_args(argv)
    made = []
    for name in args.json:
        path = Path(name)
        result = common.read_json(path)
        kind = result.get("header", {}).get("benchmark")
        if args.tables:
            print(quality_tables(result) if kind == "quality" else latency_tables(result))
            continue
        out = args.out_dir or path.parent
        made += plot_quality(result, out, path.stem) if kind == "quality" else plot_latency(result, out, path.stem)
    for m in made:
        print(f"wrote {m}")
    return made


if __name__ == "__main__":
    main()
