"""HF transformers and TransformerLens's TransformerBridge as independent oracles for HookedLlama."""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from test_config import ARCH
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from sslens import ConfigError, HookedLlama, SSLensError, load_model
from sslens.tokenizer import placeholder_tokenizer

from conftest import PRESETS, assert_column_major, random_tokens, shared_file


def hf_reference(name: str) -> LlamaForCausalLM:
    """An HF Llama of a preset's published shape, built and initialised by transformers alone."""
    n_layers, n_heads, d_model, d_mlp, _ = ARCH[name]
    torch.manual_seed(0)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=4096,
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=n_heads,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            rope_theta=10000.0,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
        )
    ).eval()


def perturbed(model: HookedLlama) -> HookedLlama:
    """Norm weights away from 1, so a swapped or missing norm weight shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", PRESETS)
def test_ours_to_hf(name, tmp_path):
    torch.manual_seed(1)
    ours = perturbed(HookedLlama.from_preset(name, seed=1).eval())
    ours.save_hf(tmp_path)
    hf, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    tokens = random_tokens(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf.eval()(tokens).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_hf_to_ours(name, tmp_path):
    hf = hf_reference(name)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    assert ours.cfg.to_dict() | {"model_name": ""} == HookedLlama.from_preset(name).cfg.to_dict() | {"model_name": ""}
    tokens = random_tokens(2, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
    assert_column_major(ours)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_full_context_unusual_rope_base_and_one_kv_head(attn_implementation, tmp_path):
    """RoPE at every position up to n_ctx, a non-default base and all query heads on one KV head."""
    ours = perturbed(HookedLlama.from_preset("5M", seed=2, rotary_base=500000.0, n_key_value_heads=1).eval())
    ours.save_hf(tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
    assert hf.config.num_key_value_heads == 1
    tokens = random_tokens(2, 512)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf(tokens).logits, atol=1e-4, rtol=0)
        _, cache = ours.run_with_cache(tokens)  # the explicit attention path agrees with HF too
        torch.testing.assert_close(
            cache.accumulated_resid(apply_ln=True)[-1] @ ours.W_U, hf(tokens).logits, atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("name", PRESETS)
def test_transformer_bridge_sees_the_same_activations(name, tmp_path):
    ours = perturbed(HookedLlama.from_preset(name, seed=3).eval())
    ours.tokenizer = placeholder_tokenizer(ours.cfg.d_vocab)
    ours.save_hf(tmp_path)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), device="cpu")
    tokens = random_tokens(2, 24)
    with torch.no_grad():
        logits, cache = ours.run_with_cache(tokens)
        bridge_logits, bridge_cache = bridge.run_with_cache(tokens)
    torch.testing.assert_close(logits, bridge_logits, atol=1e-4, rtol=0)
    missing = set(cache.keys()) - set(bridge_cache.keys())
    assert not missing, f"hooks the bridge does not have: {sorted(missing)}"
    causal = torch.ones(24, 24, dtype=torch.bool).tril()
    for key in cache.keys():
        a, b = cache[key], bridge_cache[key]
        assert a.shape == b.shape, key
        if key.endswith("hook_attn_scores"):  # masked entries: -inf here, the float minimum in HF eager
            a, b = a[..., causal], b[..., causal]
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")  # noqa: B023 (called at once)


def test_official_tokenizer_is_exported_and_reloaded(tmp_path):
    import tokenizers

    text = shared_file("tinystories/tinystories_sample_cs336.txt").read_text().split("<|endoftext|>")[0]
    official = tokenizers.Tokenizer.from_file(str(shared_file("simplestories-tokenizer/simplestories-4096.json")))
    model = HookedLlama.from_preset("1.25M")
    model.tokenizer = official
    model.save_hf(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == official.encode(text).ids
    assert load_model(tmp_path).tokenizer.encode(text).ids == official.encode(text).ids


def test_pytorch_bin_is_loaded_with_weights_only(tmp_path):
    """Older checkpoints ship a pickled state dict (lm_head included, tied to the embedding)."""
    hf = hf_reference("1.25M")
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert "lm_head.weight" in hf.state_dict()
    tokens = random_tokens(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path)(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


class Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickle_payload_is_refused_not_executed(tmp_path, monkeypatch):
    hf_reference("1.25M").config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"model.norm.weight": Payload()}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SSLensError, match="cannot read weights"):
        load_model(tmp_path)
    assert not (tmp_path / "PWNED").exists()


def test_bad_model_directories(tmp_path):
    with pytest.raises(SSLensError, match="hub could not provide it"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(SSLensError, match="no config.json"):
        load_model(tmp_path)
    HookedLlama.from_preset("1.25M").save_hf(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SSLensError, match="model.safetensors|cannot read weights"):
        load_model(tmp_path / "m")
    save_file({"model.embed_tokens.weight": torch.zeros(4096, 128)}, weights)
    with pytest.raises(SSLensError, match="do not match"):
        load_model(tmp_path / "m")


def test_unsupported_hf_features_are_refused(tmp_path):
    hf = hf_reference("1.25M")
    hf.config.tie_word_embeddings = False
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.lm_head.weight))
    hf.save_pretrained(tmp_path / "untied")
    with pytest.raises(SSLensError, match="untied"):
        load_model(tmp_path / "untied")
    cfg = hf_reference("1.25M").config
    cfg.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    cfg.save_pretrained(tmp_path / "scaled")
    with pytest.raises(ConfigError, match="RoPE scaling"):
        load_model(tmp_path / "scaled")


def test_an_hf_config_too_large_for_memory_is_refused_without_allocating(tmp_path):
    """hidden_size 1e9 would ask for exabytes: load_model refuses from config.json alone (no weights file needed),
    in one line and at once."""
    import json
    import time

    config = hf_reference("1.25M").config.to_dict() | {"hidden_size": 10**9, "head_dim": 10**9 // 4}
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(
        SSLensError,
        match=r"^huge \(n_layers=4, d_model=1000000000, .*\) has [\d,]+ parameters and needs "
        r"about [\d,.]+ GiB .* is available on cpu; choose a smaller model$",
    ) as refused:
        load_model(tmp_path / "huge")
    assert time.perf_counter() - start < 5 and "\n" not in str(refused.value)
