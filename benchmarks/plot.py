"""PNG plots from the benchmarks' JSON (matplotlib, Agg backend: no display needed).

    python -m benchmarks.plot benchmarks/results/kernels-<tag>.json     # re-draw from a results file

plot_kernels writes, next to the JSON:
  <stem>-speedup.png          fastdiss speed-up over each other provider, one panel per op (log scale, 1 = parity)
  <stem>-attention-tflops.png attention TFLOP/s per provider, forward and forward+backward
  <stem>-bandwidth.png        memory-bound ops in GB/s against the measured copy bandwidth
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks import common  # noqa: E402

MODES = ("fwd", "fwd_bwd")
MEMORY_BOUND = ("layer_norm", "q_sample", "embed_and_noise", "self_cond_project")


def _value(rec: dict, provider: str, mode: str, key: str) -> float:
    v = rec["providers"].get(provider, {}).get(mode, {}).get(key)
    return float(v) if isinstance(v, (int, float)) else math.nan


def grouped_bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, log: bool = False):
    """Bars for each series side by side within each group; NaN (no number) draws no bar, only 'n/a'.
    With log=True bars start at 1 (parity), so speed-ups rise and slow-downs hang below the line."""
    n = max(1, len(series))
    width = 0.8 / n
    base = 1.0 if log else 0.0
    finite = [v for vals in series.values() for v in vals if not math.isnan(v) and v > 0]
    for i, (name, vals) in enumerate(series.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [0 if math.isnan(v) else v - base for v in vals], width, bottom=base, label=name)
        for x, v in zip(xs, vals):
            if math.isnan(v):
                ax.text(x, base, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="grey")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
        lo, hi = min(finite + [1.0]), max(finite + [1.0])
        ax.set_ylim(min(lo, 0.5) / 1.5, max(hi, 2.0) * 1.5)
    ax.grid(axis="y", alpha=0.3)


def _width(n_groups: int) -> float:
    return min(24.0, max(9.0, 3.0 + 0.55 * n_groups))


def save_figure(fig, path, subtitle: str, *, fontsize: int = 8, top: float = 0.97, dpi: int = 110):
    """Subtitle (machine and versions), tight layout, write the PNG, free the figure; returns `path`."""
    fig.suptitle(subtitle, fontsize=fontsize)
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _subtitle(result: dict) -> str:
    h = result.get("header", {})
    m = h.get("machine", {})
    gpu = (m.get("gpu") or {}).get("name") or m.get("cpu") or "?"
    commit = (h.get("git", {}).get("commit") or "?")[:10]
    return f"{gpu} | torch {m.get('torch')} | triton {m.get('triton')} | {h.get('config', {}).get('dtype')} | {commit}"


def plot_speedups(result: dict, path: Path) -> Path | None:
    cases = [c for c in result.get("cases", []) if c.get("summary")]
    ops = [op for op in dict.fromkeys(c["op"] for c in cases)]
    if not ops:
        return None
    most = max(2 * sum(c["op"] == op for c in cases) for op in ops)
    fig, axes = plt.subplots(len(ops), 1, figsize=(_width(most), 3.4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        recs = [c for c in cases if c["op"] == op]
        groups = [f"{c['name']} {m}" for c in recs for m in MODES]
        others = [n for n in dict.fromkeys(n for c in recs for n in c["providers"]) if n != "fastdiss"]
        series = {n: [c["summary"].get(m, {}).get("speedup", {}).get(n, math.nan) for c in recs for m in MODES]
                  for n in others}
        grouped_bars(ax, groups, series, "speed-up (x)", log=True)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_title(f"{op}: fastdiss speed-up over each provider (>1 = faster)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, _subtitle(result), fontsize=8, top=0.97)


def plot_attention_tflops(result: dict, path: Path) -> Path | None:
    recs = [c for c in result.get("cases", []) if c["op"] == "attention"]
    if not recs:
        return None
    providers = list(dict.fromkeys(n for c in recs for n in c["providers"]))
    peak = ((result.get("ceilings") or {}).get("matmul_TFLOPs") or {}).get(result["header"]["config"].get("dtype"))
    fig, axes = plt.subplots(2, 1, figsize=(_width(len(recs)) + 2, 8.5))
    for ax, mode in zip(axes, MODES):
        series = {n: [_value(c, n, mode, "TFLOPs") for c in recs] for n in providers}
        grouped_bars(ax, [c["name"] for c in recs], series, "TFLOP/s")
        if peak:
            ax.axhline(peak, color="red", ls="--", lw=0.8, label=f"measured matmul {peak:.0f}")
        ax.set_title(f"attention {mode}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, _subtitle(result), fontsize=8, top=0.97)


def plot_bandwidth(result: dict, path: Path) -> Path | None:
    recs = [c for c in result.get("cases", []) if c["op"] in MEMORY_BOUND]
    if not recs:
        return None
    providers = list(dict.fromkeys(n for c in recs for n in c["providers"]))
    copy_gbps = (result.get("ceilings") or {}).get("copy_GBps")
    fig, axes = plt.subplots(2, 1, figsize=(_width(len(recs)) + 2, 8.5))
    for ax, mode in zip(axes, MODES):
        series = {n: [_value(c, n, mode, "GBps") for c in recs] for n in providers}
        grouped_bars(ax, [f"{c['op']} {c['name']}" for c in recs], series, "GB/s (min bytes / time)")
        if copy_gbps:
            ax.axhline(copy_gbps, color="red", ls="--", lw=0.8, label=f"measured copy {copy_gbps:.0f}")
            ax.axhline(0.8 * copy_gbps, color="red", ls=":", lw=0.8, label="80% of copy")
        ax.set_title(f"memory-bound ops {mode}", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path, _subtitle(result), fontsize=8, top=0.97)


def plot_kernels(result: dict, out_dir, stem: str) -> list[Path]:
    """All kernel plots for one bench_kernels result; returns the files written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    made = [plot_speedups(result, out_dir / f"{stem}-speedup.png"),
            plot_attention_tflops(result, out_dir / f"{stem}-attention-tflops.png"),
            plot_bandwidth(result, out_dir / f"{stem}-bandwidth.png")]
    return [p for p in made if p is not None]


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="a kernels-<tag>.json results file")
    p.add_argument("--out-dir", help="where to write the PNGs (default: next to the JSON)")
    args = p.parse_args(argv)
    path = Path(args.json)
    result = common.read_json(path)
    made = plot_kernels(result, args.out_dir or path.parent, path.stem)
    for m in made:
        print(f"wrote {m}")
    return made


if __name__ == "__main__":
    main()
