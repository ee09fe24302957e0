"""Reliability (issue 8): the faults the other test files do not already exercise.

Where each issue-8 item is tested:
  1. validation     ops: tests/test_{attention,layer_norm,noising,self_cond_proj,rounding_ce,cpp_ops}.py
                    (dtype, shape, mask dtype, scalars); here: an argument on another device, for every op.
                    CLI: tests/test_cli.py (missing/unreadable files, bad UTF-8, empty lines, over-long
                    inputs, unknown task/preset, --steps 0 or negative); here: damaged checkpoints through
                    the CLI (truncated, other format version, weights of another config).
  2. checkpoints    tests/test_train.py (damaged files, other version/config, atomic save); SIGKILL + bit-exact resume in tests/test_faults.py.
  3. non-finite     tests/test_train.py (skipped and counted steps, stop after too many in a row);
                    here: no tensors of a training step outlive it (a leak grows without bound).
  4. properties     tests/test_properties.py (every op against a float64 oracle, hypothesis).
  5. memory         here: a batch over the memory budget is split with unchanged ids, or refused with
                    the batch size that fits; out-of-memory chunks are halved and rerun.
  6. determinism    tests/test_sampling.py (same seed, same process), tests/test_cpp_sampler.py (C++ engine
                    == Python engine); here: the same seed in two processes with different global RNG
                    state and hash seeds.
"""
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch

import fastdiss
from fastdiss import checkpoint as ckpt
from fastdiss import cli, resources
from fastdiss import functional as Fd
from fastdiss.config import ModelConfig, SampleConfig, preset
from fastdiss.model import Denoiser
from fastdiss.sampling import Sampler, pad_batch

V, PAD = 37, 0
LENS = (5, 1, 9, 3, 7, 2, 6)   # seven sentences: chunks of 3 leave a remainder


def tiny_model(cls=Denoiser, max_len=16):
    cfg = preset("tiny")
    cfg.model = ModelConfig(**{**cfg.to_dict()["model"], "max_len": max_len})
    torch.manual_seed(0)
    return cls(cfg.model, V, PAD).eval(), cfg


def sentences(lens=LENS, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, V, (n,), generator=g).tolist() for n in lens]


# ---------------------------------------------------------------------------------------------- 1. validation

_B, _L, _D = 2, 3, 4
_q = torch.randn(_B, 1, _L, _D)
_x = torch.randn(_B, _L, _D)
_w = torch.ones(_D)
_t = torch.rand(_B)
_tok = torch.zeros(_B, _L, dtype=torch.long)
_E = torch.randn(5, _D)
_W = torch.randn(6, 2 * _D)


def _meta(t):
    return t.to("meta")


@pytest.mark.parametrize("arg, call", [
    ("k", lambda: Fd.attention(_q, _meta(_q), _q)),
    ("v", lambda: Fd.attention(_q, _q, _meta(_q))),
    ("key_padding_mask", lambda: Fd.attention(_q, _q, _q, _meta(torch.zeros(_B, _L, dtype=torch.bool)))),
    ("weight", lambda: Fd.layer_norm(_x, _meta(_w), _w)),
    ("bias", lambda: Fd.layer_norm(_x, _w, _meta(_w))),
    ("residual", lambda: Fd.layer_norm(_x, _w, _w, residual=_meta(_x))),
    ("t", lambda: Fd.q_sample(_x, _meta(_t), _x)),
    ("eps", lambda: Fd.q_sample(_x, _t, _meta(_x))),
    ("weight", lambda: Fd.embed_and_noise(_tok, _meta(_E), _t, _x)),
    ("eps", lambda: Fd.embed_and_noise(_tok, _E, _t, _meta(_x))),
    ("ln_weight", lambda: Fd.embed_and_noise(_tok, _E, _t, _x, ln_weight=_meta(_w))),
    ("sc", lambda: Fd.self_cond_project(_x, _meta(_x), _W)),
    ("weight", lambda: Fd.self_cond_project(_x, _x, _meta(_W))),
    ("add", lambda: Fd.self_cond_project(_x, _x, _W, add=_meta(torch.ones(6)))),
    ("embedding", lambda: Fd.rounding_cross_entropy(_x, _meta(_E), _tok)),
    ("targets", lambda: Fd.rounding_cross_entropy(_x, _E, _meta(_tok))),
])
def test_ops_name_an_argument_on_another_device(arg, call):
    """One argument on another device: ValueError naming it, the two devices and the fix (the 'meta'
    device stands in for a second GPU on CPU-only CI)."""
    with pytest.raises(ValueError, match=rf"^{arg} is on meta but the other inputs are on cpu; move it with "
                                         rf"\.to\('cpu'\)"):
        call()


