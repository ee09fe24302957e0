"""Shipped models: trained weights that come with the package, so `make demo`, `fastdiss generate`
and `fastdiss evaluate` show real translations without training first.

A shipped model is a folder under fastdiss/pretrained/ (or anywhere, given by path):

    model.safetensors   the weights (fp16 to stay small; upcast to fp32 on load). safetensors holds
                        raw tensors only: loading never runs code from the file, and it memory-maps.
    config.json         {"format", "version", "fastdiss_version", "kind", "config", "model_args",
                         "sha256": {file: digest}}
    tokenizer.json      the tokenizer
    provenance.json     how it was made: command, git commit, steps, hours, machine, validation BLEU

Every file's sha256 is checked on load: a damaged or edited file fails with one clear error that
names the file and the fix, as does a folder written for another format version.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from fastdiss.atomic import write_bytes
from fastdiss.checkpoint import KINDS, Checkpoint, build_model
from fastdiss.config import Config

FORMAT = "fastdiss-pretrained"
FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).with_name("pretrained")
DEFAULT_MODEL = "elb2web-tiny"       # the diffusion model `make demo` and the CLI use without --ckpt
DEFAULT_AR = "elb2web-tiny-ar"       # its autoregressive peer of the same size and budget
FILES = ("model.safetensors", "tokenizer.json")
REBUILD_HINT = ("reinstall fastdiss (git checkout -- fastdiss/pretrained; pip install -e .) or rebuild the "
                "model with `fastdiss demo --retrain`")


class PretrainedError(ValueError):
    """A shipped model that cannot be used as it is (missing, damaged, another version)."""


def shipped_path(name: str = DEFAULT_MODEL) -> Path:
    return SHIPPED_DIR / name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_pretrained(ck: Checkpoint, out_dir: str | os.PathLike, provenance: dict, dtype=torch.float16) -> Path:
    """Write a loaded checkpoint (its EMA weights when it has them) as a shipped-model folder."""
    from safetensors.torch import save as st_save

    import fastdiss
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in ck.model.state_dict().items()}
    write_bytes(out / "model.safetensors", st_save(state, metadata={"format": FORMAT}))
    write_bytes(out / "tokenizer.json", ck.tokenizer.to_json_str().encode())
    write_bytes(out / "provenance.json", (json.dumps(provenance, indent=1, sort_keys=True) + "\n").encode())
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "fastdiss_version": fastdiss.__version__, "kind": ck.kind,
            "config": ck.cfg.to_dict(), "model_args": ck.model_args,
            "sha256": {name: _sha256(out / name) for name in FILES}}
    write_bytes(out / "config.json", (json.dumps(meta, indent=1) + "\n").encode())
    return out


def read_meta(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise PretrainedError(f"{folder}: no config.json, not a fastdiss model folder; {REBUILD_HINT}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: unreadable ({type(e).__name__}); {REBUILD_HINT}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PretrainedError(f"{path}: not a fastdiss shipped-model config; {REBUILD_HINT}")
    if meta.get("version") != FORMAT_VERSION:
        raise PretrainedError(f"{folder}: written for shipped-model format version {meta.get('version')!r} "
                              f"(fastdiss {meta.get('fastdiss_version')}); this fastdiss reads version "
                              f"{FORMAT_VERSION}: {REBUILD_HINT}")
    return meta


def load_pretrained(folder: str | os.PathLike = None, device="cpu") -> Checkpoint:
    """A shipped model as a Checkpoint (model in fp32 on `device`, eval mode), checksums verified."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from fastdiss.data.tokenizer import Tokenizer
    folder = Path(folder) if folder is not None else shipped_path()
    if not folder.is_dir():
        raise PretrainedError(f"{folder}: no shipped model there; {REBUILD_HINT}")
    meta = read_meta(folder)
    for name in FILES:
        path = folder / name
        want = meta.get("sha256", {}).get(name)
        if not path.is_file():
            raise PretrainedError(f"{path}: missing; {REBUILD_HINT}")
        if want is None or _sha256(path) != want:
            raise PretrainedError(f"{path}: damaged (its sha256 differs from config.json); {REBUILD_HINT}")
    try:
        cfg = Config.from_dict(meta["config"])
        kind = meta["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        model = build_model(kind, cfg, meta["model_args"])
        state = load_file(str(folder / "model.safetensors"))
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        tokenizer = Tokenizer.from_json_str((folder / "tokenizer.json").read_text(encoding="utf-8"))
    except (KeyError, TypeError, ValueError, RuntimeError, SafetensorError) as e:
        raise PretrainedError(f"{folder}: does not fit this fastdiss ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); {REBUILD_HINT}") from None
    provenance = {}
    if (folder / "provenance.json").is_file():
        provenance = json.loads((folder / "provenance.json").read_text(encoding="utf-8"))
    return Checkpoint(model=model.to(device).eval(), cfg=cfg, tokenizer=tokenizer, kind=kind,
                      extra={"provenance": provenance}, path=str(folder), model_args=meta["model_args"],
                      tokenizer_json=None)
