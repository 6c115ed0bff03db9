"""What the model store is made of: names, references, relative paths and the manifest.

A manifest lists a model's files (relative path, size, SHA-256). Its canonical bytes (sorted
keys, no whitespace, files sorted by path) are what its digest is taken over, so the same files
give the same digest whatever their source (a directory, an OCI layout) or their order.
The model's name is not part of it: one content under two names is one digest.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

MEDIA_TYPE = "application/vnd.vgate.model.manifest.v1+json"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
HEX_RE = re.compile(r"[0-9a-f]{64}")
REF_MARK = "@sha256:"


class StoreError(Exception):
    """The store refuses: the message names the model, the file and what is wrong."""


def check_name(name: str) -> str:
    """`name` if it is a valid model name (no slashes: it is a file name in the store)."""
    if not NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid model name {name!r}: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


def check_hex(digest: str) -> str:
    """The hex of `sha256:HEX` (or of a bare HEX): 64 lowercase hex digits."""
    hex_ = digest.removeprefix("sha256:")
    if not HEX_RE.fullmatch(hex_):
        raise StoreError(f"invalid digest {digest!r}: must be sha256: and 64 lowercase hex digits")
    return hex_


@dataclass(frozen=True)
class Ref:
    """`NAME@sha256:HEX`: a model pinned by content."""

    name: str
    hex: str

    @property
    def digest(self) -> str:
        return f"sha256:{self.hex}"

    def __str__(self) -> str:
        return f"{self.name}@sha256:{self.hex}"


def is_ref(value: str) -> bool:
    """Whether an engine's `model` value names the store (anything with `@sha256:` does)."""
    return REF_MARK in value


def parse_ref(value: str) -> Ref:
    """Parse `NAME@sha256:HEX`; StoreError naming the value otherwise."""
    name, mark, digest = value.partition(REF_MARK)
    if not mark or not NAME_RE.fullmatch(name) or not HEX_RE.fullmatch(digest):
        raise StoreError(f"{value!r} is not NAME@sha256:<64 lowercase hex digits>")
    return Ref(name, digest)


def check_relpath(path: str) -> str:
    """A safe relative POSIX path, `./` prefixes removed; StoreError for `..`, `/x`, `a//b`."""
    parts = path.split("/")
    while len(parts) > 1 and parts[0] == ".":
        parts = parts[1:]
    if parts and parts[-1] == "":
        parts = parts[:-1]  # "dir/" as tar writes directories
    if (
        not parts
        or path.startswith("/")
        or "\0" in path
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise StoreError(f"unsafe path {path!r}: must be relative, without '..' or empty parts")
    return "/".join(parts)


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str  # hex


@dataclass(frozen=True)
class Manifest:
    files: tuple[FileEntry, ...]  # sorted by path

    @classmethod
    def of(cls, files: Iterable[FileEntry]) -> Manifest:
        """A manifest of `files`; StoreError if empty, or a path is also another's directory."""
        ordered = tuple(sorted(files, key=lambda f: f.path))
        if not ordered:
            raise StoreError("no files: a model needs at least one")
        paths = {f.path for f in ordered}
        for f in ordered:
            if check_relpath(f.path) != f.path:
                raise StoreError(f"path {f.path!r} is not in normal form")
            check_hex(f.sha256)
            parent = f.path.rpartition("/")[0]
            while parent:
                if parent in paths:
                    raise StoreError(f"{parent!r} is both a file and the directory of {f.path!r}")
                parent = parent.rpartition("/")[0]
        if len(paths) != len(ordered):
            raise StoreError("a path is listed twice")
        return cls(ordered)

    def canonical(self) -> bytes:
        doc = {
            "mediaType": MEDIA_TYPE,
            "files": [{"path": f.path, "size": f.size, "sha256": f.sha256} for f in self.files],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    @property
    def hex(self) -> str:
        return hashlib.sha256(self.canonical()).hexdigest()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def directories(self) -> set[str]:
        """Every directory the files imply (not the root)."""
        dirs: set[str] = set()
        for f in self.files:
            parent = f.path.rpartition("/")[0]
            while parent and parent not in dirs:
                dirs.add(parent)
                parent = parent.rpartition("/")[0]
        return dirs

    @classmethod
    def parse(cls, data: bytes, hex_: str) -> Manifest:
        """The manifest stored as `hex_`; StoreError if its bytes do not hash to it."""
        if hashlib.sha256(data).hexdigest() != hex_:
            raise StoreError(f"manifest sha256:{hex_} is damaged: its bytes do not match")
        try:
            doc: Any = json.loads(data)
            files = [FileEntry(f["path"], int(f["size"]), f["sha256"]) for f in doc["files"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(f"manifest sha256:{hex_} is not a vgate manifest: {exc}") from None
        manifest = cls.of(files)
        if manifest.canonical() != data:
            raise StoreError(f"manifest sha256:{hex_} is not in canonical form")
        return manifest


# What a source hands `Store.add`, in order; later changes win (OCI layers stack).
@dataclass(frozen=True)
class Put:
    """A file with this content at `path` (read to the end before the next change)."""

    path: str
    reader: IO[bytes]


@dataclass(frozen=True)
class Alias:
    """`path` has the content of the earlier `target` (a hard link in a tar layer)."""

    path: str
    target: str


@dataclass(frozen=True)
class Delete:
    """Drop `path` and everything under it, or only what is under it (an OCI whiteout)."""

    path: str
    children_only: bool = False


Change = Put | Alias | Delete
