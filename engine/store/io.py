"""File primitives of the model store: hashing while copying, durable atomic writes, locks."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

CHUNK = 4 * 1024 * 1024
TMP_PREFIX = ".tmp-"  # write_atomic's temporary files, beside their target


def copy_hashing(src: IO[bytes], dest: Path) -> tuple[int, str]:
    """Copy `src` to a new read-only file `dest`, durably; (size, sha256 hex) of what was written.

    One pass: the digest is of the very bytes written, and the source is read only once.
    """
    digest = hashlib.sha256()
    size = 0
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
        # Read-only: whoever wants to write a blob must chmod it first, which changes its ctime.
        os.fchmod(fd, 0o444)
    finally:
        os.close(fd)
    return size, digest.hexdigest()


def hash_file(path: Path) -> tuple[os.stat_result, str]:
    """(stat before reading, sha256 hex) of the regular file `path` (not followed if a link).

    Raises OSError; ValueError if the file changed while it was read (its stat differs after).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise ValueError("not a regular file")
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        digest = hashlib.sha256()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            digest.update(view[:n])
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if identity(before) != identity(after):
        raise ValueError("changed while it was being hashed")
    return before, digest.hexdigest()


def identity(st: os.stat_result) -> list[int]:
    """What changes when a file is replaced or written: device, inode, size, mtime, ctime."""
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data` all at once: temp file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.write(fd, data)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


@contextlib.contextmanager
def locked(path: Path, *, exclusive: bool = True, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on `path` (created if needed); yields False if `wait` is off and it is busy."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        flags = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, flags if wait else flags | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def remove_tree(path: Path) -> None:
    """Remove a directory tree the store made read-only (its directories are mode 0555)."""
    if not path.exists():
        return
    os.chmod(path, 0o755)
    for dirpath, dirnames, _ in os.walk(path):
        for d in dirnames:
            sub = os.path.join(dirpath, d)
            if not os.path.islink(sub):
                os.chmod(sub, 0o755)
    shutil.rmtree(path)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
