"""Crash-safe file writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_replace(src: Path, dst: Path) -> None:
    """Move a finished file `src` onto `dst` (same filesystem): flush it to disk, then rename."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so `path` is never half-written."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False) as f:
        f.write(text)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(f.name, 0o666 & ~umask)  # the permissions open() would give, not the temporary file's 0600
    try:
        atomic_replace(Path(f.name), path)
    except BaseException:
        Path(f.name).unlink(missing_ok=True)
        raise
