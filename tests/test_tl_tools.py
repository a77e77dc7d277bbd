"""TransformerLens's own analysis functions, and nnsight, run on HookedLlama: their results equal the same functions
on TransformerLens's TransformerBridge booted from the model's HF export (an independent implementation of the
same network), and nnsight's traces equal our hooks."""

import nnsight
import pytest
import torch
import transformer_lens.patching as tl_patching
from transformer_lens import FactoredMatrix, head_detector
from transformer_lens.model_bridge import TransformerBridge

from sslens import load_model, pairs
from sslens.errors import SSLensError
from sslens.model import HookedLlama
from sslens.patching import LogitDiff
from sslens.tokenizer import EOS

CLEAN = "one day, mia found a red ball in the park. she gave the ball to"
SWEEPS = sorted(n for n in dir(tl_patching) if n.startswith("get_act_patch") and "direct_path" not in n)


@pytest.fixture(scope="module")
def pair(tiny_run, tmp_path_factory):
    """A trained model, its TransformerBridge twin, and a name pair cut to its last 10 tokens, whose last 6 hold a
    mention of the name."""
    model = load_model(tiny_run).eval()
    export = tmp_path_factory.mktemp("export")
    model.save_hf(export)
    bridge = TransformerBridge.boot_transformers(str(export), device="cpu")
    bridge.eval()
    bridge.cfg.default_prepend_bos = False  # our models have no BOS token: both get the same tokens
    row = next(
        r
        for r in pairs.pairs("name", 60, seed=2, tokenizer=model.tokenizer)
        if len(r["clean_tokens"]) >= 10 and r["positions"][-1] >= len(r["clean_tokens"]) - 6
    )
    clean, corrupt = (torch.tensor([row[k][-10:]]) for k in ("clean_tokens", "corrupt_tokens"))
    return model, bridge, clean, corrupt, LogitDiff([row["clean_answer"]], [row["corrupt_answer"]])


@pytest.mark.parametrize("sweep", SWEEPS)
def test_transformer_lens_patching_sweeps_equal_the_bridge(pair, sweep):
    model, bridge, clean, corrupt, metric = pair
    if sweep.endswith("dest_src_pos"):  # one forward per (layer, head, query, key): 6 tokens are enough
        clean, corrupt = clean[:, -6:], corrupt[:, -6:]
    results = []
    for m in (model, bridge):
        with torch.no_grad():
            _, cache = m.run_with_cache(clean)
            results.append(getattr(tl_patching, sweep)(m, corrupt, cache, lambda logits: metric(logits).mean()))
    ours, theirs = results
    assert ours.shape == theirs.shape
    assert ours.abs().max() > 1e-3, "a sweep of all-zero effects compares nothing"
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_transformer_lens_direct_path_patching_equals_the_bridge(pair):
    """Path patching from every head into every later head's query: needs the per-head input copies."""
    model, bridge, clean, corrupt, metric = pair
    results = []
    for m in (model, bridge):
        with torch.no_grad():
            _, clean_cache = m.run_with_cache(clean)
            _, corrupt_cache = m.run_with_cache(corrupt)
            results.append(
                tl_patching.get_act_patch_direct_path_all_sources(
                    m, corrupt, clean_cache, corrupt_cache, lambda logits: metric(logits).mean(), verbose=False
                )
            )
    ours, theirs = results
    assert not model.cfg.use_split_qkv_input, "the sweep restores the switch"
    assert ours[0, :, 1].abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="GQA"):  # keys and values are shared by query heads: refused, as on the bridge
        tl_patching.get_act_patch_direct_path(model, corrupt, clean_cache, corrupt_cache, metric, 0, 0, "k")


def test_split_qkv_input_changes_nothing_until_patched(pair):
    model, _, clean, *_ = pair
    with torch.no_grad():
        logits = model(clean)
        model.set_use_split_qkv_input(True)
        try:
            split_logits, cache = model.run_with_cache(clean)
        finally:
            model.set_use_split_qkv_input(False)
    torch.testing.assert_close(split_logits, logits, atol=1e-5, rtol=1e-5)
    n_heads, n_kv = model.cfg.n_heads, model.cfg.n_key_value_heads
    assert cache["blocks.1.attn.hook_q_input"].shape == (1, clean.shape[1], n_heads, model.cfg.d_model)
    assert cache["blocks.1.attn.hook_k_input"].shape == (1, clean.shape[1], n_kv, model.cfg.d_model)


@pytest.mark.parametrize("head", ["previous_token_head", "duplicate_token_head", "induction_head"])
def test_head_detector_equals_the_bridge(pair, head):
    model, bridge, *_ = pair
    text = "the cat sat on the mat and the cat sat on the mat"
    ours = head_detector.detect_head(model, text, head)
    theirs = head_detector.detect_head(bridge, text, head)
    assert ours.shape == (model.cfg.n_layers, model.cfg.n_heads)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), atol=1e-4, rtol=1e-4)


