"""Stories in, token windows out: load (hub, parquet/jsonl/json, txt), tokenize in parallel, cache, batch.

Packing: each story becomes its ids followed by one [EOS]; the stories are concatenated into one token stream,
and window i is stream[i * n_ctx : i * n_ctx + n_ctx + 1] (x = w[:-1], y = w[1:]), so every token is a target
exactly once. No token is dropped ([UNK] included) and [EOS] appears only between stories.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
import torch
from jaxtyping import Int
from torch import Tensor

from .errors import SSLensError
from .fileio import atomic_replace, clear_stale_temporaries, temporary_path, writing
from .tokenizer import encode_batch

DEFAULT_SOURCE = "SimpleStories/SimpleStories"
SYNTH_STORIES = 100_000  # size of the embedded corpus's train split for `synth` (`synth:N` picks another)
TEXT_COLUMNS = ("story", "text")  # SimpleStories, TinyStories
_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}
OFFLINE_HINT = "offline, use --data=synth (the embedded corpus) or --data=PATH (a local .parquet/.jsonl/.json/.txt)"
EXPECTS_JSON = 'sslens expects one JSON object per line (or one JSON array of them), e.g. {"story": "..."}'
EXPECTS_UTF8 = "sslens reads UTF-8 text: convert the file (e.g. iconv -f LATIN1 -t UTF-8)"

datasets.disable_progress_bars()


class MissingSplit(SSLensError):
    """The source has no such split (a single file has only "train")."""


def load_stories(
    source: str | Path = DEFAULT_SOURCE, split: str = "train", text_column: str | None = None
) -> datasets.Dataset:
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
        ds = _load_split(
            lambda: datasets.load_dataset(str(path), split=split),
            f"directory {path}",
            split,
            lambda: _check_directory(path),
        )
    elif path.suffix in (*_FORMATS, ".txt") or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(source)):
        raise SSLensError(f"data path {source} not found")
    else:
        ds = _load_split(lambda: datasets.load_dataset(str(source), split=split), f"hub dataset {source}", split)
    column = text_column or next((c for c in TEXT_COLUMNS if c in ds.column_names), None)
    if column not in ds.column_names:
        raise SSLensError(
            f"{source} has no text column {column or ' or '.join(TEXT_COLUMNS)!r} "
            f"(columns: {', '.join(ds.column_names)}); name it with text_column"
        )
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
    clear_stale_temporaries(path.parent)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        synth.write_parquet(path, count, seed=0, start=start)
    return datasets.load_dataset("parquet", data_files=str(path), split="train")


def _load_file(path: Path, split: str) -> datasets.Dataset:
    if split != "train":
        raise MissingSplit(f"{path} is a single file: it has only the split 'train', not {split!r}")
    if path.suffix == ".txt":
        text = _decode(path, path.read_bytes())
        parts = text.split("<|endoftext|>") if "<|endoftext|>" in text else re.split(r"\n\s*\n", text)
        return datasets.Dataset.from_dict({"story": [p.strip() for p in parts if p.strip()]})
    if path.suffix not in _FORMATS:
        raise SSLensError(f"{path}: unsupported file type {path.suffix!r}; use .parquet, .jsonl, .json or .txt")
    return _load_split(
        lambda: datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train"),
        str(path),
        split,
        lambda: _check_file(path),
    )


def _load_split(
    load: Callable[[], datasets.Dataset], what: str, split: str, check: Callable[[], None] | None = None
) -> datasets.Dataset:
    """`load()`, with its failure said in one line. `check` (local data; None for the hub) examines the files
    themselves and raises naming the file, the line or row, and what sslens expects: datasets' own errors name
    neither. The text is checked for UTF-8 too, which the JSON reader lets through."""
    verbosity = huggingface_hub.logging.get_verbosity(), datasets.logging.get_verbosity()
    huggingface_hub.logging.set_verbosity_error()  # the error below says it all, in one line (datasets logs
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a reader's failure on stderr before raising)
    try:
        ds = load()
        if check:
            ds.data.table.validate(full=True)
        return ds
    except Exception as e:
        if isinstance(e, ValueError) and "Unknown split" in str(e):
            raise MissingSplit(f"{what} has no split {split!r}") from None
        if check is None:
            raise SSLensError(
                f"{what.split()[-1]} is not a local path and the hub could not provide it "
                f"({type(e).__name__}); {OFFLINE_HINT}"
            ) from None
        reason = _reason(e)
    finally:
        huggingface_hub.logging.set_verbosity(verbosity[0])
        datasets.logging.set_verbosity(verbosity[1])
    check()  # outside the handler: what it finds is the whole story, not a sequel to datasets' traceback
    raise SSLensError(f"cannot read {what}: {reason}")


def _reason(e: BaseException) -> str:
    """The innermost cause's type and first line (datasets wraps the reader's error in a generic one)."""
    while e.__cause__ is not None:
        e = e.__cause__
    line = next(iter(str(e).splitlines()), "")[:200]
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _check_directory(path: Path) -> None:
    files = sorted(f for f in path.rglob("*") if f.suffix in _FORMATS and f.is_file())
    if not files:
        raise SSLensError(
            f"directory {path} holds no .parquet, .jsonl or .json files; point --data at a directory "
            "of them (e.g. data/train-*.parquet) or at one data file"
        )
    for file in files:
        _check_file(file)


def _check_file(path: Path) -> None:
    """Raise if pyarrow's footer or Python's json finds this file unreadable, empty or not UTF-8."""
    if path.suffix != ".parquet":
        return _check_json(path)
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as e:
        raise SSLensError(
            f"{path} is not a parquet file ({_reason(e)}); sslens expects a parquet table with a "
            f"{' or '.join(TEXT_COLUMNS)} column"
        ) from None
    if rows == 0:
        raise SSLensError(f"{path} holds no stories: the table has no rows")


def _check_json(path: Path) -> None:
    """Find the first line that is not UTF-8 or not a JSON object (a file holding one JSON array is read whole)."""
    offset, seen = 0, False
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            text = _decode(path, line, offset, number)
            offset += len(line)
            if not seen and text.lstrip().startswith("["):
                return _check_json_array(path)
            if not text.strip():
                continue
            seen = True
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise SSLensError(f"{path} line {number} is not valid JSON ({e.msg}); {EXPECTS_JSON}") from None
            if not isinstance(row, dict):
                raise SSLensError(f"{path} line {number} is not a JSON object; {EXPECTS_JSON}")
    if not seen:
        raise SSLensError(f"{path} is empty: it holds no stories")


def _check_json_array(path: Path) -> None:
    try:
        rows = json.loads(_decode(path, path.read_bytes()))
    except json.JSONDecodeError as e:
        raise SSLensError(f"{path} line {e.lineno} is not valid JSON ({e.msg}); {EXPECTS_JSON}") from None
    if not rows:
        raise SSLensError(f"{path} holds no stories: the array is empty")


def _decode(path: Path, data: bytes, offset: int = 0, line: int = 1) -> str:
    """`data` (found at byte `offset`, line `line` of `path`) as text, or a refusal naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data.count(b"\n", 0, e.start)
        raise SSLensError(
            f"{path} is not UTF-8 text: byte {offset + e.start} (0x{data[e.start]:02x}), on line {line}, "
            f"cannot be decoded; {EXPECTS_UTF8}"
        ) from None


