"""Activations stored once on disk, so several SAE widths or k values train on the same tokens without running the
model again. A store holds one hook's activations (a transcoder's: two hooks' side by side) over the first N tokens of a run's training windows, in order,
as a memory-mapped .npy file (fp32, or bf16 at half the room), written as one directory with one rename, and keyed
like the token cache: by the model's weights, the hook, the token stream, the window order and N. Its room is
checked before any activation is computed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .data import Batches, cache_root
from .errors import SSLensError
from .fileio import atomic_directory, atomic_write_text, free_bytes, mib
from .model import HookedLlama
from .probe import feature_widths
from .sae import SAEConfig, activations

DTYPES = {"fp32": (torch.float32, np.float32), "bf16": (torch.bfloat16, np.uint16)}  # bf16 kept as its raw bits
DATA_FILE, META_FILE = "activations.npy", "store.json"


def store_key(model: HookedLlama, hook: str | list[str], windows: Batches, n_tokens: int, dtype: str) -> str:
    """A hash of what the activations depend on: every weight, the hook, the token stream, the windows' order
    (seed, position, shape) and how many tokens are kept, in which dtype."""
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(np.ascontiguousarray(windows.tokens).tobytes())
    settings = (hook, windows.n_ctx, windows.batch_size, windows.seed, windows.position, n_tokens, dtype)
    h.update(repr(settings).encode())
    return h.hexdigest()


def activation_store(
    model: HookedLlama,
    hook: str | list[str],
    windows: Batches,
    n_tokens: int,
    dtype: str = "fp32",
    root: Path | None = None,
) -> Path:
    """The store of `hook`'s activations over the first `n_tokens` tokens of `windows` (built if missing, refused
    before any work if the disk lacks the room)."""
    if dtype not in DTYPES:
        raise SSLensError(f"unknown activation store dtype {dtype!r}; dtypes: {', '.join(DTYPES)}")
    path = Path(root or cache_root() / "activations") / store_key(model, hook, windows, n_tokens, dtype)
    if (path / META_FILE).is_file():
        return path
    hooks = [hook] if isinstance(hook, str) else list(hook)
    d_in = sum(feature_widths(model, hooks))
    need = n_tokens * d_in * np.dtype(DTYPES[dtype][1]).itemsize
    if need > (free := free_bytes(path.parent)):
        raise SSLensError(
            f"the activation store needs {mib(need)} at {path.parent} and {mib(free)} is free; "
            "store bf16, train on fewer tokens, free some space, or set SSLENS_CACHE to another disk"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_directory(path, need) as tmp:
        data = np.lib.format.open_memmap(tmp / DATA_FILE, mode="w+", dtype=DTYPES[dtype][1], shape=(n_tokens, d_in))
        filled = 0
        while filled < n_tokens:
            part = activations(model, hooks, next(windows)[:, :-1]).flatten(0, 1)[: n_tokens - filled].cpu()
            data[filled : filled + len(part)] = to_numpy(part, dtype)
            filled += len(part)
        data.flush()
        del data
        meta = {"hooks": hooks, "tokens": n_tokens, "d_in": d_in, "dtype": dtype, "model": model.cfg.model_name}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=1) + "\n")
    return path


def to_numpy(x: Tensor, dtype: str) -> np.ndarray:
    return x.to(DTYPES[dtype][0]).view(torch.int16).numpy().view(np.uint16) if dtype == "bf16" else x.float().numpy()


def read_rows(data: np.ndarray, rows: np.ndarray, dtype: str) -> Float[Tensor, "n d_in"]:
    """Rows of a store as fp32, read in file order (sorted) for the page cache's sake, returned in `rows`' order."""
    order = np.argsort(rows)
    out = torch.from_numpy(np.ascontiguousarray(data[rows[order]]))
    out = out.view(torch.bfloat16).float() if dtype == "bf16" else out
    return out[torch.from_numpy(np.argsort(order))]


class StoredActivations:
    """A store's rows, a batch at a time, in an order shuffled once per pass (seeded); `buffer` is a sample of the
    store (the first `buffer_tokens` rows) for the input scale and the decoder bias's initialisation."""

    def __init__(self, path: Path, cfg: SAEConfig):
        meta = json.loads((Path(path) / META_FILE).read_text())
        if meta["hooks"] != cfg.hooks:
            raise SSLensError(f"{path} stores {' + '.join(meta['hooks'])}, not {' + '.join(cfg.hooks)}")
        self.data, self.dtype, self.cfg = np.load(Path(path) / DATA_FILE, mmap_mode="r"), meta["dtype"], cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.order, self.used = self.rng.permutation(len(self.data)), 0
        self.buffer = read_rows(self.data, np.arange(min(cfg.buffer_tokens, len(self.data))), self.dtype)

    def __iter__(self) -> Iterator[Float[Tensor, "batch_tokens d_in"]]:
        return self

    def state(self) -> tuple[dict[str, Tensor], dict]:
        return {"order": torch.from_numpy(self.order)}, {"used": self.used, "rng": self.rng.bit_generator.state}

    def load_state(self, tensors: dict[str, Tensor], scalars: dict) -> None:
        self.order, self.used = tensors["order"].numpy(), scalars["used"]
        self.rng.bit_generator.state = scalars["rng"]

    def __next__(self) -> Float[Tensor, "batch_tokens d_in"]:
        if self.used + self.cfg.batch_tokens > len(self.order):
            self.order, self.used = self.rng.permutation(len(self.data)), 0
        rows = self.order[self.used : self.used + self.cfg.batch_tokens]
        self.used += len(rows)
        return read_rows(self.data, rows, self.dtype)
