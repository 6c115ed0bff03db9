"""A model directory as a source of `Store.add`: its regular files, read without surprises.

Symbolic links are where a directory can hand over more than it holds: a link that stays inside
the directory is read as the file it names; one that leaves it (`/etc/shadow`, or the
`../../blobs/...` links of a Hugging Face cache snapshot) is refused unless the caller asked for
links to be followed. Links to directories are never followed (loops), and devices, FIFOs and
sockets are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from engine.store.manifest import Put, StoreError

# Version-control and download-tool metadata (`huggingface-cli download --local-dir` keeps
# timestamps in .cache/): not model content, and would make identical downloads differ.
SKIPPED = frozenset({".git", ".cache"})


def directory(root: Path, *, follow_symlinks: bool = False) -> Iterator[Put]:
    """The regular files under `root`, as `Put` changes (each open until the next is asked for)."""
    if not root.is_dir():
        raise StoreError(f"{root}: not a directory")
    yield from _walk(root, os.path.realpath(root), "", follow_symlinks)


def _walk(path: Path, real_root: str, prefix: str, follow: bool) -> Iterator[Put]:
    with os.scandir(path) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        rel = prefix + entry.name
        if entry.is_symlink():
            fd = _open_link(entry.path, real_root, follow)
        elif entry.is_dir(follow_symlinks=False):
            if not (prefix == "" and entry.name in SKIPPED):
                yield from _walk(Path(entry.path), real_root, rel + "/", follow)
            continue
        elif entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        else:
            raise StoreError(f"{entry.path}: not a regular file, a directory or a symbolic link")
        with os.fdopen(fd, "rb") as reader:
            yield Put(rel, reader)


def _open_link(link: str, real_root: str, follow: bool) -> int:
    target = os.path.realpath(link)
    inside = target.startswith(real_root + os.sep)
    if not inside and not follow:
        raise StoreError(
            f"{link}: a symbolic link to {target}, outside the model directory "
            "(copy the file in, or follow such links deliberately with --follow-symlinks)"
        )
    if os.path.isdir(target):
        raise StoreError(f"{link}: a symbolic link to a directory (not followed)")
    if not os.path.isfile(target):
        raise StoreError(f"{link}: a symbolic link to {target}, which is not a regular file")
    return os.open(target, os.O_RDONLY | os.O_CLOEXEC)
