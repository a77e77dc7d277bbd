"""Sampling with a KV cache: greedy, temperature, top-k, top-p; batched prompts of different lengths.

Each step feeds only the new token through the model (its keys and values are appended to a `KVCache`), so a
step costs one token's forward instead of the whole context. Hooks attached to the model (e.g. with
`model.hooks(fwd_hooks=...)`) run on every step: on the prompt once, then on one position per step.

Length rule: prompt + new tokens never exceed n_ctx; a prompt needs at least one free position, and
`max_new_tokens` is cut to what fits.

`compile=True` runs the one-token steps, sampling included, through `torch.compile` (the prompt itself runs
eagerly): the first call compiles for about 10 s, then a 5M batch-1 step on CPU costs about a third (BENCHMARKS.md).
It applies while no hook is attached; with hooks the steps run eagerly, so hooks see every step exactly as without
compiling.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .errors import SSLensError
from .inductor import decode_backend, hooks_attached, skip_hook_guards
from .kvcache import KVCache
from .tokenizer import EOS, encode

if TYPE_CHECKING:
    from .model import HookedLlama


@dataclass
class Sample:
    """One continuation. `text` is what follows the prompt, as the tokenizer decodes it (with its leading space);
    `logprobs` are the model's log-probabilities of each new token (temperature 1, before top-k/top-p)."""

    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]
    text: str | None


def exponential_noise(
    logits: Float[Tensor, "batch d_vocab"], temperature: float, top_k: int | None, generator: torch.Generator | None
) -> Float[Tensor, "batch candidates"] | None:
    """The Exp(1) draws `choose` needs: one per candidate token (the k most likely with top-k, else the whole
    vocabulary); None when greedy."""
    if temperature == 0:
        return None
    candidates = logits.shape[-1] if top_k is None else min(top_k, logits.shape[-1])
    return torch.empty(logits.shape[0], candidates, device=logits.device, dtype=torch.float32).exponential_(
        generator=generator
    )


def choose(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    noise: Float[Tensor, "batch candidates"] | None,
) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"]]:
    """One token per row, and its log-probability under the model (temperature 1, before top-k/top-p).

    Temperature 0 is greedy; top-k keeps the k most likely tokens; top-p the smallest set whose probability reaches
    p (the most likely token always stays); the order is HF's: temperature, k, p. A sample is the candidate with
    the largest probability / noise: the exponential race torch.multinomial runs for one draw, so the same draws
    give the same tokens, here and inside a compiled step.
    """
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
    else:
        scaled = logits / temperature
        if top_k is None and top_p is None:
            tokens = (scaled.softmax(-1) / noise).argmax(-1)
        else:
            if top_k is not None:
                values, indices = scaled.topk(noise.shape[-1])
            else:
                values, indices = scaled.sort(-1, descending=True)
            if top_p is not None:
                probs = values.softmax(-1)
                values = values.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
            tokens = indices.gather(-1, (values.softmax(-1) / noise).argmax(-1, keepdim=True)).squeeze(-1)
    return tokens, logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


