"""README numbers come from the committed result files: every `<!-- report:NAME -->` block of
README.md must equal what `python -m benchmarks.report` generates (a README without markers has
nothing to check), and the generators must state the numbers the JSON holds."""
import json
from pathlib import Path

import pytest

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def test_readme_blocks_equal_the_generated_ones():
    text = (ROOT / "README.md").read_text()
    new = report.render(text, RESULTS)
    if new != text:
        import difflib
        diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), "README.md", "generated"))
        pytest.fail("README.md differs from the committed results; run `python -m benchmarks.report`:\n" + diff[:6000])


@pytest.mark.parametrize("name", sorted(report.BLOCKS))
def test_every_block_generates_from_the_committed_files(name):
    """Each registered generator runs on the committed files (before any README uses it) and cites them."""
    out = report.BLOCKS[name](RESULTS)
    assert out.strip() and ("benchmarks/results/" in out or "fastdiss/pretrained/" in out)
    assert "<!--" not in out  # a block must not open or close markers itself


def _fake_blocks(calls):
    def gen(results_dir):
        calls.append(results_dir)
        return "| a | b |\n|---|---|\n| 1 | 2 |\n"
    return {"t": gen}


def test_render_replaces_each_block_and_keeps_the_rest(tmp_path):
    calls = []
    text = ("intro\n<!-- report:t -->\nstale 0.45 ms\n<!-- /report:t -->\nmiddle\n"
            "<!-- report:t -->\n<!-- /report:t -->\nend\n")
    out = report.render(text, tmp_path, _fake_blocks(calls))
    assert out == ("intro\n<!-- report:t -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- /report:t -->\nmiddle\n"
                   "<!-- report:t -->\n| a | b |\n|---|---|\n| 1 | 2 |\n<!-- /report:t -->\nend\n")
    assert calls == [tmp_path, tmp_path]
    assert report.render(out, tmp_path, _fake_blocks([])) == out  # regenerating is a fixed point
    assert report.render("no markers here\n", tmp_path, {}) == "no markers here\n"


@pytest.mark.parametrize("text,words", [
    ("<!-- report:nope -->\n<!-- /report:nope -->\n", "unknown report block 'nope'"),
    ("<!-- report:t -->\nx\n", "no closing marker"),
    ("x\n<!-- /report:t -->\n", "closing marker without an opening one"),
    ("<!-- report:t -->\n<!-- report:t -->\n<!-- /report:t -->\n<!-- /report:t -->\n", "another"),
])
def test_bad_markers_are_errors(text, words, tmp_path):
    with pytest.raises(ValueError, match=words):
        report.render(text, tmp_path, _fake_blocks([]))


def test_check_mode_fails_on_a_stale_readme_and_rewrite_fixes_it(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- report:latency -->\nold numbers\n<!-- /report:latency -->\n")
    assert report.main(["--readme", str(readme), "--check"]) == 1
    assert "old numbers" in readme.read_text() and "-old numbers" in capsys.readouterr().out
    assert report.main(["--readme", str(readme)]) == 0
    assert "old numbers" not in readme.read_text()
    assert report.main(["--readme", str(readme), "--check"]) == 0


def test_quality_block_uses_the_seed_means_of_the_runs():
    """The AR rows are the mean over both seeds of the per-run scores (the README once showed one seed
    as the mean: fr2web-full 0.32 / 1.87, chrF 10.9 / 13.3); computed here from the raw runs."""
    data = json.loads((RESULTS / "quality-cpu-tiny-elb2web-fr2web.json").read_text())
    runs = [data["runs"][f"fr2web-full|ar|seed{s}"]["evals"] for s in (0, 1)]
    mean = {(dec, m): sum(r[dec][m] for r in runs) / 2 for dec in ("greedy", "beam4") for m in ("bleu", "chrf")}
    row = next(line for line in report.BLOCKS["quality"](RESULTS).splitlines() if line.startswith("| fr2web-full | 0"))
    cells = [c.strip().split(" ± ")[0] for c in row.strip("|").split("|")]
    assert cells[1:5] == [f"{mean['greedy', 'bleu']:.2f}", f"{mean['beam4', 'bleu']:.2f}",
                          f"{mean['greedy', 'chrf']:.1f}", f"{mean['beam4', 'chrf']:.1f}"]
    assert cells[1:5] == ["0.32", "1.95", "11.2", "13.3"]


def test_gpu_dev_block_is_labelled_and_adds_nothing_up():
    out = report.BLOCKS["gpu-h200-dev"](RESULTS)
    assert out.startswith("**Development logs, not benchmark results.**")
    # no number that is in no file (4.4 TB/s), no graph fwd + graph bwd sum shown as fwd+bwd (0.0663 + 0.2157)
    assert "TB/s" not in out and "0.2820" not in out and "0.28 ms" not in out
    assert "| 8x8x1024x64 | 0.8019 |" in out        # eager fwd+bwd as recorded (func_fwdbwd)
