"""The C++ sampler against the Python sampler, on one tiny exported model shared by the module.

Acceptance (issue 6): for the same weights, seed and inputs the C++ loop's ids equal the Python
sampler's and its final latents agree within 1e-5 (fp32, CPU); the CMake example builds and
generates from an export. AOTInductor compiles ~1 minute on 2 cores and the CMake build about as
long, so the build runs in a second process while the model exports.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiss import export, python_engine, sampling
from fastdiss.config import SampleConfig, preset
from fastdiss.model import Denoiser
from fastdiss.schedule import time_grid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
VOCAB, PAD = 211, 0
LATENT_TOL = 1e-5


def _tiny_model(seed=1234):
    cfg = preset("tiny")
    torch.manual_seed(seed)
    return Denoiser(cfg.model, VOCAB, PAD).eval(), cfg


def _sources(seed=7):
    """Padded source batch with different lengths (one sentence of length 1)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [6, 11, 1, 9]
    sents = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lens]
    src, mask = sampling.pad_batch(sents, PAD)
    return sents, src, mask


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """Configure + build fastdiss_generate in the background (waited for by the test that needs it)."""
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    if cmake is None:
        yield None
        return
    source = os.environ.get("FASTDISS_CMAKE_SOURCE_DIR", str(REPO))
    build = tmp_path_factory.mktemp("cmake-build")
    log = open(build / "build.log", "w")
    cmd = (f"{cmake} -S {source} -B {build} {'-G Ninja' if ninja else ''} -DPython3_EXECUTABLE={sys.executable} "
           f"&& {cmake} --build {build} --target fastdiss_generate -j 1")
    proc = subprocess.Popen(["bash", "-c", cmd], stdout=log, stderr=subprocess.STDOUT)
    yield proc, build
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cmake_build):
    """A random-init tiny model saved as a checkpoint and exported the way `fastdiss export` does, with
    step tables for K = 1, 3 and the preset's 4, on a spacing and time shift other than the preset's."""
    from fastdiss import checkpoint
    model, cfg = _tiny_model()
    work = tmp_path_factory.mktemp("export")
    ckpt, out = work / "model.pt", work / "exported"
    checkpoint.save(ckpt, model, cfg, tokenizer=None)
    assert export.main(["--ckpt", str(ckpt), "--out", str(out), "--steps-list", "3,1", "--spacing", "sqrt",
                        "--time-shift", "0.5"]) == 0
    return model, cfg, out, export.load_manifest(out)


def _sample_cfg(manifest, cfg, **overrides):
    """The checkpoint's SampleConfig on the export's spacing and time shift: what the stored tables
    and the exported length rule were made for."""
    return dataclasses.replace(cfg.sample, spacing=manifest["spacing"], time_shift=manifest["time_shift"],
                               length_beam=1, noise_draws=1, **overrides)


@pytest.fixture(scope="module")
def engine(exported):
    from fastdiss.cpp_engine import CppEngine
    model, _, out, _ = exported
    return CppEngine(out, model=model)


def _assert_close(name, got, want, tol=LATENT_TOL):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs()
    bad = int((err > tol).sum())
    assert bad == 0, f"{name}: {bad}/{err.numel()} elements differ by more than {tol} (max {err.max().item():.3e})"


def test_export_writes_a_complete_manifest(exported):
    model, cfg, out, manifest = exported
    assert export.load_manifest(out) == manifest
    for f in (export.ENCODER_FILE, export.DECODER_FILE, export.EMBEDDING_FILE):
        assert (out / f).stat().st_size > 0
    assert manifest["schedule"] == cfg.diffusion.schedule and manifest["d_latent"] == cfg.model.d_latent
    assert manifest["pad_id"] == PAD and manifest["vocab_size"] == VOCAB and manifest["n_dec"] == cfg.model.n_dec
    assert manifest["weights_sha256"] == export.weights_fingerprint(model)
    assert manifest["steps_list"] == [1, 3, 4] and sorted(manifest["step_tables"], key=int) == ["1", "3", "4"]
    assert (manifest["spacing"], manifest["time_shift"]) == ("sqrt", 0.5)
    emb = torch.load(out / export.EMBEDDING_FILE)
    torch.testing.assert_close(emb, model.target_embeddings().detach(), rtol=0, atol=1e-6)


