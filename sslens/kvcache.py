"""The key-value cache that lets a forward pass continue a sequence a piece at a time (generation, streaming)."""

from __future__ import annotations

import torch

from .config import ModelConfig


class KVCache:
    """Rotated keys and values of every position seen so far, preallocated to n_ctx for all layers.

    Pass one to `forward` (as `past_kv_cache`, TransformerLens's name) to feed a sequence a piece at a time: each
    call appends its tokens. Rows may be left-padded: `key_mask` is False at padding, and `next_position` is each
    row's rotary position of its next token (its count of real tokens), so a padded row sees exactly what it
    would see alone.
    """

    def __init__(
        self, cfg: ModelConfig, batch: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ):
        shape = (batch, cfg.n_key_value_heads, cfg.n_ctx, cfg.d_head)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.key_mask = torch.ones(batch, cfg.n_ctx, device=device, dtype=torch.bool)
        self.next_position = torch.zeros(batch, device=device, dtype=torch.long)
        self.length = 0  # positions filled, padding included
        self.padded = False
