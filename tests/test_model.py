import copy
import re
import time

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import ActivationCache

from sslens import HookedLlama, SSLensError

from conftest import random_tokens

BLOCK_HOOKS = [
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
]


def test_hook_names_are_transformerlens_names(small_model):
    expected = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
    expected |= {f"blocks.{i}.{h}" for i in range(small_model.cfg.n_layers) for h in BLOCK_HOOKS}
    # per-head copies of the attention input, which fire only with use_split_qkv_input (see test_tl_tools.py)
    expected |= {f"blocks.{i}.attn.hook_{x}_input" for i in range(small_model.cfg.n_layers) for x in "qkv"}
    assert set(small_model.hook_dict) == expected


def test_cached_shapes(small_model):
    cfg = small_model.cfg
    b, p, h, kv, d = 2, 7, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head
    _, cache = small_model.run_with_cache(random_tokens(b, p))
    assert isinstance(cache, ActivationCache)
    shapes = {
        "hook_embed": (b, p, cfg.d_model),
        "blocks.1.ln1.hook_scale": (b, p, 1),
        "blocks.1.attn.hook_q": (b, p, h, d),
        "blocks.1.attn.hook_k": (b, p, kv, d),
        "blocks.1.attn.hook_v": (b, p, kv, d),
        "blocks.1.attn.hook_rot_q": (b, p, h, d),
        "blocks.1.attn.hook_rot_k": (b, p, kv, d),
        "blocks.1.attn.hook_attn_scores": (b, h, p, p),
        "blocks.1.attn.hook_pattern": (b, h, p, p),
        "blocks.1.attn.hook_z": (b, p, h, d),
        "blocks.1.mlp.hook_pre": (b, p, cfg.d_mlp),
        "blocks.1.mlp.hook_post": (b, p, cfg.d_mlp),
        "blocks.1.hook_resid_post": (b, p, cfg.d_model),
    }
    assert {k: tuple(cache[k].shape) for k in shapes} == shapes


def test_pattern_is_causal_and_normalised(small_model):
    _, cache = small_model.run_with_cache(random_tokens(2, 9), names_filter=lambda n: "pattern" in n or "scores" in n)
    pattern = cache["blocks.0.attn.hook_pattern"]
    assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-6)
    assert (pattern.triu(1) == 0).all()
    assert torch.isneginf(cache["blocks.0.attn.hook_attn_scores"].triu(1)[..., 0, 1:]).all()


def test_fast_path_only_when_pattern_unhooked(small_model, monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    tokens = random_tokens(2, 33)
    n = small_model.cfg.n_layers
    fast = small_model(tokens)
    assert len(calls) == n
    small_model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_z"))
    assert len(calls) == 2 * n  # caching z alone keeps the fused kernel
    slow, _ = small_model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    assert len(calls) == 3 * n - 1  # only layer 1 materialises its pattern
    explicit, _ = small_model.run_with_cache(tokens)
    assert len(calls) == 3 * n - 1
    torch.testing.assert_close(explicit, fast, atol=1e-5, rtol=0)
    torch.testing.assert_close(slow, fast, atol=1e-5, rtol=0)


def test_the_padded_mlp_trains_as_the_plain_one(small_model, monkeypatch):
    """Training on a GPU pads d_mlp (here 341) to a multiple of 8 on the fly. Forced onto CPU: the same loss and
    gradients, for every layer; not under no_grad, and not in a layer with any hook in its MLP (a TransformerLens
    hook, which still sees d_mlp units, or a plain torch hook on one of its projections)."""
    import sslens.model
    from sslens.model import MLP

    model, tokens, n = copy.deepcopy(small_model), random_tokens(2, 33), small_model.cfg.n_layers
    assert model.blocks[0].mlp.pad == 3

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = model(tokens, return_type="loss")
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    calls, padded_weights = [], MLP.padded_weights
    monkeypatch.setattr(sslens.model, "PADDED_MLP_DEVICES", ("cpu",))
    monkeypatch.setattr(MLP, "padded_weights", lambda self: calls.append(1) or padded_weights(self))
    loss, grads = loss_and_grads()
    assert len(calls) == n
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=0)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, atol=1e-7, rtol=1e-5)
    with torch.no_grad():
        model(tokens)
    assert len(calls) == n
    _, cache = model.run_with_cache(tokens, names_filter="blocks.1.mlp.hook_post")
    assert len(calls) == 2 * n - 1 and cache["blocks.1.mlp.hook_post"].shape[-1] == model.cfg.d_mlp
    seen = []
    model.blocks[2].mlp.down_proj.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[-1]))
    model(tokens)
    assert len(calls) == 3 * n - 2 and seen == [model.cfg.d_mlp]


