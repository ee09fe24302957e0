"""Configuration: model, diffusion objective, training and sampling settings.

The whole Config is saved inside every checkpoint (Config.to_dict) and read back strictly
(Config.from_dict): an unknown key is an error, so a typo in a config file or a checkpoint from
another version never passes silently. Every "ours" choice of docs/method.md is a setting here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

from fastdiss.schedule import SCHEDULES

SCP_MODES = ("step-gap", "uniform", "gaussian")
MANS_MEASURES = ("distance", "prob")
MANS_SOURCES = ("separate", "scp")
LR_DECAYS = ("inverse-sqrt", "cosine", "constant")
AMP_DTYPES = ("bf16", "fp16", "fp32")
SPACINGS = ("uniform", "quadratic", "sqrt")
SELECTIONS = ("mbr", "score")
SRC_COPIES = ("none", "uniform", "soft")


def _check_choice(section: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{section}.{name} must be one of {choices}, got {value!r}")


def _check_positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ValueError(f"{section}.{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check_prob(section: str, name: str, value) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{section}.{name} must lie in [0, 1], got {value!r}")


@dataclass
class ModelConfig:
    """Encoder-decoder Transformer sizes (shared by the diffusion denoiser and the AR baseline)."""
    d_model: int = 512
    n_enc: int = 6
    n_dec: int = 6
    n_heads: int = 8
    d_ff: int = 2048
    d_latent: int = 128          # d_e: dimension of the target embedding space the diffusion runs in
    max_len: int = 256           # longest source / target sequence (positions; length classes 0..max_len)
    dropout: float = 0.1
    # How the decoder input sees the source before any attention (docs/method.md 1b): "uniform"
    # copies the encoder output of source position floor(j * Ls / Lt) to target position j (the
    # uniform copy of non-autoregressive translation), "soft" mixes encoder outputs with weights
    # softmax(-|i - j Ls / Lt| / tau) (tau learnt), "none" leaves position + time only.
    src_copy: str = "uniform"
    # One embedding table for source and target tokens: the encoder reads E (V, d_e) through a
    # learnt d_e -> d_model projection (Difformer shares its embeddings). Needs one joint vocabulary.
    share_embeddings: bool = False
    # Target length predicted as an offset from the source length (classes -max_len..max_len),
    # not as an absolute length from the pooled encoder.
    length_offset: bool = True
    # False: z0 = LayerNorm(E[y]) without a learnt scale and shift, so the signal-to-noise ratio of
    # x_t cannot drift upwards during training (a learnt LayerNorm weight grew 1.0 -> 1.14 in 400 steps).
    latent_norm_affine: bool = False
    # Balanced decoder input (ours): x_t is divided by its per-token RMS before the input projection
    # (with noise factor 4, pure noise is 4x the scale of z0 and drowns the source copy at the
    # start of training), and the copy projection starts at unit gain instead of std 0.02.
    # False keeps the layout of models trained before it.
    balanced_input: bool = False
    # True: attention / LayerNorm / projections go through fastdiss.functional, which follows
    # fastdiss.set_backend (Triton on CUDA by default). False: plain PyTorch ops (eager baseline).
    use_kernels: bool = True

    def __post_init__(self):
        for name in ("d_model", "n_enc", "n_dec", "n_heads", "d_ff", "d_latent", "max_len"):
            _check_positive("model", name, getattr(self, name))
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must lie in [0, 1), got {self.dropout!r}")
        _check_choice("model", "src_copy", self.src_copy, SRC_COPIES)


@dataclass
class DiffusionConfig:
    """The training objective (docs/method.md sections 1, 3, 4). scp=False and mans=False give plain
    self-conditioned embedding diffusion (the "standard diffusion" baseline)."""
    schedule: str = "sqrt"
    # F in x_t = alpha z0 + sigma F eps. 4 (Difformer's setting): with F = 1 the nearest embedding of
    # x_t at t = 0.5 still gives 94% of the tokens away, so training teaches denoising, not translation.
    noise_factor: float = 4.0
    t_min: float = 0.0           # training times t ~ U(t_min, 1): clip the smallest noise levels (DINOISER)
    self_cond_prob: float = 0.5  # probability that a batch trains with a self-conditioning signal
    # Self-Conditioning Perturbation: the no-grad self-conditioning pass runs at t' = min(1, t + Delta).
    scp: bool = True
    scp_mode: str = "step-gap"   # step-gap: Delta = 1/K, K ~ U{1..scp_k_max}; uniform: Delta ~ U(0, scp_delta_max);
    #                              gaussian: pass at t, then sc += N(0, scp_noise_std^2)
    scp_prob: float = 1.0        # probability that a self-conditioned batch uses the perturbed pass
    scp_k_max: int = 10
    scp_delta_max: float = 0.2
    scp_noise_std: float = 0.3
    scp_fresh_eps: bool = False  # False: x_t' reuses the eps of x_t (the deterministic DDIM path)
    # Model-Aware Noise Scaling: t_i = t + (1 - t) * s_max * r_i, r_i from each token's confidence.
    mans: bool = True
    mans_measure: str = "distance"   # distance: d_i = ||x0_hat_i - z0_i||^2 / d_e; prob: softmax(logits_i)[y_i]
    mans_d_lo: float = 0.1           # d_i <= d_lo: fully confident (r = 1)
    mans_d_hi: float = 1.0           # d_i >= d_hi: not confident (r = 0)
    mans_a_lo: float = 0.5           # p_i <= a_lo: r = 0
    mans_a_hi: float = 0.99          # p_i >= a_hi: r = 1
    mans_s_max: float = 0.5
    mans_source: str = "separate"    # separate: own no-grad pass at t; scp: reuse the SCP pass's prediction
    # Glancing self-conditioning (ours, after GLAT): in a self-conditioned batch, a fraction
    # glance_ratio of the tokens the no-grad pass got wrong are replaced in sc by their true z0, so
    # the trained pass learns to finish a partly right draft (what sampling steps 2..K see). 0 = off.
    glance_ratio: float = 0.0
    # Rounded self-conditioning (ours, after SUNDAE/CMLM): the no-grad draft is snapped to its nearest
    # target embeddings before it enters the trained pass, so the model learns to repair a committed
    # draft (repeated or missing words) instead of a blurred average; sample with sample.clamp = True.
    round_self_cond: bool = False
    mse_weight: float = 1.0
    ce_weight: float = 1.0
    length_weight: float = 0.1

    def __post_init__(self):
        s = "diffusion"
        _check_choice(s, "schedule", self.schedule, SCHEDULES)
        _check_choice(s, "scp_mode", self.scp_mode, SCP_MODES)
        _check_choice(s, "mans_measure", self.mans_measure, MANS_MEASURES)
        _check_choice(s, "mans_source", self.mans_source, MANS_SOURCES)
        _check_positive(s, "noise_factor", self.noise_factor)
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"diffusion.t_min must lie in [0, 1), got {self.t_min!r}")
        for name in ("self_cond_prob", "scp_prob", "mans_s_max", "glance_ratio"):
            _check_prob(s, name, getattr(self, name))
        _check_positive(s, "scp_k_max", self.scp_k_max)
        _check_positive(s, "scp_delta_max", self.scp_delta_max, allow_zero=True)
        _check_positive(s, "scp_noise_std", self.scp_noise_std, allow_zero=True)
        if not self.mans_d_lo < self.mans_d_hi:
            raise ValueError(f"diffusion.mans_d_lo ({self.mans_d_lo}) must be < mans_d_hi ({self.mans_d_hi})")
        if not self.mans_a_lo < self.mans_a_hi:
            raise ValueError(f"diffusion.mans_a_lo ({self.mans_a_lo}) must be < mans_a_hi ({self.mans_a_hi})")
        for name in ("mse_weight", "ce_weight", "length_weight"):
            _check_positive(s, name, getattr(self, name), allow_zero=True)


@dataclass
class TrainConfig:
    lr: float = 5e-4
    warmup: int = 4000
    decay: str = "inverse-sqrt"
    min_lr_ratio: float = 0.0    # cosine decays to lr * min_lr_ratio
    max_steps: int = 100_000
    max_tokens: int = 4096       # per batch (per process), source + target tokens of the longest pair x rows
    clip: float = 1.0            # gradient-norm clipping; 0 = off
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.98)
    ema_decay: float = 0.9999    # 0 = no EMA
    amp: str = "bf16"            # autocast dtype on GPU (CPU always trains in fp32)
    eval_every: int = 1000
    eval_steps: int = 4          # sampling steps of the validation BLEU (the few-step setting we care about)
    eval_sentences: int = 500    # validation subset size (0 = all)
    save_every: int = 1000       # "last" checkpoint every N steps (also written at every eval and at the end)
    max_bad_steps: int = 20      # stop after this many consecutive non-finite losses / gradients
    log_every: int = 50
    seed: int = 0
    # path of a trained AR checkpoint of the same size whose encoder and decoder layers start a fresh
    # diffusion run (fastdiss/transfer.py); "" = random initialisation
    init_from: str = ""

    def __post_init__(self):
        s = "train"
        self.betas = tuple(self.betas)
        _check_choice(s, "decay", self.decay, LR_DECAYS)
        _check_choice(s, "amp", self.amp, AMP_DTYPES)
        _check_positive(s, "lr", self.lr)
        for name in ("warmup", "clip", "weight_decay", "ema_decay", "eval_sentences", "min_lr_ratio"):
            _check_positive(s, name, getattr(self, name), allow_zero=True)
        for name in ("max_steps", "max_tokens", "eval_every", "eval_steps", "save_every", "max_bad_steps",
                     "log_every"):
            _check_positive(s, name, getattr(self, name))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay!r}")


@dataclass
class SampleConfig:
    steps: int = 4
    # time grid of the K steps; "quadratic" puts more of them near t = 0. Chosen on kjv2web validation
    # data (tiny preset, 800 steps, K = 4, 2 seeds): 21.4 / 18.3 BLEU against 18.4 / 16.6 for uniform.
    spacing: str = "quadratic"
    clamp: bool = False          # snap x0_hat to the nearest embedding (argmax, re-embed) at every step
    length_beam: int = 3         # top-b predicted lengths
    noise_draws: int = 1         # noise samples per length
    # how one of the length_beam x noise_draws candidates is chosen: score (mean token log-prob) or mbr
    # (mutual BLEU). Measured on the copy task of tests/test_learning.py with the current recipe, 3 lengths:
    # score 100 BLEU, mbr 18 (it picks a neighbouring length); single candidate 100.
    select: str = "score"
    # network time t_net = t + time_shift * (1 - t); 1 = DINOISER's condition-enhanced sampling
    # (measured: +5-9 BLEU at K = 4 on kjv2web); 0 feeds the true time.
    time_shift: float = 1.0
    max_len: int = 0             # cap on generated length (0 = the model's max_len)
    seed: int = 0

    def __post_init__(self):
        s = "sample"
        _check_positive(s, "steps", self.steps)
        _check_choice(s, "spacing", self.spacing, SPACINGS)
        _check_choice(s, "select", self.select, SELECTIONS)
        _check_positive(s, "length_beam", self.length_beam)
        _check_positive(s, "noise_draws", self.noise_draws)
        _check_prob(s, "time_shift", self.time_shift)
        _check_positive(s, "max_len", self.max_len, allow_zero=True)


_SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig, "sample": SampleConfig}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def to_dict(self) -> dict:
        """Plain nested dict of primitives (safe for torch.load(weights_only=True) and JSON)."""
        out = {}
        for name in _SECTIONS:
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Inverse of to_dict. Missing keys take defaults; unknown keys raise ValueError naming them."""
        if not isinstance(d, dict):
            raise TypeError(f"Config.from_dict expects a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section(s) {unknown}; expected a subset of {list(_SECTIONS)}")
        parts = {}
        for name, klass in _SECTIONS.items():
            sub = d.get(name, {})
            if isinstance(sub, klass):
                parts[name] = sub
                continue
            if not isinstance(sub, dict):
                raise TypeError(f"config section {name!r} must be a dict, got {type(sub).__name__}")
            known = {f.name for f in fields(klass)}
            bad = sorted(set(sub) - known)
            if bad:
                raise ValueError(f"unknown key(s) {bad} in config section {name!r}; known keys: {sorted(known)}")
            parts[name] = klass(**sub)
        return cls(**parts)

    def replace(self, **sections) -> "Config":
        """Copy with some sections replaced, e.g. cfg.replace(diffusion=DiffusionConfig(scp=False))."""
        return Config.from_dict({**self.to_dict(), **{k: dataclasses.asdict(v) for k, v in sections.items()}})


def _tiny() -> Config:
    return Config(
        model=ModelConfig(d_model=128, n_enc=2, n_dec=2, n_heads=4, d_ff=512, d_latent=64, max_len=64, dropout=0.0),
        train=TrainConfig(lr=1e-3, warmup=200, max_steps=2000, max_tokens=2048, ema_decay=0.99, eval_every=500,
                          save_every=500, eval_sentences=200),
    )


def _small() -> Config:
    return Config(
        model=ModelConfig(d_model=256, n_enc=3, n_dec=3, n_heads=4, d_ff=1024, d_latent=64, max_len=128,
                          dropout=0.1),
        train=TrainConfig(lr=7e-4, warmup=500, max_steps=20_000, max_tokens=4096, ema_decay=0.999, eval_every=1000),
    )


def _base() -> Config:  # Difformer's IWSLT size
    return Config(
        model=ModelConfig(d_model=512, n_enc=6, n_dec=6, n_heads=8, d_ff=2048, d_latent=128, max_len=256,
                          dropout=0.1),
        train=TrainConfig(lr=5e-4, warmup=4000, max_steps=300_000, max_tokens=8192),
    )


def _large() -> Config:
    return Config(
        model=ModelConfig(d_model=1024, n_enc=12, n_dec=12, n_heads=16, d_ff=4096, d_latent=128, max_len=256,
                          dropout=0.1),
        train=TrainConfig(lr=3e-4, warmup=8000, max_steps=300_000, max_tokens=8192),
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "large": _large}


def preset(name: str) -> Config:
    """A fresh Config for a named size: tiny (tests), small (CPU demo), base (Difformer size), large."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available presets: {list(PRESETS)}")
    return PRESETS[name]()
