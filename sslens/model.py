"""HookedLlama: the SimpleStories Llama with a TransformerLens HookPoint on every activation.

Numerics follow HF `LlamaForCausalLM` (RMSNorm in fp32, rotate-half RoPE on the full head, GQA head order
h -> h // n_rep, SwiGLU, tied unembedding); hook names and weight views follow TransformerLens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import einops
import tokenizers
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from .config import ModelConfig, load_config, memory_needed, parameter_count
from .errors import SSLensError
from .inductor import hooks_attached
from .kvcache import KVCache
from .surface import TransformerLensSurface
from .tokenizer import EOS, alphabet_size


class Hook(HookPoint):
    """A TransformerLens HookPoint that returns its input at once while nothing is attached to it, skipping
    nn.Module's call machinery: a model has ~20 per layer, and a one-token generation step mostly pays overhead."""

    def __call__(self, x: Tensor) -> Tensor:
        return super().__call__(x) if self.active else x

    @property
    def active(self) -> bool:
        # nnsight routes a module it wraps through a `forward` of its own, set on the instance
        return hooks_attached(self) or "forward" in self.__dict__


class RMSNorm(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.hook_scale = Hook()  # [batch, pos, 1]: sqrt(mean(x^2) + eps), as TransformerLens
        self.hook_normalized = Hook()  # [batch, pos, d_model]: x / scale, before the weight

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if not (self.hook_scale.active or self.hook_normalized.active):  # the fused kernel, same fp32 numerics
            return F.rms_norm(x.float(), self.w.shape, eps=self.eps).to(x.dtype) * self.w
        x32 = x.float()
        scale = self.hook_scale((x32.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x32 * scale.reciprocal()).to(x.dtype) * self.w


def rotary_tables(cfg: ModelConfig) -> tuple[Float[Tensor, "n_ctx d_head"], Float[Tensor, "n_ctx d_head"]]:
    inv_freq = 1.0 / cfg.rotary_base ** (torch.arange(0, cfg.d_head, 2, dtype=torch.float32) / cfg.d_head)
    angles = torch.outer(torch.arange(cfg.n_ctx, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def column_major(layer: nn.Linear | nn.Embedding) -> nn.Linear | nn.Embedding:
    """`layer` with its weight stored column-major (shape as usual; use `.reshape`, not `.view`, on it). F.linear then
    multiplies by a contiguous W^T: on CPU a one-token step's matrix-vector products run ~2.5x faster, reading the
    weights at memory speed; training speed is unchanged (both measured, see BENCHMARKS.md)."""
    layer.weight = nn.Parameter(layer.weight.detach().t().contiguous().t())
    return layer


@dataclass
class AttentionContext:
    """What every layer's attention needs about the positions of one forward call, computed once per call."""

    cos: Tensor  # [batch or 1, pos, 1, d_head]
    sin: Tensor
    mask: Bool[Tensor, "batch 1 q_pos k_pos"] | None  # None: plain causal (all keys when q_pos == 1)
    start: int  # cached positions before this call
    cache: KVCache | None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.n_rep = cfg.n_heads // cfg.n_key_value_heads
        # Q, K and V in one matrix (rows: Q heads, then K heads, then V heads): one GEMM reads x once.
        self.qkv_sizes = [cfg.n_heads * cfg.d_head] + 2 * [cfg.n_key_value_heads * cfg.d_head]
        self.qkv_proj = column_major(nn.Linear(cfg.d_model, sum(self.qkv_sizes), bias=False))
        self.o_proj = column_major(nn.Linear(cfg.n_heads * cfg.d_head, cfg.d_model, bias=False))
        self.hook_q = Hook()  # [batch, pos, head, d_head]
        self.hook_k = Hook()  # [batch, pos, kv_head, d_head]
        self.hook_v = Hook()  # [batch, pos, kv_head, d_head]
        self.hook_rot_q = Hook()
        self.hook_rot_k = Hook()
        self.hook_attn_scores = Hook()  # [batch, head, q_pos, k_pos], -inf above the diagonal
        self.hook_pattern = Hook()  # [batch, head, q_pos, k_pos]
        self.hook_z = Hook()  # [batch, pos, head, d_head]
        # Only with cfg.use_split_qkv_input (see TransformerBlock.split_inputs): [batch, pos, head or kv_head, d_model]
        self.hook_q_input, self.hook_k_input, self.hook_v_input = Hook(), Hook(), Hook()

    # TransformerLens weight views: W_Q [head, d_model, d_head], W_O [head, d_head, d_model]. W_K and W_V are
    # repeated to one per query head (as TransformerLens does for GQA) so per-head circuits index them directly.
    def _head_weights(self, index: int) -> Float[Tensor, "head d_model d_head"]:
        w = self.qkv_proj.weight.split(self.qkv_sizes)[index]
        return einops.rearrange(w, "(h e) d -> h d e", e=self.cfg.d_head)

    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self._head_weights(0)

    @property
    def W_K(self) -> Float[Tensor, "head d_model d_head"]:
        return self._head_weights(1).repeat_interleave(self.n_rep, dim=0)

    @property
    def W_V(self) -> Float[Tensor, "head d_model d_head"]:
        return self._head_weights(2).repeat_interleave(self.n_rep, dim=0)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return einops.rearrange(self.o_proj.weight, "d (h e) -> h e d", h=self.cfg.n_heads)

    def pattern_needed(self) -> bool:
        # Any hook (TransformerLens or plain torch) on scores or pattern needs them materialised.
        return self.hook_attn_scores.active or self.hook_pattern.active

    def forward(
        self, x: Float[Tensor, "batch pos d_model"] | tuple[Tensor, Tensor, Tensor], ctx: AttentionContext
    ) -> Float[Tensor, "batch pos d_model"]:
        """`x` is the normalised residual stream, or (with `use_split_qkv_input`) one copy of it per query head and
        per key/value head for Q, K and V, each [batch, pos, head, d_model]."""
        cfg = self.cfg
        if isinstance(x, tuple):
            q, k, v = (einops.einsum(xi, self._head_weights(i), "b p h d, h d e -> b p h e") for i, xi in enumerate(x))
        else:
            q, k, v = (t.unflatten(-1, (-1, cfg.d_head)) for t in self.qkv_proj(x).split(self.qkv_sizes, dim=-1))
        batch, pos = q.shape[:2]
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        cos, sin = ctx.cos.to(q.dtype), ctx.sin.to(q.dtype)
        q = self.hook_rot_q(apply_rotary(q, cos, sin)).transpose(1, 2)
        k = self.hook_rot_k(apply_rotary(k, cos, sin)).transpose(1, 2)
        v = v.transpose(1, 2)
        if ctx.cache is not None:  # append this call's keys and values, attend over everything cached
            end = ctx.start + pos
            keys, values = ctx.cache.keys[self.layer], ctx.cache.values[self.layer]
            keys[:, :, ctx.start : end] = k
            values[:, :, ctx.start : end] = v
            k, v = keys[:, :, :end], values[:, :, :end]
        if self.pattern_needed():
            z = self.explicit_attention(q, k, v, ctx.mask)
        else:
            # The fused kernel never materialises the [q_pos, k_pos] pattern: the fast path for training,
            # generation and caching anything but scores/pattern.
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None and pos > 1, enable_gqa=self.n_rep > 1
            )
        z = self.hook_z(z.transpose(1, 2))
        return self.o_proj(z.reshape(batch, pos, cfg.n_heads * cfg.d_head))

    def explicit_attention(
        self,
        q: Float[Tensor, "batch head q_pos d_head"],
        k: Float[Tensor, "batch kv_head k_pos d_head"],
        v: Float[Tensor, "batch kv_head k_pos d_head"],
        mask: Bool[Tensor, "batch 1 q_pos k_pos"] | None,
    ) -> Float[Tensor, "batch head q_pos d_head"]:
        """Scores and pattern materialised for their hooks. The n_rep query heads that share a KV head are
        stacked along the query axis, so one batched matmul serves them without copying K or V."""
        batch, n_kv, k_pos, d_head = k.shape
        q_pos = q.shape[2]
        if mask is None:  # causal; with q_pos == 1 the last query sees every key
            bias = torch.full((q_pos, k_pos), float("-inf"), device=q.device, dtype=q.dtype).triu(k_pos - q_pos + 1)
            bias = bias.repeat(self.n_rep, 1)
        else:
            bias = torch.zeros(mask.shape, device=q.device, dtype=q.dtype).masked_fill(~mask, float("-inf"))
            bias = bias[:, None].expand(batch, n_kv, self.n_rep, q_pos, k_pos).reshape(batch * n_kv, -1, k_pos)
        scores = torch.baddbmm(
            bias,
            q.reshape(batch * n_kv, self.n_rep * q_pos, d_head),
            k.reshape(batch * n_kv, k_pos, d_head).transpose(1, 2),
            alpha=1 / math.sqrt(d_head),
        )
        scores = self.hook_attn_scores(scores.view(batch, self.cfg.n_heads, q_pos, k_pos))
        pattern = self.hook_pattern(scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype))
        return (pattern.reshape(batch, n_kv, self.n_rep * q_pos, k_pos) @ v).view(
            batch, self.cfg.n_heads, q_pos, d_head
        )


PADDED_MLP_DEVICES = ("cuda",)  # where training pads d_mlp to a multiple of 8 (see MLP.padded_weights)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pad = -cfg.d_mlp % 8
        self.gate_up_proj = column_major(nn.Linear(cfg.d_model, 2 * cfg.d_mlp, bias=False))  # rows: gate, then up
        self.down_proj = column_major(nn.Linear(cfg.d_mlp, cfg.d_model, bias=False))
        self.hook_pre = Hook()  # gate pre-activation [batch, pos, d_mlp]
        self.hook_pre_linear = Hook()  # up projection [batch, pos, d_mlp]
        self.hook_post = Hook()  # silu(pre) * pre_linear [batch, pos, d_mlp]

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_up_proj.weight.chunk(2)[0].T

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.gate_up_proj.weight.chunk(2)[1].T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.down_proj.weight.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        padded = (
            self.pad
            and x.device.type in PADDED_MLP_DEVICES
            and torch.is_grad_enabled()
            and not any(hooks_attached(m) for m in self.modules())
        )
        if padded:
            gate_up_weight, down_weight = self.padded_weights()
        pre, pre_linear = (F.linear(x, gate_up_weight) if padded else self.gate_up_proj(x)).chunk(2, dim=-1)
        pre, pre_linear = self.hook_pre(pre), self.hook_pre_linear(pre_linear)
        post = self.hook_post(F.silu(pre) * pre_linear)
        return F.linear(post, down_weight) if padded else self.down_proj(post)

    def padded_weights(self) -> tuple[Float[Tensor, "two_d_mlp_padded d_model"], Float[Tensor, "d_model d_mlp_padded"]]:
        """The gate-up and down weights padded with zero rows to a multiple of 8 hidden units, which `forward` uses
        when training on a GPU with nothing hooked in the MLP: the extra units are exactly zero, so outputs and the
        parameters' gradients are those of the plain MLP. The published 35M's d_mlp = 1365 needs it: rows of 1365
        bf16 values are not 16-byte aligned, which rules out cuBLAS's fastest GEMMs and vectorised loads (H200 step
        37% -> 42% MFU). Under torch.compile the pad is fused into autocast's bf16 copy of the weights; parameters,
        hooks and checkpoints keep d_mlp."""
        gate_up = F.pad(self.gate_up_proj.weight.unflatten(0, (2, -1)), (0, 0, 0, self.pad)).flatten(0, 1)
        return gate_up, F.pad(self.down_proj.weight, (0, self.pad))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = RMSNorm(cfg)
        self.attn = Attention(cfg, layer)
        self.ln2 = RMSNorm(cfg)
        self.mlp = MLP(cfg)
        self.hook_resid_pre = Hook()
        self.hook_attn_out = Hook()
        self.hook_resid_mid = Hook()
        self.hook_mlp_out = Hook()
        self.hook_resid_post = Hook()
        self.cfg = cfg

    def forward(
        self, x: Float[Tensor, "batch pos d_model"], ctx: AttentionContext
    ) -> Float[Tensor, "batch pos d_model"]:
        resid_pre = self.hook_resid_pre(x)
        attn_in = self.split_inputs(resid_pre) if self.cfg.use_split_qkv_input else self.ln1(resid_pre)
        resid_mid = self.hook_resid_mid(resid_pre + self.hook_attn_out(self.attn(attn_in, ctx)))
        return self.hook_resid_post(resid_mid + self.hook_mlp_out(self.mlp(self.ln2(resid_mid))))

    def split_inputs(self, resid_pre: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor]:
        """TransformerLens's `use_split_qkv_input`: a copy of the residual stream per query head and per key/value
        head, hooked before the norm, so that what one head reads (its query, key or value) can be patched alone."""
        n_heads, n_kv = self.cfg.n_heads, self.cfg.n_key_value_heads
        hooks = ((self.attn.hook_q_input, n_heads), (self.attn.hook_k_input, n_kv), (self.attn.hook_v_input, n_kv))
        return tuple(self.ln1(hook(resid_pre[:, :, None].repeat(1, 1, n, 1))) for hook, n in hooks)


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on `device`: the free memory of a CUDA device; on the CPU Linux's
    MemAvailable (what can be had without swapping), else the free pages os.sysconf reports. None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):  # not Linux, or an unusual /proc
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def check_memory(cfg: ModelConfig, device: torch.device | str = "cpu") -> None:
    """Refuse a model whose weights and one forward (`memory_needed`) cannot fit in the memory available on
    `device`, before any of it is allocated: a typo like d_model=1000000 would otherwise run into the OOM killer."""
    need, available = memory_needed(cfg), available_memory(device)
    if available is not None and need > available:
        shape = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("n_layers", "d_model", "d_mlp", "d_vocab", "n_ctx"))
        raise SSLensError(
            f"{cfg.model_name} ({shape}) has {parameter_count(cfg):,} parameters and needs about "
            f"{need / 2**30:,.1f} GiB for its weights and one forward, but {available / 2**30:,.1f} GiB "
            f"is available on {torch.device(device).type}; choose a smaller model"
        )