@dataclass
class Split:
    """A run's training and validation stories, and how validation was chosen (recorded in the run directory, so
    a later evaluation reads the same held-out stories: `validation_stories`)."""

    train: datasets.Dataset
    val: datasets.Dataset
    held_out: np.ndarray | None  # rows of the source's train split held out; None: the source's own test split

    def record(self, source: str | Path, seed: int) -> dict:
        return {
            "data": str(source),
            "seed": seed,
            "validation": "test split" if self.held_out is None else "held out",
            "train_stories": len(self.train),
            "val_stories": len(self.val),
            "train_fingerprint": fingerprint(self.train),
            "val_fingerprint": fingerprint(self.val),
            "held_out_rows": None if self.held_out is None else self.held_out.tolist(),
        }


def train_val(
    source: str | Path = DEFAULT_SOURCE, val_fraction: float = 0.01, seed: int = 0, text_column: str | None = None
) -> Split:
    """Training stories and validation stories: the source's test split when it has one, else the rows
    `held_out_rows` picks (the same for the same data, fraction and seed), which the training stories never hold."""
    train = load_stories(source, "train", text_column)
    try:
        return Split(train, load_stories(source, "test", text_column), None)
    except MissingSplit:
        pass
    if len(train) < 2:
        raise SSLensError(f"{source} has {len(train)} story: too few to hold some out for validation")
    held_out = held_out_rows(len(train), val_fraction, seed)
    kept = np.ones(len(train), dtype=bool)
    kept[held_out] = False
    return Split(train.select(np.flatnonzero(kept)), train.select(held_out), held_out)


def validation_stories(record: dict, text_column: str | None = None) -> datasets.Dataset:
    """The validation stories a `Split.record` describes, read again from its source; refused if the source's
    stories are no longer the ones the record was made from."""
    if record["validation"] == "test split":
        val = load_stories(record["data"], "test", text_column)
    else:
        val = load_stories(record["data"], "train", text_column).select(record["held_out_rows"])
    if fingerprint(val) != record["val_fingerprint"]:
        raise SSLensError(
            f"{record['data']} no longer holds the validation stories this run was made with "
            "(their texts differ); restore the data the run was trained on"
        )
    return val


def training_stories(record: dict, text_column: str | None = None) -> datasets.Dataset:
    """The training stories a `Split.record` describes (the source's train split less its held-out rows), refused
    as `validation_stories` refuses if the source no longer holds them."""
    train = load_stories(record["data"], "train", text_column)
    if record["held_out_rows"]:
        kept = np.ones(len(train), dtype=bool)
        kept[record["held_out_rows"]] = False
        train = train.select(np.flatnonzero(kept))
    if fingerprint(train) != record["train_fingerprint"]:
        raise SSLensError(
            f"{record['data']} no longer holds the training stories this run was made with "
            "(their texts differ); restore the data the run was trained on"
        )
    return train


