"""Reading a model on one prompt: the logit lens (or a tuned lens), attention-head summaries and next-token
probabilities.

The explorer and the notebooks draw from these; each returns plain tensors, indexed as the docstrings say.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache

from .generate import prompt_ids
from .model import HookedLlama


@dataclass
class LogitLens:
    """The final norm and unembedding applied to the residual stream before each layer and after the last.

    Row `l` of every tensor is `labels[l]`: "embed" (the residual entering block 0), then "blocks.i" (leaving
    block i). `target_*` describe the token that actually comes next (none for the last position).
    """

    labels: list[str]
    top_tokens: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    target_probs: Float[Tensor, "layer pos_minus_1"]
    target_ranks: Int[Tensor, "layer pos_minus_1"]  # 0: the lens's top prediction


class TunedLens(nn.Module):
    """The tuned lens (Belrose et al., 2023): one affine translator per residual the logit lens reads except the last
    (the model's own output), so row l is read as unembed(ln_final(h + h A_l + b_l)). A and b start at zero: an
    untrained tuned lens is the logit lens."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.b = nn.Parameter(torch.zeros(n_layers, d_model))

    def forward(self, resid: Float[Tensor, "layer_plus_1 ... d_model"]) -> Float[Tensor, "layer_plus_1 ... d_model"]:
        shape = (len(self.b),) + (1,) * (resid.ndim - 2) + (-1,)
        early = resid[:-1] + torch.einsum("l...d,lde->l...e", resid[:-1], self.A) + self.b.view(shape)
        return torch.cat([early, resid[-1:]])


def lens_residuals(model: HookedLlama, cache: ActivationCache) -> Float[Tensor, "layer_plus_1 batch pos d_model"]:
    """The residuals a lens reads, in `LogitLens.labels` order: entering block 0, then leaving each block."""
    n = model.cfg.n_layers
    return torch.stack([cache["blocks.0.hook_resid_pre"]] + [cache[f"blocks.{i}.hook_resid_post"] for i in range(n)])


def lens_logits(
    model: HookedLlama, resid: Float[Tensor, "layer_plus_1 ... d_model"], tuned: TunedLens | None = None
) -> Float[Tensor, "layer_plus_1 ... d_vocab"]:
    """Each residual read out through the final norm (its own RMS) and the unembedding, translated first by a tuned
    lens if given."""
    return model.logits_from_resid(resid if tuned is None else tuned(resid))


@torch.inference_mode()
def logit_lens(
    model: HookedLlama,
    tokens: Int[Tensor, " pos"],
    k: int = 5,
    cache: ActivationCache | None = None,
    tuned: TunedLens | None = None,
) -> LogitLens:
    """What each layer's residual stream would predict if the model stopped there, read by the logit lens or, with
    `tuned`, a tuned lens. The final norm is applied afresh to each residual (its own RMS), so the last row equals
    the model's real output."""
    if cache is None:
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.endswith(("resid_pre", "resid_post")))
    n = model.cfg.n_layers
    probs = lens_logits(model, lens_residuals(model, cache)[:, 0], tuned).float().softmax(-1)  # [layer, pos, vocab]
    top_probs, top_tokens = probs.topk(k, dim=-1)
    targets = tokens[1:].to(probs.device)
    target_probs = probs[:, :-1].gather(-1, targets[None, :, None].expand(n + 1, -1, 1))[..., 0]
    target_ranks = (probs[:, :-1] > target_probs[..., None]).sum(-1)
    return LogitLens(["embed"] + [f"blocks.{i}" for i in range(n)], top_tokens, top_probs, target_probs, target_ranks)


def previous_token_scores(pattern: Float[Tensor, "layer head q_pos k_pos"]) -> Float[Tensor, "layer head"]:
    """Mean attention from each position to the one before it (positions 1 onwards)."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(-1)


def first_token_scores(pattern: Float[Tensor, "layer head q_pos k_pos"]) -> Float[Tensor, "layer head"]:
    """Mean attention to position 0 (the usual resting place of heads with nothing to do)."""
    return pattern[..., 0].mean(-1)


def induction_scores(
    pattern: Float[Tensor, "layer head q_pos k_pos"], tokens: Int[Tensor, " pos"]
) -> Float[Tensor, "layer head"]:
    """Mean attention from a token that occurred before to the token that followed its previous occurrence
    (A B ... A -> B); zero where no token repeats."""
    targets = induction_targets(tokens)
    rows = [i for i, j in enumerate(targets) if j is not None]
    if not rows:
        return torch.zeros(pattern.shape[:2], device=pattern.device)
    cols = [targets[i] for i in rows]
    return pattern[..., rows, cols].mean(-1)


def induction_targets(tokens: Int[Tensor, " pos"]) -> list[int | None]:
    """For each position, the position after the previous occurrence of its token (None if it has none or if
    that would be the position itself)."""
    last: dict[int, int] = {}
    targets: list[int | None] = []
    for i, t in enumerate(tokens.tolist()):
        j = last.get(t)
        targets.append(j + 1 if j is not None and j + 1 < i else None)
        last[t] = i
    return targets


@torch.inference_mode()
def head_summaries(
    model: HookedLlama, tokens: Int[Tensor, " pos"], cache: ActivationCache | None = None
) -> dict[str, Float[Tensor, "layer head"]]:
    """Previous-token, first-token and induction scores of every head on this prompt."""
    if cache is None:
        _, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n.endswith("hook_pattern"))
    pattern = cache.stack_activation("pattern")[:, 0]  # [layer, head, q, k]
    return {
        "previous token": previous_token_scores(pattern),
        "first token": first_token_scores(pattern),
        "induction": induction_scores(pattern, tokens),
    }


@torch.inference_mode()
def repeated_tokens_induction_scores(
    model: HookedLlama, seq_len: int = 50, batch: int = 8, seed: int = 0
) -> Float[Tensor, "layer head"]:
    """The standard induction score: on random tokens repeated twice, mean attention from each token of the
    second copy to the token after its first occurrence (seq_len - 1 back)."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(0, model.cfg.d_vocab, (batch, seq_len), generator=gen)
    tokens = torch.cat([first, first], 1).to(model.W_E.device)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    pattern = cache.stack_activation("pattern")  # [layer, batch, head, q, k]
    return pattern.diagonal(offset=-(seq_len - 1), dim1=-2, dim2=-1)[..., 1:].mean((1, -1))


