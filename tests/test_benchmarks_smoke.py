"""Smoke tests of the benchmarks on CPU: they run end to end on tiny shapes and write a complete,
well-formed JSON (machine record, every op with numbers or a recorded error) and the plots.
Speed is never asserted here."""
import json
import math

import pytest
import torch

from benchmarks import bench_ceilings, bench_kernels, common


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    ceilings = bench_ceilings.main(["--quick", "--device", "cpu", "--out-dir", str(out),
                                    "--copy-mib", "4", "--matmul-n", "128"])
    kernels = bench_kernels.main(["--quick", "--device", "cpu", "--no-compile", "--cpu-repeats", "2",
                                  "--out-dir", str(out)])
    return out, ceilings, kernels


def _check_timing(m, where):
    for key in ("median_ms", "p20_ms", "p80_ms"):
        assert isinstance(m[key], float) and math.isfinite(m[key]) and m[key] > 0, (where, key, m)
    assert m["p20_ms"] <= m["median_ms"] <= m["p80_ms"], (where, m)


def test_ceilings_json(quick_run):
    out, result, _ = quick_run
    on_disk = json.loads((out / "ceilings-cpu.json").read_text())
    assert on_disk["header"]["benchmark"] == "ceilings"
    assert on_disk["errors"] == []
    (copy,), (mm,) = on_disk["copy"], on_disk["matmul"]
    _check_timing(copy, "copy")
    _check_timing(mm, "matmul")
    assert copy["bytes_moved"] == 2 * 4 * 2**20
    assert copy["GBps"] == pytest.approx(copy["bytes_moved"] / (copy["median_ms"] * 1e-3) / 1e9)
    assert mm["n"] == 128 and mm["dtype"] == "float32"
    assert mm["TFLOPs"] == pytest.approx(2 * 128**3 / (mm["median_ms"] * 1e-3) / 1e12)
    assert on_disk["summary"]["copy_GBps"] == pytest.approx(copy["GBps"])
    assert set(on_disk["summary"]["matmul_TFLOPs"]) == {"float32"}


def test_kernels_json_schema(quick_run):
    out, _, result = quick_run
    data = json.loads((out / "kernels-cpu.json").read_text())
    h = data["header"]
    assert h["schema_version"] == common.SCHEMA_VERSION and h["benchmark"] == "kernels"
    assert set(h["git"]) == {"commit", "dirty"} and h["command"]
    m = h["machine"]
    assert m["torch"] == torch.__version__ and m["device"] == "cpu" and m["gpu"] is None
    assert m["python"] and m["cpu"] and "triton" in m
    assert h["config"]["preset"] == "quick" and h["config"]["dtype"] == "float32"
    assert data["ceilings"]["copy_GBps"] > 0   # picked up from the ceilings file written first

    assert {c["op"] for c in data["cases"]} == set(bench_kernels.OPS)
    for case in data["cases"]:
        where = f"{case['op']} {case['name']}"
        assert {"fastdiss", "eager", "compile"} <= set(case["providers"]), where
        for name, by_mode in case["providers"].items():
            assert set(by_mode) == set(bench_kernels.MODES), (where, name)
            for mode, meas in by_mode.items():
                if "error" in meas:
                    assert isinstance(meas["error"], str) and meas["error"], (where, name, mode)
                    assert not meas["error"].startswith("pending"), (where, name, mode)
                else:
                    _check_timing(meas, (where, name, mode))
                    assert meas["peak_mem_bytes"] is None   # no memory counter on CPU
                    if case["bytes"].get(mode):
                        assert meas["GBps"] > 0 and meas["frac_copy_bw"] > 0
        # The eager references are plain PyTorch: they must always produce numbers.
        for mode in bench_kernels.MODES:
            assert "median_ms" in case["providers"]["eager"][mode], (where, case["providers"]["eager"][mode])
        assert case["providers"]["compile"]["fwd"] == {"error": "skipped: --no-compile", "skipped": True}
        if case["op"] == "attention":
            assert case["flops"]["fwd"] > 0
            flash = case["providers"]["sdpa_flash"]["fwd"]
            if case["params"]["mask"]:
                assert flash == {"error": bench_kernels.UNSUPPORTED_MASK, "unsupported": True}
            else:
                _check_timing(flash, where)   # flash SDPA runs on CPU without a mask
        if case["op"] == "rounding_cross_entropy":
            assert "logits_ce" in case["providers"]

    names = {p.split("/")[-1] for p in data["plots"]}
    assert names == {"kernels-cpu-speedup.png", "kernels-cpu-attention-tflops.png", "kernels-cpu-bandwidth.png"}
    for name in names:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]   # atomic writes leave no temporaries
    assert bench_kernels.summary_lines(data)[-1].endswith("(errors or skipped; see the JSON)")


