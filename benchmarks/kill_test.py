"""SIGKILL a `fastdiss train` run at random moments, resume it each time, and prove the resumed run
ends bit for bit where an uninterrupted run ends (issue 17).

    python -m benchmarks.kill_test                 # 10 kills, ~1-2 min on a 2-core CPU
    python -m benchmarks.kill_test --kills 20 --seed 3

What it does, on the tiny preset and a small generated TSV corpus (CPU, one thread):
  1. the reference: `fastdiss train ... --max-steps N`, never interrupted;
  2. the same training started in a child process and SIGKILLed, again and again, each restart with
     `fastdiss train --out DIR --resume` (or afresh while no last.pt exists yet). Each kill lands at a
     moment drawn at random from four kinds:
       startup   a random time after the process starts (imports, data, tokenizer, model build);
       train     after 3-5 optimizer steps plus a random fraction of a step;
       save      in the middle of a checkpoint write: half the bytes of best.pt or last.pt are in the
                 temporary file (the child pauses there so the kill lands inside the write);
       validate  in the middle of validation: the outputs are generated, BLEU is not yet computed;
     after every kill every checkpoint in DIR must load (fastdiss.checkpoint.load);
  3. a last resume without a kill, to step N;
  4. compare: last.pt (weights, EMA weights, optimizer state, RNG state, data position, best BLEU),
     best.pt (weights, EMA weights, its step and BLEU) and the log's records must equal the
     reference's bit for bit; no temporary file is left.

The child is this file run with --child: it runs `fastdiss.cli.main` after patching in the pauses
and progress markers (it changes no number the training computes). The reference runs the plain
CLI. Results go to benchmarks/results/kill-test-cpu.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

KINDS = ("startup", "train", "save", "validate")
MARK = "@@kill-test "
WORDS = ("thou shalt not kill thee ye hath said unto them and the lord god spake moses "
         "you have said to them he it is light day night").split()


# ----------------------------------------------------------------------------- the child process

def child_main(argv: list[str]) -> int:
    """`fastdiss train` with markers on stdout (`@@kill-test step N`, `... save`, `... validate`) and,
    when FASTDISS_KILL_PHASE names a phase, a pause inside its FASTDISS_KILL_AT-th occurrence (1-based)
    for the kill."""
    import torch

    from fastdiss import cli
    from fastdiss import train as T

    phase = os.environ.get("FASTDISS_KILL_PHASE", "")
    pause = float(os.environ.get("FASTDISS_KILL_PAUSE", "2"))
    at = int(os.environ.get("FASTDISS_KILL_AT", "1"))
    seen = {"save": 0, "validate": 0}

    def pause_here(what):
        seen[what] += 1
        return phase == what and seen[what] == at

    def mark(what):
        sys.stdout.write(MARK + what + "\n")
        sys.stdout.flush()

    real_step = T.Trainer.train_step

    def train_step(self, batch):
        stats = real_step(self, batch)
        mark(f"step {self.step}")
        return stats
    T.Trainer.train_step = train_step

    real_bleu = T.corpus_bleu

    def corpus_bleu(hyps, refs):
        if pause_here("validate"):
            mark("validate")
            time.sleep(pause)
        return real_bleu(hyps, refs)
    T.corpus_bleu = corpus_bleu

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) or not pause_here("save"):
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])
        f.flush()
        mark("save")
        time.sleep(pause)
        f.write(data[len(data) // 2:])
    torch.save = save
    mark("start")
    return cli.main(argv)


# ----------------------------------------------------------------------------- the harness

def archaic_pairs(n: int, seed: int) -> list:
    """n (archaic, modernised) sentence pairs from a 29-word vocabulary: a copy-like task a tiny model
    trains on in seconds (also the CLI tests' data)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        src = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))
        out.append((src, src.replace("thou", "you").replace("hath", "has").replace("ye", "you")))
    return out


def make_data(folder: Path) -> tuple[Path, Path]:
    """A small copy-like parallel corpus: 60 training and 4 validation pairs."""
    folder.mkdir(parents=True, exist_ok=True)
    train, valid = folder / "train.tsv", folder / "valid.tsv"
    train.write_text("".join(f"{s}\t{t}\n" for s, t in archaic_pairs(60, 1)))
    valid.write_text("".join(f"{s}\t{t}\n" for s, t in archaic_pairs(4, 2)))
    return train, valid


def fresh_argv(train: Path, valid: Path, out: Path, steps: int, eval_every: int) -> list[str]:
    return ["train", "--train", str(train), "--valid", str(valid), "--preset", "tiny", "--vocab-size", "300",
            "--max-tokens", "512", "--max-steps", str(steps), "--eval-every", str(eval_every), "--out", str(out),
            "--quiet", "--device", "cpu"]


def resume_argv(out: Path, steps: int, eval_every: int) -> list[str]:
    return ["train", "--out", str(out), "--resume", "--max-steps", str(steps), "--eval-every", str(eval_every),
            "--quiet", "--device", "cpu"]


def child_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("FASTDISS_KILL_PHASE", None)
    return {**env, **extra}


class Child:
    """A child training process whose stdout markers are read by a thread."""

    def __init__(self, argv: list[str], env: dict, log):
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", *argv], env=env,
                                     stdout=subprocess.PIPE, stderr=log, text=True)
        self.marks: queue.Queue = queue.Queue()
        self.started = time.monotonic()
        self.first_step_s = None   # seconds from the start to the first optimizer step
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                m = line[len(MARK):].strip()
                if self.first_step_s is None and m.startswith("step "):
                    self.first_step_s = time.monotonic() - self.started
                self.marks.put(m)
        self.marks.put(None)   # end of output: the process is gone

    def wait_for(self, pred, timeout: float) -> str | None:
        """The first marker satisfying pred, or None when the process ended or the time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                m = self.marks.get(timeout=left)
            except queue.Empty:
                return None
            if m is None:
                return None
            if pred(m):
                return m

    def kill(self) -> bool:
        """SIGKILL; True when the process was still alive (so the kill really interrupted it)."""
        alive = self.proc.poll() is None
        if alive:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        return alive


def check_checkpoints(out: Path) -> tuple[int, list[str]]:
    """(number of checkpoints checked, the ones that fail to load with their error)."""
    from fastdiss import checkpoint
    failed, n = [], 0
    for p in sorted(out.glob("*.pt")):
        n += 1
        try:
            checkpoint.load(p)
        except Exception as e:  # noqa: BLE001 (any failure to load is the finding)
            failed.append(f"{p.name}: {type(e).__name__}: {e}")
    return n, failed


def saved_step(out: Path) -> int | None:
    from fastdiss import checkpoint
    last = out / "last.pt"
    return checkpoint.read_payload(last)["train_state"]["step"] if last.exists() else None


def run_plain(argv: list[str], log) -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "fastdiss.cli", *argv], env=child_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=log, timeout=900)
    return time.monotonic() - t0


def kill_plan(kills: int, rng: random.Random) -> list[str]:
    """Every kind at least once (when kills >= 4), the rest drawn at random, in random order."""
    plan = list(KINDS[:kills]) + [rng.choice(KINDS) for _ in range(kills - len(KINDS))]
    rng.shuffle(plan)
    return plan


def kill_once(kind: str, argv: list[str], rng: random.Random, startup_s: float, pause: float, log,
              first_occurrence: bool = False):
    """Start a child and kill it at a moment of the given kind; (the record of what happened, the child)."""
    at = 1 if first_occurrence else rng.randint(1, 4) if kind == "save" else rng.randint(1, 3)   # which one
    env = child_env(FASTDISS_KILL_PHASE=kind if kind in ("save", "validate") else "",
                    FASTDISS_KILL_PAUSE=str(pause), FASTDISS_KILL_AT=str(at))
    child = Child(argv, env, log)
    rec = {"kind": kind}
    if kind == "startup":
        delay = rng.uniform(0.0, startup_s)
        time.sleep(delay)
        rec["at"] = f"{delay:.2f} s after the process started"
    elif kind == "train":
        n = rng.randint(3, 5)   # past the first validation + save (every 2 steps), so the run advances
        seen, t_prev, step_s = 0, None, 0.05
        for _ in range(n):
            m = child.wait_for(lambda m: m.startswith("step "), timeout=600)
            if m is None:
                break
            now = time.monotonic()
            step_s = now - t_prev if t_prev is not None else step_s
            t_prev, seen = now, int(m.split()[1])
        frac = rng.random()
        time.sleep(frac * step_s)
        rec["at"] = f"{frac:.2f} of a step after step {seen}"
    else:
        m = child.wait_for(lambda m: m == kind, timeout=600)
        what = f"checkpoint write no. {at} (half its bytes written)" if kind == "save" else f"validation no. {at}"
        rec["at"] = f"inside {what}" if m is not None else f"{what} never came (the run ended first)"
        time.sleep(rng.uniform(0.0, pause / 2))
    rec["interrupted"] = child.kill()
    rec["seconds_alive"] = round(time.monotonic() - child.started, 2)
    return rec, child


def _tensors_equal(a, b, where: str, diffs: list) -> None:
    """Recursive bit-exact comparison of nested dicts/lists/tensors/numbers."""
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.dtype != b.dtype \
                or a.shape != b.shape or not torch.equal(a, b):
            diffs.append(where)
        return
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            diffs.append(f"{where}: keys {sorted(map(str, set(a) ^ set(b)))}")
        for k in sorted(set(a) & set(b), key=str):
            _tensors_equal(a[k], b[k], f"{where}.{k}", diffs)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            diffs.append(f"{where}: length {len(a)} != {len(b)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{where}[{i}]", diffs)
        return
    if a != b and not (a != a and b != b):   # NaN == NaN here
        diffs.append(f"{where}: {a!r} != {b!r}")


def _log_records(path: Path) -> list:
    """The log without wall-clock fields: (step, 'loss' | 'valid', BLEU or None) per record. Loss
    records are compared by step only: a resumed run averages the loss over fewer steps."""
    out = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        out.append((rec["step"], "valid", rec["valid_bleu"]) if "valid_bleu" in rec else (rec["step"], "loss", None))
    return out


def compare_runs(ref: Path, run: Path) -> list[str]:
    """Differences between two training folders, bit for bit; [] when the runs ended identically."""
    import torch
    diffs: list[str] = []
    for name in ("last.pt", "best.pt"):
        if not (ref / name).exists() or not (run / name).exists():
            diffs.append(f"{name}: missing in {'reference' if not (ref / name).exists() else 'resumed run'}")
            continue
        a = torch.load(ref / name, weights_only=True)
        b = torch.load(run / name, weights_only=True)
        for key in ("format", "version", "kind", "config", "model_args", "tokenizer", "model", "ema", "extra"):
            _tensors_equal(a.get(key), b.get(key), f"{name}:{key}", diffs)
        sa, sb = a.get("train_state"), b.get("train_state")
        if (sa is None) != (sb is None):
            diffs.append(f"{name}: train_state present in only one")
        elif sa is not None:
            for key in sorted(set(sa) | set(sb)):
                if key != "history":   # wall-clock throughput and loss averages over different windows
                    _tensors_equal(sa.get(key), sb.get(key), f"{name}:train_state.{key}", diffs)
    la, lb = _log_records(ref / "train_log.jsonl"), _log_records(run / "train_log.jsonl")
    if la != lb:
        diffs.append(f"train_log.jsonl: {la} != {lb}")
    return diffs


def run(kills: int = 10, seed: int = 0, steps: int | None = None, eval_every: int = 2, work: Path | None = None,
        pause: float = 2.0, verbose: bool = True, plan: list[str] | None = None,
        first_occurrence: bool = False) -> dict:
    """The whole test; returns the record (see the module docstring). steps: the run's length, by
    default 4 per kill, so that the kills (each lets the run advance a few steps) end before it does.
    plan: the kinds of kill in order (default: drawn at random); first_occurrence: kill in the first
    checkpoint write / validation of a process, not in one drawn from the first 3-4 (for short runs)."""
    steps = steps or 4 * kills
    if plan is not None:
        kills = len(plan)
    rng = random.Random(seed)
    tmp = tempfile.TemporaryDirectory(prefix="fastdiss-kill-") if work is None else None
    work = Path(tmp.name) if tmp is not None else Path(work)
    try:
        train, valid = make_data(work / "data")
        ref, out = work / "reference", work / "killed"
        say = (lambda *a: print(*a, file=sys.stderr, flush=True)) if verbose else (lambda *a: None)
        t0 = time.monotonic()
        with open(work / "children.log", "a") as log:
            ref_s = run_plain(fresh_argv(train, valid, ref, steps, eval_every), log)
            say(f"reference: {steps} steps in {ref_s:.1f} s")
            records, checked, failed = [], 0, []
            startup_s = 3.0   # until a child has shown how long its start takes
            for i, kind in enumerate(plan or kill_plan(kills, rng)):
                argv = resume_argv(out, steps, eval_every) if (out / "last.pt").exists() else \
                    fresh_argv(train, valid, out, steps, eval_every)
                rec, child = kill_once(kind, argv, rng, startup_s, pause, log, first_occurrence)
                startup_s = child.first_step_s or startup_s
                rec["resumed"] = "--resume" in argv
                n, bad = check_checkpoints(out) if out.exists() else (0, [])
                checked, failed = checked + n, failed + bad
                rec["last_step_after"] = saved_step(out) if out.exists() else None
                rec["leftover_tmp"] = sorted(p.name for p in out.glob("*.tmp")) if out.exists() else []
                records.append(rec)
                say(f"kill {i + 1}/{kills} ({kind}, {rec['at']}): last.pt at step {rec['last_step_after']}, "
                    f"{n} checkpoint(s) load, {len(bad)} fail")
            final_argv = resume_argv(out, steps, eval_every) if (out / "last.pt").exists() else \
                fresh_argv(train, valid, out, steps, eval_every)
            run_plain(final_argv, log)
        n, bad = check_checkpoints(out)
        checked, failed = checked + n, failed + bad
        diffs = compare_runs(ref, out)
        leftovers = sorted(p.name for p in out.glob("*.tmp"))
        interrupted = sum(r["interrupted"] for r in records)
        result = {
            "kills": interrupted, "kills_requested": kills, "steps": steps, "eval_every": eval_every,
            "seed": seed, "kills_by_kind": {k: sum(1 for r in records if r["kind"] == k and r["interrupted"])
                                             for k in KINDS},
            "checkpoints_checked": checked, "checkpoints_failed_to_load": len(failed), "load_failures": failed,
            "bit_exact": not diffs, "differences_count": len(diffs), "differences": diffs[:50], "leftover_tmp_files_at_end": leftovers,
            "compared": ["last.pt: model, ema, optimizer, rng, step/epoch/batch position, best_bleu, config, "
                         "tokenizer", "best.pt: model, ema, step, valid_bleu", "train_log.jsonl: records"],
            "records": records, "reference_seconds": round(ref_s, 2),
            "total_seconds": round(time.monotonic() - t0, 1),
        }
        return result
    finally:
        if tmp is not None:
            tmp.cleanup()


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="training steps of the run (default 4 per kill)")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/kill-test-cpu.json)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    from benchmarks.common import RESULTS_DIR, run_header, write_json
    result = run(kills=args.kills, seed=args.seed, steps=args.steps)
    record = {**run_header("kill_test", torch.device("cpu"), {"kills": args.kills, "seed": args.seed,
                                                               "steps": result["steps"]}), **result}
    path = write_json(record, args.out or RESULTS_DIR / "kill-test-cpu.json")
    ok = result["kills"] >= args.kills and result["checkpoints_failed_to_load"] == 0 and result["bit_exact"] \
        and not result["leftover_tmp_files_at_end"]
    print(f"{result['kills']} kills ({result['kills_by_kind']}), {result['checkpoints_checked']} checkpoint loads, "
          f"{result['checkpoints_failed_to_load']} failed; resumed run bit-exact: {result['bit_exact']}; "
          f"{'PASS' if ok else 'FAIL'} -> {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
