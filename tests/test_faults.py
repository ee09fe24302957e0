"""Reliability, second round (issue 17): damaged checkpoints in our words, one training per output
folder (a lock a killed run does not leave stuck), SIGKILLs at random moments with a bit-exact resume,
long generations (bound on steps, estimate, progress bar), and damaged or stale exports.
The CLI fuzz test is tests/test_cli_fuzz.py; the 10-kill run is benchmarks/kill_test.py."""
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from fastdiss import checkpoint as ckpt
from fastdiss import argtypes, cli, evaluate, longjobs, runlock, userio
from fastdiss.config import ModelConfig, preset
from fastdiss.model import Denoiser

REPO = Path(__file__).resolve().parent.parent
V, PAD = 37, 0
WORDS = "thou shalt not kill thee ye hath said unto them and the lord god spake moses light day night".split()


def tiny(max_len=16, seed=0):
    cfg = preset("tiny")
    cfg.model = ModelConfig(**{**cfg.to_dict()["model"], "max_len": max_len})
    torch.manual_seed(seed)
    return Denoiser(cfg.model, V, PAD).eval(), cfg


def _pairs(n, seed):
    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))),) * 2 for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults_data")
    (d / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in _pairs(40, 1)))
    (d / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in _pairs(3, 2)))
    (d / "in.txt").write_text("".join(s + "\n" for s, _ in _pairs(6, 3)))
    return d