# -------------------------------------------------------------------------------- 1+2. damaged checkpoints via the CLI

def _one_line_error(capsys, argv, *needles):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def test_cli_refuses_damaged_checkpoints_in_one_line(capsys, tmp_path):
    model, cfg = tiny_model()
    good = tmp_path / "good.pt"
    ckpt.save(good, model, cfg, tokenizer=None)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 3])
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "version": ckpt.FORMAT_VERSION + 1}, tmp_path / "future.pt")
    other = {**payload, "config": {**payload["config"], "model": {**payload["config"]["model"], "d_model": 64}}}
    torch.save(other, tmp_path / "other_config.pt")
    inp = tmp_path / "in.txt"
    inp.write_text("hello world\n")
    for name, needles in (("truncated.pt", ["truncated.pt", "is truncated", "download it again"]),
                          ("future.pt", ["future.pt", f"format version {ckpt.FORMAT_VERSION + 1}"]),
                          ("other_config.pt", ["other_config.pt", "do not fit"])):
        _one_line_error(capsys, ["generate", "--ckpt", str(tmp_path / name), str(inp), "--device", "cpu"], *needles)
    # resuming a run whose last.pt is from another format version
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes((tmp_path / "future.pt").read_bytes())
    _one_line_error(capsys, ["train", "--out", str(run), "--resume", "--device", "cpu"], "last.pt", "format version")


# ---------------------------------------------------------------------------------------------- 3. no leaks

def test_training_step_tensors_do_not_outlive_the_step():
    """After forward + backward of the fused training ops nothing of the step stays referenced (a
    cache keyed on tensors would keep every step's gradients alive: memory grows until OOM)."""
    before = fastdiss.get_backend()
    fastdiss.set_backend("triton")
    try:
        alive = []
        for _ in range(2):
            weight = torch.randn(5, 8, requires_grad=True)
            tokens = torch.randint(0, 5, (2, 3))
            z0, xt = Fd.embed_and_noise(tokens, weight, torch.rand(2), torch.randn(2, 3, 8))
            loss = Fd.rounding_cross_entropy(Fd.layer_norm(xt, None, None), weight, tokens) + z0.square().mean()
            loss.backward()
            alive += [weakref.ref(weight), weakref.ref(weight.grad), weakref.ref(tokens)]
            del weight, tokens, z0, xt, loss
        gc.collect()
        kept = [name for r, name in zip(alive, ["weight", "weight.grad", "tokens"] * 2) if r() is not None]
        assert not kept, f"tensors of finished steps are still referenced: {kept}"
    finally:
        fastdiss.set_backend(before)


# ---------------------------------------------------------------------------------------------- 5. memory limits

class Recording(Denoiser):
    """Records how many candidate rows each denoiser call sees."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rows = []

    def forward(self, x_t, *a, **k):
        self.rows.append(x_t.shape[0])
        return super().forward(x_t, *a, **k)


SCFG = SampleConfig(steps=3, length_beam=2, noise_draws=2, select="mbr", seed=3)   # C = 4 candidates


def _per_sentence_mib(model, src, res):
    """The planner's bytes per sentence for this batch, in MiB (L from the unsplit result)."""
    C, L = len(res.candidates[0]), res.latents.shape[1]
    return resources.decoder_bytes(model.cfg, V, src.shape[1], L, C, model.tgt_embed.element_size()) / 2**20


