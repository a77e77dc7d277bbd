"""Speed against the tools users would otherwise run, measured as ratios in one process.

Each comparison runs both sides on the same weights, input, dtype and thread count, alternating them
repetition by repetition so that machine noise hits both; the reported ratio is the median of the
per-repetition ratios (peer time / our time: > 1 means sslens is faster).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from transformers import LlamaForCausalLM
from transformer_lens.model_bridge import TransformerBridge

from .model import HookedLlama
from .tokenizer import placeholder_tokenizer


@dataclass
class Row:
    name: str
    ours_tok_s: float
    peer: str
    peer_tok_s: float
    ratio: float
    goal: float


def interleaved(ours: Callable[[], object], peer: Callable[[], object], reps: int) -> tuple[list[float], list[float]]:
    """Wall times of `reps` alternating runs of each side, after one warm-up run of each."""
    ours(), peer()
    t_ours, t_peer = [], []
    for i in range(reps):
        order = [(ours, t_ours), (peer, t_peer)]
        for fn, times in order if i % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return t_ours, t_peer


def compare(name: str, ours: Callable, peer_name: str, peer: Callable, tokens: int, reps: int, goal: float) -> Row:
    t_ours, t_peer = interleaved(ours, peer, reps)
    return Row(name, tokens / statistics.median(t_ours), peer_name, tokens / statistics.median(t_peer),
               statistics.median(p / o for o, p in zip(t_ours, t_peer)), goal)


def bench_model(preset: str = "5M", batch: int = 8, seq: int = 512, reps: int = 5) -> list[Row]:
    """Hook-free forward vs HF LlamaForCausalLM; full run_with_cache vs TransformerLens's TransformerBridge."""
    model = HookedLlama.from_preset(preset, seed=0).eval()
    model.tokenizer = placeholder_tokenizer(model.cfg.d_vocab)  # the bridge insists on a tokenizer
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    n = batch * seq
    with tempfile.TemporaryDirectory() as export, torch.inference_mode():
        model.save_hf(export)
        hf = LlamaForCausalLM.from_pretrained(export).eval()
        bridge = TransformerBridge.boot_transformers(export, device="cpu")
        rows = [
            compare("forward_nohooks_vs_hf", lambda: model(tokens), "HF LlamaForCausalLM (sdpa)",
                    lambda: hf(tokens).logits, n, reps, goal=1.0),
            compare("cache_vs_tl_bridge", lambda: model.run_with_cache(tokens), "TransformerBridge.run_with_cache",
                    lambda: bridge.run_with_cache(tokens), n, reps, goal=2.0),
        ]
    return rows


def format_rows(rows: list[Row], header: str) -> str:
    lines = [header, f"{'row':<24}{'sslens tok/s':>14}{'peer tok/s':>12}{'ratio':>8}{'goal':>7}  peer"]
    for r in rows:
        mark = "ok" if r.ratio >= r.goal else "MISSED"
        lines.append(f"{r.name:<24}{r.ours_tok_s:>14,.0f}{r.peer_tok_s:>12,.0f}{r.ratio:>7.2f}x{r.goal:>6.1f}x  "
                     f"{r.peer} [{mark}]")
    return "\n".join(lines)


def as_json(rows: list[Row]) -> dict:
    return {r.name: asdict(r) for r in rows}
