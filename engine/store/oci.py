"""An OCI image layout directory as a source of `Store.add` (`oras copy --to-oci-layout`,
`skopeo copy ... oci:DIR:TAG`, or any tool writing the OCI image-layout spec).

One manifest is picked from `index.json` (by its `org.opencontainers.image.ref.name`, or the only
one), and its layers are read in order: tar layers (plain or gzip) entry by entry, with later
layers replacing earlier files and OCI whiteouts deleting them; other layers are single files
named by their `org.cncf.model.filepath` (ModelPack `.raw` layers) or
`org.opencontainers.image.title` annotation (how `oras push FILE` names them). Every blob is
checked against its descriptor's size and digest, and no entry may leave the model directory
(`../x`, `/etc/x`) or be a symbolic link or a device.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from engine.store.manifest import Alias, Change, Delete, Put, StoreError, check_hex, check_relpath

LAYOUT_FILE = "oci-layout"
TITLE = "org.opencontainers.image.title"
FILEPATH = "org.cncf.model.filepath"  # ModelPack
ORAS_UNPACK = "io.deis.oras.content.unpack"
REF_NAME = "org.opencontainers.image.ref.name"
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MAX_JSON_BYTES = 4 * 1024 * 1024


def is_layout(path: Path) -> bool:
    return (path / LAYOUT_FILE).is_file()


def layout(root: Path, *, ref: str | None = None, subdir: str | None = None) -> Iterator[Change]:
    """The files of the image at `root` (only those under `subdir`, relative to it)."""
    try:
        version = json.loads((root / LAYOUT_FILE).read_bytes()).get("imageLayoutVersion")
        index = json.loads((root / "index.json").read_bytes())
    except (OSError, ValueError, AttributeError) as exc:
        raise StoreError(f"{root}: not a readable OCI image layout: {exc}") from None
    if not isinstance(version, str) or not version.startswith("1."):
        raise StoreError(f"{root}: unsupported OCI image layout version {version!r}")
    manifest = _select(root, index, ref)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise StoreError(f"{root}: the image manifest has no layers")
    prefix = check_relpath(subdir) + "/" if subdir else ""
    for i, layer in enumerate(layers):
        for change in _layer(root, i, layer):
            within = _within(change, prefix)
            if within is not None:
                yield within


def _select(root: Path, index: Any, ref: str | None) -> dict[str, Any]:
    manifests = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(manifests, list):
        raise StoreError(f"{root}/index.json: no manifests list")
    refs = [_ref_name(m) for m in manifests]
    if ref is not None:
        chosen = [m for m in manifests if _ref_name(m) == ref]
        if len(chosen) != 1:
            raise StoreError(f"{root}: {len(chosen)} manifests named {ref!r} (names: {refs})")
    elif len(manifests) != 1:
        raise StoreError(f"{root}: {len(manifests)} manifests; choose one by name (names: {refs})")
    else:
        chosen = manifests
    doc = _json_blob(root, chosen[0], "manifest")
    while doc.get("mediaType") in INDEX_TYPES or "manifests" in doc:
        nested = doc.get("manifests")
        if not isinstance(nested, list) or len(nested) != 1:
            count = len(nested) if isinstance(nested, list) else 0
            raise StoreError(f"{root}: an image index of {count} manifests (one is needed)")
        doc = _json_blob(root, nested[0], "manifest")
    return doc


def _ref_name(desc: Any) -> str | None:
    annotations = desc.get("annotations") if isinstance(desc, dict) else None
    name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
    return name if isinstance(name, str) else None


def _descriptor(root: Path, desc: Any, what: str) -> tuple[Path, str, int, str]:
    if not isinstance(desc, dict):
        raise StoreError(f"{root}: a {what} descriptor is not an object")
    digest, size, media = desc.get("digest"), desc.get("size"), desc.get("mediaType", "")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise StoreError(f"{root}: {what} digest {digest!r} is not sha256:HEX")
    if not isinstance(size, int) or size < 0 or not isinstance(media, str):
        raise StoreError(f"{root}: {what} {digest}: bad size or media type")
    hex_ = check_hex(digest)
    return root / "blobs" / "sha256" / hex_, hex_, size, media


def _json_blob(root: Path, desc: Any, what: str) -> dict[str, Any]:
    path, hex_, size, _ = _descriptor(root, desc, what)
    if size > MAX_JSON_BYTES:
        raise StoreError(f"{root}: {what} sha256:{hex_} is too large ({size} bytes)")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise StoreError(f"{root}: {what} sha256:{hex_}: {exc.strerror}") from None
    if len(data) != size or hashlib.sha256(data).hexdigest() != hex_:
        raise StoreError(f"{root}: {what} sha256:{hex_}: size or digest differs from its blob")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise StoreError(f"{root}: {what} sha256:{hex_} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise StoreError(f"{root}: {what} sha256:{hex_} is not a JSON object")
    return doc


def _layer(root: Path, i: int, desc: Any) -> Iterator[Change]:
    path, hex_, size, media = _descriptor(root, desc, f"layer {i}")
    where = f"{root}: layer {i} (sha256:{hex_[:12]})"
    kind, _, compression = media.partition("+")
    if kind.endswith(".tar.gzip"):  # Docker's media types
        kind, compression = kind[: -len(".gzip")], "gzip"
    annotations = desc.get("annotations")
    annotations = annotations if isinstance(annotations, dict) else {}
    name = annotations.get(FILEPATH) or annotations.get(TITLE)
    try:
        fh = open(path, "rb")  # noqa: SIM115 (closed in the finally below)
        # `oras push FILE` gives a plain file the tar media type: only a title and no tar header
        # tell it apart (ORAS marks the tars it packs from directories with its unpack key).
        plain_file = (
            kind.endswith(".tar")
            and not compression
            and isinstance(name, str)
            and annotations.get(ORAS_UNPACK) != "true"
            and fh.read(512)[257:262] != b"ustar"
        )
        fh.seek(0)
    except OSError as exc:
        raise StoreError(f"{where}: {exc.strerror}") from None
    try:
        verified = _Verified(fh, size, hex_, where)
        reader = io.BufferedReader(verified)
        if kind.endswith(".tar") and not plain_file:
            if compression not in ("", "gzip"):
                raise StoreError(f"{where}: {compression} layers are not supported (use gzip)")
            try:
                with _tar(reader, gzip=compression == "gzip") as tf:
                    for member in tf:
                        yield from _member(tf, member, where)
            except (tarfile.TarError, EOFError, OSError) as exc:
                raise StoreError(f"{where}: not a readable tar: {exc}") from None
        elif isinstance(name, str) and not compression:
            yield Put(_safe(name, where), reader)
        else:
            raise StoreError(
                f"{where}: media type {media!r} is neither a tar layer nor a file named by a "
                f"{FILEPATH} or {TITLE} annotation"
            )
        while reader.read(1024 * 1024):  # what the tar reader left: padding, the gzip trailer
            pass
        verified.check()
    finally:
        fh.close()


def _tar(reader: IO[bytes], *, gzip: bool) -> tarfile.TarFile:
    # Stream modes: one pass over the blob, never a seek.
    if gzip:
        return tarfile.open(fileobj=reader, mode="r|gz")
    return tarfile.open(fileobj=reader, mode="r|")


def _member(tf: tarfile.TarFile, m: tarfile.TarInfo, where: str) -> Iterator[Change]:
    if m.name in ("", ".", "./"):
        return
    path = _safe(m.name, where)
    parent, _, base = path.rpartition("/")
    if base == ".wh..wh..opq":
        yield Delete(parent, children_only=True)
    elif base.startswith(".wh."):
        yield Delete(posixpath.join(parent, base[len(".wh.") :]))
    elif m.isdir():
        return
    elif m.isreg():
        reader = tf.extractfile(m)
        assert reader is not None  # a regular member always has data
        yield Put(path, reader)
    elif m.islnk():
        yield Alias(path, _safe(m.linkname, where))
    elif m.issym():
        raise StoreError(f"{where}: {path} is a symbolic link to {m.linkname!r} (not supported)")
    else:
        raise StoreError(f"{where}: {path} is a device, FIFO or other special file")


def _safe(path: str, where: str) -> str:
    try:
        return check_relpath(path)
    except StoreError as exc:
        raise StoreError(f"{where}: {exc}") from None


def _within(change: Change, prefix: str) -> Change | None:
    """`change` relative to the chosen subdirectory, or None if it is about something else."""
    if not prefix:
        return change
    if change.path.startswith(prefix):
        path = change.path[len(prefix) :]
        if isinstance(change, Put):
            return Put(path, change.reader)
        if isinstance(change, Delete):
            return Delete(path, change.children_only)
        if not change.target.startswith(prefix):
            raise StoreError(f"{change.path}: a hard link to {change.target}, outside {prefix}")
        return Alias(path, change.target[len(prefix) :])
    if isinstance(change, Delete) and (change.path == "" or prefix.startswith(change.path + "/")):
        return Delete("", children_only=True)  # the subdirectory itself, or one above it
    return None


class _Verified(io.RawIOBase):
    """A blob read through: it must have its descriptor's size and digest."""

    def __init__(self, fh: IO[bytes], size: int, hex_: str, where: str) -> None:
        super().__init__()
        self._fh, self._size, self._hex, self._where = fh, size, hex_, where
        self._digest = hashlib.sha256()
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._fh.read(len(buffer))
        buffer[: len(data)] = data
        self._digest.update(data)
        self._read += len(data)
        if self._read > self._size:
            raise StoreError(f"{self._where}: larger than its descriptor's {self._size} bytes")
        return len(data)

    def check(self) -> None:
        if self._read != self._size or self._digest.hexdigest() != self._hex:
            raise StoreError(f"{self._where}: its content does not match its digest")