def _assert_same(got, want):
    assert got.ids == want.ids and got.candidates == want.candidates and got.single_ids == want.single_ids
    # identical ids; the floats may differ in the last bit (CPU GEMMs block by batch size)
    torch.testing.assert_close(got.latents, want.latents, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.scores, want.scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fit", [1, 3])
def test_oversize_batch_is_split_with_the_same_ids(fit):
    model, cfg = tiny_model(Recording)
    src, mask = pad_batch(sentences(), PAD)
    want = Sampler(model, SCFG, cfg.diffusion).generate(src, mask)
    assert model.rows == [4 * len(LENS)] * SCFG.steps
    model.rows.clear()
    budget = (fit + 0.5) * _per_sentence_mib(model, src, want)
    got = Sampler(model, SCFG, cfg.diffusion, memory_budget_mb=budget).generate(src, mask)
    chunks = [min(fit, len(LENS) - i) for i in range(0, len(LENS), fit)]
    assert model.rows == [4 * c for c in chunks for _ in range(SCFG.steps)]   # it did split, as planned
    _assert_same(got, want)


def test_budget_from_the_environment_applies_to_translate(monkeypatch):
    model, cfg = tiny_model(Recording)
    seqs = sentences()
    sampler = Sampler(model, SCFG, cfg.diffusion)
    want = sampler.translate(seqs, batch_size=len(seqs))
    src, mask = pad_batch(sorted(seqs, key=len), PAD)
    budget = 2.5 * _per_sentence_mib(model, src, Sampler(model, SCFG, cfg.diffusion).generate(src, mask))
    model.rows.clear()
    monkeypatch.setenv(resources.ENV_BUDGET, f"{budget:.6f}")
    got = sampler.translate(seqs, batch_size=len(seqs))
    assert max(model.rows) == 4 * 2
    assert got.ids == want.ids and got.candidates == want.candidates


def test_refusal_says_what_fits():
    model, cfg = tiny_model()
    src, mask = pad_batch(sentences(), PAD)
    per = _per_sentence_mib(model, src, Sampler(model, SCFG, cfg.diffusion).generate(src, mask))
    strict = Sampler(model, SCFG, cfg.diffusion, memory_budget_mb=3.5 * per, split_oversize=False)
    with pytest.raises(resources.GenerationMemoryError,
                       match=r"^a batch of 7 sentences \(4 candidate\(s\) x \d+ target tokens, 9 source tokens\) "
                             r"needs ~.*MiB; .*MiB is allowed by memory_budget_mb; use a batch of at most 3 "
                             r"sentences \(--batch-size 3\)$"):
        strict.generate(src, mask)
    assert len(strict.generate(src[:3], mask[:3]).ids) == 3   # what the message says fits does run
    tiny_budget = Sampler(model, SCFG, cfg.diffusion, memory_budget_mb=0.5 * per)
    with pytest.raises(resources.GenerationMemoryError, match=r"per sentence .* but only .* is allowed by "
                                                              r"memory_budget_mb; use fewer candidates"):
        tiny_budget.generate(src, mask)


def test_bad_budget_values_are_named(monkeypatch):
    model, cfg = tiny_model()
    src, mask = pad_batch(sentences()[:2], PAD)
    monkeypatch.setenv(resources.ENV_BUDGET, "lots")
    with pytest.raises(ValueError, match=r"FASTDISS_GEN_MEMORY_BUDGET_MB must be a number of MiB, got 'lots'"):
        Sampler(model, SCFG, cfg.diffusion).generate(src, mask)
    monkeypatch.setenv(resources.ENV_BUDGET, "-5")
    with pytest.raises(ValueError, match="FASTDISS_GEN_MEMORY_BUDGET_MB must be a positive number"):
        Sampler(model, SCFG, cfg.diffusion).generate(src, mask)
    monkeypatch.delenv(resources.ENV_BUDGET)
    with pytest.raises(ValueError, match="memory_budget_mb must be a positive number of MiB or None, got 0"):
        Sampler(model, SCFG, cfg.diffusion, memory_budget_mb=0).generate(src, mask)
    assert resources.memory_budget("cpu") == (None, "no limit")


class RunsOutOfMemory(Recording):
    """Raises CUDA's out-of-memory error for calls with more than `limit` candidate rows."""
    limit = 8

    def forward(self, x_t, *a, **k):
        if x_t.shape[0] > self.limit:
            self.rows.append(-x_t.shape[0])
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x_t, *a, **k)


