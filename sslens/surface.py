"""What TransformerLens code expects of a HookedTransformer, for HookedLlama.

TransformerLens's own tools (`transformer_lens.patching`, `head_detector`, `ActivationCache`, `FactoredMatrix`
utilities) read model-level weights, `cfg.device` / `cfg.dtype` and the tokenizer helpers below. A Llama trained
here has no BOS token, so nothing is ever prepended: `prepend_bos=True` is refused rather than ignored.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import FactoredMatrix

from .errors import SSLensError
from .tokenizer import EOS, encode

if TYPE_CHECKING:
    import tokenizers

    from .config import ModelConfig


def _stacked(module: str, weight: str, shape: str) -> property:
    """A TransformerLens model-level weight: the per-block weight stacked over layers."""

    def get(self: TransformerLensSurface) -> Tensor:
        return torch.stack([getattr(getattr(block, module), weight) for block in self.blocks])

    get.__doc__ = f"`blocks[i].{module}.{weight}` stacked: [{shape}]"
    return property(get)


class TransformerLensSurface:
    """Weight views, tokenizer helpers and `cfg.device` as HookedTransformer has them (mixed into HookedLlama)."""

    cfg: ModelConfig
    tokenizer: tokenizers.Tokenizer | None

    def _apply(self, fn, *args, **kwargs):
        """Every move or cast (`to`, `cuda`, `half`, ...) ends here: keep `cfg.device` / `cfg.dtype`, which
        TransformerLens allocates its results with, where the weights are."""
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.device, self.cfg.dtype = self.embed.weight.device, self.embed.weight.dtype
        return out

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.weight

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.embed.weight.T

    W_Q = _stacked("attn", "W_Q", "layer head d_model d_head")
    W_K = _stacked("attn", "W_K", "layer head d_model d_head")
    W_V = _stacked("attn", "W_V", "layer head d_model d_head")
    W_O = _stacked("attn", "W_O", "layer head d_head d_model")
    W_gate = _stacked("mlp", "W_gate", "layer d_model d_mlp")
    W_in = _stacked("mlp", "W_in", "layer d_model d_mlp")
    W_out = _stacked("mlp", "W_out", "layer d_mlp d_model")

    @property
    def QK(self) -> FactoredMatrix:
        """W_Q W_K^T per layer and head ([layer, head, d_model, d_model]), GQA's keys repeated per query head. The
        rotary rotation sits between the two factors in the real forward, so this is the position-free part."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        """W_V W_O per layer and head ([layer, head, d_model, d_model]), GQA's values repeated per query head."""
        return FactoredMatrix(self.W_V, self.W_O)

    def tokens_to_residual_directions(self, tokens: str | int | Int[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
        """The residual direction whose dot product with the RMS-scaled residual gives each token's logit.

        Unlike TransformerLens without `fold_ln`, this includes ln_final's weight, so `cache.logit_attrs` on a
        `decompose_resid` stack sums exactly to the logits of this unfolded (real) Llama.
        """
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        tokens = torch.as_tensor(tokens, device=self.W_E.device)
        return self.W_E[tokens] * self.ln_final.w

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Tensor:
        """Llama has no biases: the accumulated bias is zero."""
        return torch.zeros(self.cfg.d_model, device=self.W_E.device, dtype=self.W_E.dtype)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Give each head its own copy of the block input (hooks `blocks.{i}.attn.hook_q_input`, `hook_k_input`,
        `hook_v_input`, before ln1), as TransformerLens; path patching into one head's query needs it. Slower."""
        self.cfg.use_split_qkv_input = use_split_qkv_input

    def _tok(self) -> tokenizers.Tokenizer:
        if self.tokenizer is None:
            raise SSLensError("this model has no tokenizer attached; pass token ids instead of strings")
        return self.tokenizer

    def to_single_token(self, string: str) -> int:
        ids = encode(self._tok(), string, eos=False)
        if len(ids) != 1:
            raise SSLensError(f"{string!r} is {len(ids)} tokens, not one")
        return ids[0]

    def to_tokens(
        self,
        input: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = None,
        move_to_device: bool = True,
        truncate: bool = True,
    ) -> Int[Tensor, "batch pos"]:
        """Token ids as TransformerLens's `to_tokens`: texts of different lengths are padded with [EOS] on the
        right (or the left), and cut to n_ctx when `truncate`. No BOS: these tokenizers have none."""
        if prepend_bos:
            raise SSLensError("these models have no BOS token; call to_tokens without prepend_bos=True")
        rows = [encode(self._tok(), text, eos=False) for text in ([input] if isinstance(input, str) else input)]
        if truncate:
            rows = [row[: self.cfg.n_ctx] for row in rows]
        width = max(map(len, rows))
        pad = [self._tok().token_to_id(EOS) or 0]
        left = padding_side == "left"
        tokens = torch.tensor([pad * (width - len(r)) + r if left else r + pad * (width - len(r)) for r in rows])
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_string(self, tokens: int | list[int] | Int[Tensor, "... pos"]) -> str | list[str]:
        """The text of a token sequence, or a list of texts for a batch (as TransformerLens)."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim > 1:
            return [self.to_string(row) for row in tokens]
        return self._tok().decode(tokens.reshape(-1).tolist(), skip_special_tokens=False)

    def to_str_tokens(self, input: str | list[str] | int | list[int] | Tensor) -> list[str] | list[list[str]]:
        """Each token as its vocabulary entry (continuations keep their '##', so word boundaries stay visible)."""
        if isinstance(input, list) and input and isinstance(input[0], str):
            return [self.to_str_tokens(text) for text in input]
        tokens = self.to_tokens(input)[0] if isinstance(input, str) else torch.as_tensor(input)
        if tokens.ndim > 1 and tokens.shape[0] > 1:
            return [self.to_str_tokens(row) for row in tokens]
        return [self._tok().id_to_token(t) for t in tokens.reshape(-1).tolist()]
