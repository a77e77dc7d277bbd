"""Stories in, token windows out: load (hub, parquet/jsonl/json, txt), tokenize in parallel, cache, batch.

Packing: each story becomes its ids followed by one [EOS]; the stories are concatenated into one token stream,
and window i is stream[i * n_ctx : i * n_ctx + n_ctx + 1] (x = w[:-1], y = w[1:]), so every token is a target
exactly once. No token is dropped ([UNK] included) and [EOS] appears only between stories.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterable
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import tokenizers
import torch
from jaxtyping import Int
from torch import Tensor

from .errors import SSLensError
from .fileio import atomic_replace
from .tokenizer import encode_batch

DEFAULT_SOURCE = "SimpleStories/SimpleStories"
SYNTH_STORIES = 100_000  # size of the embedded corpus's train split for `synth` (`synth:N` picks another)
TEXT_COLUMNS = ("story", "text")  # SimpleStories, TinyStories
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
OFFLINE_HINT = "offline, use --data=synth (the embedded corpus) or --data=PATH (a local .parquet/.jsonl/.json/.txt)"

datasets.disable_progress_bars()


class MissingSplit(SSLensError):
    """The source has no such split (a single file has only "train")."""


def load_stories(source: str | Path = DEFAULT_SOURCE, split: str = "train", text_column: str | None = None) -> datasets.Dataset:
    """One split of a story dataset, with its metadata columns, and the text in column "story".

    `source`: an HF hub dataset name; a .parquet/.jsonl/.json file or a directory of them (the HF layout with
    files named by split, e.g. data/train-*.parquet, included); a .txt file, whose stories are separated by
    `<|endoftext|>` if it contains that marker and by blank lines otherwise; or "synth" / "synth:N", the embedded
    corpus (N train stories, default 100,000, and a test split of N / 100 more), generated once and cached.
    The text column is `text_column`, else "story", else "text".
    """
    path = Path(source)
    if str(source) == "synth" or str(source).startswith("synth:"):
        ds = _synth(str(source), split)
    elif path.is_file():
        ds = _load_file(path, split)
    elif path.is_dir():
        ds = _load_split(lambda: datasets.load_dataset(str(path), split=split), f"directory {path}", split)
    elif path.suffix in (*_FORMATS, ".txt") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)):
        raise SSLensError(f"data path {source} not found")
    else:
        ds = _load_split(lambda: datasets.load_dataset(str(source), split=split), f"hub dataset {source}", split, hub=True)
    column = text_column or next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if column not in ds.column_names:
        raise SSLensError(f"{source} has no text column {column or ' or '.join(TEXT_COLUMNS)!r} "
                          f"(columns: {', '.join(ds.column_names)}); name it with text_column")
    if column != "story":
        ds = ds.rename_column(column, "story")
    if len(ds) == 0:
        raise SSLensError(f"{source} ({split}) holds no stories")
    return ds


def _synth(source: str, split: str) -> datasets.Dataset:
    from . import synth

    try:
        n = int(source.partition(":")[2] or SYNTH_STORIES)
    except ValueError:
        raise SSLensError(f"{source}: the size after 'synth:' must be a number of stories") from None
    if split not in ("train", "test"):
        raise MissingSplit(f"the embedded corpus has splits 'train' and 'test', not {split!r}")
    start, count = (0, n) if split == "train" else (n, max(1, n // 100))
    path = cache_root() / "synth" / f"synth-{synth.version()}-{start}-{count}.parquet"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synth.write_parquet(path, count, seed=0, start=start)
    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _load_file(path: Path, split: str) -> datasets.Dataset:
    if split != "train":
        raise MissingSplit(f"{path} is a single file: it has only the split 'train', not {split!r}")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else re.split(r"\n\s*\n", text)
        return datasets.Dataset.from_dict({"story": [p.strip() for p in parts if p.strip()]})
    if path.suffix not in _FORMATS:
        raise SSLensError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .jsonl, .json or .txt")
    return _load_split(lambda: datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train"), str(path), split)


def _load_split(load, what: str, split: str, hub: bool = False) -> datasets.Dataset:
    verbosity = huggingface_hub.logging.get_verbosity()
    huggingface_hub.logging.set_verbosity_error()  # the error below says it all, in one line
    try:
        return load()
    except Exception as e:
        if isinstance(e, ValueError) and "Unknown split" in str(e):
            raise MissingSplit(f"{what} has no split {split!r}") from None
        if hub:
            raise SSLensError(f"{what.split()[-1]} is not a local path and the hub could not provide it "
                              f"({type(e).__name__}); {OFFLINE_HINT}") from None
        raise SSLensError(f"cannot read {what}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        huggingface_hub.logging.set_verbosity(verbosity)


def train_val(source: str | Path = DEFAULT_SOURCE, val_fraction: float = 0.01, seed: int = 0,
              text_column: str | None = None) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Training stories and validation stories: the source's test split when it has one, else a fixed
    held-out fraction (the same for the same data and seed)."""
    train = load_stories(source, "train", text_column)
    try:
        return train, load_stories(source, "test", text_column)
    except MissingSplit:
        pass
    if len(train) < 2:
        raise SSLensError(f"{source} has {len(train)} story: too few to hold some out for validation")
    parts = train.train_test_split(test_size=max(1, round(len(train) * val_fraction)), seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def fingerprint(stories: datasets.Dataset) -> str:
    """A hash of the story texts themselves (not of file names or dates)."""
    h = hashlib.blake2b(digest_size=12)
    for chunk in stories.data.column("story").chunks:
        for buf in chunk.buffers():
            if buf is not None:
                h.update(buf)
    return h.hexdigest()


def tokenizer_hash(tok: tokenizers.Tokenizer) -> str:
    return hashlib.blake2b(tok.to_str().encode(), digest_size=12).hexdigest()


def cache_root() -> Path:
    """Where sslens caches token streams and the embedded corpus: $SSLENS_CACHE, else ~/.cache/sslens."""
    return Path(os.environ.get("SSLENS_CACHE", Path.home() / ".cache" / "sslens"))


def tokenize(stories: datasets.Dataset, tok: tokenizers.Tokenizer, cache_dir: str | Path | None = None,
             chunk_size: int = 20_000) -> np.ndarray:
    """The stories' token stream (each story + [EOS]) as a read-only uint16 memmap, cached by the stories'
    content and the tokenizer, so a second run opens it at once and any change rebuilds it."""
    if tok.get_vocab_size() > 2**16:
        raise SSLensError(f"tokenizer vocabulary {tok.get_vocab_size()} does not fit uint16 token storage")
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "tokens"
    path = cache_dir / f"{fingerprint(stories)}-{tokenizer_hash(tok)}.u16"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                for start in range(0, len(stories), chunk_size):
                    ids = encode_batch(tok, stories[start:start + chunk_size]["story"], eos=True)
                    np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16).tofile(f)
            atomic_replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return np.memmap(path, dtype=np.uint16, mode="r")