class HookedLlama(TransformerLensSurface, HookedRootModule):
    """A Llama whose every activation is a TransformerLens HookPoint.

    >>> model = HookedLlama.from_preset("5M", seed=0)
    >>> logits, cache = model.run_with_cache(tokens)   # cache: transformer_lens.ActivationCache
    """

    def __init__(self, cfg: ModelConfig, tokenizer: tokenizers.Tokenizer | None = None):
        check_memory(cfg, torch.get_default_device())
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.embed = column_major(nn.Embedding(cfg.d_vocab, cfg.d_model))
        self.hook_embed = Hook()
        self.blocks = nn.ModuleList([TransformerBlock(cfg, layer) for layer in range(cfg.n_layers)])
        self.ln_final = RMSNorm(cfg)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.setup()
        cfg.device, cfg.dtype = self.W_E.device, self.W_E.dtype

    def to(self, *args, **kwargs) -> HookedLlama:
        """nn.Module.to, refusing first a move onto a GPU without room for the weights and one forward."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]  # the parser nn.Module.to itself uses
        if device is not None and device.type == "cuda" and self.W_E.device.type != "cuda":
            check_memory(self.cfg, device)
        return super().to(*args, **kwargs)

    @property
    def tokenizer(self) -> tokenizers.Tokenizer | None:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok: tokenizers.Tokenizer | None) -> None:
        """A tokenizer may have fewer entries than d_vocab (SimpleStories' 4019 with a 4096 model), never more."""
        if tok is not None and tok.get_vocab_size() > self.cfg.d_vocab:
            size, d_vocab, fewest = tok.get_vocab_size(), self.cfg.d_vocab, alphabet_size(tok)
            other = (
                f", or use a tokenizer of at most {d_vocab} tokens (sslens tokenizer train --vocab_size {d_vocab})"
                if d_vocab >= fewest
                else f" (its characters, alone and as ##continuations, take {fewest} tokens)"
            )
            raise SSLensError(
                f"the tokenizer has {size} tokens but the model's d_vocab is {d_vocab}; raise d_vocab "
                f"to at least {size}{other}"
            )
        self._tokenizer = tok

    @classmethod
    def from_preset(cls, name: str | Path, seed: int = 0, **overrides) -> HookedLlama:
        """A freshly initialised model from a preset name ("5M") or YAML path."""
        model = cls(load_config(name, **overrides))
        model.init_weights(seed)
        return model

    def init_weights(self, seed: int) -> None:
        """Normal(0, initializer_range) everywhere, scaled by 1/sqrt(2 n_layers) on the two projections that
        write into the residual stream (GPT-2 style, keeps the residual variance flat with depth); norms at 1."""
        gen = torch.Generator().manual_seed(seed)
        std = self.cfg.initializer_range
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(".w"):
                    p.fill_(1.0)
                else:
                    scale = (
                        1 / math.sqrt(2 * self.cfg.n_layers)
                        if name.endswith(("o_proj.weight", "down_proj.weight"))
                        else 1
                    )
                    p.copy_(torch.randn(p.shape, generator=gen) * std * scale)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        return_type: Literal["logits", "loss", "both"] | None = "logits",
        *,
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        past_kv_cache: KVCache | None = None,
        stop_at_layer: int | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, ""] | tuple[Tensor, Tensor] | None:
        """Logits, or the mean next-token cross-entropy ("loss"), or both, as TransformerLens's forward.

        `attention_mask` (1 = token, 0 = left padding) lets prompts of different lengths share a batch;
        `past_kv_cache` continues the sequence it holds (see KVCache). Both leave a row's logits as if it ran alone.
        `stop_at_layer=n` runs blocks 0 .. n-1 only and returns the residual stream (as TransformerLens).
        """
        if tokens.ndim == 1:
            tokens = tokens[None]
        start = 0 if past_kv_cache is None else past_kv_cache.length
        if start + tokens.shape[-1] > self.cfg.n_ctx:
            raise SSLensError(
                f"{start + tokens.shape[-1]} tokens exceed the context of {self.cfg.n_ctx}; truncate the input"
            )
        ctx = self.attention_context(tokens.shape, start, attention_mask, past_kv_cache)
        x = self.hook_embed(self.embed(tokens))
        for block in self.blocks[:stop_at_layer]:
            x = block(x, ctx)
        if stop_at_layer is not None:
            return x
        logits = self.logits_from_resid(x)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        targets = tokens[:, 1:]
        if attention_mask is not None:  # a target counts only if it and the token predicting it are both real
            targets = targets.masked_fill((attention_mask[:, 1:] * attention_mask[:, :-1]) == 0, -100)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten())
        return loss if return_type == "loss" else (logits, loss)

    def logits_from_resid(
        self, resid: Float[Tensor, "... pos d_model"], positions: slice = slice(None)
    ) -> Float[Tensor, "... pos d_vocab"]:
        """ln_final, then the tied unembedding at `positions`: forward's last step, which lenses apply to earlier
        layers, and patching to the last position alone. The norm sees every position, so its hooks do too."""
        return F.linear(self.ln_final(resid)[..., positions, :], self.embed.weight)

    def attention_context(
        self, shape: torch.Size, start: int, attention_mask: Tensor | None, cache: KVCache | None
    ) -> AttentionContext:
        """Rotary angles and the attention mask of one call, shared by all layers. Without padding every row has
        positions start .. start + pos - 1; with it, a row's positions count only its real tokens."""
        batch, pos = shape
        device = self.rotary_cos.device
        padded = attention_mask is not None and not bool(attention_mask.all())
        if cache is not None:
            if attention_mask is not None:
                cache.key_mask[:, start : start + pos] = attention_mask.bool()
            cache.padded = padded = padded or cache.padded
            if padded:
                new = cache.key_mask[:, start : start + pos]
                positions = cache.next_position[:, None] + new.cumsum(-1) - 1
                cache.next_position += new.sum(-1)
            else:
                cache.next_position += pos
            cache.length = start + pos
            key_mask = cache.key_mask[:, : start + pos]
        else:
            key_mask = None if attention_mask is None else attention_mask.bool()
            positions = None if key_mask is None else key_mask.cumsum(-1) - 1
        if not padded:
            cos = self.rotary_cos[start : start + pos, None]
            sin = self.rotary_sin[start : start + pos, None]
        else:
            positions = positions.clamp(min=0)
            cos, sin = self.rotary_cos[positions][:, :, None], self.rotary_sin[positions][:, :, None]
        if not padded and (start == 0 or pos == 1):
            return AttentionContext(cos, sin, None, start, cache)
        # Key j is visible to query i if it is not after it and not padding; every query sees itself, so a
        # padding row never has all its keys masked (its output is ignored).
        query_at = torch.arange(start, start + pos, device=device)[:, None]
        key_at = torch.arange(start + pos, device=device)
        mask = (key_at <= query_at) & ((key_at == query_at) | (key_mask[:, None] if padded else True))
        return AttentionContext(cos, sin, mask[:, None] if mask.ndim == 3 else mask[None, None], start, cache)

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False, level=None) -> None:
        """TransformerLens's, visiting only the hook points that hold hooks: every `run_with_hooks` ends here, and
        walking all of them took about 1 ms a call, a sixth of a whole attribution-patching sweep."""
        for hp in self.hook_dict.values():
            if hp.fwd_hooks or hp.bwd_hooks:
                hp.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def run_with_cache(
        self, *model_args, return_cache_object: bool = True, remove_batch_dim: bool = False, **kwargs
    ) -> tuple[Tensor, ActivationCache | dict[str, Tensor]]:
        """As TransformerLens: the output and an ActivationCache (or a plain dict)."""
        out, cache = super().run_with_cache(*model_args, remove_batch_dim=remove_batch_dim, **kwargs)
        if return_cache_object:
            return out, ActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        return out, cache

    def generate(self, prompts, max_new_tokens: int = 200, do_sample: bool = True, **settings) -> list | Tensor:
        """Continue prompt strings or token lists with KV-cached sampling: a list of Samples (see
        `sslens.generate.generate`). A token tensor gives a token tensor, as in TransformerLens: each row and its
        continuation, [EOS] after a row has stopped. `do_sample=False` is greedy."""
        from .generate import generate

        if not do_sample:
            settings["temperature"] = 0.0
        if not isinstance(prompts, Tensor):
            return generate(self, prompts, max_new_tokens, **settings)
        rows = prompts[None] if prompts.ndim == 1 else prompts
        samples = generate(self, rows.tolist(), max_new_tokens, **settings)
        width = max(len(s.tokens) for s in samples)
        pad = self._tok().token_to_id(EOS) if self.tokenizer is not None else 0
        new = [s.tokens + [pad] * (width - len(s.tokens)) for s in samples]
        return torch.cat([rows, torch.tensor(new, dtype=rows.dtype, device=rows.device).view(len(rows), width)], 1)

    def save_hf(self, path: str | Path, card: str | None = None) -> None:
        """Write an HF `LlamaForCausalLM` directory (config, safetensors, tokenizer files if attached, README.md with
        `card`, a run card's Markdown, as its evaluation section)."""
        from .hf import save_hf

        save_hf(self, path, card)