def test_rms_norm_scale_by_hand(small_model):
    _, cache = small_model.run_with_cache(random_tokens(1, 5))
    x = cache["blocks.2.hook_resid_mid"]
    scale = (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(cache["blocks.2.ln2.hook_scale"], scale)
    torch.testing.assert_close(cache["blocks.2.ln2.hook_normalized"], x / scale)


def test_weight_views_reproduce_activations(small_model):
    """W_Q/W_K/W_V/W_O/W_gate/W_in/W_out, in TransformerLens layouts, reproduce the cached activations."""
    m = small_model
    _, cache = m.run_with_cache(random_tokens(2, 6))
    layer, n_rep = 1, m.cfg.n_heads // m.cfg.n_key_value_heads
    x = cache[f"blocks.{layer}.ln1.hook_normalized"] * m.blocks[layer].ln1.w
    torch.testing.assert_close(torch.einsum("bpd,hde->bphe", x, m.W_Q[layer]), cache[f"blocks.{layer}.attn.hook_q"])
    k_per_query_head = torch.einsum("bpd,hde->bphe", x, m.W_K[layer])
    v_per_query_head = torch.einsum("bpd,hde->bphe", x, m.W_V[layer])
    for h in range(m.cfg.n_heads):  # query head h reads KV head h // n_rep (HF order)
        torch.testing.assert_close(k_per_query_head[:, :, h], cache[f"blocks.{layer}.attn.hook_k"][:, :, h // n_rep])
        torch.testing.assert_close(v_per_query_head[:, :, h], cache[f"blocks.{layer}.attn.hook_v"][:, :, h // n_rep])
    attn_out = torch.einsum("bphe,hed->bpd", cache[f"blocks.{layer}.attn.hook_z"], m.W_O[layer])
    torch.testing.assert_close(attn_out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-6, rtol=1e-5)
    x2 = cache[f"blocks.{layer}.ln2.hook_normalized"] * m.blocks[layer].ln2.w
    torch.testing.assert_close(x2 @ m.W_gate[layer], cache[f"blocks.{layer}.mlp.hook_pre"])
    torch.testing.assert_close(x2 @ m.W_in[layer], cache[f"blocks.{layer}.mlp.hook_pre_linear"])
    torch.testing.assert_close(
        cache[f"blocks.{layer}.mlp.hook_post"] @ m.W_out[layer],
        cache[f"blocks.{layer}.hook_mlp_out"],
        atol=1e-6,
        rtol=1e-5,
    )
    assert m.W_U.shape == (m.cfg.d_model, m.cfg.d_vocab) and m.W_U.data_ptr() == m.W_E.data_ptr()  # tied


def test_identity_attention_makes_z_equal_v_with_gqa_head_order(small_model):
    """Patch the scores so each position attends only to itself: z must then be the value of its KV head."""

    def diagonal_only(scores, hook):
        off_diagonal = ~torch.eye(scores.shape[-1], dtype=torch.bool)
        return scores.masked_fill(off_diagonal, float("-inf"))

    m = small_model
    n_rep = m.cfg.n_heads // m.cfg.n_key_value_heads
    cache = {}
    m.run_with_hooks(
        random_tokens(2, 8),
        fwd_hooks=[
            ("blocks.0.attn.hook_attn_scores", diagonal_only),
            ("blocks.0.attn.hook_v", lambda t, hook: cache.__setitem__("v", t)),
            ("blocks.0.attn.hook_z", lambda t, hook: cache.__setitem__("z", t)),
        ],
    )
    torch.testing.assert_close(cache["z"], cache["v"].repeat_interleave(n_rep, dim=2))


def test_zeroing_a_head_equals_zeroing_its_output_weights(small_model):
    tokens = random_tokens(2, 10)
    layer, head, d = 1, 2, small_model.cfg.d_head

    def ablate(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    patched = small_model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", ablate)])
    edited = copy.deepcopy(small_model)
    with torch.no_grad():
        edited.blocks[layer].attn.o_proj.weight[:, head * d : (head + 1) * d] = 0
    torch.testing.assert_close(patched, edited(tokens))
    assert not torch.allclose(patched, small_model(tokens))
    assert not any(hp.has_hooks() for hp in small_model.hook_points())  # run_with_hooks cleaned up


def test_patching_the_whole_residual_stream_transplants_the_run(small_model):
    clean, corrupt = random_tokens(1, 12, seed=1), random_tokens(1, 12, seed=2)
    clean_logits, clean_cache = small_model.run_with_cache(clean)
    patched = small_model.run_with_hooks(
        corrupt, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, hook: clean_cache["blocks.1.hook_resid_pre"])]
    )
    torch.testing.assert_close(patched, clean_logits)


def test_activation_cache_against_hand_computation(small_model):
    m = small_model
    tokens = random_tokens(2, 11)
    logits, cache = m.run_with_cache(tokens)
    n = m.cfg.n_layers

    # Logit lens: the final accumulated residual through ln_final and W_U gives the logits; an intermediate
    # one normalised with the cached scale is what that layer's ln1 saw.
    accumulated, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)
    assert labels == [f"{i}_pre" for i in range(n)] + ["final_post"]
    torch.testing.assert_close(accumulated[-1] @ m.W_U, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        cache.accumulated_resid(layer=1, apply_ln=True)[-1], cache["blocks.1.ln1.hook_normalized"]
    )

    # The residual stream is the sum of its parts; per-head results add up to each attention output.
    parts, part_labels = cache.decompose_resid(return_labels=True)
    assert part_labels == ["embed"] + [f"{i}_{c}" for i in range(n) for c in ("attn_out", "mlp_out")]
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"], atol=1e-5, rtol=1e-5)
    heads, head_labels = cache.stack_head_results(layer=-1, return_labels=True)
    assert heads.shape[0] == n * m.cfg.n_heads and head_labels[:2] == ["L0H0", "L0H1"]
    per_layer = heads.view(n, m.cfg.n_heads, *heads.shape[1:]).sum(1)
    for i in range(n):
        torch.testing.assert_close(per_layer[i], cache[f"blocks.{i}.hook_attn_out"], atol=1e-5, rtol=1e-5)

    # Direct logit attribution is exact: the attributions of all parts sum to the logit.
    answer = tokens[:, -1]
    attrs = cache.logit_attrs(parts[:, :, -1], tokens=answer, pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), logits[torch.arange(2), -1, answer], atol=1e-4, rtol=1e-5)
    stacked = cache.apply_ln_to_stack(parts, layer=-1)
    torch.testing.assert_close((stacked.sum(0) * m.ln_final.w) @ m.W_U, logits, atol=1e-4, rtol=1e-5)
    directions = m.tokens_to_residual_directions(tokens)
    assert directions.shape == (*tokens.shape, m.cfg.d_model)


def test_remove_batch_dim_and_loss(small_model):
    tokens = random_tokens(1, 9)
    logits, cache = small_model.run_with_cache(tokens, remove_batch_dim=True)
    assert cache["blocks.0.hook_resid_pre"].shape == (9, small_model.cfg.d_model)
    loss = small_model(tokens, return_type="loss")
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, :-1], tokens[0, 1:]))