def test_stored_step_tables_are_python_step_schedules_bit_for_bit(exported, engine):
    """What C++ reads from decoder.pt2 (and the manifest holds) is step_schedule's float32 tables, exactly;
    step_schedule itself is checked against the schedule in float64 in test_sampling.py."""
    *_, manifest = exported
    for k in manifest["steps_list"]:
        want = python_engine.step_schedule(time_grid(k, manifest["spacing"]), manifest["schedule"],
                                           manifest["time_shift"])
        got = engine.sampler.step_table(k)
        stored = [torch.tensor(v, dtype=torch.float32) for v in manifest["step_tables"][str(k)].values()]
        for name, g, s, w in zip(("t_net", "alpha", "sigma"), got, stored, want):
            assert torch.equal(g, w), f"K={k}: C++ {name} {g} != step_schedule's {w}"
            assert torch.equal(s, w), f"K={k}: manifest {name} {s} != step_schedule's {w}"
    with pytest.raises(ValueError, match=r"K = 1, 3, 4, not K = 2; re-export with .*--steps-list 1,3,4,2"):
        engine.sampler.step_table(2)


def test_an_older_export_is_refused_with_the_fix(exported, tmp_path):
    *_, manifest = exported
    (tmp_path / export.MANIFEST_FILE).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"version 1; expected .* version 2 .*re-run `fastdiss export"):
        export.load_manifest(tmp_path)


def test_encoder_matches_python(exported, engine):
    model, _, _, manifest = exported
    _, src, mask = _sources()
    enc_c, enc_p = engine.encode(src, mask), model.encode(src, mask)
    _assert_close("memory", enc_c.out, enc_p.out)
    for i, ((kc, vc), (kp, vp)) in enumerate(zip(enc_c.cross_kv, enc_p.cross_kv)):
        _assert_close(f"k{i}", kc, kp)
        _assert_close(f"v{i}", vc, vp)
    lengths = engine.sampler.encode(src, mask)[1]
    want = sampling.predict_lengths(model.length_logits(enc_p), manifest["length_cap"])[:, 0]
    assert lengths.dtype == torch.long and torch.equal(lengths, want)


@pytest.mark.parametrize("steps,spacing,clamp,shift,rows", [(1, "uniform", False, 0.0, 4), (4, "uniform", False, 0.0, 4),
                                                            (4, "quadratic", True, 0.0, 4), (16, "sqrt", False, 0.5, 4),
                                                            (4, "uniform", True, 0.0, 1)])
def test_cpp_loop_matches_python_loop(exported, engine, steps, spacing, clamp, shift, rows):
    """Same encoder state and initial noise -> the C++ K-step loop gives the Python loop's x and x0.
    rows=1 runs the smallest shapes the export allows: one sentence, target length 1."""
    model, cfg, *_ = exported
    _, src, mask = _sources()
    if rows == 1:
        src, mask = src[2:3, :1], mask[2:3, :1]              # the length-1 sentence, unpadded: (1, 1)
    enc = model.encode(src, mask)
    lens = torch.tensor([5, 9, 1, 12])[:rows] if rows > 1 else torch.tensor([1])
    L = int(lens.max())
    tgt_mask = torch.arange(L)[None] >= lens[:, None]
    x0 = torch.randn(rows, L, cfg.model.d_latent, generator=torch.Generator().manual_seed(steps))
    grid = time_grid(steps, spacing)
    x_c, sc_c = engine.denoise(enc, x0, tgt_mask, grid, clamp=clamp, time_shift=shift)
    x_p, sc_p = x0, torch.zeros_like(x0)
    with torch.no_grad():
        for k in range(steps):
            x_p, sc_p = python_engine.denoise_step(model, x_p, sc_p, grid[k], grid[k + 1], enc, tgt_mask,
                                                   schedule=cfg.diffusion.schedule, clamp=clamp, time_shift=shift)
    _assert_close("final latents", x_c, x_p)
    _assert_close("last x0", sc_c, sc_p)
    ids_c, _ = engine.sampler.round(sc_c)
    assert torch.equal(ids_c, model.logits(sc_p).argmax(-1))


