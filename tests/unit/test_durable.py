"""service/durable.py on real files under tmp_path: replace, exclusive create, shred."""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.durable import (
    create_exclusive,
    fsync_dir,
    replace_file,
    shred,
    temp_files,
    temp_path,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _names(directory: Path) -> list[str]:
    """Every name in the directory, temporary (dot) files included."""
    return sorted(os.listdir(directory))


def _fail_writes_after(monkeypatch: pytest.MonkeyPatch, good_bytes: int) -> list[int]:
    """Make os.write write ``good_bytes`` bytes, then fail with ENOSPC (a disk filling up)."""
    real_write = os.write
    written: list[int] = []

    def write(fd: int, data: bytes | memoryview) -> int:
        room = good_bytes - sum(written)
        if room <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, memoryview(data)[:room])
        written.append(n)
        return n

    monkeypatch.setattr(os, "write", write)
    return written


def _record_syscalls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Log fsync (of a file or a directory), replace, link and unlink, in order."""
    events: list[str] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "link", "unlink")}

    def fsync(fd: int) -> None:
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real["fsync"](fd)

    def logged(name: str) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            events.append(name)
            return real[name](*args, **kwargs)

        return call

    monkeypatch.setattr(os, "fsync", fsync)
    for name in ("replace", "link", "unlink"):
        monkeypatch.setattr(os, name, logged(name))
    return events


# -- temporary names ---------------------------------------------------------------------


def test_temp_path_is_a_hidden_sibling_that_temp_files_finds(tmp_path: Path) -> None:
    final = tmp_path / "2025-11.default.key"
    tmp = temp_path(final)
    assert tmp.parent == tmp_path
    assert re.fullmatch(rf"\.2025-11\.default\.key\.{os.getpid()}\.[0-9a-f]{{12}}\.tmp", tmp.name)
    assert temp_path(final) != tmp  # fresh each time: racing writers never share one
    tmp.write_bytes(b"x")
    # Temporary files of other targets are not this target's debris.
    (tmp_path / ".2025-11.default.destroyed.1.abc.tmp").write_bytes(b"x")
    (tmp_path / ".2025-11.default.keyx.1.abc.tmp").write_bytes(b"x")
    assert list(temp_files(final)) == [tmp]


def test_fsync_dir_of_a_missing_directory_raises(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "gone")


# -- what all three share -----------------------------------------------------------------


def _replace(path: Path) -> None:
    replace_file(path, b"0123456789")


def _create(path: Path) -> None:
    create_exclusive(path, b"0123456789")


def _shred(path: Path) -> None:
    path.write_bytes(b"secret")
    shred(path)


@pytest.mark.parametrize(
    ("operation", "expected"),
    [
        pytest.param(_replace, ["fsync file", "replace", "fsync dir"], id="replace_file"),
        # The unlink removes the temporary name once the final name links to the file.
        pytest.param(_create, ["fsync file", "link", "unlink", "fsync dir"], id="create_exclusive"),
        pytest.param(_shred, ["fsync file", "unlink", "fsync dir"], id="shred"),
    ],
)
def test_the_data_is_synced_before_the_name_changes_and_the_directory_after(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    operation: Callable[[Path], None],
    expected: list[str],
) -> None:
    path = tmp_path / "h1.key"
    with monkeypatch.context() as m:
        events = _record_syscalls(m)
        operation(path)
    assert events == expected


@pytest.mark.parametrize("operation", [_replace, _create], ids=["replace_file", "create_exclusive"])
def test_nothing_is_created_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: Callable[[Path], None]
) -> None:
    with monkeypatch.context() as m:
        _fail_writes_after(m, 3)
        with pytest.raises(OSError, match="No space left"):
            operation(tmp_path / "h1.key")
    assert _names(tmp_path) == []  # neither the file nor a temporary file


# -- replace_file ------------------------------------------------------------------------


def test_replace_file_creates_then_replaces_with_the_mode_asked(tmp_path: Path) -> None:
    path = tmp_path / "h1.json"
    replace_file(path, b"first\n")
    assert path.read_bytes() == b"first\n"
    assert _mode(path) == 0o600
    path.chmod(0o644)
    replace_file(path, b"second\n", mode=0o600)
    assert path.read_bytes() == b"second\n"
    # A new inode with the mode asked for, not the old file's wider one.
    assert _mode(path) == 0o600
    assert _names(tmp_path) == ["h1.json"]


def test_replace_file_mode_is_never_wider_than_asked(tmp_path: Path) -> None:
    path = tmp_path / "shared.json"
    replace_file(path, b"{}", mode=0o640)
    assert _mode(path) & ~0o640 == 0
    assert _mode(path) & 0o600 == 0o600


def test_replace_file_keeps_the_old_content_when_the_write_fails_midway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "rejected.jsonl"
    path.write_bytes(b"old line\n")
    new = b"new line\n" * 1000
    with monkeypatch.context() as m:
        written = _fail_writes_after(m, len(new) // 2)
        with pytest.raises(OSError, match="No space left") as exc:
            replace_file(path, new)
    assert exc.value.errno == errno.ENOSPC
    assert sum(written) == len(new) // 2  # it did fail midway, after writing part
    assert path.read_bytes() == b"old line\n"
    assert _names(tmp_path) == ["rejected.jsonl"]  # no temporary file left behind


def test_replace_file_removes_its_temp_file_when_the_rename_fails(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.mkdir()
    (path / "inside").write_bytes(b"kept")
    with pytest.raises(IsADirectoryError):
        replace_file(path, b"data")
    assert _names(tmp_path) == ["taken"]
    assert (path / "inside").read_bytes() == b"kept"


# -- create_exclusive --------------------------------------------------------------------


def test_create_exclusive_creates_a_missing_file(tmp_path: Path) -> None:
    final = tmp_path / "2025-11.default.key"
    assert create_exclusive(final, b"mine\n") is True
    assert final.read_bytes() == b"mine\n"
    assert _mode(final) == 0o600
    assert final.stat().st_nlink == 1  # the temporary name is gone
    assert _names(tmp_path) == ["2025-11.default.key"]


def test_create_exclusive_loses_to_an_existing_file(tmp_path: Path) -> None:
    final = tmp_path / "2025-11.default.destroyed"
    final.write_bytes(b"the first tombstone\n")
    assert create_exclusive(final, b"a later tombstone\n") is False
    assert final.read_bytes() == b"the first tombstone\n"
    assert _names(tmp_path) == ["2025-11.default.destroyed"]


def test_create_exclusive_has_one_winner_among_racing_writers(tmp_path: Path) -> None:
    final = tmp_path / "2025-11.race.wrapped"
    writers = 16
    start = threading.Barrier(writers)

    def write(n: int) -> bool:
        start.wait(timeout=30)
        return create_exclusive(final, f"candidate {n}\n".encode())

    with ThreadPoolExecutor(writers) as pool:
        won = list(pool.map(write, range(writers)))
    assert won.count(True) == 1
    assert final.read_bytes() == f"candidate {won.index(True)}\n".encode()
    assert _names(tmp_path) == ["2025-11.race.wrapped"]


def test_create_exclusive_raises_file_not_found_when_its_temp_file_vanishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A concurrent destroy shreds temp_files(final) between our write and our link; the
    # file keystore tells that case apart by this FileNotFoundError.
    final = tmp_path / "2025-11.default.key"
    real_link = os.link

    def link_after_a_destroy(src: Path, dst: Path) -> None:
        for debris in temp_files(final):
            shred(debris)
        real_link(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "link", link_after_a_destroy)
        with pytest.raises(FileNotFoundError):
            create_exclusive(final, b"candidate\n")
    assert _names(tmp_path) == []


# -- shred -------------------------------------------------------------------------------


def test_shred_overwrites_the_bytes_in_place_before_unlinking(tmp_path: Path) -> None:
    path = tmp_path / "h1.key"
    secret = b"wrapped-secret-" * 40
    path.write_bytes(secret)
    # A second hard link shares the inode: it shows whether shred overwrote the bytes
    # or merely unlinked the name.
    witness = tmp_path / "witness"
    os.link(path, witness)

    assert shred(path) is True

    assert not path.exists()
    overwritten = witness.read_bytes()
    assert len(overwritten) == len(secret)
    assert overwritten != secret
    assert b"wrapped-secret-" not in overwritten


def test_shred_of_a_missing_file_returns_false(tmp_path: Path) -> None:
    assert shred(tmp_path / "never.key") is False
    assert _names(tmp_path) == []


def test_shred_of_an_empty_file_unlinks_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.key"
    path.write_bytes(b"")
    assert shred(path) is True
    assert _names(tmp_path) == []
