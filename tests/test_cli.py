"""The `fastdiss` command line: help, one-line errors with exit code 2 for every kind of bad input,
`env`, and train -> generate -> evaluate end to end on tiny models trained for a few steps."""
import io
import json
import os
import subprocess
import sys

import pytest

from benchmarks.kill_test import archaic_pairs as _pairs
from fastdiss import cli



def _run(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_data")
    (d / "train.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in _pairs(60, 1)))
    (d / "valid.tsv").write_text("".join(f"{s}\t{t}\n" for s, t in _pairs(4, 2)))
    test = _pairs(5, 3)
    (d / "test.src").write_text("".join(s + "\n" for s, _ in test))
    (d / "test.ref").write_text("".join(t + "\n" for _, t in test))
    return d


def _train(data_dir, out, kind):
    argv = ["train", "--train", str(data_dir / "train.tsv"), "--valid", str(data_dir / "valid.tsv"),
            "--preset", "tiny", "--kind", kind, "--max-steps", "2", "--vocab-size", "300", "--max-tokens", "512",
            "--out", str(out), "--quiet", "--device", "cpu"]
    assert cli.main(argv) == 0
    return out / "last.pt"


@pytest.fixture(scope="module")
def diffusion_ckpt(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("run_diffusion"), "diffusion")


@pytest.fixture(scope="module")
def ar_ckpt(data_dir, tmp_path_factory):
    return _train(data_dir, tmp_path_factory.mktemp("run_ar"), "ar")


# ---- help ------------------------------------------------------------------------------------

def test_help_lists_commands_and_examples(capsys):
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for cmd in ("train", "generate", "evaluate", "demo", "env", "export"):
        assert cmd in out
    assert "examples:" in out and "fastdiss generate --ckpt" in out


@pytest.mark.parametrize("cmd", ["train", "generate", "evaluate", "demo", "env", "export"])
def test_each_command_has_help(capsys, cmd):
    rc, out, _ = _run(capsys, cmd, "--help")
    assert rc == 0 and f"fastdiss {cmd}" in out
    if cmd in ("train", "generate", "evaluate", "demo"):
        assert "examples:" in out


def test_no_command_prints_usage_and_exits_2(capsys):
    rc, _, err = _run(capsys)
    assert rc == 2 and "usage: fastdiss" in err


def test_console_entry_point_exit_code_and_single_line():
    """The real process: exit status 2 and one line on stderr, no traceback."""
    argv = ["evaluate", "--ckpt", "x", "--steps", "0"]
    p = subprocess.run([sys.executable, "-W", "ignore", "-m", "fastdiss.cli", *argv], capture_output=True, text=True,
                       timeout=120)
    _assert_one_line_error(p.returncode, p.stderr, "--steps", "positive integer")


# ---- bad input: one clear line, exit 2 ---------------------------------------------------------

@pytest.mark.parametrize("argv, needles", [
    (["train", "--task", "nope", "--out", "x"], ["--task", "invalid choice: 'nope'", "kjv2web"]),
    (["train", "--preset", "huge", "--out", "x"], ["--preset", "invalid choice: 'huge'", "tiny"]),
    (["evaluate", "--task", "nope", "--ckpt", "x"], ["--task", "'nope'"]),
    (["generate", "--ckpt", "x", "--steps", "0"], ["--steps", "got 0"]),
    (["generate", "--ckpt", "x", "--steps", "-3"], ["--steps", "-3"]),
    (["generate", "--ckpt", "x", "--steps", "two"], ["--steps", "'two'"]),
    (["evaluate", "--ckpt", "x", "--steps", "1,0,4"], ["--steps", "got 0"]),
    (["evaluate", "--ckpt", "x", "--steps", "1,,4"], ["--steps"]),
    (["generate", "--ckpt", "x", "--batch-size", "0"], ["--batch-size"]),
    (["train", "--task", "kjv2web", "--out", "x", "--minutes", "-1"], ["--minutes"]),
    (["train", "--task", "kjv2web"], ["--out"]),
])
def test_argument_errors(capsys, argv, needles):
    rc, _, err = _run(capsys, *argv)
    _assert_one_line_error(rc, err, *needles)


def test_missing_input_file(capsys, tmp_path):
    rc, _, err = _run(capsys, "generate", "--ckpt", "x.pt", str(tmp_path / "nope.txt"))
    _assert_one_line_error(rc, err, "nope.txt", "file not found")


def test_directory_as_input(capsys, tmp_path):
    rc, _, err = _run(capsys, "generate", "--ckpt", "x.pt", str(tmp_path))
    _assert_one_line_error(rc, err, "is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_input_file(capsys, tmp_path):
    f = tmp_path / "secret.txt"
    f.write_text("hello\n")
    f.chmod(0)
    rc, _, err = _run(capsys, "generate", "--ckpt", "x.pt", str(f))
    _assert_one_line_error(rc, err, "secret.txt", "permission denied")


def test_bad_utf8_names_file_and_line(capsys, tmp_path):
    f = tmp_path / "bad.txt"
    f.write_bytes(b"fine line\nbad \xff\xfe byte\n")
    rc, _, err = _run(capsys, "generate", "--ckpt", "x.pt", str(f))
    _assert_one_line_error(rc, err, "bad.txt:2", "invalid UTF-8")


def test_empty_line_names_file_and_line(capsys, tmp_path):
    f = tmp_path / "gaps.txt"
    f.write_text("one\ntwo\n   \nfour\n")
    rc, _, err = _run(capsys, "generate", "--ckpt", "x.pt", str(f))
    _assert_one_line_error(rc, err, "gaps.txt:3", "empty line")


def test_empty_input_file(capsys, tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    rc, _, err = _run(capsys, "generate", "--ckpt", "x.pt", str(f))
    _assert_one_line_error(rc, err, "empty.txt", "no input lines")


def test_missing_and_corrupt_checkpoint(capsys, tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("hello\n")
    rc, _, err = _run(capsys, "generate", "--ckpt", str(tmp_path / "none.pt"), str(f))
    _assert_one_line_error(rc, err, "none.pt", "checkpoint not found")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(256))
    rc, _, err = _run(capsys, "generate", "--ckpt", str(bad), str(f))
    _assert_one_line_error(rc, err, "bad.pt")
    rc, _, err = _run(capsys, "generate", "--ckpt", str(tmp_path), str(f))
    _assert_one_line_error(rc, err, "is a directory")


def test_bad_training_file_names_file_and_line(capsys, tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("a b\tc d\nonly one column\n")
    rc, _, err = _run(capsys, "train", "--train", str(f), "--out", str(tmp_path / "run"), "--preset", "tiny")
    _assert_one_line_error(rc, err, "train.tsv:2", "2 tab-separated columns")
    rc, _, err = _run(capsys, "train", "--train", str(tmp_path / "missing.tsv"), "--out", str(tmp_path / "run"))
    _assert_one_line_error(rc, err, "missing.tsv", "not found")


def test_train_argument_conflicts(capsys, tmp_path):
    rc, _, err = _run(capsys, "train", "--task", "kjv2web", "--train", "x.tsv", "--out", str(tmp_path))
    _assert_one_line_error(rc, err, "either --task", "not both")
    rc, _, err = _run(capsys, "train", "--out", str(tmp_path / "fresh"), "--resume")
    _assert_one_line_error(rc, err, "--resume", "does not exist")


def test_evaluate_src_without_ref(capsys, data_dir):
    rc, _, err = _run(capsys, "evaluate", "--ckpt", "x.pt", "--src", str(data_dir / "test.src"))
    _assert_one_line_error(rc, err, "--src and --ref")


def test_evaluate_src_ref_length_mismatch(capsys, data_dir, tmp_path):
    ref = tmp_path / "short.ref"
    ref.write_text("one\n")
    rc, _, err = _run(capsys, "evaluate", "--ckpt", "x.pt", "--src", str(data_dir / "test.src"), "--ref", str(ref))
    _assert_one_line_error(rc, err, "5 lines", "has 1")


# ---- env ---------------------------------------------------------------------------------------

def test_env_prints_every_field(capsys):
    import torch
    rc, out, _ = _run(capsys, "env")
    assert rc == 0
    for field in ("fastdiss", "python", "torch", "triton", "CUDA", "GPU", "fastdiss._C", "backend"):
        assert any(line.startswith(field) for line in out.splitlines()), field
    assert torch.__version__ in out
    from fastdiss.functional import __all__ as ops
    for op in ops:
        assert f"  {op} " in out, op
    gpu_line = next(x for x in out.splitlines() if x.startswith("GPU"))
    if not torch.cuda.is_available():
        assert "none" in gpu_line


def test_env_json(capsys):
    import torch
    rc, out, _ = _run(capsys, "env", "--json")
    assert rc == 0
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["cuda"] == (torch.version.cuda or "none (CPU build of torch)")
    assert set(info["ops"]["attention"]) == {"cpu", "cuda"}
    assert "available" in info["extension"] and info["backend"] in ("auto", "triton", "torch")
    assert info["ops"]["attention"]["cpu"].startswith("PyTorch reference") or info["backend"] == "triton"


# ---- end to end on tiny checkpoints -------------------------------------------------------------

def test_generate_from_file_and_stdin(capsys, diffusion_ckpt, data_dir, monkeypatch, tmp_path):
    src = data_dir / "test.src"
    rc, out, err = _run(capsys, "generate", "--ckpt", str(diffusion_ckpt), str(src), "--steps", "2",
                        "--device", "cpu")
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 5
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(src.read_bytes())))
    rc, out2, err = _run(capsys, "generate", "--ckpt", str(diffusion_ckpt), "--steps", "2", "--device", "cpu")
    assert rc == 0 and out2.splitlines() == lines  # deterministic for the same inputs and seed
    dest = tmp_path / "out.txt"
    rc, out3, _ = _run(capsys, "generate", "--ckpt", str(diffusion_ckpt), str(src), "--steps", "2",
                       "--device", "cpu", "-o", str(dest), "--length-beam", "2", "--noise-draws", "2")
    assert rc == 0 and out3 == "" and len(dest.read_text().splitlines()) == 5


def test_long_input_is_truncated_with_warning_or_refused(capsys, diffusion_ckpt, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("short line\n" + " ".join(["unto"] * 200) + "\n")  # tiny preset: max_len 64 tokens
    rc, out, err = _run(capsys, "generate", "--ckpt", str(diffusion_ckpt), str(f), "--steps", "1",
                        "--device", "cpu")
    assert rc == 0 and len(out.splitlines()) == 2
    assert "1 input line(s) are longer than the model's max_len=64" in err and "truncated" in err
    rc, out, err = _run(capsys, "generate", "--ckpt", str(diffusion_ckpt), str(f), "--steps", "1",
                        "--device", "cpu", "--strict-length")
    _assert_one_line_error(rc, err, "line 2", "--strict-length")
    rc, _, err = _run(capsys, "generate", "--ckpt", str(diffusion_ckpt), str(f), "--max-input-len", "500")
    _assert_one_line_error(rc, err, "--max-input-len 500", "max_len=64")


def test_evaluate_json_and_table(capsys, diffusion_ckpt, data_dir):
    import sacrebleu
    args = ["evaluate", "--ckpt", str(diffusion_ckpt), "--src", str(data_dir / "test.src"),
            "--ref", str(data_dir / "test.ref"), "--steps", "1,2", "--device", "cpu"]
    rc, out, err = _run(capsys, *args, "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["kind"] == "diffusion" and rep["sentences"] == 5
    assert [r["steps"] for r in rep["results"]] == [1, 2]
    assert "nrefs:1" in rep["bleu_signature"] and sacrebleu.__version__ in rep["bleu_signature"]
    for r in rep["results"]:
        assert 0.0 <= r["bleu"] <= 100.0 and 0.0 <= r["chrf"] <= 100.0
        assert r["calls_per_sentence"] >= r["steps"] and r["latency_ms_per_sentence"] > 0
    rc, out, err = _run(capsys, *args)
    assert rc == 0 and "BLEU signature: nrefs:1" in out and "chrF signature:" in out


def test_evaluate_embedded_task_with_limit(capsys, diffusion_ckpt):
    rc, out, err = _run(capsys, "evaluate", "--ckpt", str(diffusion_ckpt), "--task", "kjv2web", "--split", "valid",
                        "--limit", "3", "--steps", "1", "--json", "--device", "cpu")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["data"] == "kjv2web/valid" and rep["sentences"] == 3


def test_ar_checkpoint_generate_and_evaluate(capsys, ar_ckpt, data_dir):
    rc, out, err = _run(capsys, "generate", "--ckpt", str(ar_ckpt), str(data_dir / "test.src"), "--beam", "2",
                        "--device", "cpu")
    assert rc == 0, err
    assert len(out.splitlines()) == 5
    rc, out, err = _run(capsys, "evaluate", "--ckpt", str(ar_ckpt), "--data", str(data_dir / "valid.tsv"),
                        "--beam", "1,2", "--json", "--device", "cpu")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["kind"] == "ar" and [r["beam"] for r in rep["results"]] == [1, 2]


def test_train_refuses_to_overwrite_and_resumes(capsys, diffusion_ckpt, data_dir):
    out_dir = diffusion_ckpt.parent
    rc, _, err = _run(capsys, "train", "--train", str(data_dir / "train.tsv"), "--out", str(out_dir),
                      "--preset", "tiny")
    _assert_one_line_error(rc, err, "already holds a run", "--resume")
    from fastdiss import checkpoint
    assert checkpoint.load(diffusion_ckpt).train_state["step"] == 2
    # --resume alone continues on the data recorded in OUT/run.json
    rc, out, err = _run(capsys, "train", "--out", str(out_dir), "--resume", "--max-steps", "3", "--quiet",
                        "--device", "cpu")
    assert rc == 0, err
    assert "done: 3 steps" in out and "train.tsv: 60 train / 4 valid pairs" in err
    assert checkpoint.load(diffusion_ckpt).train_state["step"] == 3


def test_train_share_embeddings_flag_reaches_the_model(capsys, data_dir, tmp_path):
    base = ["train", "--train", str(data_dir / "train.tsv"), "--valid", str(data_dir / "valid.tsv"), "--preset", "tiny",
            "--vocab-size", "300", "--max-tokens", "512", "--max-steps", "1", "--quiet", "--device", "cpu"]
    from fastdiss import checkpoint
    for flag, shared in (("--share-embeddings", True), ("--no-share-embeddings", False)):
        out_dir = tmp_path / flag
        rc, _, err = _run(capsys, *base, flag, "--out", str(out_dir))
        assert rc == 0, err
        ck = checkpoint.load(out_dir / "last.pt")
        assert ck.cfg.model.share_embeddings is shared
        # the shared model reads source tokens through the target table: no source embedding of its own
        assert hasattr(ck.model.encoder, "embed") is not shared
        rc, out, err = _run(capsys, "generate", "--ckpt", str(out_dir / "last.pt"), "--steps", "2",
                            str(data_dir / "test.src"))
        assert rc == 0, err
        assert len([x for x in out.splitlines()]) == 5


def test_train_stops_at_the_time_budget(capsys, data_dir, tmp_path):
    rc, out, err = _run(capsys, "train", "--train", str(data_dir / "train.tsv"), "--valid", str(data_dir / "valid.tsv"),
                        "--preset", "tiny", "--vocab-size", "300", "--max-tokens", "512", "--max-steps", "100000",
                        "--minutes", "0.0001", "--out", str(tmp_path / "run"), "--quiet", "--device", "cpu")
    assert rc == 0, err
    assert "time budget reached" in out
    from fastdiss import checkpoint
    ck = checkpoint.load(tmp_path / "run" / "last.pt")
    assert ck.train_state["step"] < 100000 and (tmp_path / "run" / "best.pt").exists()


# ---- demo --------------------------------------------------------------------------------------

def test_demo_shows_the_shipped_models_with_ar_and_identity_rows(capsys, tmp_path):
    save = tmp_path / "demo.json"
    rc, out, err = _run(capsys, "demo", "--task", "kjv2web", "--sentences", "3", "--steps", "1,2,8", "--examples", "1",
                        "--save", str(save))
    assert rc == 0, err
    assert out.splitlines()[0].startswith("fastdiss demo on cpu:") and "torch thread" in out.splitlines()[0]
    rows = [x.split() for x in out.splitlines()
            if x.strip().startswith(("diffusion K=", "AR greedy", "identity")) and ":" not in x]   # table, not examples
    assert [r[1] if r[0] == "diffusion" else r[0] for r in rows] == ["K=1", "K=2", "K=8", "AR", "identity"]
    assert rows[2][-1] == "1.0x"    # the most-steps row is the speed-up baseline
    rec = json.loads(save.read_text())["tasks"][0]
    assert rec["task"] == "kjv2web" and rec["sentences"] == 3 and rec["ar"] is not None
    assert [r["steps"] for r in rec["rows"]] == [1, 2, 8]
    assert out.count("reference    :") == 1


def test_demo_model_needs_one_task(capsys, diffusion_ckpt):
    rc, _, err = _run(capsys, "demo", "--model", str(diffusion_ckpt))
    _assert_one_line_error(rc, err, "--task")


def test_export_errors_are_one_line(capsys, ar_ckpt, tmp_path):
    rc, _, err = _run(capsys, "export", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "exp"))
    _assert_one_line_error(rc, err, "checkpoint not found")
    rc, _, err = _run(capsys, "export", "--ckpt", str(ar_ckpt), "--out", str(tmp_path / "exp"))
    _assert_one_line_error(rc, err, "'ar' model", "diffusion")
