"""Model FLOPs and the measured matmul peak, for MFU (model FLOPs utilisation)."""

from __future__ import annotations

import functools
import time

import torch

from .config import ModelConfig, layer_weights


def flops_per_token(cfg: ModelConfig, training: bool = True) -> float:
    """Matmul FLOPs per token at full context: 2 per weight of every projection and of the unembedding, plus
    4 x n_ctx x d_model per layer for the attention scores and the weighted sum (counted over the full square, as
    is usual); training is three times the forward (backward = 2x forward). Norms, RoPE and softmax are left out."""
    forward = (
        2 * (cfg.n_layers * layer_weights(cfg) + cfg.d_model * cfg.d_vocab) + 4 * cfg.n_layers * cfg.n_ctx * cfg.d_model
    )
    return forward * (3 if training else 1)


@functools.cache
def peak_flops(device: str, dtype: torch.dtype) -> float:
    """The best matmul throughput this process measures on `device` in `dtype` (square matrices of 2048 on CPU,
    8192 on GPU; best of several runs): the denominator of MFU."""
    n = 8192 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best