def train_argv(data, out, steps=1, *extra):
    return ["train", "--train", str(data / "train.tsv"), "--valid", str(data / "valid.tsv"), "--preset", "tiny",
            "--vocab-size", "300", "--max-tokens", "256", "--max-steps", str(steps), "--out", str(out), "--quiet",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A diffusion checkpoint with a tokenizer, from the CLI (2 steps)."""
    out = tmp_path_factory.mktemp("faults_run") / "run"
    assert cli.main(train_argv(data, out, 2)) == 0
    return out / "last.pt"


def _error_line(capsys, argv, rc=2):
    got = cli.main(argv)
    out, err = capsys.readouterr()
    lines = [x for x in err.splitlines() if x.strip()]
    assert got == rc and "Traceback" not in err, err
    errors = [x for x in lines if ": error: " in x]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0], out


# ------------------------------------------------------------------------- damaged checkpoints, in our words

TORCH_WORDING = ("weights_only", "arbitrary code", "Weights only load failed", "PytorchStreamReader", "miniz",
                 "Unpickler", "GLOBAL")


def _damaged_files(tmp_path):
    model, cfg = tiny()
    good = tmp_path / "good.pt"
    ckpt.save(good, model, cfg, tokenizer=None)
    data = good.read_bytes()
    files = {}
    files["random.pt"] = os.urandom(4096)
    files["empty.pt"] = b""
    files["text.pt"] = b"this is not a checkpoint\n" * 10
    files["truncated.pt"] = data[: len(data) // 3]
    # a flipped byte inside the weights: torch.load accepts it (no checksum of its own), the CRC does not
    with zipfile.ZipFile(good) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)   # the largest tensor's bytes
    name_len, extra_len = (int.from_bytes(data[info.header_offset + o:info.header_offset + o + 2], "little")
                           for o in (26, 28))                 # from the local header (torch pads it)
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    flipped = bytearray(data)
    flipped[offset] ^= 0x40
    files["bitflip.pt"] = bytes(flipped)
    import io
    import warnings
    buf = io.BytesIO()
    torch.save({"format": ckpt.FORMAT, "obj": warnings.WarningMessage("m", UserWarning, "f", 1)}, buf)
    files["pickled_object.pt"] = buf.getvalue()
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w") as z:
        z.writestr("hello.txt", "a zip archive, but not from torch")
    files["other_zip.pt"] = zbuf.getvalue()
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
    return files


EXPECTED = {
    "random.pt": "not a PyTorch zip archive",
    "empty.pt": "is empty (0 bytes)",
    "text.pt": "not a PyTorch zip archive",
    "truncated.pt": "is truncated",
    "bitflip.pt": "fails its CRC-32 checksum",
    "pickled_object.pt": "holds Python objects other than tensors",
    "other_zip.pt": "corrupted or not a fastdiss checkpoint",
}


def test_damaged_checkpoints_get_our_one_line_error_never_torch_advice(capsys, tmp_path):
    files = _damaged_files(tmp_path)
    # independent of our loader: torch itself accepts the bit-flipped file (so only a checksum finds it)
    torch.load(tmp_path / "bitflip.pt", weights_only=True)
    inp = tmp_path / "in.txt"
    inp.write_text("hello world\n")
    for name in files:
        line, out = _error_line(capsys, ["generate", "--ckpt", str(tmp_path / name), str(inp), "--device", "cpu"])
        assert out == ""
        assert name in line and EXPECTED[name] in line, line
        assert "retrain it" in line and "download it again" in line, line
        for w in TORCH_WORDING:
            assert w not in line, f"{name}: torch's wording {w!r} leaked: {line}"
        with pytest.raises(ValueError) as e:   # the library says the same, as one line
            ckpt.load(tmp_path / name)
        assert "\n" not in str(e.value) and EXPECTED[name] in str(e.value)
    ckpt.load(tmp_path / "good.pt")   # the intact file still loads


def test_random_bytes_checkpoint_in_a_real_process(tmp_path):
    """The installed command, not only main(): exit status 2, one line, none of torch's text."""
    bad = tmp_path / "best.pt"
    bad.write_bytes(os.urandom(2048))
    p = subprocess.run([sys.executable, "-m", "fastdiss.cli", "generate", "--ckpt", str(bad), "--device", "cpu"],
                       input="x\n", capture_output=True, text=True, timeout=300)
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert "best.pt" in lines[0] and "weights_only" not in lines[0] and "Traceback" not in p.stderr


# ------------------------------------------------------------------------- one training per output folder

# runlock.py alone (stdlib only), not the fastdiss package (which imports torch): a quick child process
_HOLDER = ("import importlib.util, sys, time\n"
           f"spec = importlib.util.spec_from_file_location('runlock', {str(REPO / 'fastdiss' / 'runlock.py')!r})\n"
           "runlock = importlib.util.module_from_spec(spec)\nspec.loader.exec_module(runlock)\n"
           "with runlock.hold(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n")


def _start_holder(out):
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_training_into_a_busy_folder_is_refused_and_a_killed_holder_does_not_block(capsys, data, tmp_path):
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        line, _ = _error_line(capsys, train_argv(data, out))
        assert "is in use by a training that is still running" in line and f"pid {holder.pid}" in line, line
        assert "choose another --out" in line
        assert not (out / "last.pt").exists() and not (out / "run.json").exists()   # refused before any write
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel released the dead holder's lock: the same command now trains
    assert cli.main(train_argv(data, out)) == 0
    capsys.readouterr()
    assert ckpt.load(out / "last.pt").train_state["step"] == 1


def test_resume_while_the_first_run_trains_is_refused(capsys, data, tmp_path):
    """A real `fastdiss train` (a child process, checkpoints every step): a second one with --resume on
    the same folder would otherwise be accepted as soon as last.pt exists, and race on it."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "fastdiss.cli", *train_argv(data, out, 100_000, "--eval-every", "1")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (out / "last.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first training did not start"
            time.sleep(0.1)
        line, _ = _error_line(capsys, ["train", "--out", str(out), "--resume", "--quiet", "--device", "cpu"])
        assert "in use by a training that is still running" in line and f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    step = ckpt.load(out / "last.pt").train_state["step"]
    assert cli.main(["train", "--out", str(out), "--resume", "--max-steps", str(step + 1), "--quiet",
                     "--device", "cpu"]) == 0
    capsys.readouterr()
    assert ckpt.load(out / "last.pt").train_state["step"] == step + 1


def test_library_train_holds_the_lock(tmp_path):
    from fastdiss.train import train
    model, cfg = tiny()
    out = tmp_path / "run"
    holder = _start_holder(out)
    try:
        with pytest.raises(runlock.RunDirBusy, match="in use by a training"):
            train(cfg, [([1, 2], [1, 2])], [], None, str(out), max_steps=1, progress=False, vocab_size=V, pad_id=PAD)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_lock_is_reentrant_in_one_process_and_released_after(tmp_path):
    with runlock.hold(tmp_path):
        with runlock.hold(tmp_path):   # the CLI holds it and its training loop takes it again
            pass
        p = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(600)", "pass"), str(tmp_path)],
                           capture_output=True, text=True, timeout=600)
        assert p.returncode == 1 and "RunDirBusy" in p.stderr   # still held by this process
    p = subprocess.run([sys.executable, "-c", _HOLDER.replace("time.sleep(600)", "pass"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and p.stdout.strip() == "held"


def test_failed_training_leaves_no_folder(capsys, tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("one column only\n")
    line, _ = _error_line(capsys, ["train", "--train", str(bad), "--out", str(tmp_path / "new"), "--preset", "tiny"])
    assert "bad.tsv:1" in line and not (tmp_path / "new").exists()
    (tmp_path / "afile").write_text("x")
    line, _ = _error_line(capsys, ["train", "--task", "kjv2web", "--out", str(tmp_path / "afile")])
    assert "is a file, expected a folder" in line


def test_damaged_gzip_data_is_one_line(capsys, tmp_path):
    """Found by the fuzz test: a cut or damaged .gz training file ended in EOFError / zlib.error tracebacks."""
    import gzip
    comp = gzip.compress(b"a b\tc d\n" * 200, mtime=0)
    flipped = comp[:20] + bytes([comp[20] ^ 0xFF]) + comp[21:]
    for name, blob, needle in (("cut.tsv.gz", comp[: len(comp) // 2], "is cut short"),
                               ("plain.tsv.gz", b"a b\tc d\n", "is not a gzip file"),
                               ("flipped.tsv.gz", flipped, "damaged")):
        (tmp_path / name).write_bytes(blob)
        for argv in (["train", "--train", str(tmp_path / name), "--out", str(tmp_path / "run"), "--preset", "tiny"],
                     ["evaluate", "--ckpt", "x.pt", "--data", str(tmp_path / name)]):
            line, out = _error_line(capsys, argv)
            assert name in line and needle in line and "gzip" in line and out == "", line


def test_output_path_errors_come_before_the_generation(capsys, trained, data, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "generate", lambda *a, **k: pytest.fail("generated before checking -o"))
    for dest, needle in ((tmp_path / "missing" / "out.txt", "does not exist"), (tmp_path, "is a directory")):
        line, _ = _error_line(capsys, ["generate", "--ckpt", str(trained), str(data / "in.txt"), "-o", str(dest)])
        assert needle in line


def test_leftover_temporary_files_are_removed_and_others_kept(tmp_path):
    names = ["last.pt.abc123.tmp", "best.pt.x_y9.tmp", "train_log.jsonl.q1w2e3.tmp", ".run.json.4242.tmp",
             "last.pt", "notes.tmp", "data.tsv", "other.pt.tmpx"]
    for n in names:
        (tmp_path / n).write_text("x")
    with runlock.hold(tmp_path):
        removed = runlock.remove_leftovers(str(tmp_path))
    assert removed == sorted(names[:4])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[4:] + [runlock.LOCK_NAME])


def test_trim_log_drops_later_steps_and_a_torn_line(tmp_path):
    from fastdiss.train import trim_log
    log = tmp_path / "train_log.jsonl"
    recs = [{"step": s, "loss": 1.0 / s} for s in range(1, 7)] + [{"step": 4, "valid_bleu": 1.5}]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 7, "lo'   # killed while appending
    log.write_text(text)
    trim_log(str(log), 4)
    got = [json.loads(x) for x in log.read_text().splitlines()]
    assert got == [r for r in recs if r["step"] <= 4]
    before = log.stat().st_mtime_ns, log.stat().st_ino
    trim_log(str(log), 4)   # nothing to drop: the file is not rewritten
    assert (log.stat().st_mtime_ns, log.stat().st_ino) == before


# ------------------------------------------------------------------------- SIGKILL at random moments

sys.path.insert(0, str(REPO))
from benchmarks import kill_test  # noqa: E402


@pytest.mark.slow
def test_sigkill_at_every_kind_of_moment_then_bit_exact_resume(tmp_path):
    """One kill of each kind (after some steps, inside a checkpoint write, inside validation, during
    start-up); every checkpoint loads after every kill; the resumed run's last.pt, best.pt and log equal
    an uninterrupted run's bit for bit. (10 kills: benchmarks/kill_test.py.)"""
    res = kill_test.run(plan=["train", "save", "validate", "startup"], steps=8, seed=1, work=tmp_path, pause=1.5,
                        verbose=False, first_occurrence=True)
    recs = res["records"]
    assert res["kills"] == 4 and all(r["interrupted"] for r in recs), recs
    assert all(r["resumed"] for r in recs[1:]), recs   # the first kill came after a save: the rest resume
    assert [r["at"].startswith("inside") for r in recs[1:3]] == [True, True], recs
    assert any(r["leftover_tmp"] for r in recs if r["kind"] == "save"), recs   # the kill did tear a write
    assert res["checkpoints_failed_to_load"] == 0 and res["checkpoints_checked"] >= 8
    assert res["bit_exact"], res["differences"]
    assert res["leftover_tmp_files_at_end"] == []


def test_run_comparison_catches_a_one_ulp_difference(tmp_path, data):
    """compare_runs is the oracle of the kill test: it must see the smallest change of any weight,
    of the optimizer state and of the log."""
    a = tmp_path / "a"
    assert cli.main(train_argv(data, a, 2)) == 0
    b = tmp_path / "b"
    import shutil
    shutil.copytree(a, b)
    assert kill_test.compare_runs(a, b) == []
    p = torch.load(b / "last.pt", weights_only=True)
    k = next(iter(p["model"]))
    w = p["model"][k].view(-1)
    w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
    torch.save(p, b / "last.pt")
    assert kill_test.compare_runs(a, b) == [f"last.pt:model.{k}"]
    shutil.copy(a / "last.pt", b / "last.pt")
    p = torch.load(b / "last.pt", weights_only=True)
    st = p["train_state"]["optimizer"]["state"][0]["exp_avg"].view(-1)
    st[0] = st[0] * 2 + 1
    torch.save(p, b / "last.pt")
    assert kill_test.compare_runs(a, b) == ["last.pt:train_state.optimizer.state.0.exp_avg"]
    shutil.copy(a / "last.pt", b / "last.pt")
    with open(b / "train_log.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "valid_bleu": 99.0}) + "\n")
    assert len(kill_test.compare_runs(a, b)) == 1


# ------------------------------------------------------------------------- long generations

def test_steps_above_the_limit_are_refused_in_one_line(capsys, tmp_path):
    for argv in (["generate", "--ckpt", "x.pt", "--steps", str(argtypes.MAX_STEPS + 1)],
                 ["evaluate", "--ckpt", "x.pt", "--steps", f"1,4,{argtypes.MAX_STEPS * 10}"]):
        line, out = _error_line(capsys, argv)
        assert "--steps" in line and f"limit of {argtypes.MAX_STEPS}" in line and out == ""
    assert argtypes.step_count(str(argtypes.MAX_STEPS)) == argtypes.MAX_STEPS   # the limit itself is allowed


def test_short_jobs_run_no_probe_and_show_no_bar(capsys, trained, data, monkeypatch):
    def no_probe(*a, **k):
        raise AssertionError("a short job must not be probed")
    monkeypatch.setattr(longjobs, "probe", no_probe)
    rc = cli.main(["generate", "--ckpt", str(trained), str(data / "in.txt"), "--steps", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 0 and len(out.splitlines()) == 6
    assert "estimated" not in err and "sentences [" not in err and "warning" not in err, err


def test_long_job_prints_an_estimate_and_a_bar_and_the_same_outputs(capsys, trained, data, monkeypatch):
    base = ["generate", "--ckpt", str(trained), str(data / "in.txt"), "--steps", "6", "--device", "cpu",
            "--batch-size", "2"]
    assert cli.main(base + ["--quiet"]) == 0
    quiet_out, quiet_err = capsys.readouterr()
    assert "estimated" not in quiet_err and "sentences [" not in quiet_err
    monkeypatch.setattr(longjobs, "LONG_CALLS", 1)     # 3 batches x 6 steps counts as long
    monkeypatch.setattr(longjobs, "BAR_SECONDS", 0.0)
    assert cli.main(base) == 0
    out, err = capsys.readouterr()
    assert out == quiet_out   # probing and the bar change no output
    est = [x for x in err.splitlines() if "estimated time" in x]
    assert len(est) == 1 and "6 sentence(s) x 6 step(s)" in est[0] and "3 batch(es) of up to 2" in est[0], err
    assert "6/6 sentences" in err.replace("\r", "\n"), err   # the bar reached the end
    # above WARN_STEPS: a warning with the estimate (even for one short job)
    monkeypatch.setattr(longjobs, "WARN_STEPS", 5)
    monkeypatch.setattr(longjobs, "LONG_CALLS", 10 ** 9)
    assert cli.main(base) == 0
    _, err = capsys.readouterr()
    warn = [x for x in err.splitlines() if x.startswith("fastdiss: warning: --steps 6 is above 5")]
    assert len(warn) == 1 and "estimated time" in warn[0] and f"limit is {longjobs.MAX_STEPS}" in warn[0], err
    assert cli.main(base + ["--quiet"]) == 0   # --quiet keeps the warning, without probing
    _, err = capsys.readouterr()
    assert "above 5" in err and "estimated" not in err


def test_evaluate_estimate_covers_every_row(capsys, trained, data, monkeypatch):
    monkeypatch.setattr(longjobs, "LONG_CALLS", 1)
    monkeypatch.setattr(longjobs, "BAR_SECONDS", 0.0)
    rc = cli.main(["evaluate", "--ckpt", str(trained), "--data", str(data / "valid.tsv"), "--steps", "1,3",
                   "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0 and [r["steps"] for r in json.loads(out)["results"]] == [1, 3]
    assert "3 sentence(s) x 1,3 step(s)" in err and "steps=1" in err and "steps=3" in err, err


def test_cost_model_sums_batches_between_its_probes():
    """Hand-computed: overhead and step time linear in the sentences of a batch between the probes."""
    cm = longjobs.CostModel(small=longjobs.Point(rows=1, step_s=0.01, overhead_s=0.1),
                            large=longjobs.Point(rows=5, step_s=0.05, overhead_s=0.5))
    # batches of 5, 5 and 3 sentences, 10 steps: (0.5 + 10*0.05) * 2 + (0.3 + 10*0.03)
    assert cm.seconds([(5, 9), (5, 4), (3, 2)], 10) == pytest.approx(2.0 + 0.6)
    assert longjobs.batches_of([[1] * n for n in (3, 1, 2, 5, 4)], 2) == [(2, 2), (2, 4), (1, 5)]
    assert longjobs.fmt_seconds(3 * 3600 + 5 * 60) == "3 h 05 min" and longjobs.fmt_seconds(75) == "1 min 15 s"


def test_estimate_is_within_a_factor_of_three_of_the_run(trained, data):
    """The probe-based estimate against the measured time of the same job (a busy machine makes this
    noisy: the job is long enough, ~1 s, for a factor of three to hold)."""
    ck = userio.load_checkpoint(str(trained))
    lines = userio.read_lines(str(data / "in.txt")) * 2
    sources = userio.encode_sources(ck.tokenizer, lines, ck.cfg.model.max_len)
    from fastdiss.sampling import Sampler
    sampler = Sampler(ck.model, ck.cfg.sample, ck.cfg.diffusion)
    kw = {"length_beam": 1, "noise_draws": 1}
    cost = longjobs.probe(sampler, sources, 4, "cpu", **kw)
    est = cost.seconds(longjobs.batches_of(sources, 4), 20)
    t0 = time.perf_counter()
    sampler.translate(sources, 20, batch_size=4, **kw)
    took = time.perf_counter() - t0
    assert took / 3 < est < took * 3, (est, took)


# ------------------------------------------------------------------------- exported model files

@pytest.fixture
def fake_export(monkeypatch, tmp_path):
    """`fastdiss export` with the compilation stubbed out (minutes of AOTInductor on CPU): the files
    are written, hashed and checked exactly as for a real export."""
    from fastdiss import export
    monkeypatch.setattr(export, "export_programs", lambda model, device=None, length_cap=None: (None, None))

    def compile_(program, path, metadata=None):
        path.write_bytes(b"fake AOTInductor package " + path.name.encode() + os.urandom(64))
    monkeypatch.setattr(export, "_compile", compile_)
    model, cfg = tiny()
    ck_path, out = tmp_path / "model.pt", tmp_path / "exported"
    ckpt.save(ck_path, model, cfg, tokenizer=None)
    export.export_model(ck_path, out)
    return export, ck_path, out, cfg


def test_export_steps_list_is_parsed_and_bad_lists_are_refused(capsys):
    import argparse
    from fastdiss import export
    parser = export.add_arguments(argparse.ArgumentParser(prog="fastdiss export"))
    base = ["--ckpt", "m.pt", "--out", "o"]
    assert parser.parse_args(base + ["--steps-list", "3, 1"]).steps_list == [3, 1]
    assert parser.parse_args(base).steps_list is None
    for bad in ("0,2", "2,x", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(base + ["--steps-list", bad])
        assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):   # the same bound as every other --steps option
        parser.parse_args(base + ["--steps-list", "4,20000"])
    assert "limit of 10000" in capsys.readouterr().err


def test_export_records_and_verifies_file_checksums(fake_export):
    export, ck_path, out, _ = fake_export
    m = export.load_manifest(out)
    assert set(m["files"]) == {export.ENCODER_FILE, export.DECODER_FILE, export.EMBEDDING_FILE}
    import hashlib
    for name, rec in m["files"].items():   # recorded hashes against an independent computation
        assert rec["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    assert m["checkpoint"]["path"] == str(ck_path.resolve())
    for name in (export.DECODER_FILE, export.EMBEDDING_FILE):
        blob = bytearray((out / name).read_bytes())
        blob[len(blob) // 2] ^= 1
        original = (out / name).read_bytes()
        (out / name).write_bytes(bytes(blob))
        with pytest.raises(export.DamagedExportError, match=rf"{name}' is damaged: .* re-run `fastdiss export"):
            export.load_manifest(out)
        (out / name).write_bytes(original)
    (out / export.ENCODER_FILE).write_bytes((out / export.ENCODER_FILE).read_bytes()[:-10])   # cut short
    with pytest.raises(export.DamagedExportError, match="encoder.pt2"):
        export.load_manifest(out)
    (out / export.MANIFEST_FILE).write_bytes(b"\x00\xff not json")
    with pytest.raises(export.DamagedExportError, match=r"manifest.json' is damaged \(not a readable JSON"):
        export.load_manifest(out)


def test_stale_export_is_detected(fake_export):
    export, ck_path, out, cfg = fake_export
    export.load_manifest(out)
    # the same weights saved again (new bytes, new mtime): not stale
    c = ckpt.load(ck_path, use_ema=False)
    ckpt.save(ck_path, c.model, cfg, tokenizer=None, extra={"note": "re-saved"})
    os.utime(ck_path, ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    export.load_manifest(out)
    # training went on: other weights in the same file
    model, _ = tiny(seed=1)
    ckpt.save(ck_path, model, cfg, tokenizer=None)
    with pytest.raises(export.StaleExportError, match=r"is stale: it was made from .*model.pt.*re-run `fastdiss "
                                                      r"export --ckpt"):
        export.load_manifest(out)
    export.load_manifest(out, verify=False)   # the raw reader still works (e.g. to show the manifest)
    os.remove(ck_path)
    export.load_manifest(out)   # the checkpoint is gone: nothing to compare against