def held_out_rows(n_stories: int, val_fraction: float, seed: int) -> np.ndarray:
    """The rows of a source without a test split that validation holds out: a seeded random choice, in order."""
    count = min(n_stories - 1, max(1, round(n_stories * val_fraction)))
    return np.sort(np.random.default_rng(seed).permutation(n_stories)[:count])


def fingerprint(stories: datasets.Dataset, batch_size: int = 65_536) -> str:
    """A hash of the texts of exactly these stories, in order: a subset (`select`, a held-out split) has its own,
    whatever table it is a view of. Zero-copy: the bytes each text occupies, read from Arrow's buffers."""
    lengths, texts = hashlib.blake2b(digest_size=12), hashlib.blake2b(digest_size=12)
    for batch in stories.select_columns(["story"]).with_format("arrow").iter(batch_size):
        for strings in batch.column("story").chunks:  # a slice keeps its parent's whole buffers: honour its offset
            _, offsets, data = strings.buffers()
            dtype = np.int64 if pa.types.is_large_string(strings.type) else np.int32
            ends = np.frombuffer(offsets, dtype=dtype)[strings.offset : strings.offset + len(strings) + 1]
            lengths.update(np.diff(ends).astype(np.int64).tobytes())
            if len(strings) and data is not None:
                texts.update(memoryview(data)[int(ends[0]) : int(ends[-1])])
    return hashlib.blake2b(lengths.digest() + texts.digest(), digest_size=12).hexdigest()


def tokenizer_hash(tok: tokenizers.Tokenizer) -> str:
    return hashlib.blake2b(tok.to_str().encode(), digest_size=12).hexdigest()


def cache_root() -> Path:
    """Where sslens caches token streams and the embedded corpus: $SSLENS_CACHE, else ~/.cache/sslens."""
    return Path(os.environ.get("SSLENS_CACHE", Path.home() / ".cache" / "sslens"))


def tokenize(
    stories: datasets.Dataset, tok: tokenizers.Tokenizer, cache_dir: str | Path | None = None, chunk_size: int = 20_000
) -> np.ndarray:
    """The stories' token stream (each story + [EOS]) as a read-only uint16 memmap, cached by the stories'
    content and the tokenizer, so a second run opens it at once and any change rebuilds it."""
    if tok.get_vocab_size() > 2**16:
        raise SSLensError(f"tokenizer vocabulary {tok.get_vocab_size()} does not fit uint16 token storage")
    cache_dir = Path(cache_dir) if cache_dir else cache_root() / "tokens"
    path = cache_dir / f"{fingerprint(stories)}-{tokenizer_hash(tok)}.u16"
    clear_stale_temporaries(cache_dir)
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        _write_tokens(stories, tok, path, chunk_size)
    return np.memmap(path, dtype=np.uint16, mode="r")


def _write_tokens(stories: datasets.Dataset, tok: tokenizers.Tokenizer, path: Path, chunk_size: int) -> None:
    """Tokenize into a temporary file beside `path`, then rename it: a killed or failed write leaves no `path`. A
    full disk is reported with the room the whole stream needs, estimated from the share written so far."""
    tmp = temporary_path(path)
    written = done = 0
    try:
        with open(tmp, "xb") as f:
            for start in range(0, len(stories), chunk_size):
                texts = stories[start : start + chunk_size]["story"]
                ids = encode_batch(tok, texts, eos=True)
                data = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.uint16).tobytes()
                written, done = written + len(data), done + len(texts)
                f.write(data)  # a plain write, so a full disk raises ENOSPC (numpy's tofile reports only a count)
        atomic_replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # first, so the free room the report names is real
        with writing(path, written * len(stories) // max(done, 1)):
            raise
    finally:
        tmp.unlink(missing_ok=True)


class Batches:
    """Seeded, shuffled batches of windows over a token stream. The whole data state is one integer,
    `position` (windows consumed so far): epoch e visits every window once in an order fixed by (seed, e)."""

    def __init__(
        self, tokens: np.ndarray, n_ctx: int, batch_size: int, seed: int = 0, position: int = 0, what: str = "the data"
    ):
        self.tokens, self.n_ctx, self.batch_size, self.seed, self.position = tokens, n_ctx, batch_size, seed, position
        self.n_windows = (len(tokens) - 1) // n_ctx
        if self.n_windows < 1:
            raise SSLensError(
                f"{what} hold {len(tokens)} tokens, fewer than one window of n_ctx + 1 = {n_ctx + 1}; "
                "use more stories or a smaller n_ctx"
            )
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def window(self, i: int) -> np.ndarray:
        return self.tokens[i * self.n_ctx : (i + 1) * self.n_ctx + 1]

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