def test_bfloat16_runs_with_norms_in_float32(small_model):
    model = copy.deepcopy(small_model).to(torch.bfloat16)
    tokens = random_tokens(2, 16)
    logits, cache = model.run_with_cache(tokens)
    assert logits.dtype == torch.bfloat16 and cache["blocks.0.ln1.hook_scale"].dtype == torch.float32
    assert (logits.float().softmax(-1) - small_model(tokens).softmax(-1)).abs().max() < 0.02


def test_too_long_input_is_refused(small_model):
    with pytest.raises(SSLensError, match="exceed the context of 512"):
        small_model(random_tokens(1, 513))


def test_tokenizer_larger_than_the_vocabulary_is_refused():
    from sslens.tokenizer import placeholder_tokenizer

    model = HookedLlama.from_preset("1.25M", d_vocab=1000)
    model.tokenizer = placeholder_tokenizer(1000)
    with pytest.raises(SSLensError, match="the tokenizer has 4096 tokens but the model's d_vocab is 1000"):
        model.tokenizer = placeholder_tokenizer(4096)
    assert model.tokenizer.get_vocab_size() == 1000


def test_a_tokenizer_too_large_names_only_vocabularies_that_can_work():
    """A model too small even for the tokenizer's alphabet is told to raise d_vocab, not to train a tokenizer of
    d_vocab tokens (WordPiece keeps every character, so it could not); one large enough gets both choices."""
    from sslens.tokenizer import train_tokenizer

    tok = train_tokenizer(["ab ba abc"] * 3, vocab_size=9)  # [UNK] [EOS] ##a ##b ##c a b c, then "ab"
    assert tok.get_vocab_size() == 9
    with pytest.raises(SSLensError) as refused:
        HookedLlama.from_preset("1.25M", d_vocab=5).tokenizer = tok
    assert str(refused.value) == (
        "the tokenizer has 9 tokens but the model's d_vocab is 5; raise d_vocab to at least 9 "
        "(its characters, alone and as ##continuations, take 8 tokens)"
    )
    with pytest.raises(
        SSLensError,
        match="raise d_vocab to at least 9, or use a tokenizer of at most 8 tokens "
        r"\(sslens tokenizer train --vocab_size 8\)",
    ):
        HookedLlama.from_preset("1.25M", d_vocab=8).tokenizer = tok


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    """d_model=10,000,000 would need petabytes: refused from the config in one line, at once, naming the estimate."""
    start = time.perf_counter()
    with pytest.raises(SSLensError) as refused:
        HookedLlama.from_preset("1.25M", d_model=10_000_000)
    assert time.perf_counter() - start < 2
    message = str(refused.value)
    assert "\n" not in message and message.startswith("SimpleStories-1.25M (n_layers=4, d_model=10000000, d_mlp=341")
    assert re.search(
        r"needs about [\d,.]+ GiB for its weights and one forward, but [\d,.]+ GiB is available on cpu; "
        "choose a smaller model$",
        message,
    )


