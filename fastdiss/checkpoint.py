"""Checkpoints: one self-contained artifact per model.

A checkpoint holds the weights, the EMA weights, the full Config, the tokenizer (as its JSON
string), the model kind ('diffusion' | 'ar'), a format version and, optionally, the training
state needed for an exact resume (optimizer, step, data position, RNG states). It holds only
tensors, dicts, lists, strings and numbers, so it loads with torch.load(weights_only=True): opening
a checkpoint never runs code from the file.

Writes are atomic (fastdiss.atomic): a crash or a kill at any moment leaves either the old file or
the new one, never a torn one.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import dataclass, field

import torch

from fastdiss.atomic import write_with
from fastdiss.config import Config

FORMAT = "fastdiss-checkpoint"
FORMAT_VERSION = 2   # 2: the learning recipe (source copy, length offsets, fixed z0 norm) changed the model
KINDS = ("diffusion", "ar")


@dataclass
class Checkpoint:
    model: torch.nn.Module            # built from cfg; EMA weights if present and use_ema, else the raw weights
    cfg: Config
    tokenizer: object                 # fastdiss.data.tokenizer.Tokenizer, or None when none was saved
    kind: str
    extra: dict = field(default_factory=dict)
    path: str = ""
    weights: dict | None = None       # raw state dict (for resume)
    ema_weights: dict | None = None
    train_state: dict | None = None   # optimizer / step / data position / RNG, when saved for resume
    tokenizer_json: str | None = None
    model_args: dict = field(default_factory=dict)


def model_kind(model) -> str:
    kind = getattr(model, "kind", None)
    if kind in KINDS:
        return kind
    from fastdiss.model import Denoiser
    return "diffusion" if isinstance(model, Denoiser) else "ar"


def _tokenizer_json(tokenizer):
    if tokenizer is None or isinstance(tokenizer, str):
        return tokenizer
    if hasattr(tokenizer, "to_json_str"):
        return tokenizer.to_json_str()
    raise TypeError(f"tokenizer must be a Tokenizer (with .to_json_str()), a JSON string or None, "
                    f"got {type(tokenizer).__name__}")


def _model_args(model, kind):
    args = {"vocab_size": int(model.vocab_size), "pad_id": int(model.pad_id)}
    if kind == "ar":
        args.update(bos_id=int(model.bos_id), eos_id=int(model.eos_id))
    return args


def _cpu_state(module_or_state):
    sd = module_or_state.state_dict() if hasattr(module_or_state, "state_dict") else module_or_state
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}


def save(path, model, cfg: Config, tokenizer, extra: dict | None = None, *, ema=None, train_state=None,
         kind: str | None = None) -> None:
    """Write a checkpoint atomically. `ema`: an EMA copy of the model (module or state dict);
    `train_state`: resume state (primitives, lists, dicts and tensors only); `extra`: small
    user metadata (e.g. validation BLEU), same restriction."""
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a fastdiss.config.Config, got {type(cfg).__name__}")
    kind = kind or model_kind(model)
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "kind": kind,
        "config": cfg.to_dict(),
        "model_args": _model_args(model, kind),
        "tokenizer": _tokenizer_json(tokenizer),
        "model": _cpu_state(model),
        "ema": _cpu_state(ema) if ema is not None else None,
        "extra": dict(extra or {}),
        "train_state": train_state,
    }
    write_with(path, lambda f: torch.save(payload, f))


def build_model(kind: str, cfg: Config, model_args: dict):
    """A fresh model of the given kind (the AR class is imported lazily)."""
    if kind == "diffusion":
        from fastdiss.model import Denoiser
        return Denoiser(cfg.model, model_args["vocab_size"], model_args["pad_id"])
    if kind == "ar":
        from fastdiss.ar import ARTransformer
        return ARTransformer(cfg.model, model_args["vocab_size"], model_args["pad_id"], model_args["bos_id"],
                             model_args["eos_id"])
    raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


def _load_tokenizer(s):
    if s is None:
        return None
    from fastdiss.data.tokenizer import Tokenizer
    return Tokenizer.from_json_str(s)


REPLACE_HINT = "replace it with a good copy (copy or download it again) or retrain it with `fastdiss train`"


def _damage(path: str) -> str | None:
    """What is wrong with the bytes of a checkpoint file, in our words, or None when the zip archive
    is intact. torch.save writes a zip archive whose members carry CRC-32 checksums, so a torn, cut
    or bit-flipped file is found here before (and even when) torch.load would accept it."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        return f"cannot be read ({e.strerror or type(e).__name__})"
    if size == 0:
        return "is empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        if head == b"PK\x03\x04":  # starts like a zip archive but its directory at the end is gone
            return f"is truncated ({size} bytes; the archive stops before its end, e.g. a cut copy or download)"
        return "is not a fastdiss checkpoint (its bytes are not a PyTorch zip archive: random data or another format)"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError):
        return "is corrupted (its zip archive cannot be read)"
    if bad is not None:
        return f"is corrupted (member {bad!r} fails its CRC-32 checksum)"
    return None