def test_tokenizer_helpers_as_transformer_lens(pair):
    model, bridge, *_ = pair
    tokens = model.to_tokens(CLEAN)
    torch.testing.assert_close(tokens, bridge.to_tokens(CLEAN, prepend_bos=False))
    assert model.to_string(tokens[0]) == bridge.to_string(tokens[0])
    assert model.to_string(tokens) == [model.to_string(tokens[0])]
    assert model.to_str_tokens(CLEAN) == [model.tokenizer.id_to_token(t) for t in tokens[0].tolist()]
    assert len(model.to_str_tokens(["a cat", "a cat sat"])) == 2
    batch = model.to_tokens(["a cat", "a cat sat down"])
    eos = model.tokenizer.token_to_id(EOS)
    assert batch.shape[0] == 2 and batch[0, -1] == eos and batch[1, -1] != eos  # right padding with [EOS]
    assert model.to_tokens(["a cat", "a cat sat down"], padding_side="left")[0, 0] == eos
    with pytest.raises(SSLensError, match="no BOS"):
        model.to_tokens(CLEAN, prepend_bos=True)


def test_factored_circuits_and_device(pair):
    model, bridge, *_ = pair
    assert model.cfg.device == torch.device("cpu") and model.cfg.dtype == torch.float32
    assert (
        isinstance(model.OV, FactoredMatrix)
        and model.OV.shape == (model.cfg.n_layers, model.cfg.n_heads) + (model.cfg.d_model,) * 2
    )
    layer, head = 1, 3  # GQA: query head 3 reads key/value head 1
    torch.testing.assert_close(model.QK.AB[layer, head], model.W_Q[layer, head] @ model.W_K[layer, head].T)
    torch.testing.assert_close(model.OV.AB[layer, head], model.W_V[layer, head] @ model.W_O[layer, head])
    # The bridge's OV circuit folds nothing into a Llama's V (no biases, RMSNorm weight kept separate)
    torch.testing.assert_close(model.OV.AB, bridge.OV.AB, atol=1e-5, rtol=1e-4)
    model.to(torch.float64)
    try:
        assert model.cfg.dtype == torch.float64
    finally:
        model.to(torch.float32)


def test_generate_on_a_token_tensor_returns_tokens(pair):
    model, _, clean, *_ = pair
    out = model.generate(clean, max_new_tokens=5, do_sample=False, stop_at_eos=False)  # a tiny model may end at once
    assert isinstance(out, torch.Tensor) and out.shape == (1, clean.shape[1] + 5)
    assert torch.equal(out[:, : clean.shape[1]], clean)
    greedy = model.generate([clean[0].tolist()], max_new_tokens=5, temperature=0, stop_at_eos=False)[0].tokens
    assert out[0, clean.shape[1] :].tolist() == greedy
    stopped = model.generate(torch.cat([clean, clean]), max_new_tokens=5, do_sample=False)
    eos = model.tokenizer.token_to_id(EOS)
    for row in stopped[:, clean.shape[1] :].tolist():  # a row that stopped is padded with [EOS], as TransformerLens
        assert eos not in row or all(t == eos for t in row[row.index(eos) :])


def test_nnsight_traces_equal_our_hooks(pair):
    model, _, clean, corrupt, _ = pair
    wrapped = nnsight.NNsight(model)
    hook = "blocks.0.hook_resid_post"
    with torch.no_grad():
        logits, cache = model.run_with_cache(clean)
        with wrapped.trace(clean):
            saved = wrapped.blocks[0].hook_resid_post.output.save()
            traced_logits = wrapped.output.save()
    torch.testing.assert_close(saved, cache[hook], atol=0, rtol=0)
    torch.testing.assert_close(traced_logits, logits, atol=0, rtol=0)

    with torch.no_grad():
        _, corrupt_cache = model.run_with_cache(corrupt)
        patched = model.run_with_hooks(clean, fwd_hooks=[(hook, lambda act, hook: corrupt_cache[hook.name])])
        with wrapped.trace(clean):
            wrapped.blocks[0].hook_resid_post.output = corrupt_cache[hook]
            traced_patched = wrapped.output.save()
    assert not torch.allclose(patched, logits)
    torch.testing.assert_close(traced_patched, patched, atol=0, rtol=0)


def test_transformer_lens_functions_refuse_what_a_llama_lacks():
    model = HookedLlama.from_preset("1.25M")
    with pytest.raises(SSLensError, match="no tokenizer"):
        model.to_tokens("a cat")
