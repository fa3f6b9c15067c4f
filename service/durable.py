"""Durable file writes: replace, create-if-absent and shred, each fsynced to the directory.

The keystores and the hold registry keep secrets and records in small files that must
survive a crash whole or not at all. Every operation here writes to a temporary file
beside the target first, ``.<target name>.<pid>.<random>.tmp`` (see ``temp_path``): the
leading dot and the ``.tmp`` suffix keep it out of every caller's listing, and
``temp_files`` finds the ones a crashed or racing writer left behind.

- ``replace_file``: temp file, fsync, rename over the target, fsync the directory. A
  reader sees the old content or the new, never a mix; on any error the target is
  untouched.
- ``create_exclusive``: temp file, fsync, hard link to the target. ``link`` fails if the
  name exists, so of racing writers (threads or processes, no locks) exactly one wins.
- ``shred``: overwrite the file's bytes in place with random bytes, fsync, unlink, fsync
  the directory. Overwriting the inode reaches every hard link to it; it cannot reach
  copies (backups, snapshots, copy-on-write blocks).

The temporary file is removed whatever happens. Errors are the OSError the system call
raised; callers turn them into their own errors, naming their file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["create_exclusive", "fsync_dir", "replace_file", "shred", "temp_files", "temp_path"]


def fsync_dir(directory: Path) -> None:
    """fsync a directory so that a rename, link or unlink in it is durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final``: ``.<name>.<pid>.<12 hex digits>.tmp``."""
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def temp_files(final: Path) -> Iterator[Path]:
    """Temporary files of ``final`` that exist now (left by a crashed or racing writer)."""
    yield from final.parent.glob(f".{final.name}.*.tmp")


def _write_new(tmp: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never write through a name someone else created (a symlink, a racing writer).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` all or nothing: temp file, fsync, rename, fsync directory.

    ``mode`` is the new file's mode (less the umask). Raises the OSError of the failing
    step; ``path`` then still holds its old content (or is still absent).
    """
    tmp = temp_path(path)
    try:
        _write_new(tmp, data, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def create_exclusive(final: Path, data: bytes, *, mode: int = 0o600) -> bool:
    """Create ``final`` holding ``data`` unless it exists; True if this call created it.

    Temp file, fsync, hard link to ``final``, fsync directory. False (``final`` left as
    it was) if the name already exists. Raises the OSError of any other failure:
    FileNotFoundError if the temporary file vanished before the link (a concurrent
    ``shred`` of ``temp_files(final)``).
    """
    tmp = temp_path(final)
    try:
        _write_new(tmp, data, mode)
        try:
            os.link(tmp, final)
            won = True
        except FileExistsError:
            won = False
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fsync_dir(final.parent)
    return won


def shred(path: Path) -> bool:
    """Overwrite the file's bytes with random bytes, fsync, unlink; True if it existed.

    The directory is fsynced even when the file is already gone, so that running a destroy
    again after a crash between an unlink and its fsync makes that unlink durable.
    """
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        existed = False
    else:
        existed = True
        try:
            size = os.fstat(fd).st_size
            # Writing into the inode (not a new file) reaches every hard link to it.
            written = 0
            while written < size:
                written += os.pwrite(fd, secrets.token_bytes(size - written), written)
            os.fsync(fd)
        finally:
            os.close(fd)
        # Someone else's shred may have unlinked it meanwhile: gone is what we want.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    fsync_dir(path.parent)
    return existed