def read_payload(path, map_location="cpu") -> dict:
    """torch.load(weights_only=True) with every failure turned into one ValueError in our words: the
    file, the problem and the fix. torch's own text is never shown: for a file it refuses it advises
    loading with weights_only=False, which would run code from an untrusted file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    problem = _damage(path)
    if problem is None:
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            problem = ("holds Python objects other than tensors, numbers, strings, lists and dicts; fastdiss "
                       "never writes those and does not load them (unpickling them could run code from the file)")
        except Exception:  # noqa: BLE001 (a damaged archive found by torch rather than by the CRC check)
            problem = "is corrupted or not a fastdiss checkpoint (torch cannot read its contents)"
    if problem is not None:
        raise ValueError(f"checkpoint {path!r} {problem}; {REPLACE_HINT}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a fastdiss checkpoint (no '{FORMAT}' header)")
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {path!r} has format version {version!r}; this fastdiss reads version "
                         f"{FORMAT_VERSION}: retrain it with this version (fastdiss train), or load it with the "
                         f"fastdiss release that wrote it")
    missing = [k for k in ("kind", "config", "model_args", "model") if k not in payload]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks the entries {missing}")
    return payload


def _check_same_model(path, cfg: Config, expect_cfg) -> None:
    if expect_cfg is None:
        return
    want = expect_cfg.to_dict()["model"] if isinstance(expect_cfg, Config) else dict(expect_cfg)
    have = cfg.to_dict()["model"]
    diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
    if diff:
        detail = ", ".join(f"{k}: file has {a!r}, expected {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"checkpoint {path!r} was saved with a different model config ({detail})")


def load(path, map_location="cpu", *, use_ema: bool = True, expect_cfg=None) -> Checkpoint:
    """Load a checkpoint into a fresh model. use_ema: load the EMA weights into .model when the
    file has them (what inference wants); expect_cfg: a Config (or ModelConfig dict) the file's
    model config must equal, else ValueError."""
    path = os.fspath(path)
    payload = read_payload(path, map_location)
    try:
        cfg = Config.from_dict(payload["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path!r} has an invalid config: {e}") from None
    _check_same_model(path, cfg, expect_cfg)
    kind = payload["kind"]
    if kind not in KINDS:
        raise ValueError(f"checkpoint {path!r} has unknown model kind {kind!r}; expected one of {KINDS}")
    model = build_model(kind, cfg, payload["model_args"])
    weights = payload["ema"] if (use_ema and payload.get("ema") is not None) else payload["model"]
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path!r}: its weights do not fit a {kind} model built from its config "
                         f"({str(e).splitlines()[0]} ...)") from None
    model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu")
    return Checkpoint(model=model.eval(), cfg=cfg, tokenizer=_load_tokenizer(payload.get("tokenizer")), kind=kind,
                      extra=payload.get("extra") or {}, path=path, weights=payload["model"],
                      ema_weights=payload.get("ema"), train_state=payload.get("train_state"),
                      tokenizer_json=payload.get("tokenizer"), model_args=payload["model_args"])