def test_failures_are_recorded_not_raised():
    def broken(x):
        raise RuntimeError("kernel exploded")

    case = bench_kernels.Case(
        op="toy", name="n8", params={}, make=lambda: {"a": torch.randn(8)}, grad=("a",),
        providers={"fastdiss": broken, "eager": lambda x: x["a"] * 2.0, "sdpa_flash": bench_kernels.UNSUPPORTED_MASK},
        bytes={"fwd": 64, "fwd_bwd": 128})
    rec = bench_kernels._record(case)
    timing = {"cpu_warmup": 0, "cpu_repeats": 2}
    bench_kernels.run_case(case, rec, list(case.providers), torch.device("cpu"), torch.float32, timing, None, {})
    for mode in bench_kernels.MODES:
        assert rec["providers"]["fastdiss"][mode]["error"] == "RuntimeError: kernel exploded"
        _check_timing(rec["providers"]["eager"][mode], mode)
        assert rec["providers"]["sdpa_flash"][mode]["unsupported"] is True
    assert rec["summary"] == {}   # no fastdiss numbers, so no speed-ups


def test_summarize_case_speedups():
    rec = {"providers": {
        "fastdiss": {"fwd": {"median_ms": 2.0, "peak_mem_bytes": 100}, "fwd_bwd": {"error": "x"}},
        "eager": {"fwd": {"median_ms": 8.0, "peak_mem_bytes": 400}, "fwd_bwd": {"median_ms": 9.0}},
        "sdpa_flash": {"fwd": {"median_ms": 3.0, "peak_mem_bytes": None}, "fwd_bwd": {"error": "y"}}}}
    s = bench_kernels.summarize_case(rec)
    assert set(s) == {"fwd"}
    assert s["fwd"]["speedup"] == {"eager": 4.0, "sdpa_flash": 1.5}
    assert s["fwd"]["best_baseline"] == "sdpa_flash" and s["fwd"]["speedup_vs_best"] == 1.5
    assert s["fwd"]["peak_mem_ratio"] == {"eager": 4.0}


def test_common_helpers(tmp_path):
    s = common.summarize([5.0, 1.0, 4.0, 2.0, 3.0], "test")
    assert (s["median_ms"], s["p20_ms"], s["p80_ms"], s["samples"]) == (3.0, 1.8, 4.2, 5)
    with pytest.raises(ValueError):
        common.summarize([], "test")
    assert common.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.device_tag(torch.device("cpu")) == "cpu"
    path = common.write_json({"a": float("nan"), "b": (1, float("inf")), "c": torch.float32},
                             common.results_path("x", "cpu", tmp_path))
    assert json.loads(path.read_text()) == {"a": None, "b": [1, None], "c": "torch.float32"}
    assert [p.name for p in tmp_path.iterdir()] == ["x-cpu.json"]
    assert common.peak_memory(lambda: None, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="device"):
        common.pick_device("tpu")


def test_learning_curve_rows_keep_screens_long_runs_and_reruns_apart():
    from benchmarks.learning_curve import run_label

    def run(name, variant="default", sets=(), distilled=False):
        return {"run": name, "variant": variant, "header": {"config": {"args": {"set": list(sets)}}},
                "data": {"train_data": "distilled: x.tsv" if distilled else "embedded"}}

    assert run_label(run("kjv2web-default-s1")) == "default"
    assert run_label(run("kjv2web-default-long-s0")) == "default long"
    assert run_label(run("elb2web-ar-rerun-s0", "ar")) == "ar rerun"
    assert run_label(run("x", sets=["model.share_embeddings=true"], distilled=True)) == \
        "default+distilled [share_embeddings=true]"


def test_learning_curve_merge_averages_final_rows_by_step_count(tmp_path):
    """Seeds that swept different step counts (K = 1000 on seed 0 only) merge row by row: each final row
    averages the seeds that have it, and its n says how many."""
    from benchmarks.learning_curve import merge

    def run(seed, finals):
        return {"task": "elb2web", "variant": "default", "seed": seed, "identity": {"bleu": 0.2},
                "config": {"sample": {"spacing": "quadratic"}},
                "header": {"config": {"args": {"set": []}}}, "data": {"train_data": "embedded"},
                "points": [{"train_steps": 10, "train_cpu_seconds": 1.0,
                            "scores": [{"steps": 4, "bleu": 1.0 + seed, "chrf": 10.0}]}],
                "final": [{"steps": k, "time_shift": ts, "bleu": b, "chrf": 2 * b, "ms_per_sentence": 1.0}
                          for k, ts, b in finals]}
    for seed, finals in ((0, [(1, 1.0, 1.0), (4, 1.0, 2.0), (1000, 1.0, 3.0), (4, 0.0, 0.5)]),
                         (1, [(1, 1.0, 2.0), (4, 1.0, 4.0), (4, 0.0, 1.5)])):
        d = tmp_path / "runs" / f"elb2web-default-s{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(run(seed, finals)))
    out = merge("t", tmp_path / "runs", tmp_path)
    (entry,) = out["summary"]
    rows = {(f["steps"], f["time_shift"]): f["bleu"] for f in entry["final"]}
    assert rows[(1, 1.0)]["mean"] == 1.5 and rows[(1, 1.0)]["n"] == 2
    assert rows[(4, 1.0)]["mean"] == 3.0 and rows[(4, 0.0)]["mean"] == 1.0
    assert rows[(1000, 1.0)]["mean"] == 3.0 and rows[(1000, 1.0)]["n"] == 1
    assert entry["curve"][0]["K4"]["bleu"]["mean"] == 1.5
