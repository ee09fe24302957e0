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

import torch


def distill_pairs(teacher, tokenizer, pairs: list, *, beam: int = 4, batch_size: int = 64, device="cpu",
                  progress: bool = True) -> tuple[list, int]:
    """[(src, teacher_output)] for [(src, ref)] pairs; returns (pairs, n_kept_reference)."""
    from tqdm.auto import tqdm

    from fastdiss.sampling import pad_batch
    max_len = teacher.max_len
    src_ids = tokenizer.encode_batch([s for s, _ in pairs])
    out = [ref for _, ref in pairs]
    usable = [i for i, s in enumerate(src_ids) if 0 < len(s) <= max_len]
    order = sorted(usable, key=lambda i: len(src_ids[i]))
    teacher = teacher.to(device).eval()
    with torch.no_grad(), tqdm(total=len(order), desc=f"distill (beam {beam})", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            src, mask = pad_batch([src_ids[i] for i in idx], teacher.pad_id, device)
            cap = min(max_len, 2 * src.shape[1] + 10)
            for i, ids in zip(idx, teacher.generate(src, mask, beam=beam, max_len=cap)):
                text = tokenizer.decode(ids).strip()
                if text:                     # an empty output would be an unusable pair: keep the reference
                    out[i] = text
            bar.update(len(idx))
    return [(s, o) for (s, _), o in zip(pairs, out)], len(pairs) - len(usable)


def write_tsv(pairs: list, path: str) -> None:
    """Atomic write (fastdiss.atomic): a killed run leaves no half file."""
    from fastdiss.atomic import write_bytes
    write_bytes(path, "".join(f"{_one_line(s)}\t{_one_line(t)}\n" for s, t in pairs).encode("utf-8"))


def _one_line(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())