def sample_tokens(
    logits: Float[Tensor, "batch d_vocab"],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """One token per row, as `choose` picks it, with noise drawn from `generator`."""
    return choose(logits, temperature, top_k, top_p, exponential_noise(logits, temperature, top_k, generator))[0]


def check_settings(
    temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int, num_samples: int = 1
) -> None:
    """Refuse sampling settings that have no meaning (an infinite temperature would sample uniformly, NaN nothing),
    before a model is loaded or a token is drawn."""
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise SSLensError(f"temperature must be >= 0 and finite (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise SSLensError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise SSLensError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise SSLensError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if num_samples < 1:
        raise SSLensError(f"num_samples must be >= 1, got {num_samples}")


def decode_step(
    model: HookedLlama,
    tokens: Int[Tensor, "batch 1"],
    cache: KVCache,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    noise: Tensor | None,
) -> tuple[Int[Tensor, " batch"], Float[Tensor, " batch"]]:
    """Feed each row's newest token and choose the next one."""
    return choose(model(tokens, past_kv_cache=cache)[:, -1], temperature, top_k, top_p, noise)


def step_function(model: HookedLlama, compile: bool) -> Callable[..., tuple[Tensor, Tensor]]:
    """`decode_step` for `model`; with `compile` and no hook attached anywhere in the model, compiled once per model
    for any cache length (dynamic shapes) and, on first use of each, per batch size and sampling setting. A hook
    attached in the middle of a stream takes effect from the next stream."""
    step = functools.partial(decode_step, model)
    if not compile or any(hooks_attached(m) for m in model.modules()):
        return step
    owner, compiled = getattr(model, "_compiled_step", (None, None))
    if owner is None or owner() is not model:  # a copy of a model (copy.deepcopy) compiles its own
        compiled = torch.compile(
            step, backend=decode_backend, dynamic=True, options={"guard_filter_fn": skip_hook_guards}
        )
        model._compiled_step = (weakref.ref(model), compiled)
    return compiled


@torch.inference_mode()
def stream(
    model: HookedLlama,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    *,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    eos: int | None = None,
    compile: bool = False,
) -> Iterator[tuple[Int[Tensor, " batch"], Float[Tensor, " batch"]]]:
    """Yield each step's new tokens and their log-probabilities. Rows are left-padded prompts (`attention_mask`
    0 at padding). A row that produced `eos` keeps producing it; the stream ends when every row has."""
    check_settings(temperature, top_k, top_p, max_new_tokens)
    batch, pos = tokens.shape
    if pos == 0 or (attention_mask is not None and not bool(attention_mask.sum(-1).all())):
        raise SSLensError("empty prompt: give at least one token")
    if pos >= model.cfg.n_ctx:
        raise SSLensError(
            f"the prompt is {pos} tokens; the context is {model.cfg.n_ctx}, so at most "
            f"{model.cfg.n_ctx - 1} leave room to generate"
        )
    cache = KVCache(model.cfg, batch, model.W_E.device, model.W_E.dtype)
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    logits = model(tokens, attention_mask=attention_mask, past_kv_cache=cache)[:, -1]
    next_tokens, logprobs = choose(
        logits, temperature, top_k, top_p, exponential_noise(logits, temperature, top_k, generator)
    )
    step = step_function(model, compile)
    steps = min(max_new_tokens, model.cfg.n_ctx - pos)
    for i in range(steps):
        if eos is not None:
            next_tokens = next_tokens.masked_fill(finished, eos)
            finished |= next_tokens == eos
        yield next_tokens, logprobs
        if i + 1 == steps or (eos is not None and bool(finished.all())):
            return
        noise = exponential_noise(logits, temperature, top_k, generator)  # the prompt's logits: only their shape counts
        next_tokens, logprobs = step(next_tokens[:, None], cache, temperature, top_k, top_p, noise)


def prompt_ids(model: HookedLlama, prompt: str) -> list[int]:
    """A text prompt's token ids (no [EOS]), refusing what cannot be continued: no tokenizer, no tokens, or no
    room left in the context."""
    if model.tokenizer is None:
        raise SSLensError("this model has no tokenizer attached; pass token ids instead of text")
    ids = encode(model.tokenizer, prompt, eos=False)
    if not ids:
        raise SSLensError("empty prompt: give at least one word")
    if len(ids) >= model.cfg.n_ctx:
        raise SSLensError(
            f"the prompt is {len(ids)} tokens; the context is {model.cfg.n_ctx}, so at most "
            f"{model.cfg.n_ctx - 1} leave room to generate"
        )
    return ids


def left_pad(prompts: Sequence[Sequence[int]], pad: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Prompts of different lengths as one batch, padded on the left, and the attention mask (0 at padding)."""
    width = max(len(p) for p in prompts)
    tokens = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long)
    return tokens, mask


def generate(
    model: HookedLlama,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    num_samples: int = 1,
    stop_at_eos: bool = True,
    compile: bool = False,
) -> list[Sample]:
    """Continue each prompt `num_samples` times, all in one batch; a list of Samples, prompt by prompt.

    Prompts are strings (encoded with the model's tokenizer, no [EOS]) or token-id lists. The same seed gives the
    same samples; with temperature 0 a prompt's continuation is the same whatever else shares its batch.
    """
    check_settings(temperature, top_k, top_p, max_new_tokens, num_samples)
    tok = model.tokenizer
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise SSLensError("no prompts given")
    ids = [prompt_ids(model, p) if isinstance(p, str) else list(p) for p in prompts for _ in range(num_samples)]
    eos = tok.token_to_id(EOS) if stop_at_eos and tok is not None else None  # None: no [EOS] in the vocabulary
    tokens, mask = left_pad(ids, pad=eos or 0)
    device = model.W_E.device
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    steps = list(
        stream(
            model,
            tokens.to(device),
            mask.to(device) if not mask.all() else None,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
            eos=eos,
            compile=compile,
        )
    )
    new = torch.stack([t for t, _ in steps], 1).tolist() if steps else [[] for _ in ids]
    logprobs = torch.stack([lp for _, lp in steps], 1).tolist() if steps else [[] for _ in ids]
    samples = []
    for prompt, row, lps in zip(ids, new, logprobs):
        if eos is not None and eos in row:
            end = row.index(eos) + 1  # keep the [EOS] that ended the story, drop what follows
            row, lps = row[:end], lps[:end]
        samples.append(Sample(prompt, row, lps, None if tok is None else continuation_text(tok, prompt, row)))
    return samples


def continuation_text(tok, prompt: list[int], new: list[int]) -> str:
    """The text that `new` adds after `prompt` (decoding the two together keeps word pieces and spacing right)."""
    before = tok.decode(prompt)
    full = tok.decode(prompt + new)
    return full[len(before) :] if full.startswith(before) else " " + tok.decode(new)


def stream_text(
    model: HookedLlama,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> Iterator[str]:
    """Continue one prompt, yielding text as it is produced, whole words at a time (a later word piece or
    punctuation can change how the end of the text decodes, so the unfinished word is held back)."""
    ids = prompt_ids(model, prompt)
    tok = model.tokenizer
    eos = tok.token_to_id(EOS)
    new: list[int] = []
    shown = ""
    steps = stream(
        model,
        torch.tensor([ids], device=model.W_E.device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        generator=generator,
        eos=eos,
        compile=compile,
    )
    for token, _ in steps:
        new.append(int(token))
        text = continuation_text(tok, ids, new)
        done = text[: text.rfind(" ") + 1]
        if done.startswith(shown) and len(done) > len(shown):
            yield done[len(shown) :]
            shown = done
    text = continuation_text(tok, ids, new)
    if text.startswith(shown) and len(text) > len(shown):
        yield text[len(shown) :]
