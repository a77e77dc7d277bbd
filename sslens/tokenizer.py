"""Tokenizers (HF `tokenizers` objects)."""

from __future__ import annotations

import tokenizers
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit


def placeholder_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A stand-in for models without a trained tokenizer: token i is the word "t{i}", 0 is [UNK], 1 is [EOS].
    It makes an export loadable by tools that insist on tokenizer files (TransformerBridge)."""
    vocab = {f"t{i}": i for i in range(vocab_size)} | {"[UNK]": 0, "[EOS]": 1}
    del vocab["t0"], vocab["t1"]
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok
