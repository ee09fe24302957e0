"""Regenerates the README's result blocks from the committed files in benchmarks/results/.

A block is everything between two marker lines in README.md:

    <!-- report:NAME -->
    ...generated markdown, never edited by hand...
    <!-- /report:NAME -->

    python -m benchmarks.report               # rewrite every block of README.md in place
    python -m benchmarks.report --check       # exit 1 and print a diff if README.md is stale
    python -m benchmarks.report --print NAME  # print one block (to paste markers around it)
    python -m benchmarks.report --list        # the block names

Why: every number in the README must be read off a committed result file by code, so that a
number cannot drift from its evidence (tests/test_readme_report.py fails when the README differs
from what this script produces). Prose outside the blocks is not checked.

Adding a block: one function `(results_dir: Path) -> str` returning markdown, registered in BLOCKS
(the @block("name") decorator does that). Generators read only files under results_dir and name
each file they read, with the commit it records, in the block itself.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from pathlib import Path
from typing import Callable

from fastdiss.atomic import write_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"

BLOCKS: dict[str, Callable[[Path], str]] = {}

_OPEN = re.compile(r"^<!-- report:([A-Za-z0-9_.-]+) -->[ \t]*$", re.M)
_CLOSE = re.compile(r"^<!-- /report:([A-Za-z0-9_.-]+) -->[ \t]*$", re.M)


def block(name: str):
    """Register a generator under `name` (the NAME of its README markers)."""
    def register(fn):
        if name in BLOCKS:
            raise ValueError(f"report block {name!r} is registered twice")
        BLOCKS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------------------------------------- rendering

def render(text: str, results_dir: Path = RESULTS, blocks: dict | None = None) -> str:
    """`text` with the body of every marker block replaced by its generator's output. Raises
    ValueError for an unknown name, an unclosed or unopened block, or nested blocks."""
    blocks = BLOCKS if blocks is None else blocks
    out, pos = [], 0
    opens = list(_OPEN.finditer(text))
    closes = list(_CLOSE.finditer(text))
    for m in opens:
        name = m.group(1)
        if m.start() < pos:
            raise ValueError(f"report block {name!r} starts inside another block")
        end = next((c for c in closes if c.start() > m.end() and c.group(1) == name), None)
        if end is None:
            raise ValueError(f"report block {name!r} has no closing marker <!-- /report:{name} -->")
        inner = text[m.end():end.start()]
        if _OPEN.search(inner) or _CLOSE.search(inner):
            raise ValueError(f"report block {name!r} contains another marker")
        if name not in blocks:
            raise ValueError(f"unknown report block {name!r}; known: {sorted(blocks)}")
        body = blocks[name](Path(results_dir)).strip("\n")
        out += [text[pos:m.end()], "\n", body, "\n"]
        pos = end.start()
    opened = {m.group(1) for m in opens}
    stray = [c.group(1) for c in closes if c.group(1) not in opened]
    if stray:
        raise ValueError(f"closing marker without an opening one: {stray}")
    out.append(text[pos:])
    return "".join(out)


def block_names(text: str) -> list[str]:
    """Names of the blocks present in `text`, in order."""
    return [m.group(1) for m in _OPEN.finditer(text)]


# ---------------------------------------------------------------------------------------------- helpers

def _load(results_dir: Path, name: str) -> dict:
    return json.loads((Path(results_dir) / name).read_text())


def _commit(data) -> str:
    """'commit abc1234' (+ ', dirty tree') from a result header, or say that none was recorded."""
    git = ((data.get("header") or {}).get("git") or {}) if isinstance(data, dict) else {}
    if not git.get("commit"):
        return "no git commit recorded"
    return f"commit {git['commit'][:7]}" + (", dirty tree" if git.get("dirty") else "")


def _source(*files: tuple[str, dict]) -> str:
    return "Source: " + "; ".join(f"`benchmarks/results/{name}` ({_commit(data)})" for name, data in files) + "."


def _num(x, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _stat(cell: dict | None, metric: str, nd: int) -> str:
    """'mean ± std' of a summary cell (just the mean when there is one seed)."""
    s = (cell or {}).get(metric) or {}
    if s.get("mean") is None:
        return "-"
    if (s.get("n") or 1) > 1 and s.get("std") is not None:
        return f"{s['mean']:.{nd}f} ± {s['std']:.{nd}f}"
    return f"{s['mean']:.{nd}f}"


def _ms(x) -> str:
    """Milliseconds with about three significant digits."""
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ---------------------------------------------------------------------------------------------- quality

QUALITY_FILES = ("quality-cpu-tiny-kjv2web.json", "quality-cpu-tiny-elb2web-fr2web.json")
QUALITY_SHARE_FILES = ("quality-cpu-tiny-kjv2web-share.json", "quality-cpu-tiny-kjv2web-share-ablation.json")
VARIANT_LABEL = {"plain": "plain self-conditioning", "scp": "+ SCP", "mans": "+ MANS", "scp+mans": "+ SCP + MANS"}


@block("quality")
def quality_block(results_dir: Path) -> str:
    """The quality files made before the learning recipe (old defaults)."""
    return _quality_tables(results_dir, QUALITY_FILES, ("1", "2", "4", "1000"))


@block("quality-share")
def quality_share_block(results_dir: Path) -> str:
    """The quality file of the current recipe with shared embeddings on kjv2web."""
    return _quality_tables(results_dir, QUALITY_SHARE_FILES, ("1", "2", "4", "8", "16", "1000"))


def _quality_tables(results_dir: Path, names, ks) -> str:
    """Single-candidate BLEU at each K and chrF at K = 4, 1000 per task and variant, then the AR
    baseline; mean ± std over seeds, from each file's summary."""
    files = [(name, _load(results_dir, name)) for name in names]
    by_key, ar_rows, setup, sigs, seeds = {}, [], [], set(), set()
    beam = None
    for _, data in files:   # files may split one task's variants between them: rows are keyed (task, variant)
        for task, summ in data["summary"].items():
            runs = [r for r in data["runs"].values() if r["task"] == task]
            steps = sorted({r["train"]["steps"] for r in runs})
            line = (f"{task}: {'/'.join(map(str, steps))} training steps per run, "
                    f"{data['tasks'][task]['test_subset_size']} test sentences")
            if line not in setup:
                setup.append(line)
            sigs |= {ev["bleu_signature"] for r in runs for ev in r["evals"].values() if "bleu_signature" in ev}
            for variant, label in VARIANT_LABEL.items():
                single = summ["diffusion"].get(variant, {}).get("single")
                if not single:
                    continue
                seeds |= {single[k]["bleu"]["n"] for k in ks if k in single}
                by_key[(task, variant)] = ([task, label] + [_stat(single.get(k), "bleu", 2) for k in ks]
                                           + [_stat(single.get(k), "chrf", 1) for k in ("4", "1000")])
            ar = summ.get("ar") or {}
            beam = next((d for d in ar if d.startswith("beam")), beam)
            if "greedy" in ar:
                ar_rows.append([task, _stat(ar["greedy"], "bleu", 2), _stat(ar.get(beam), "bleu", 2),
                                _stat(ar["greedy"], "chrf", 1), _stat(ar.get(beam), "chrf", 1),
                                str(ar["greedy"]["bleu"]["n"])])
    tasks = list(dict.fromkeys(task for task, _ in by_key))
    rows = [by_key[(t, v)] for t in tasks for v in VARIANT_LABEL if (t, v) in by_key]
    n_seeds = "/".join(map(str, sorted(seeds)))
    lines = [f"Single candidate (top-1 length, one noise draw), mean ± std over {n_seeds} seeds; "
             + "; ".join(setup) + ". SacreBLEU signature: " + ", ".join(f"`{s}`" for s in sorted(sigs)) + ".", ""]
    lines += _table(["task", "variant"] + [f"BLEU K={k}" for k in ks] + ["chrF K=4", "chrF K=1000"], rows)
    beam_label = beam.replace("beam", "beam ") if beam else "beam"
    lines += ["", "Autoregressive Transformer of the same size, trained with the same steps and data:", ""]
    lines += _table(["task", "BLEU greedy", f"BLEU {beam_label}", "chrF greedy", f"chrF {beam_label}", "seeds"],
                    ar_rows)
    lines += ["", _source(*files)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- latency

LATENCY_FILES = ("latency-quick-cpu.json", "latency-cpu-tiny-b64-many-steps.json")
ENGINE_LABEL = {"python": "Python loop", "cpp": "C++ loop", "cuda-graph": "CUDA-graph replay"}


@block("latency")
def latency_block(results_dir: Path) -> str:
    """ms per sentence against K, batch 1 and 64, per engine, then AR; a point the first file skipped
    is taken from the next file that measured it."""
    files = [(name, _load(results_dir, name)) for name in LATENCY_FILES]
    ks = (1, 4, 1000, 2000)
    measured, skipped = {}, {}
    for name, data in files:
        for r in data["diffusion"]:
            key = (r["engine"], r["batch"], r["steps"])
            if r.get("ms_per_sentence") is not None and key not in measured:
                measured[key] = (r["ms_per_sentence"], name)
            elif r.get("skipped"):
                skipped.setdefault(key, r["skipped"])
    first = files[0][1]
    batches = sorted({r["batch"] for r in first["diffusion"]})
    rows, from_other = [], []
    for engine in [e for e in ENGINE_LABEL if any(k[0] == e for k in measured)]:
        for k in ks:
            cells = []
            for b in batches:
                got = measured.get((engine, b, k))
                if got is None:
                    cells.append("not measured")
                else:
                    cells.append(_ms(got[0]) + ("*" if got[1] != files[0][0] else ""))
                    if got[1] != files[0][0]:
                        from_other.append(got[1])
            rows.append([f"diffusion, {ENGINE_LABEL[engine]}, K = {k}"] + cells)
    for dec in sorted({r["decoder"] for r in first["ar"]}, key=lambda d: (d != "greedy", d)):
        by_batch = {r["batch"]: r["ms_per_sentence"] for r in first["ar"] if r["decoder"] == dec}
        label = "AR greedy" if dec == "greedy" else f"AR {dec.replace('beam', 'beam ')}"
        rows.append([label] + [_ms(by_batch.get(b)) for b in batches])
    cfg = first["header"]["config"]
    lines = [f"ms per sentence, {cfg['preset']} preset, random init, {cfg['dtype']}, "
             f"{first['header']['machine'].get('torch_threads')} torch thread, median of at least "
             f"{cfg['min_repeats']} calls; diffusion is given the reference lengths, AR decodes up to the longest "
             "reference." + (f" * measured in `{sorted(set(from_other))[0]}`, which times the points the first "
                             "file's per-point cap skipped." if from_other else ""), ""]
    lines += _table(["", *[f"batch {b}" for b in batches]], rows)
    lines += ["", _source(*files)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- sampler

def _sampler_block(results_dir: Path, name: str) -> str:
    """Per-step costs of each sampler engine. The loop's own overhead is step - the engine's own network
    call; step - the fastest network (AOTInductor on CPU, graph device time on GPU) also charges the
    eager-vs-compiled network difference, so it is shown as that and not as loop overhead."""
    data = _load(results_dir, name)
    ks = [str(k) for k in data["config"]["steps"]]
    rows, sources = [], set()
    for b in data["batches"]:
        sources.add(b.get("compute_source", "?"))
        for engine, rec in b["engines"].items():
            rows.append([str(b["batch"]), engine, _num(rec["step_ms"], 3), _num(rec.get("network_ms"), 3),
                         _num(rec.get("loop_overhead_ms"), 3), _num(b["compute_ms"], 3),
                         _num(rec["step_ms"] - b["compute_ms"], 3)]
                        + [_num(rec["latency"][k]["median_ms"], 2) for k in ks])
    cfg, machine = data["config"], data["header"]["machine"]
    device = (machine.get("gpu") or {}).get("name") if machine.get("gpu") else machine.get("cpu", "CPU")
    lines = [f"{device}, {cfg['preset']} preset, torch {machine.get('torch')}, target length {cfg['tgt_len']}, "
             f"medians of {cfg['repeats']} paired interleaved runs. step = (T(K={ks[-1]}) - T(K={ks[0]})) / "
             f"{int(ks[-1]) - int(ks[0])}; own network = one network call as this engine makes it; loop overhead = "
             f"step - own network; fastest network = {', '.join(sorted(sources))}; step - fastest network adds "
             "the engine's network cost above the fastest one (for the Python loop: eager vs compiled)."
             + (f" Not run: {', '.join(f'{k} ({v})' for k, v in data['skipped'].items())}." if data.get("skipped")
                else ""), ""]
    lines += _table(["batch", "engine", "step ms", "own network ms", "loop overhead ms", "fastest network ms",
                     "step - fastest network ms", *[f"K={k} ms" for k in ks]], rows)
    lines += ["", _source((name, data))]
    return "\n".join(lines)


@block("sampler-cpu")
def sampler_cpu_block(results_dir: Path) -> str:
    return _sampler_block(results_dir, "sampler-cpu.json")


@block("sampler-h200")
def sampler_h200_block(results_dir: Path) -> str:
    return _sampler_block(results_dir, "sampler-nvidia-h200.json")


# ---------------------------------------------------------------------------------------------- GPU dev logs

GPU_DEV = "gpu-h200-dev"
_ATTN_FWD = (("graph_fwd", "fastdiss"), ("eff_mask_graph_fwd", "SDPA efficient, mask"),
             ("cudnn_mask_graph_fwd", "SDPA cuDNN, mask"), ("flash_nomask_graph_fwd", "SDPA flash, no mask"))
_ATTN_FWDBWD = (("func_fwdbwd", "fastdiss (autograd.Function)"), ("op_fwdbwd", "fastdiss (custom op)"),
                ("eff_mask_fwdbwd", "SDPA efficient, mask"), ("cudnn_mask_fwdbwd", "SDPA cuDNN, mask"),
                ("flash_nomask_fwdbwd", "SDPA flash, no mask"))
_OP_LABEL = {"ln_res": "residual + LayerNorm", "q_sample_cosine_per_token": "q_sample, per-token cosine",
             "embed_noise": "embed_and_noise", "sc_proj": "self_cond_project"}


def _op_label(key: str) -> str:
    for prefix, label in _OP_LABEL.items():
        if key.startswith(prefix):
            rest = key[len(prefix):].strip("_").replace("_", " ")
            return f"{label} {rest}".strip()
    return key


@block("gpu-h200-dev")
def gpu_dev_block(results_dir: Path) -> str:
    """The H200 development logs, shown as logs: the scripts that wrote these keys are not committed,
    so the numbers cannot be regenerated here; each value is shown as recorded, none is combined."""
    folder = Path(results_dir) / GPU_DEV
    attn = json.loads((folder / "attention-bench.json").read_text())
    mem = json.loads((folder / "ln-noise-selfcond-bench.json").read_text())
    lines = [f"**Development logs, not benchmark results.** Recorded on an {mem.get('gpu', 'unknown GPU')} "
             f"(torch {mem.get('torch', '?')}) by scripts that are not in this repository, on a working tree older "
             f"than the committed code (`benchmarks/results/{GPU_DEV}/README.md`); no committed script reproduces "
             "them. The column meanings are read from the key names. Times in ms, bf16.", ""]
    shapes = [r for r in attn if "shape" in r]
    lines += ["Attention forward, replayed in a CUDA graph (B, H, L, D):", ""]
    lines += _table(["shape", *[label for _, label in _ATTN_FWD]],
                    [["x".join(map(str, r["shape"]))] + [_num(r.get(k), 4) for k, _ in _ATTN_FWD] for r in shapes])
    lines += ["", "Attention forward + backward, eager (host dispatch included):", ""]
    lines += _table(["shape", *[label for _, label in _ATTN_FWDBWD]],
                    [["x".join(map(str, r["shape"]))] + [_num(r.get(k), 4) for k, _ in _ATTN_FWDBWD] for r in shapes])
    sweeps = [r for r in attn if "sweep" in r]
    if sweeps:
        configs = [k for k in sweeps[0] if k.startswith("bwd(")]
        lines += ["", "Backward block-config sweep, (BLOCK_M, BLOCK_N, warps, stages); MISMATCH = wrong dK/dV from the "
                  "dK/dV kernel of that time (BLOCK_M < BLOCK_N; its cause is fixed, see `kernels/attention.py`):", ""]
        lines += _table(["config", *["x".join(map(str, r["sweep"])) for r in sweeps]],
                        [[k[3:]] + [r[k] if isinstance(r.get(k), str) else _num(r.get(k), 4) for r in sweeps]
                         for k in configs])
    copy = mem.get("copy_GBps")
    rows = []
    for key, rec in mem.items():
        if isinstance(rec, dict) and "ours_ms" in rec:
            rows.append([_op_label(key), _num(rec["ours_ms"], 4), _num(rec["torch_ms"], 4),
                         f"{rec['ours_ms'] / rec['torch_ms']:.2f}", _num(rec.get("ours_GBps"), 0),
                         _num(rec.get("frac_copy"), 2)])
    lines += ["", f"Memory-bound ops against PyTorch (measured copy bandwidth {_num(copy, 0)} GB/s):", ""]
    lines += _table(["op", "fastdiss ms", "PyTorch ms", "time ratio fastdiss / PyTorch", "fastdiss GB/s",
                     "fraction of copy bandwidth"], rows)
    lines += ["", f"Source: `benchmarks/results/{GPU_DEV}/attention-bench.json`, "
                  f"`benchmarks/results/{GPU_DEV}/ln-noise-selfcond-bench.json` (no git commit recorded)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- demo

@block("demo")
def demo_block(results_dir: Path) -> str:
    """Per task, the first example and the table of `fastdiss demo --save benchmarks/results/demo-cpu.json`."""
    path = Path(results_dir) / "demo-cpu.json"
    records = json.loads(path.read_text())["tasks"]
    lines = ["```", records[0]["threads"]]
    for rec in records:
        ex = rec["examples"][0]
        lines += ["", f"=== {rec['task']} ===", f"source       : {ex['source']}", f"reference    : {ex['reference']}"]
        for key in ("K1", "K4", "K1000", "ar"):
            if key in ex:
                lines.append(f"{('AR greedy' if key == 'ar' else 'K = ' + key[1:]):<13}: {' '.join(ex[key].split())}")
        lines += [rec["table"].rstrip("\n")]
    m = records[0]["machine"]
    lines += [f"BLEU signature: {records[0]['signatures']['bleu']}", "```", "",
              f"Source: `benchmarks/results/{path.name}` ({m['cpu']}, {m['cores']} cores, torch {m['torch']}).", ""]
    return "\n".join(lines)


@block("learning-curve")
def learning_curve_block(results_dir: Path) -> str:
    """Learning curves, final step sweeps and the identity baseline, from learning-curve-cpu-tiny.json."""
    from benchmarks.learning_curve import curve_table
    path = Path(results_dir) / "learning-curve-cpu-tiny.json"
    merged = json.loads(path.read_text())
    commits = sorted({(r["header"]["git"]["commit"] or "?")[:7] + (" (dirty)" if r["header"]["git"]["dirty"] else "")
                      for r in merged["runs"]})
    return curve_table(merged) + f"\nSource: `benchmarks/results/{path.name}` (runs at commits {', '.join(commits)}).\n"


@block("nat-diagnostics")
def nat_diagnostics_block(results_dir: Path) -> str:
    """First-step token diagnostics of trained runs, from nat-diagnostics-cpu.json."""
    from benchmarks.nat_diagnostics import table
    path = Path(results_dir) / "nat-diagnostics-cpu.json"
    data = json.loads(path.read_text())
    return table(data) + f"\n\nSource: `benchmarks/results/{path.name}` ({_commit(data)}).\n"


@block("shipped-model")
def shipped_model_block(results_dir: Path) -> str:
    """How the shipped models were trained, from their provenance.json files."""
    rows = ["| model | kind | preset | parameters | training steps | CPU hours | training data | valid BLEU |",
            "|---|---|---|---|---|---|---|---|"]
    for folder in sorted((ROOT / "fastdiss" / "pretrained").glob("*/provenance.json")):
        p = json.loads(folder.read_text())
        rows.append(f"| `{folder.parent.name}` | {p['kind']} | {p['preset']} | {p['params'] / 1e6:.1f} M | "
                    f"{p['train_steps']} | {p['train_hours']:.2f} | {p['train_data']} | "
                    f"{p['valid_bleu']:.2f} ({p['valid_bleu_setting']}) |")
    return "\n".join(rows) + "\n\nSource: `fastdiss/pretrained/*/provenance.json`.\n"


# ---------------------------------------------------------------------------------------------- CLI

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--check", action="store_true", help="do not write; exit 1 with a diff if the README is stale")
    p.add_argument("--print", dest="show", metavar="NAME", help="print one generated block and exit")
    p.add_argument("--list", action="store_true", help="list the block names and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(BLOCKS))
        return 0
    if args.show:
        if args.show not in BLOCKS:
            p.error(f"unknown block {args.show!r}; known: {', '.join(BLOCKS)}")
        print(BLOCKS[args.show](args.results))
        return 0
    text = args.readme.read_text()
    new = render(text, args.results)
    if new == text:
        print(f"{args.readme}: {len(block_names(text))} report blocks up to date", file=sys.stderr)
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True),
                                                   str(args.readme), "generated"))
        print(f"{args.readme} differs from `python -m benchmarks.report`; run it to update", file=sys.stderr)
        return 1
    write_bytes(args.readme, new.encode())
    print(f"{args.readme}: rewrote {len(block_names(text))} report blocks", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