class Batches:
    """Seeded, shuffled batches of windows over a token stream. The whole data state is one integer,
    `position` (windows consumed so far): epoch e visits every window once in an order fixed by (seed, e)."""

    def __init__(self, tokens: np.ndarray, n_ctx: int, batch_size: int, seed: int = 0, position: int = 0):
        self.tokens, self.n_ctx, self.batch_size, self.seed, self.position = tokens, n_ctx, batch_size, seed, position
        self.n_windows = (len(tokens) - 1) // n_ctx
        if self.n_windows < 1:
            raise SSLensError(f"the data has {len(tokens)} tokens, fewer than one window of n_ctx + 1 = {n_ctx + 1}")
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def window(self, i: int) -> np.ndarray:
        return self.tokens[i * self.n_ctx:(i + 1) * self.n_ctx + 1]

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_windows)
        if epoch != self._order_epoch:
            self._order = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._order_epoch = epoch
        return int(self._order[offset])

    def __iter__(self):
        return self

    def windows(self, indices: Iterable[int]) -> Int[Tensor, "batch n_ctx_plus_1"]:
        """These windows as one batch: a row's inputs are `[:-1]`, its targets `[1:]`."""
        return torch.from_numpy(np.stack([self.window(i) for i in indices]).astype(np.int64))

    def __next__(self) -> Int[Tensor, "batch n_ctx_plus_1"]:
        batch = self.windows(self._index(self.position + b) for b in range(self.batch_size))
        self.position += self.batch_size
        return batch
