"""Hugging Face `LlamaForCausalLM` export and import: the format of the published SimpleStories models."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, PreTrainedTokenizerFast

from .config import ModelConfig
from .errors import ConfigError, SSLensError
from .fileio import atomic_replace

if TYPE_CHECKING:
    from .model import HookedLlama  # instances only: this module sits below model.py (model.save_hf calls it)


def hf_state_dict(model: HookedLlama) -> dict[str, torch.Tensor]:
    """Our weights under HF Llama names (fused QKV and gate|up matrices split back apart)."""
    state = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.ln_final.w}
    for i, block in enumerate(model.blocks):
        q, k, v = block.attn.qkv_proj.weight.split(block.attn.qkv_sizes)
        gate, up = block.mlp.gate_up_proj.weight.chunk(2)
        layer = {
            "input_layernorm": block.ln1.w,
            "post_attention_layernorm": block.ln2.w,
            "self_attn.q_proj": q,
            "self_attn.k_proj": k,
            "self_attn.v_proj": v,
            "self_attn.o_proj": block.attn.o_proj.weight,
            "mlp.gate_proj": gate,
            "mlp.up_proj": up,
            "mlp.down_proj": block.mlp.down_proj.weight,
        }
        state |= {f"model.layers.{i}.{name}.weight": w for name, w in layer.items()}
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def state_dict_from_hf(hf: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    """HF Llama weights under our names. Raises KeyError naming the first missing HF weight."""
    hf = dict(hf)
    take = hf.pop
    state = {"embed.weight": take("model.embed_tokens.weight"), "ln_final.w": take("model.norm.weight")}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state |= {
            f"blocks.{i}.ln1.w": take(p + "input_layernorm.weight"),
            f"blocks.{i}.ln2.w": take(p + "post_attention_layernorm.weight"),
            f"blocks.{i}.attn.qkv_proj.weight": torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"]),
            f"blocks.{i}.attn.o_proj.weight": take(p + "self_attn.o_proj.weight"),
            f"blocks.{i}.mlp.gate_up_proj.weight": torch.cat(
                [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
            ),
            f"blocks.{i}.mlp.down_proj.weight": take(p + "mlp.down_proj.weight"),
        }
    if hf:
        raise KeyError(f"unexpected weight {next(iter(hf))}")
    return state


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=cfg.d_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads,
        head_dim=cfg.d_head,
        max_position_embeddings=cfg.n_ctx,
        rms_norm_eps=cfg.eps,
        rope_theta=cfg.rotary_base,
        hidden_act="silu",
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=cfg.initializer_range,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


def config_from_hf(hf: LlamaConfig, name: str) -> ModelConfig:
    """Our config for an HF Llama config; refuses features HookedLlama does not implement."""
    rope = getattr(hf, "rope_parameters", None) or {"rope_type": "default", "rope_theta": hf.rope_theta}
    if (getattr(hf, "rope_scaling", None) or {}).get("rope_type", "default") != "default" or rope.get(
        "rope_type", "default"
    ) != "default":
        raise ConfigError(f"{name}: RoPE scaling {rope.get('rope_type')!r} is not supported (only default RoPE)")
    if hf.hidden_act != "silu":
        raise ConfigError(f"{name}: hidden_act {hf.hidden_act!r} is not supported (only silu)")
    if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
        raise ConfigError(f"{name}: attention/MLP biases are not supported")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ConfigError(
            f"{name}: head_dim {head_dim} * {hf.num_attention_heads} heads != hidden_size {hf.hidden_size}"
        )
    return ModelConfig(
        n_layers=hf.num_hidden_layers,
        d_model=hf.hidden_size,
        n_heads=hf.num_attention_heads,
        n_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        eps=float(hf.rms_norm_eps),
        rotary_base=float(rope["rope_theta"]),
        initializer_range=float(hf.initializer_range),
        model_name=name,
    )


def save_hf(model: HookedLlama, path: str | Path, card: str | None = None) -> None:
    """Write config.json, model.safetensors, (if a tokenizer is attached) tokenizer files, and README.md: the hub's
    model card, with `card` (Markdown, e.g. `RunCard.markdown()`) as its evaluation section.

    Every file is written to a temporary name beside its target and renamed, so an interrupted export never
    leaves a half-written file behind.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SSLensError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    with tempfile.TemporaryDirectory(dir=path, prefix=".export-") as tmp:
        tmp = Path(tmp)
        cfg = hf_config(model.cfg)
        cfg.torch_dtype = str(model.W_E.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(cfg.to_json_string())
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        if model.tokenizer is not None:
            PreTrainedTokenizerFast(
                tokenizer_object=model.tokenizer,
                unk_token="[UNK]",
                eos_token="[EOS]",
                model_max_length=model.cfg.n_ctx,
            ).save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model, card))
        for f in tmp.iterdir():
            atomic_replace(f, path / f.name)


def model_card(model: HookedLlama, card: str | None) -> str:
    """README.md of an export: hub metadata (YAML front matter), what the model is, how to load it, its card."""
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [llama, sslens, simplestories]",
        "---",
        "",
        f"# {cfg.model_name}",
        "",
        f"A Llama model ({n_params:,} parameters: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
        f"{cfg.n_key_value_heads} key/value heads, context {cfg.n_ctx}, vocabulary {cfg.d_vocab}) trained with "
        "sslens. It loads as `LlamaForCausalLM.from_pretrained(DIR)` or, with every activation hooked, as "
        "`sslens.load_model(DIR)`.",
    ]
    if card:
        lines += ["", "## Evaluation (`sslens eval`)", "", card]
    return "\n".join(lines) + "\n"


def read_hf_config(path: Path, name: str) -> ModelConfig:
    """Our config, named `name`, for the Llama in an HF directory (its config.json)."""
    try:
        hf = LlamaConfig.from_pretrained(path)
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise SSLensError(f"{path}/config.json is not a readable Llama config: {str(e).splitlines()[0]}") from None
    if hf.model_type != "llama":
        raise SSLensError(f"{path} holds a {hf.model_type!r} model; only Llama is supported")
    return config_from_hf(hf, name)


def read_hf_weights(path: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """The weights of an HF Llama directory (safetensors or pytorch_model.bin) under our names."""
    state = _read_weights(path)
    lm_head = state.pop("lm_head.weight", None)
    if lm_head is not None and not torch.equal(lm_head, state.get("model.embed_tokens.weight", lm_head)):
        raise SSLensError(f"{path}: lm_head differs from the embedding (untied); HookedLlama ties them")
    try:
        return state_dict_from_hf(state, n_layers)
    except KeyError as e:
        raise SSLensError(f"{path}: weights do not match its config.json ({str(e).splitlines()[0]})") from None


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    try:
        if files:
            return {k: v for f in files for k, v in load_file(f).items()}
        if (path / "pytorch_model.bin").is_file():
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or corrupt file: say which
        raise SSLensError(f"{path}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise SSLensError(f"{path} has no model.safetensors or pytorch_model.bin")


def hf_location(name_or_path: str | Path) -> tuple[Path, str]:
    """Where an HF-format model lies and what to call it: a local directory (named after it), or a hub name (e.g.
    "SimpleStories/SimpleStories-5M") downloaded when online and read from the hub cache when offline (named after
    the repo: its snapshot directory is only a commit hash)."""
    path = Path(name_or_path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise SSLensError(f"{path} is not a model directory (no config.json)")
        return path, path.name
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):  # not a hub name either
        raise SSLensError(f"model directory {name_or_path} not found")
    return _hub_snapshot(str(name_or_path)), str(name_or_path)


def _hub_snapshot(repo: str) -> Path:
    """The local snapshot of a hub model. huggingface_hub serves it from its cache when HF_HUB_OFFLINE is set
    or the hub is unreachable, so the error says which of the two stopped it and where the cache is."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        if constants.HF_HUB_OFFLINE:
            why, advice = "HF_HUB_OFFLINE=1 forbids downloading", "unset HF_HUB_OFFLINE to fetch it once"
        else:
            detail = str(e).splitlines()[0] if str(e) else "no detail"
            why, advice = f"{type(e).__name__}: {detail}", "check the name and the network"
        raise SSLensError(
            f"{repo} is not in the hub cache {constants.HF_HUB_CACHE} and the hub could not provide it "
            f"({why}); {advice}, or pass a local model directory"
        ) from None