def test_out_of_memory_chunks_are_halved_and_rerun():
    model, cfg = tiny_model(RunsOutOfMemory)
    src, mask = pad_batch(sentences(), PAD)
    RunsOutOfMemory.limit = 10 ** 6
    want = Sampler(model, SCFG, cfg.diffusion).generate(src, mask)
    RunsOutOfMemory.limit = 8                                  # 2 sentences x 4 candidates
    model.rows.clear()
    got = Sampler(model, SCFG, cfg.diffusion).generate(src, mask)
    assert model.rows == [-28, -12] + [4] * (SCFG.steps * 7)   # 7 sentences, then 3, then 1 at a time
    _assert_same(got, want)
    RunsOutOfMemory.limit = 0
    with pytest.raises(resources.GenerationMemoryError, match="out of CUDA memory generating a single sentence"):
        Sampler(model, SCFG, cfg.diffusion).generate(src, mask)


def test_other_errors_are_not_retried():
    class Broken(Recording):
        def forward(self, x_t, *a, **k):
            self.rows.append(x_t.shape[0])
            raise RuntimeError("a real bug")
    model, cfg = tiny_model(Broken)
    src, mask = pad_batch(sentences(), PAD)
    with pytest.raises(RuntimeError, match="a real bug"):
        Sampler(model, SCFG, cfg.diffusion).generate(src, mask)
    assert model.rows == [28]


# ---------------------------------------------------------------------------------------------- 6. determinism

_GENERATE = r"""
import hashlib, json, sys, torch
sys.path.insert(0, {tests!r})
from test_reliability import SCFG, sentences, tiny_model
from fastdiss.sampling import Sampler, pad_batch
torch.set_num_threads(1)
model, cfg = tiny_model()
torch.manual_seed(int(sys.argv[1]))      # the global RNG differs per process: the sampler must not use it
torch.rand(int(sys.argv[1]) % 97 + 1)
src, mask = pad_batch(sentences(), 0)
res = Sampler(model, SCFG, cfg.diffusion).generate(src, mask, seed=int(sys.argv[2]))
print(json.dumps({{"ids": res.ids, "candidates": res.candidates,
                  "latents": hashlib.sha256(res.latents.numpy().tobytes()).hexdigest()}}))
"""


def test_same_seed_same_ids_across_processes(tmp_path):
    """Two processes with different global RNG states and hash seeds: the same ids, candidates and
    latents bit for bit. (Another seed gives other outputs: tests/test_sampling.py; the C++ engine
    equals the Python one: tests/test_cpp_sampler.py.)"""
    script = tmp_path / "gen.py"
    script.write_text(_GENERATE.format(tests=os.path.dirname(os.path.abspath(__file__))))

    def run(global_seed, seed, hash_seed):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(hash_seed)}
        env.pop(resources.ENV_BUDGET, None)
        out = subprocess.run([sys.executable, str(script), str(global_seed), str(seed)], env=env, check=True,
                             capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.splitlines()[-1])

    a, b = run(1, 5, 0), run(2, 5, 123)
    assert len(a["ids"]) == len(LENS) and all(a["ids"])
    assert a == b
