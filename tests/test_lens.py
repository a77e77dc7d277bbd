import pytest
import torch

from sslens.lens import (
    first_token_scores,
    head_summaries,
    induction_scores,
    induction_targets,
    logit_lens,
    previous_token_scores,
    repeated_tokens_induction_scores,
    token_probabilities,
)

from conftest import random_tokens


def test_logit_lens_ends_at_the_model_output_and_starts_at_the_embedding(small_model):
    tokens = random_tokens(1, 12)[0]
    lens = logit_lens(small_model, tokens, k=3)
    assert lens.labels == ["embed", "blocks.0", "blocks.1", "blocks.2"]
    with torch.no_grad():
        final = small_model(tokens[None])[0].softmax(-1)
        embed = (small_model.ln_final(small_model.W_E[tokens]) @ small_model.W_U).softmax(-1)
    for row, expected in [(-1, final), (0, embed)]:
        probs, ids = expected.topk(3, dim=-1)
        torch.testing.assert_close(lens.top_probs[row], probs)
        assert torch.equal(lens.top_tokens[row], ids)
    # the actual next token: its probability and its rank among all tokens, by hand at one position
    p = 4
    assert lens.target_probs[-1, p] == pytest.approx(final[p, tokens[p + 1]].item(), rel=1e-5)
    assert lens.target_ranks[-1, p] == (final[p] > final[p, tokens[p + 1]]).sum()
    assert lens.target_ranks.shape == (4, 11)


def test_head_scores_on_hand_made_patterns():
    pos = 6
    prev = torch.zeros(pos, pos)
    prev[0, 0] = 1
    prev[torch.arange(1, pos), torch.arange(pos - 1)] = 1
    first = torch.zeros(pos, pos)
    first[:, 0] = 1
    pattern = torch.stack([prev, first])[None]  # [layer 1, head 2, q, k]
    assert previous_token_scores(pattern)[0].tolist() == pytest.approx([1.0, 1 / (pos - 1)])  # row 1 of "first" is both
    assert first_token_scores(pattern)[0].tolist() == pytest.approx([2 / pos, 1.0])  # rows 0 and 1 of "prev"
    tokens = torch.tensor([5, 6, 7, 5, 6, 8])
    assert induction_targets(tokens) == [None, None, None, 1, 2, None]
    induction = torch.zeros(pos, pos)
    induction[3, 1] = induction[4, 2] = 1
    assert induction_scores(torch.stack([induction, prev])[None], tokens).tolist() == [[1.0, 0.0]]
    assert induction_scores(pattern, torch.arange(pos)).tolist() == [[0.0, 0.0]]  # nothing repeats


def test_head_summaries_read_the_models_patterns(small_model):
    tokens = random_tokens(1, 10)[0]
    _, cache = small_model.run_with_cache(tokens[None])
    summaries = head_summaries(small_model, tokens)
    layer1 = cache["blocks.1.attn.hook_pattern"][0]
    assert summaries["previous token"][1, 2] == pytest.approx(layer1[2].diagonal(-1).mean().item())
    assert summaries["first token"][1, 3] == pytest.approx(layer1[3, :, 0].mean().item())


def test_repeated_tokens_induction_score_finds_a_planted_induction_head(small_model):
    seq = 20

    def plant(pattern, hook):
        perfect = torch.zeros_like(pattern[:, 1])
        perfect[:, :seq, 0] = 1
        perfect[:, torch.arange(seq, 2 * seq), torch.arange(1, seq + 1)] = 1  # token after the first occurrence
        pattern[:, 1] = perfect
        return pattern

    with small_model.hooks(fwd_hooks=[("blocks.2.attn.hook_pattern", plant)]):
        scores = repeated_tokens_induction_scores(small_model, seq_len=seq, batch=2)
    assert scores.shape == (3, 4) and scores[2, 1] == pytest.approx(1.0)
    assert scores[:2].max() < 0.5 and scores[2, [0, 2, 3]].max() < 0.5


def test_token_probabilities_agree_with_generation_logprobs(small_model):
    sample = small_model.generate([[5, 9, 200]], max_new_tokens=6, temperature=1.0, seed=0, stop_at_eos=False)[0]
    tokens = torch.tensor(sample.prompt_tokens + sample.tokens)
    probs = token_probabilities(small_model, tokens, k=4)
    torch.testing.assert_close(probs.probs[2:].log(), torch.tensor(sample.logprobs), atol=1e-4, rtol=1e-4)
    assert probs.top_tokens.shape == (8, 4) and (probs.top_probs[:, :1] >= probs.probs[:, None]).all()