def test_the_memory_check_measures_the_device_the_model_goes_to(small_model, monkeypatch):
    """Moving onto a GPU checks that GPU's free memory (here made too small), before anything is copied."""
    import sslens.model

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2**20, 80 * 2**30))
    with pytest.raises(SSLensError, match=r"needs about 0\.\d GiB .* but 0\.0 GiB is available on cuda"):
        copy.deepcopy(small_model).to("cuda")
    monkeypatch.setattr(sslens.model, "available_memory", lambda device=None: 2**20)
    with pytest.raises(SSLensError, match="is available on cpu"):
        HookedLlama.from_preset("1.25M")


def test_the_forward_compiles_as_one_graph_with_or_without_a_cache():
    """Every hook point checks for hooks on each call (`hooks_attached`); dynamo must trace that check, or the
    compiled training step and the compiled decode step would break into a graph per hook point."""
    from sslens.kvcache import KVCache

    model = HookedLlama.from_preset("1.25M", seed=0)
    tokens = random_tokens(batch=2, pos=16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(tokens)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons[:1]
    cache = KVCache(model.cfg, batch=2)
    model(tokens, past_kv_cache=cache)
    explained = torch._dynamo.explain(model)(tokens[:, :1], past_kv_cache=cache)
    assert explained.graph_break_count == 0, explained.break_reasons[:1]
