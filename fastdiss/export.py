"""Export a trained denoiser for the C++ sampler: two AOTInductor packages and what the loop needs.

    fastdiss export --ckpt model.pt --out exported/ [--steps-list 1,2,4,8,16] [--spacing S] [--time-shift F]

writes into `out`:
    encoder.pt2      (src, src_mask) -> (memory, lengths, k_0, v_0, ..., k_{n-1}, v_{n-1}); lengths (B,)
                     is the top-1 predicted length, by the Sampler's own rule (lengths.predict_lengths)
    decoder.pt2      (x_t, sc, t, tgt_mask, memory, src_mask, k_0, v_0, ...) -> x0_hat
    embedding.pt     norm(E) (V, d_e): the rounding head and the clamp targets (torch.save, read by
                     torch.load in Python and torch::pickle_load in C++)
    manifest.json    schedule, noise factor, sizes, pad id, input/output order, weights fingerprint,
                     the per-step tables, the sha256 of the three files above and (from `fastdiss
                     export`) the checkpoint it was made from

The step tables: for every K in the steps list (default 1, 2, 4, 8, 16 and the checkpoint's
SampleConfig.steps), the network time per step and alpha / sigma per grid point that
python_engine.step_schedule gives for the SampleConfig's spacing and time shift. The C++ sampler
reads them instead of evaluating the schedule, so the schedule, the time grid and the length rule
exist in Python only; a K that was not exported is refused with the list of those that were.

Loading an export (load_manifest, which the C++ engine calls) verifies it: a file whose sha256
differs from the manifest's is damaged (DamagedExportError), and an export whose checkpoint now
holds other weights (training went on, or the file was replaced) is stale (StaleExportError). Both
name the file and the fix: re-run `fastdiss export`.

Why two graphs: the encoder, cross-attention K/V and length logits run once per batch; the decoder
runs K times. The DDIM update (with the optional clamp) is not in the graph: the C++ loop calls the
fused op fastdiss::ddim_step_clamp between decoder calls, so the graph stays one network call and
the step arithmetic is the same code the Python sampler uses. The decoder returns x0_hat only; the
rounding logits (x0_hat @ norm(E)^T, V columns per token) are needed once, after the last step, and
the C++ loop computes them from embedding.pt.

Why AOTInductor rather than TorchScript: torch.export captures the model as written (no scripting
restrictions, dynamic batch and lengths checked by the exporter against the declared ranges) and
AOTInductor compiles it to a shared library that C++ loads without Python. Both graphs export
cleanly, so there is no TorchScript fallback to maintain. During export the fastdiss backend is
'torch': the Triton custom ops are Python and cannot run inside a C++ program, so the graphs hold
the plain PyTorch reference ops, which Inductor then fuses itself.

The same metadata as manifest.json is stored inside decoder.pt2 (AOTInductor package metadata,
string values), so C++ reads it without a JSON parser.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from fastdiss.argtypes import step_list
from fastdiss.atomic import write_bytes, write_with

FORMAT = "fastdiss-aoti"
FORMAT_VERSION = 2   # 2: the encoder returns predicted lengths; the manifest holds the step tables
ENCODER_FILE, DECODER_FILE, EMBEDDING_FILE, MANIFEST_FILE = "encoder.pt2", "decoder.pt2", "embedding.pt", \
    "manifest.json"
MAX_BATCH = 4096   # largest batch (sentences x candidates) the exported graphs accept
DEFAULT_STEPS_LIST = (1, 2, 4, 8, 16)   # step counts with a stored table, besides SampleConfig.steps
REEXPORT = "re-run `fastdiss export --ckpt CKPT --out DIR`"


class DamagedExportError(ValueError):
    """A file of an export is missing, unreadable or differs from the sha256 in its manifest."""


class StaleExportError(ValueError):
    """The checkpoint an export was made from now holds other weights."""


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes and bytes of the state dict: ties an export to its weights, so an
    engine built from an export refuses a live model whose weights differ."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class EncoderGraph(nn.Module):
    """Denoiser.encode + the top-1 predicted length (the Sampler's rule, capped at `cap`) as one graph
    with a flat tensor output."""

    def __init__(self, model, cap: int):
        super().__init__()
        self.model = model
        self.cap = cap

    def forward(self, src, src_mask):
        from fastdiss.lengths import predict_lengths
        enc = self.model.encode(src, src_mask)
        flat = [enc.out, predict_lengths(self.model.length_logits(enc), self.cap)[:, 0]]
        for k, v in enc.cross_kv:
            flat += [k, v]
        return tuple(flat)


class DecoderGraph(nn.Module):
    """One denoiser call, x0_hat = f(x_t, sc, t, src): the body of every sampling step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x_t, sc, t, tgt_mask, memory, src_mask, cross_kv: list):
        """cross_kv = [k_0, v_0, k_1, v_1, ...]; flattened, the graph's inputs are in this order."""
        from fastdiss.model import EncoderState
        pairs = tuple((cross_kv[2 * i], cross_kv[2 * i + 1]) for i in range(len(cross_kv) // 2))
        return self.model(x_t, sc, t, EncoderState(memory, src_mask, pairs), tgt_mask)


@contextlib.contextmanager
def _export_mode():
    """Backend 'torch': no Python custom ops in the graph. (Denoiser.encode traces no id range check
    either: the C++ sampler checks the range itself before every run.)"""
    import fastdiss
    previous = fastdiss.get_backend()
    fastdiss.set_backend("torch")
    try:
        yield
    finally:
        fastdiss.set_backend(previous)


def _example_inputs(model, device, batch=3, src_len=7, tgt_len=5):
    """Inputs with distinct sizes (so the exporter does not tie unrelated dims) and some padding."""
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    src = torch.randint(0, model.vocab_size, (batch, src_len), generator=gen)
    src_mask = torch.zeros(batch, src_len, dtype=torch.bool)
    src_mask[0, src_len - 2:] = True
    x_t = torch.randn(batch, tgt_len, cfg.d_latent, generator=gen)
    sc = torch.randn(batch, tgt_len, cfg.d_latent, generator=gen)
    t = torch.rand(batch, tgt_len, generator=gen)
    tgt_mask = torch.zeros(batch, tgt_len, dtype=torch.bool)
    tgt_mask[1, tgt_len - 1:] = True
    return [x.to(device) for x in (src, src_mask, x_t, sc, t, tgt_mask)]


def export_programs(model, device=None, length_cap: int | None = None):
    """(encoder ExportedProgram, decoder ExportedProgram) with dynamic batch, source and target length;
    the encoder predicts lengths up to length_cap (default: the model's max_len)."""
    from torch.export import Dim

    device = torch.device(device or next(model.parameters()).device)
    max_len = model.cfg.max_len
    batch = Dim("batch", min=1, max=MAX_BATCH)
    src_len = Dim("src_len", min=1, max=max_len)
    tgt_len = Dim("tgt_len", min=1, max=max_len)
    src, src_mask, x_t, sc, t, tgt_mask = _example_inputs(model, device)
    encoder = EncoderGraph(model, length_cap or max_len)
    with _export_mode(), torch.no_grad():
        enc_prog = torch.export.export(encoder, (src, src_mask),
                                       dynamic_shapes=({0: batch, 1: src_len}, {0: batch, 1: src_len}))
        enc_out = encoder(src, src_mask)
        # contiguous examples: the compiled decoder assumes the layout of its example inputs, and the
        # C++ loop passes contiguous tensors
        memory, cross = enc_out[0].contiguous(), [c.contiguous() for c in enc_out[2:]]
        kv_shape = {0: batch, 2: src_len}
        dec_args = (x_t, sc, t, tgt_mask, memory, src_mask, cross)
        dec_shapes = ({0: batch, 1: tgt_len}, {0: batch, 1: tgt_len}, {0: batch, 1: tgt_len},
                      {0: batch, 1: tgt_len}, {0: batch, 1: src_len}, {0: batch, 1: src_len},
                      [kv_shape] * len(cross))
        dec_prog = torch.export.export(DecoderGraph(model), dec_args, dynamic_shapes=dec_shapes)
    return enc_prog, dec_prog


def _compile(program, path: Path, metadata: dict | None = None) -> None:
    """AOTInductor package at `path` (metadata: string values), written to a temporary name first so a
    crash leaves no torn file."""
    configs = {"aot_inductor.metadata": metadata} if metadata else {}
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.pt2")
    try:
        with _export_mode():
            torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=configs)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def step_tables(schedule: str, spacing: str, time_shift: float, steps_list) -> dict:
    """{"K": {"t_net": [K floats], "alpha": [K+1], "sigma": [K+1]}}: python_engine.step_schedule's float32
    values as Python floats, which JSON and the decoder metadata write in a form that reads back exactly."""
    from fastdiss.python_engine import step_schedule
    from fastdiss.schedule import time_grid
    tables = {}
    for k in steps_list:
        t_net, alpha, sigma = step_schedule(time_grid(k, spacing), schedule, time_shift)
        tables[str(k)] = {"t_net": t_net.tolist(), "alpha": alpha.tolist(), "sigma": sigma.tolist()}
    return tables


def _steps_list(steps_list, default_steps: int) -> list:
    """Sorted distinct positive step counts, always including the default."""
    steps = set(DEFAULT_STEPS_LIST if steps_list is None else steps_list) | {default_steps}
    if any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
        raise ValueError(f"steps_list must hold positive integers, got {sorted(steps, key=str)}")
    return sorted(steps)


def manifest_for(model, diffusion_cfg, sample_cfg=None, device="cpu", steps_list=None) -> dict:
    """Everything a loop needs besides the graphs. Values are primitives (decoder_metadata stores them
    as strings in decoder.pt2 for C++)."""
    from fastdiss.config import SampleConfig
    from fastdiss.lengths import length_cap

    cfg = model.cfg
    sample_cfg = sample_cfg or SampleConfig()   # the Sampler's defaults
    steps = _steps_list(steps_list, int(sample_cfg.steps))
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch": torch.__version__,
        "device": str(torch.device(device).type),
        "schedule": diffusion_cfg.schedule,
        "noise_factor": float(diffusion_cfg.noise_factor),
        "d_latent": int(cfg.d_latent),
        "d_model": int(cfg.d_model),
        "n_dec": int(cfg.n_dec),
        "max_len": int(cfg.max_len),
        "vocab_size": int(model.vocab_size),
        "pad_id": int(model.pad_id),
        "max_batch": MAX_BATCH,
        "length_cap": length_cap(model, sample_cfg),
        "default_steps": int(sample_cfg.steps),
        "default_clamp": int(bool(sample_cfg.clamp)),
        "spacing": sample_cfg.spacing,
        "time_shift": float(sample_cfg.time_shift),
        "steps_list": steps,
        "step_tables": step_tables(diffusion_cfg.schedule, sample_cfg.spacing, float(sample_cfg.time_shift), steps),
        "weights_sha256": weights_fingerprint(model),
        "encoder_outputs": "memory,lengths," + ",".join(f"k{i},v{i}" for i in range(cfg.n_dec)),
        "decoder_inputs": "x_t,sc,t,tgt_mask,memory,src_mask," + ",".join(f"k{i},v{i}" for i in range(cfg.n_dec)),
    }


