"""Sequence-level knowledge distillation (Kim & Rush 2016): an AR teacher's beam-search outputs
replace the references of the training data. Non-autoregressive and diffusion translation models
learn much faster from these simpler, more deterministic targets; every ancestor of FastDiSS
(Difformer, DINOISER, DiffuSeq on MT) trains on distilled data.

    fastdiss distill --ckpt runs/elb2web-ar/best.pt --task elb2web --out runs/elb2web.distilled.tsv
    fastdiss train --train runs/elb2web.distilled.tsv --valid ... --out runs/student

The output is a TSV (source<TAB>teacher output), written atomically; sources the teacher cannot
read (longer than its max_len) keep their reference, and the count is reported.
"""
from __future__ import annotations


def distill_pairs(teacher, tokenizer, pairs: list, *, beam: int = 4, batch_size: int = 64, device="cpu",
                  progress: bool = True) -> tuple[list, int]:
    """[(src, teacher_output)] for [(src, ref)] pairs; returns (pairs, n_kept_reference). The teacher
    generates through fastdiss.evaluate (its AR length cap), like every evaluation of an AR model."""
    from fastdiss.evaluate import generate
    from fastdiss.longjobs import JobProgress
    src_ids = tokenizer.encode_batch([s for s, _ in pairs])
    out = [ref for _, ref in pairs]
    usable = [i for i, s in enumerate(src_ids) if 0 < len(s) <= teacher.max_len]
    if usable:
        bar = JobProgress(f"distill (beam {beam})", len(usable), None, show=progress)
        res = generate(teacher, "ar", [src_ids[i] for i in usable], beam=beam, batch_size=batch_size, device=device,
                       progress=bar)
        for i, ids in zip(usable, res.ids):
            text = tokenizer.decode(ids).strip()
            if text:                     # an empty output would be an unusable pair: keep the reference
                out[i] = text
    return [(s, o) for (s, _), o in zip(pairs, out)], len(pairs) - len(usable)


def write_tsv(pairs: list, path: str) -> None:
    """Atomic write (fastdiss.atomic): a killed run leaves no half file."""
    from fastdiss.atomic import write_bytes
    write_bytes(path, "".join(f"{_one_line(s)}\t{_one_line(t)}\n" for s, t in pairs).encode("utf-8"))


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())
