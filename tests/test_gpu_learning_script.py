"""benchmarks/gpu_learning.sh, the one-call GPU learning run, tried here on the CPU (DEVICE=cpu) so
that a lent GPU's minutes are never spent on a broken script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_learning.sh"


def _run(tmp_path, **env):
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "DEVICE": "cpu", **env}
    return subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env={**full, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=600)


def test_missing_distilled_set_is_named_with_the_fix(tmp_path):
    res = _run(tmp_path, TRAIN_TSV=str(tmp_path / "absent.tsv"))
    assert res.returncode == 2
    assert "absent.tsv is missing" in res.stderr and "carry" in res.stderr


@pytest.mark.slow
def test_two_runs_train_score_and_merge(tmp_path):
    from fastdiss.data.corpus import load_pairs
    tsv = tmp_path / "distilled.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in load_pairs("elb2web", "train")[:300]))
    res = _run(tmp_path, TRAIN_TSV=str(tsv), CHECKPOINTS="2 3", FINAL_STEPS="1", SEEDS="0")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = tmp_path / "out"
    merged = json.loads((out / "learning-curve-gpu-tiny.json").read_text())
    runs = {r["run"]: r for r in merged["runs"]}
    assert set(runs) == {"elb2web-default-tiny-s0", "elb2web-ar-tiny-s0"}
    for r in runs.values():
        assert [p["train_steps"] for p in r["points"]] == [2, 3]
        assert r["header"]["machine"]["device"] == "cpu"
    assert runs["elb2web-default-tiny-s0"]["data"]["train_data"].startswith("distilled")
    assert [f["steps"] for f in runs["elb2web-default-tiny-s0"]["final"]][:1] == [1]
    assert (out / "learning-curve-gpu-tiny.png").stat().st_size > 0
    for name, kind in (("elb2web-tiny", "diffusion"), ("elb2web-tiny-ar", "ar")):   # seed 0 packaged
        prov = json.loads((out / "pretrained" / name / "provenance.json").read_text())
        assert prov["kind"] == kind and prov["train_steps"] == 3 and prov["machine"]["device"] == "cpu"
        assert (out / "pretrained" / name / "model.safetensors").stat().st_size > 0
    # weights past the last scored point (a run stopped between checkpoints) are not packaged
    from benchmarks import make_shipped_model
    run = tmp_path / "runs" / "gpu_learning" / "elb2web-ar-tiny-s0"
    result = json.loads((run / "result.json").read_text())
    result["points"] = result["points"][:1]
    (run / "result.json").write_text(json.dumps(result))
    with pytest.raises(SystemExit, match=r"holds step 3 but the run's last scored point is step 2.*--checkpoints 3"):
        make_shipped_model.main(["--run", str(run), "--name", "x", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_oversized_weights_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    """The small preset (16 MiB in fp16) must not leave a half-shipped folder behind."""
    from benchmarks import make_shipped_model
    from fastdiss import checkpoint
    from fastdiss.config import preset
    from fastdiss.data.corpus import load_tokenizer
    from fastdiss.train import build_model
    cfg = preset("tiny")
    tok = load_tokenizer("elb2web")
    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save(str(run / "last.pt"), build_model(cfg, tok), cfg, tok, extra={"step": 1})
    (run / "result.json").write_text(json.dumps({"points": [{"train_steps": 1}]}))
    monkeypatch.setattr(make_shipped_model, "SIZE_LIMIT", 1024 * 1024)   # 1 MiB: tiny's 4.9 MiB is over it
    with pytest.raises(SystemExit, match=r"4\.9 MiB of fp16 weights, over the 10 MB limit"):
        make_shipped_model.main(["--run", str(run), "--name", "x", "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_kernels_failing_the_preflight_fall_back_to_the_torch_ops(tmp_path):
    """Kernels that fail the 3-step preflight (here: the Triton backend forced on a CPU without the interpreter)
    must not cost the GPU call: the runs train with FASTDISS_BACKEND=torch, and their headers say so."""
    from fastdiss.data.corpus import load_pairs
    tsv = tmp_path / "distilled.tsv"
    tsv.write_text("".join(f"{s}\t{t}\n" for s, t in load_pairs("elb2web", "train")[:200]))
    res = _run(tmp_path, TRAIN_TSV=str(tsv), CHECKPOINTS="2", FINAL_STEPS="1", SEEDS="0", SHIP="0",
               FASTDISS_BACKEND="triton", TRITON_INTERPRET="")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = tmp_path / "out"
    assert "training with FASTDISS_BACKEND=torch" in (out / "preflight.log").read_text()
    for name in ("elb2web-default-tiny-s0", "elb2web-ar-tiny-s0"):
        run = json.loads((out / f"{name}.json").read_text())
        assert run["header"]["machine"]["fastdiss_backend"] == "torch"
        assert [p["train_steps"] for p in run["points"]] == [2]