@dataclass
class TokenProbabilities:
    """For each position p >= 1 of a sequence: the probability the model gave the token at p (from position
    p - 1), and its top-k alternatives there."""

    probs: Float[Tensor, " pos_minus_1"]
    top_tokens: Int[Tensor, "pos_minus_1 k"]
    top_probs: Float[Tensor, "pos_minus_1 k"]


@torch.inference_mode()
def token_probabilities(
    model: HookedLlama, tokens: Int[Tensor, " pos"], k: int = 10, logits: Float[Tensor, "pos d_vocab"] | None = None
) -> TokenProbabilities:
    """`logits`: the model's output on `tokens` where a forward already made them (saves running it again)."""
    if logits is None:
        logits = model(tokens[None])[0]
    probs = logits[:-1].float().softmax(-1)
    top_probs, top_tokens = probs.topk(k, dim=-1)
    return TokenProbabilities(probs.gather(-1, tokens[1:, None].to(probs.device))[:, 0], top_tokens, top_probs)


EXPLORE_NEW_TOKENS = 20  # the explorer's default continuation: long enough to read, short enough to stay interactive


@dataclass
class Exploration:
    """One prompt and its continuation as the explorer shows them, in plain data (numpy arrays, strings), so the
    app can cache it. Positions run over prompt + continuation; token strings are the tokenizer's ("##" pieces)."""

    n_prompt: int  # where the continuation starts
    tokens: list[str]
    prompt_tokens: list[str]
    new_tokens: list[str]
    text: str | None
    new_probs: list[float]  # each new token's probability
    alternatives: list[list[tuple[str, float]]]  # each new position's top 10 (token, probability)
    pattern: Float[np.ndarray, "layer head q_pos k_pos"]
    heads: dict[str, Float[np.ndarray, "layer head"]]  # head_summaries
    lens: LensView  # the logit lens
    tuned_lens: LensView | None  # the checkpoint's tuned lens, if it has one


@dataclass
class LensView:
    """A LogitLens in plain data: token strings ([layer][pos][k]) and numpy arrays."""

    labels: list[str]
    top_tokens: list[list[list[str]]]
    top_probs: Float[np.ndarray, "layer pos k"]
    target_probs: Float[np.ndarray, "layer pos_minus_1"]
    target_ranks: Int[np.ndarray, "layer pos_minus_1"]

    @classmethod
    def of(cls, lens: LogitLens, decode) -> LensView:
        return cls(
            lens.labels,
            [[[decode(t) for t in ks] for ks in row] for row in lens.top_tokens.tolist()],
            lens.top_probs.cpu().numpy(),
            lens.target_probs.cpu().numpy(),
            lens.target_ranks.cpu().numpy(),
        )


@torch.inference_mode()
def explore(
    model: HookedLlama,
    prompt: str,
    max_new_tokens: int = EXPLORE_NEW_TOKENS,
    tuned: TunedLens | None = None,
    **sampling,
) -> Exploration:
    """Continue `prompt`, then one forward over prompt + continuation (so the model's own tokens can be examined)
    for every layer's attention pattern, the head scores and the logit lens (and the tuned lens, if given)."""
    ids = prompt_ids(model, prompt)
    tok = model.tokenizer
    sample = model.generate([ids], max_new_tokens, **sampling)[0]
    tokens = torch.tensor(ids + sample.tokens, device=model.W_E.device)
    logits, cache = model.run_with_cache(
        tokens[None], names_filter=lambda n: n.endswith(("resid_pre", "resid_post", "hook_pattern"))
    )
    lens = logit_lens(model, tokens, k=5, cache=cache)
    tuned_view = (
        None
        if tuned is None
        else LensView.of(logit_lens(model, tokens, k=5, cache=cache, tuned=tuned), tok.id_to_token)
    )
    probs = token_probabilities(model, tokens, k=10, logits=logits[0])
    new = slice(len(ids) - 1, None)
    decode = tok.id_to_token
    return Exploration(
        n_prompt=len(ids),
        tokens=[decode(t) for t in tokens.tolist()],
        prompt_tokens=[decode(t) for t in ids],
        new_tokens=[decode(t) for t in sample.tokens],
        text=sample.text,
        new_probs=probs.probs[new].tolist(),
        alternatives=[
            [(decode(t), p) for t, p in zip(ts, ps)]
            for ts, ps in zip(probs.top_tokens[new].tolist(), probs.top_probs[new].tolist())
        ],
        pattern=cache.stack_activation("pattern")[:, 0].cpu().numpy(),
        heads={name: v.cpu().numpy() for name, v in head_summaries(model, tokens, cache=cache).items()},
        lens=LensView.of(lens, decode),
        tuned_lens=tuned_view,
    )