def decoder_metadata(manifest: dict) -> dict:
    """The manifest as the flat string map C++ reads from decoder.pt2 (no JSON parser there): lists
    comma-separated, each step table as t_net_K, alpha_K, sigma_K."""
    def text(v):
        return ",".join(map(repr, v)) if isinstance(v, list) else str(v)
    flat = {k: text(v) for k, v in manifest.items() if k != "step_tables"}
    for k, table in manifest["step_tables"].items():
        flat.update({f"{name}_{k}": text(values) for name, values in table.items()})
    return flat


def export_denoiser(model, diffusion_cfg, out_dir, sample_cfg=None, device=None, verbose: bool = False,
                    source: dict | None = None, steps_list=None) -> dict:
    """Export a live Denoiser (see the module docstring); returns the manifest. source: the checkpoint
    it comes from ({"path", "sha256", "bytes", "mtime_ns"}), recorded so a stale export is found.
    steps_list: step counts to store tables for (default DEFAULT_STEPS_LIST; sample_cfg.steps always)."""
    from fastdiss.config import DiffusionConfig
    from fastdiss.model import Denoiser

    if not isinstance(model, Denoiser):
        raise TypeError(f"model must be a fastdiss.model.Denoiser, got {type(model).__name__}")
    if not isinstance(diffusion_cfg, DiffusionConfig):
        raise TypeError(f"diffusion_cfg must be a fastdiss.config.DiffusionConfig, got {type(diffusion_cfg).__name__}")
    device = torch.device(device or next(model.parameters()).device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        manifest = manifest_for(model, diffusion_cfg, sample_cfg, device, steps_list)
        t0 = time.perf_counter()
        enc_prog, dec_prog = export_programs(model, device, manifest["length_cap"])
        if verbose:
            print(f"[export] torch.export: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for prog, name, meta in ((enc_prog, ENCODER_FILE, None), (dec_prog, DECODER_FILE, decoder_metadata(manifest))):
            t0 = time.perf_counter()
            _compile(prog, out / name, meta)
            if verbose:
                print(f"[export] AOTInductor {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        with torch.no_grad(), _export_mode():
            emb = model.target_embeddings().detach().to("cpu").contiguous().clone()
        write_with(out / EMBEDDING_FILE, lambda f: torch.save(emb, f))
        manifest = {**manifest, "files": {name: {"sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
                                          for name in (ENCODER_FILE, DECODER_FILE, EMBEDDING_FILE)}}
        if source is not None:
            manifest["checkpoint"] = dict(source)
        text = json.dumps(manifest, indent=1) + "\n"
        write_bytes(out / MANIFEST_FILE, text.encode())
    finally:
        model.train(was_training)
    return manifest


def export_model(ckpt_path, out_dir, device: str = "cpu", verbose: bool = False, steps_list=None,
                 spacing: str | None = None, time_shift: float | None = None) -> dict:
    """`fastdiss export`: load a diffusion checkpoint (EMA weights when saved) and export it. The step
    tables use the checkpoint's SampleConfig spacing and time shift unless given here."""
    import dataclasses

    from fastdiss import checkpoint

    ck = checkpoint.load(ckpt_path, map_location=device)
    if ck.kind != "diffusion":
        raise ValueError(f"checkpoint {os.fspath(ckpt_path)!r} holds a {ck.kind!r} model; only diffusion "
                         f"models can be exported for the C++ sampler")
    st = os.stat(ckpt_path)
    source = {"path": os.path.abspath(ckpt_path), "sha256": file_sha256(ckpt_path), "bytes": st.st_size,
              "mtime_ns": st.st_mtime_ns}
    sample_cfg = ck.cfg.sample
    if spacing is not None:
        sample_cfg = dataclasses.replace(sample_cfg, spacing=spacing)
    if time_shift is not None:
        sample_cfg = dataclasses.replace(sample_cfg, time_shift=time_shift)
    return export_denoiser(ck.model, ck.cfg.diffusion, out_dir, sample_cfg=sample_cfg, device=device,
                           verbose=verbose, source=source, steps_list=steps_list)


def load_manifest(export_dir, verify: bool = True) -> dict:
    """The manifest of an export, checked for format and completeness; with verify, also that every
    file has the sha256 recorded at export time (else DamagedExportError) and that the checkpoint it
    was made from, when it still exists, holds the exported weights (else StaleExportError)."""
    d = Path(export_dir)
    path = d / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{os.fspath(d)!r} is not a fastdiss export (no {MANIFEST_FILE}); "
                                f"create one with `fastdiss export --ckpt CKPT --out DIR`")
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedExportError(f"{os.fspath(path)!r} is damaged (not a readable JSON manifest: "
                                 f"{type(e).__name__}); re-run `fastdiss export --ckpt CKPT --out "
                                 f"{os.fspath(d)}`") from None
    if not isinstance(manifest, dict):
        raise DamagedExportError(f"{os.fspath(path)!r} is damaged (not a JSON object); re-run `fastdiss export`")
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{os.fspath(path)!r} has format {manifest.get('format')!r} version "
                         f"{manifest.get('format_version')!r}; expected {FORMAT!r} version {FORMAT_VERSION} "
                         f"(made by an older fastdiss: {REEXPORT})")
    missing = [f for f in (ENCODER_FILE, DECODER_FILE, EMBEDDING_FILE) if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(f"export {os.fspath(d)!r} lacks {missing}; re-run `fastdiss export`")
    if verify:
        _verify_files(d, manifest)
        _check_not_stale(d, manifest)
    return manifest


def _verify_files(d: Path, manifest: dict) -> None:
    """Every file listed in the manifest has the recorded size and sha256 (exports made before the
    manifest listed its files are not checked)."""
    for name, rec in (manifest.get("files") or {}).items():
        f = d / name
        try:
            ok = f.stat().st_size == rec["bytes"] and file_sha256(f) == rec["sha256"]
        except (OSError, KeyError, TypeError):
            ok = False
        if not ok:
            raise DamagedExportError(f"{os.fspath(f)!r} is damaged: its size or sha256 differs from the one "
                                     f"`fastdiss export` recorded in {MANIFEST_FILE}; re-run `fastdiss export "
                                     f"--ckpt CKPT --out {os.fspath(d)}`")


def _check_not_stale(d: Path, manifest: dict) -> None:
    """The export's checkpoint, if it still exists, holds the exported weights. Cheap when the file is
    unchanged (size and mtime); its sha256 next; only a changed file is loaded and fingerprinted (so a
    copy or a re-save of the same weights is not stale)."""
    src = manifest.get("checkpoint")
    if not isinstance(src, dict) or not src.get("path") or not os.path.isfile(src["path"]):
        return
    ckpt_path = src["path"]
    st = os.stat(ckpt_path)
    if st.st_size == src.get("bytes") and st.st_mtime_ns == src.get("mtime_ns"):
        return
    if file_sha256(ckpt_path) == src.get("sha256"):
        return
    from fastdiss import checkpoint
    try:
        ck = checkpoint.load(ckpt_path)
    except (ValueError, OSError):
        return   # a damaged checkpoint does not make the export wrong; loading it will say what is wrong
    if weights_fingerprint(ck.model) != manifest.get("weights_sha256"):
        raise StaleExportError(f"export {os.fspath(d)!r} is stale: it was made from {ckpt_path!r}, which now holds "
                               f"other weights (training went on or the file was replaced); re-run `fastdiss "
                               f"export --ckpt {ckpt_path} --out {os.fspath(d)}`")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from fastdiss.config import SPACINGS

    parser.add_argument("--ckpt", required=True, help="diffusion checkpoint (fastdiss.checkpoint format)")
    parser.add_argument("--out", required=True, help="output folder for encoder.pt2, decoder.pt2, ...")
    parser.add_argument("--device", default="cpu", help="device the packages are compiled for (cpu | cuda)")
    parser.add_argument("--steps-list", type=step_list, default=None,
                        help="step counts K the C++ sampler can run, comma-separated (default: "
                             f"{','.join(map(str, DEFAULT_STEPS_LIST))}, plus the checkpoint's sample steps)")
    parser.add_argument("--spacing", default=None, choices=SPACINGS,
                        help="time spacing of the step tables (default: the checkpoint's sample config)")
    parser.add_argument("--time-shift", type=float, default=None,
                        help="network time shift of the step tables (default: the checkpoint's sample config)")
    return parser


def run(args) -> int:
    manifest = export_model(args.ckpt, args.out, device=args.device, verbose=True, steps_list=args.steps_list,
                            spacing=args.spacing, time_shift=args.time_shift)
    print(f"exported {args.ckpt} -> {args.out} (schedule {manifest['schedule']}, d_latent {manifest['d_latent']}, "
          f"vocab {manifest['vocab_size']}, steps {','.join(map(str, manifest['steps_list']))}, "
          f"{manifest['spacing']} spacing, time shift {manifest['time_shift']})")
    return 0


def main(argv=None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="fastdiss export", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
