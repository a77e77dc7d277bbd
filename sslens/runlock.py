"""One writer per run directory: an exclusive lock held for the whole run.

The lock is `flock` on OUT/.lock, which the kernel drops when its process dies however it dies (SIGKILL included),
so a dead run never blocks the next start and no stale lock needs clearing by hand. The file holds the holder's
PID, for the refusal message. It is removed on release; a starter that locked a file another process had just
removed sees that the path no longer leads to its file and tries again.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import SSLensError

LOCK_NAME = ".lock"


class RunLock:
    """An exclusive lock on `run_dir`, taken at construction (refused with one line if another process holds it)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise SSLensError(
                    f"{run_dir} is being written by another sslens process (PID {holder}); wait for it "
                    "to finish or stop it, or choose another --out_dir"
                ) from None
            if self._still_at_path(fd):
                break
            os.close(fd)  # the holder before us removed this file on release: lock the one now at the path
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd

    def _still_at_path(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
