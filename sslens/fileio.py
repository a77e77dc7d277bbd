"""Crash-safe file writes: a file is either the old version or the complete new one, never half-written."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_replace(src: Path, dst: Path) -> None:
    """Move a finished file `src` onto `dst` (same filesystem): flush it to disk, then rename."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)
