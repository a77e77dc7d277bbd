"""Tokenizers: the SimpleStories WordPiece recipe (train, load, save) and encoding with an explicit [EOS]."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel, WordPiece
from tokenizers.pre_tokenizers import WhitespaceSplit
from tokenizers.trainers import WordPieceTrainer

from .errors import SSLensError
from .fileio import atomic_write_text

UNK, EOS = "[UNK]", "[EOS]"


def simplestories_pipeline(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Give `tok` the pipeline of the official SimpleStories tokenizers: lowercase (`` and '' become "), split on
    whitespace, isolate punctuation and single digits, WordPiece decoding, [EOS] appended by the post-processor."""
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Lowercase(),
            normalizers.Replace("``", '"'),
            normalizers.Replace("''", '"'),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Whitespace(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    if tok.token_to_id(EOS) is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"$A {EOS}", pair="$A $B:1", special_tokens=[(EOS, tok.token_to_id(EOS))]
        )
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> tokenizers.Tokenizer:
    """Train the SimpleStories WordPiece recipe on `texts`: [UNK] = 0, [EOS] = 1, `vocab_size` entries at most.
    WordPiece keeps every character of the texts whatever `vocab_size` asks, so a size below that alphabet is
    refused, naming the smallest that works (62 for the embedded corpus).

    The same texts give the same tokenizer in every process. The trainer alone does not: it numbers the ##continuation
    characters in hash-map order and breaks ties between equally frequent pairs by those numbers (tokenizers issue
    #1794), so two fresh runs of one recipe could learn different vocabularies. A first pass finds those characters,
    and the second gives them fixed ids, in sorted order, right after the special tokens. `texts` is read twice: a
    one-shot iterator is first copied to a list."""
    if vocab_size < 1:
        raise SSLensError(f"the vocabulary size must be positive, got {vocab_size}")
    texts = list(texts) if iter(texts) is texts else texts
    continuations = sorted(t for t in _wordpiece(texts, 0, [UNK, EOS]).get_vocab() if t.startswith("##"))
    trained = _wordpiece(texts, vocab_size, [UNK, EOS, *continuations])
    if trained.get_vocab_size() > vocab_size:
        raise SSLensError(
            f"a vocabulary of {vocab_size} tokens cannot hold these stories: [UNK], [EOS] and each "
            f"character, alone and as a ##continuation, take {trained.get_vocab_size()}; ask for at least "
            f"{trained.get_vocab_size()} (d_vocab when training, --vocab-size for sslens tokenizer train)"
        )
    vocab = trained.get_vocab(with_added_tokens=False)  # the ##continuations, not special tokens once trained
    tok = tokenizers.Tokenizer(WordPiece(vocab, unk_token=UNK, continuing_subword_prefix="##"))
    tok.add_special_tokens([UNK, EOS])
    return simplestories_pipeline(tok)


def _wordpiece(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> tokenizers.Tokenizer:
    tok = simplestories_pipeline(tokenizers.Tokenizer(WordPiece(unk_token=UNK, continuing_subword_prefix="##")))
    trainer = WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, continuing_subword_prefix="##", show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def alphabet_size(tok: tokenizers.Tokenizer) -> int:
    """The entries no WordPiece tokenizer of `tok`'s characters can do without: its special tokens and each
    character, alone and as a ##continuation (`train_tokenizer` never returns fewer, whatever it is asked)."""
    vocab = tok.get_vocab(with_added_tokens=False)
    return len(tok.get_added_tokens_decoder()) + sum(len(t) == 1 or (len(t) == 3 and t.startswith("##")) for t in vocab)


def load_tokenizer(path: str | Path) -> tokenizers.Tokenizer:
    """Any `tokenizer.json`, the official SimpleStories ones included."""
    path = Path(path)
    if not path.is_file():
        raise SSLensError(f"tokenizer file {path} not found")
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:
        raise SSLensError(f"{path} is not a tokenizers JSON file ({str(e).splitlines()[0][:120]})") from None


def save_tokenizer(tok: tokenizers.Tokenizer, path: str | Path) -> None:
    atomic_write_text(Path(path), tok.to_str(pretty=True))


def eos_id(tok: tokenizers.Tokenizer) -> int:
    token_id = tok.token_to_id(EOS)
    if token_id is None:
        raise SSLensError(f"the tokenizer has no {EOS} token")
    return token_id


def encode(tok: tokenizers.Tokenizer, text: str, *, eos: bool) -> list[int]:
    """Token ids of `text`, followed by [EOS] only if `eos`. Whatever the file's post-processor does, the caller
    decides: a story for training ends in [EOS], a generation prompt must not."""
    ids = tok.encode(text, add_special_tokens=False).ids
    return ids + [eos_id(tok)] if eos else ids


def encode_batch(tok: tokenizers.Tokenizer, texts: list[str], *, eos: bool) -> list[list[int]]:
    """`encode` for many texts at once, in parallel threads (the `tokenizers` Rust pool)."""
    suffix = [eos_id(tok)] if eos else []
    return [e.ids + suffix for e in tok.encode_batch(texts, add_special_tokens=False)]


def placeholder_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A stand-in for models without a trained tokenizer: token i is the word "t{i}", 0 is [UNK], 1 is [EOS].
    It makes an export loadable by tools that insist on tokenizer files (TransformerBridge)."""
    vocab = {f"t{i}": i for i in range(vocab_size)} | {UNK: 0, EOS: 1}
    del vocab["t0"], vocab["t1"]
    tok = tokenizers.Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok
