"""`fastdiss distill`: an AR teacher's beam outputs replace the references; the TSV is what the
teacher's own beam search gives for each source, written atomically; bad teachers are refused."""
import pytest
import torch

from fastdiss import cli, distill
from fastdiss.checkpoint import load
from fastdiss.data.loader import read_pairs
from fastdiss.sampling import pad_batch

PAIRS = [("thou shalt not kill", "you shall not kill"), ("ye have said unto them", "you have said to them"),
         ("the lord god spake unto moses", "the lord god spoke to moses"), ("and it was light", "and there was light")]


def _train(tmp_path, kind):
    data = tmp_path / "train.tsv"
    data.write_text("".join(f"{s}\t{t}\n" for s, t in PAIRS * 10))
    out = tmp_path / f"run-{kind}"
    argv = ["train", "--train", str(data), "--valid", str(data), "--preset", "tiny", "--kind", kind, "--max-steps", "3",
            "--vocab-size", "300", "--max-tokens", "256", "--out", str(out), "--quiet", "--device", "cpu"]
    assert cli.main(argv) == 0
    return out / "last.pt", data


def test_distilled_targets_are_the_teachers_beam_outputs(tmp_path, capsys):
    ckpt, data = _train(tmp_path, "ar")
    out = tmp_path / "distilled.tsv"
    capsys.readouterr()
    # batch size 1: each source decoded alone, exactly as the reference loop below does it
    assert cli.main(["distill", "--ckpt", str(ckpt), "--data", str(data), "--out", str(out), "--beam", "3",
                     "--batch-size", "1", "--quiet"]) == 0
    got = list(read_pairs(str(out)))
    assert [s for s, _ in got] == [s for s, _ in PAIRS * 10]
    ck = load(str(ckpt))
    tok, model = ck.tokenizer, ck.model
    for (src, tgt), (ref_src, ref_tgt) in zip(got[:4], PAIRS):
        ids, mask = pad_batch([tok.encode(src)], model.pad_id)
        with torch.no_grad():
            beam = model.generate(ids, mask, beam=3, max_len=min(model.max_len, 2 * ids.shape[1] + 10))[0]
        expected = " ".join(tok.decode(beam).split()) or ref_tgt   # empty outputs keep the reference
        assert tgt == expected
    assert "wrote 40 distilled pairs" in capsys.readouterr().err


def test_a_diffusion_teacher_is_refused_in_one_line(tmp_path, capsys):
    ckpt, data = _train(tmp_path, "diffusion")
    capsys.readouterr()
    rc = cli.main(["distill", "--ckpt", str(ckpt), "--data", str(data), "--out", str(tmp_path / "x.tsv")])
    err = capsys.readouterr().err
    assert rc == 2 and "must be an autoregressive checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.tsv").exists()


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.tsv"
    target.write_text("old\tcontent\n")

    def boom(*a, **k):
        raise OSError("disk full")
    from fastdiss import atomic
    monkeypatch.setattr(atomic.os, "fsync", boom)
    with pytest.raises(OSError):
        distill.write_tsv([("a", "b")], str(target))
    assert target.read_text() == "old\tcontent\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tsv"]
