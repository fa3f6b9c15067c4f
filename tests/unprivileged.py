"""Running a process as an unprivileged user, for tests of file modes (root ignores them).

The tests often run as root, for whom a directory of mode 0555 is as writable as any
other. A test of a read-only keystore runs the process under test as ``nobody`` (uid and
gid 65534) through ``setpriv`` (util-linux); when the tests run as an ordinary user,
file modes apply to them already and the process runs unchanged.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Final

NOBODY: Final = 65534


def is_root() -> bool:
    return os.geteuid() == 0


def unprivileged_prefix() -> list[str]:
    """A command prefix that runs the command as uid/gid 65534 with no supplementary
    groups when the tests run as root; empty otherwise."""
    if not is_root():
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv is not None, "setpriv (util-linux) is needed to drop root in this test"
    return [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def hand_over(path: Path) -> Path:
    """Create the directory ``path`` (mode 0700) owned by the unprivileged user."""
    path.mkdir(mode=0o700)
    if is_root():
        os.chown(path, NOBODY, NOBODY)
    return path


@contextlib.contextmanager
def shared_tmp(prefix: str) -> Iterator[Path]:
    """A fresh directory under /tmp that the unprivileged user can traverse (0755).

    pytest's tmp_path lies under a 0700 directory of root's, which ``nobody`` cannot
    enter. Removed afterwards, read-only subdirectories included.
    """
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        # A non-root owner cannot delete entries of its own 0555 directories: open them up.
        for d, _, _ in os.walk(root):
            with contextlib.suppress(OSError):
                os.chmod(d, 0o700)
        shutil.rmtree(root, ignore_errors=True)


__all__ = ["NOBODY", "hand_over", "is_root", "shared_tmp", "unprivileged_prefix"]
