"""Model config with TransformerLens field names, YAML presets and `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DEFAULT_PROBE_HOOKS = ("hook_embed", "blocks.*.hook_resid_post")  # sslens probe; here so the CLI needs no torch
# sslens eval: enough stories for a 63-way theme probe (60/20/20 split) to have a few training stories per theme.
CARD_PROBE_STORIES = 2000


@dataclass
class ModelConfig:
    """A Llama as published for SimpleStories: pre-norm RMSNorm, RoPE, GQA, SwiGLU, tied embeddings.

    Field names follow TransformerLens so that its tools (ActivationCache, ...) read them unchanged.
    Fields with ``init=False`` are facts of the architecture or derived, not settings.
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_mlp: int
    d_vocab: int = 4096
    n_ctx: int = 512
    eps: float = 1e-6
    rotary_base: float = 10000.0
    initializer_range: float = 0.02
    model_name: str = "custom"

    d_head: int = field(init=False)
    rotary_dim: int = field(init=False)
    d_vocab_out: int = field(init=False)
    normalization_type: str = field(init=False, default="RMS")
    final_rms: bool = field(init=False, default=True)
    positional_embedding_type: str = field(init=False, default="rotary")
    act_fn: str = field(init=False, default="silu")
    gated_mlp: bool = field(init=False, default=True)
    attn_only: bool = field(init=False, default=False)
    tie_word_embeddings: bool = field(init=False, default=True)
    default_prepend_bos: bool = field(init=False, default=False)
    original_architecture: str = field(init=False, default="LlamaForCausalLM")
    # Where the model's weights are and their dtype, kept up to date by the model: TransformerLens's tools
    # allocate their results with them. Not settings, so never saved or compared.
    device: Any = field(init=False, default="cpu", compare=False, repr=False)
    dtype: Any = field(init=False, default=None, compare=False, repr=False)
    # TransformerLens's switch for per-head copies of each block's attention input (HookedLlama.set_use_split_qkv_input)
    use_split_qkv_input: bool = field(init=False, default=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        _coerce_fields(self)
        for name in ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_mlp", "d_vocab", "n_ctx"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("eps", "rotary_base", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_key_value_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be divisible by n_key_value_heads ({self.n_key_value_heads})"
            )
        self.d_head = self.d_model // self.n_heads
        if self.d_head % 2:
            raise ConfigError(f"d_head = d_model / n_heads = {self.d_head} must be even for rotary embeddings")
        self.rotary_dim = self.d_head
        self.d_vocab_out = self.d_vocab

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in settable_fields()}


def layer_weights(cfg: ModelConfig) -> int:
    """The weights of one block's projections (q, k, v, o; gate, up, down): what each token multiplies by."""
    qkv = cfg.d_model * (cfg.n_heads + 2 * cfg.n_key_value_heads) * cfg.d_head
    return qkv + cfg.n_heads * cfg.d_head * cfg.d_model + 3 * cfg.d_model * cfg.d_mlp


def parameter_count(cfg: ModelConfig) -> int:
    """Every parameter of the model: the projections and two norm weights per block, the final norm, and the
    embedding (the unembedding is tied to it)."""
    return cfg.n_layers * (layer_weights(cfg) + 2 * cfg.d_model) + cfg.d_model + cfg.d_vocab * cfg.d_model


def memory_needed(cfg: ModelConfig) -> int:
    """Bytes for the fp32 weights and one forward of one sequence of n_ctx tokens: an upper estimate, known before
    anything is allocated, so an impossible config is refused instead of meeting the OOM killer.

    Per token: the residual stream and its normed, attention and MLP outputs (4 d_model), q, k, v and their rotated
    copies and z, the MLP's gate, up and hidden units (3 d_mlp), and the logits with their log-softmax (2 d_vocab);
    per layer's attention: the causal mask, the scores and the pattern (3 n_heads n_ctx^2, materialised when
    hooked); the rotary tables; all in fp32. Only one layer's activations are live at a time (no cache kept).
    """
    qkv = (cfg.n_heads + 2 * cfg.n_key_value_heads) * cfg.d_head
    per_token = 4 * cfg.d_model + 2 * qkv + cfg.n_heads * cfg.d_head + 3 * cfg.d_mlp + 2 * cfg.d_vocab
    activations = cfg.n_ctx * per_token + 3 * cfg.n_heads * cfg.n_ctx**2 + 2 * cfg.n_ctx * cfg.d_head
    return 4 * (parameter_count(cfg) + activations)


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class TrainConfig:
    """How to train. Keys share one namespace with ModelConfig: a YAML file or `--key=value` may set any of both."""

    data: str = _help(
        "SimpleStories/SimpleStories from the hub; synth or synth:N (the embedded corpus, offline); "
        "or a local .parquet/.jsonl/.json/.txt file or directory",
        "SimpleStories/SimpleStories",
    )
    tokenizer: str = _help("a tokenizer.json; empty: train the SimpleStories recipe on the data", "")
    init_from: str = _help(
        "fine-tune: start from this model's weights (an sslens run, a checkpoint directory, an HF Llama directory "
        "or a hub name) with a fresh optimizer; the run takes its shape (n_ctx may shrink) and tokenizer",
        "",
    )
    init_step: int = _help("with init_from a run: the checkpoint to start from; -1: its newest", -1)
    out_dir: str = _help("the run directory; empty: runs/<model_name>", "")
    seed: int = _help("seeds initialisation, data order and everything else", 0)
    max_steps: int = _help("optimizer steps", 2000)
    batch_size: int = _help("sequences per forward pass", 32)
    total_batch_size: int = _help("tokens per optimizer step (gradient accumulation); 0: batch_size x n_ctx", 0)
    lr: float = _help("peak learning rate", 1e-3)
    min_lr_ratio: float = _help("the cosine schedule ends at min_lr_ratio x lr", 0.1)
    warmup_steps: int = _help("linear warmup steps", 100)
    weight_decay: float = _help("AdamW weight decay on 2-D weights (not on norms)", 0.1)
    beta1: float = _help("AdamW beta1", 0.9)
    beta2: float = _help("AdamW beta2", 0.95)
    grad_clip: float = _help("clip the gradient norm to this; 0: no clipping", 1.0)
    dtype: str = _help(
        "auto (bfloat16 autocast where the hardware has fast bf16, else float32), bfloat16 or float32", "auto"
    )
    compile: str = _help(
        "torch.compile the model: true, false, or auto (on where it pays: a run of 200+ steps, on CUDA "
        "or on a CPU with a C++ compiler for inductor)",
        "auto",
    )
    val_every: int = _help("validation loss every this many steps (and at the end)", 100)
    val_batches: int = _help("batches of held-out data per validation", 8)
    val_samples: int = _help(
        "stories of 48 tokens written from 'Once upon a time' at each validation, logged in "
        "metrics.jsonl (and WandB) as 'samples'; 0: none",
        2,
    )
    log_every: int = _help("a metrics.jsonl line every this many steps", 10)
    print_every: int = _help(
        "when stderr is not a terminal (a log file, CI, a scheduler), a plain progress line "
        "every this many steps instead of the progress bar; 0: about 20 lines a run",
        0,
    )
    checkpoint_schedule: str = _help(
        "log (0, powers of two to 1024, then every checkpoint_every), linear, or a list like 0,50,100", "log"
    )
    checkpoint_every: int = _help("checkpoint spacing after 1024 (log) or throughout (linear)", 1000)
    keep_trainer_states: int = _help(
        "the newest this many checkpoints (the final one among them) keep the optimizer state that --resume needs; "
        "older ones keep their weights alone, which is what analyses read",
        2,
    )
    resume: bool = _help("continue the run in out_dir from its newest complete checkpoint", False)
    wandb_project: str = _help("also log to this Weights & Biases project (key from WANDB_API_KEY or a .env file)", "")

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # --compile=False (YAML's and Python's spelling), or a bare --compile
            self.compile = str(self.compile).lower()
        _coerce_fields(self)
        if self.compile not in ("auto", "true", "false"):
            raise ConfigError(f"compile must be auto, true or false, got {self.compile!r}")
        for name in (
            "max_steps",
            "batch_size",
            "val_every",
            "val_batches",
            "log_every",
            "checkpoint_every",
            "keep_trainer_states",
        ):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "total_batch_size",
            "warmup_steps",
            "weight_decay",
            "grad_clip",
            "min_lr_ratio",
            "seed",
            "val_samples",
            "print_every",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}")
        if self.init_from and self.resume:
            raise ConfigError("init_from starts a new run and resume continues one; to continue a fine-tuning run, "
                              "drop --init_from")  # fmt: skip
        if self.init_from and self.tokenizer:
            raise ConfigError("a fine-tuned run keeps its source's tokenizer; drop --tokenizer")
        if self.init_step < -1:
            raise ConfigError(f"init_step must be a step or -1 (the newest), got {self.init_step}")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"dtype must be auto, bfloat16 or float32, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        return _from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def settable_fields(cls: type = ModelConfig) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _coerce_fields(config: Any) -> None:
    for f in settable_fields(type(config)):
        setattr(config, f.name, coerce(f.name, f.type, getattr(config, f.name)))


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    known = {f.name for f in settable_fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
    missing = [f.name for f in settable_fields(cls) if f.default is dataclasses.MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"missing config key {missing[0]!r}")
    return cls(**values)


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def coerce(name: str, type_name: str, value: Any) -> Any:
    """Check `value` against the field's type; accept ints for floats, YAML 1.1's '1e-6' strings, and numbers for
    text (`--checkpoint_schedule=200`, `--out_dir=2024`: YAML reads them as numbers)."""
    typ = _TYPES[type_name]
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if typ is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{name} must be {type_name}, got {value!r}")


def preset_names() -> list[str]:
    """Preset names, smallest model first ("1.25M", "5M", ...)."""
    names = [
        p.name.removesuffix(".yaml") for p in resources.files("sslens.presets").iterdir() if p.name.endswith(".yaml")
    ]
    return sorted(
        names, key=lambda n: (float(n[:-1]), n) if n[:-1].replace(".", "", 1).isdigit() else (float("inf"), n)
    )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["n_layers=2", "eps=1e-5"]`` (or ``--n_layers=2``) into a dict; values are read as YAML."""
    out = {}
    for item in items:
        key, sep, raw = item.removeprefix("--").partition("=")
        if not sep and item.startswith("--") and key:  # a bare flag: --resume
            out[key] = True
            continue
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_config(name_or_path: str | Path, **overrides: Any) -> ModelConfig:
    """The model config of a preset name (``"5M"``) or a YAML file, after overrides (training keys ignored)."""
    return load_train_config(name_or_path, **overrides)[0]


def load_train_config(name_or_path: str | Path, **overrides: Any) -> tuple[ModelConfig, TrainConfig]:
    """Model and training configs from a preset name or YAML file, then `key=value` overrides of either."""
    values = {**_read_config(name_or_path), **overrides}
    model_keys, train_keys = {f.name for f in settable_fields()}, {f.name for f in settable_fields(TrainConfig)}
    unknown = sorted(map(str, set(values) - model_keys - train_keys))
    if unknown:
        raise ConfigError(f"unknown config key {unknown[0]!r}; see `sslens train --help` for the keys")
    return (
        ModelConfig.from_dict({k: v for k, v in values.items() if k in model_keys}),
        TrainConfig.from_dict({k: v for k, v in values.items() if k in train_keys}),
    )


def _read_config(name_or_path: str | Path) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file; a config is YAML text") from None
    elif str(name_or_path) in preset_names():
        text = resources.files("sslens.presets").joinpath(f"{name_or_path}.yaml").read_text()
    else:
        raise ConfigError(f"unknown preset {str(name_or_path)!r}; presets: {', '.join(preset_names())}, or a YAML path")
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name_or_path}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{name_or_path}: expected a mapping of config keys, got {type(values).__name__}")
    return values