@pytest.mark.parametrize("clamp", [False, True])
def test_sampler_engine_cpp_equals_python(exported, clamp):
    """The acceptance check through the public API: Sampler(engine="cpp") == Sampler() for one seed."""
    model, cfg, out, _ = exported
    _, src, mask = _sources()
    scfg = SampleConfig(steps=4, length_beam=2, noise_draws=2, select="score", clamp=clamp, seed=11)
    py = sampling.Sampler(model, scfg, cfg.diffusion).generate(src, mask)
    cpp = sampling.Sampler(model, scfg, cfg.diffusion, engine="cpp",
                           engine_options={"export_dir": str(out)}).generate(src, mask)
    assert cpp.candidates == py.candidates
    assert cpp.ids == py.ids
    _assert_close("final latents", cpp.latents, py.latents)


@pytest.mark.parametrize("steps", [3, 4])
def test_whole_generation_in_cpp_equals_python_sampler(exported, engine, steps):
    """Exported lengths, seeded noise, the stored step table, K steps and rounding, driven from C++ (what
    the CMake example runs), against the Python sampler on the export's spacing and time shift."""
    model, cfg, _, manifest = exported
    _, src, mask = _sources()
    py = sampling.Sampler(model, _sample_cfg(manifest, cfg, steps=steps, seed=5), cfg.diffusion).generate(src, mask)
    ids, latents = engine.generate(src, mask, steps=steps, seed=5)
    assert ids == py.ids
    _assert_close("final latents", latents, py.latents)


def test_cmake_example_generates_from_an_export(exported, cmake_build):
    if cmake_build is None:
        pytest.skip("cmake is not installed")
    model, cfg, out, manifest = exported
    proc, build = cmake_build
    rc = proc.wait(timeout=900)
    log = (build / "build.log").read_text()
    assert rc == 0, f"CMake build of fastdiss_generate failed:\n{log[-4000:]}"
    sents, src, mask = _sources()
    binary = build / "fastdiss_generate"
    for clamp in (False, True):
        res = subprocess.run([str(binary), str(out), "--steps", "3", "--seed", "9", *(["--clamp"] if clamp else []),
                              *[" ".join(map(str, s)) for s in sents]], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        got = [[int(v) for v in line.split()] for line in res.stdout.splitlines()]
        scfg = _sample_cfg(manifest, cfg, steps=3, seed=9, clamp=clamp)
        assert got == sampling.Sampler(model, scfg, cfg.diffusion).generate(src, mask).ids
    bad = subprocess.run([str(binary), str(out), "3 x 4"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "not a non-negative integer" in bad.stderr
    missing = subprocess.run([str(binary), str(out), "--steps", "8", "3 4"], capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode == 1 and "K = 1, 3, 4, not K = 8" in missing.stderr
    assert "--steps-list 1,3,4,8" in missing.stderr
    fixed = subprocess.run([str(binary), str(out), "--spacing", "uniform", "3 4"], capture_output=True, text=True,
                           timeout=300)
    assert fixed.returncode == 2 and "fixed when the model is exported" in fixed.stderr


# -- errors ----------------------------------------------------------------------------------------

def test_engine_rejects_other_weights(exported):
    from fastdiss.cpp_engine import CppEngine
    _, _, out, _ = exported
    other, _ = _tiny_model(seed=99)
    with pytest.raises(ValueError, match="weights differ"):
        CppEngine(out, model=other)


def test_missing_export_is_explained(tmp_path):
    from fastdiss.cpp_engine import CppEngine
    with pytest.raises(FileNotFoundError, match="fastdiss export"):
        CppEngine(tmp_path)
    with pytest.raises(ValueError, match="export_dir"):
        sampling.Sampler(_tiny_model()[0], engine="cpp")


def test_bad_inputs_name_the_argument(exported, engine):
    _, cfg, *_ = exported
    _, src, mask = _sources()
    with pytest.raises(ValueError, match=r"src holds ids in \[.*outside the vocabulary"):
        engine.sampler.encode(torch.full_like(src, VOCAB), mask)
    with pytest.raises(TypeError, match="src must hold int64"):
        engine.sampler.encode(src.float(), mask)
    with pytest.raises(ValueError, match="src_mask must have shape"):
        engine.sampler.encode(src, mask[:, :-1])
    enc = engine.encode(src, mask)
    tgt_mask = torch.zeros(4, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="x must have shape"):
        engine.denoise(enc, torch.randn(4, 5, cfg.model.d_latent + 1), tgt_mask, time_grid(2))
    with pytest.raises(ValueError, match="tgt_mask must have shape"):
        engine.denoise(enc, torch.randn(4, 6, cfg.model.d_latent), tgt_mask, time_grid(2))
