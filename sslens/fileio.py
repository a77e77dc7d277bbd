"""Crash-safe file writes: a file is either the old version or the complete new one, never half-written; and a
full disk is reported as the path being written and the room it needs, not as a bare OSError."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import SSLensError

FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
STALE_AFTER_S = 3600  # a temporary cache file untouched this long has no live writer (one writes every chunk)
_TEMPORARY = re.compile(r"\..+\.(\d+)\.[0-9a-f]+\.tmp")  # .NAME.PID.RANDOM.tmp: see `temporary_path`


class DiskFull(SSLensError):
    """The disk filled while sslens was writing a file; the message names the file and the room it needs."""


def atomic_replace(src: Path, dst: Path) -> None:
    """Move a finished file `src` onto `dst` (same filesystem): flush it to disk, then rename."""
    with open(src, "rb") as f:
        os.fsync(f.fileno())
    os.replace(src, dst)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file beside it, so `path` is never half-written."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file beside it, so `path` is never half-written."""
    with writing(path, len(data)):
        with tempfile.NamedTemporaryFile(
            "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as f:
            try:
                f.write(data)
                f.flush()
            except BaseException:
                Path(f.name).unlink(missing_ok=True)
                raise
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(f.name, 0o666 & ~umask)  # the permissions open() would give, not the temporary file's 0600
        try:
            atomic_replace(Path(f.name), path)
        except BaseException:
            Path(f.name).unlink(missing_ok=True)
            raise


def temporary_path(path: Path) -> Path:
    """A name beside `path` that this process alone writes (its pid and a random part), so processes filling the
    same cache at once never share one, and a dead writer's leftover can be told from a live one's."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def clear_stale_temporaries(directory: Path) -> None:
    """Remove the `temporary_path` files of writers that were killed: their process is gone or the file has not
    been written for an hour. A live writer's file is left alone."""
    for tmp in directory.glob(".*.tmp"):
        owner = _TEMPORARY.fullmatch(tmp.name)
        try:
            if (owner and not _alive(int(owner[1]))) or time.time() - tmp.stat().st_mtime > STALE_AFTER_S:
                tmp.unlink()
        except FileNotFoundError:
            pass  # its writer renamed or removed it meanwhile


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    return True


def free_bytes(path: Path) -> int:
    """Free space on the filesystem holding `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


@contextlib.contextmanager
def writing(path: Path, need: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing `path` (about `need` bytes, when known) into a DiskFull line that names the
    file, the room it needs and the room there is. Other errors pass through."""
    try:
        yield
    except OSError as e:
        if e.errno not in FULL_DISK_ERRNOS:
            raise
        needs = f"needs about {mib(need)}" if need else "needs more room"
        raise DiskFull(
            f"the disk is full: writing {path} {needs} and {mib(free_bytes(path))} is free; "
            "free some space or choose another directory"
        ) from None


@contextlib.contextmanager
def atomic_directory(final: Path, need: int | None = None) -> Iterator[Path]:
    """Fill a temporary directory beside `final` (yielded), then put it in place with renames: `final` is the old
    directory or the complete new one, never half-written or missing. A failure (a full disk, named by `writing`)
    removes the temporary directory; one a killed writer left is removed by the next writer of `final`."""
    for leftover in [*final.parent.glob(f".tmp-{final.name}-*"), *final.parent.glob(f".tmp-old-{final.name}-*")]:
        if not _alive(int(leftover.name.rsplit("-", 1)[1])) or leftover.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    try:
        with writing(final, need):
            tmp.mkdir(parents=True)
            yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # replacing: set the old copy aside, put the new one in place, then delete the old
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
