"""The model store: model directories pinned by content, for engines naming `NAME@sha256:HEX`.

`add` hashes a source (a directory, an OCI layout) into content-addressed blobs, one manifest
and a tree of symlinks vLLM can load (layout: engine/store_layout.py). Identical files are one
blob across all models. An add is atomic: everything is staged under tmp/ and made visible in an
order that leaves no half model behind a crash (blobs, then the tree, then the manifest, and the
name last); re-adding identical content changes nothing; other content under an existing name
moves the name and keeps the old digest (engines pinned to it still start) until removed.
`resolve` checks a model before anything loads it (engine/store_verify.py).

Changes (add, remove) hold an flock on <root>/lock while they commit; staging and checking do
not. Every error is a `StoreError` whose message names the model, the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from engine.store import gc as store_gc
from engine.store import verify as store_verify
from engine.store.gc import Removed
from engine.store.io import copy_hashing, fsync_dir, identity, locked, remove_tree, write_atomic
from engine.store.layout import Layout
from engine.store.manifest import (
    Alias,
    Change,
    Delete,
    FileEntry,
    Manifest,
    Put,
    Ref,
    StoreError,
    check_hex,
    check_name,
    check_relpath,
    parse_ref,
)
from engine.store.names import NameRecord


@dataclass(frozen=True)
class Listed:
    name: str
    hex: str
    current: bool  # the digest the name was added with last
    added: str
    size: int | None  # None: the manifest is missing or damaged
    files: int | None


@dataclass(frozen=True)
class Added:
    ref: Ref
    changed: bool  # False: the name already held this content as its current one
    new_blobs: int  # contents written: new, or replacing one no stamp vouched for
    size: int
    files: int


@dataclass(frozen=True)
class Checked:
    names: list[str]
    hex: str
    problems: list[str]


class Store:
    """The store at `root` (created by the first `add`)."""

    def __init__(self, root: str | Path) -> None:
        self.layout = Layout(Path(root))

    def add(self, name: str, changes: Iterable[Change]) -> Added:
        """Hash `changes` (see store_source and oci) into the store under `name`."""
        check_name(name)
        self.layout.create()
        with self._staging() as stage:
            files, staged = self._stage(changes, stage)
            manifest = Manifest.of(files.values())
            with locked(self.layout.lock):
                fresh = self._commit(manifest, staged, stage)
                changed = self._point(name, manifest.hex)
                self._collect()
        store_verify.stamp_fresh(self.layout, fresh)
        ref = Ref(name, manifest.hex)
        return Added(ref, changed, len(fresh), manifest.size, len(manifest.files))

    def models(self) -> list[Listed]:
        """Every (name, digest) the store holds, by name, oldest digest first."""
        out = []
        for name in self._names():
            record = self._record(name)
            for digest, added in record.digests:
                hex_ = check_hex(digest)
                try:
                    m: Manifest | None = self.manifest(hex_)
                except StoreError:
                    m = None
                size, count = (m.size, len(m.files)) if m else (None, None)
                out.append(Listed(name, hex_, digest == record.current, added, size, count))
        return out

    def manifest(self, hex_: str) -> Manifest:
        try:
            data = self.layout.manifest(hex_).read_bytes()
        except FileNotFoundError:
            raise StoreError(f"manifest sha256:{hex_} is missing from the store") from None
        return Manifest.parse(data, hex_)

    def resolve(
        self, ref: str | Ref, *, full: bool = False, log: store_verify.Log | None = None
    ) -> Path:
        """The directory to hand vLLM for `NAME@sha256:HEX`, once its files are checked.

        The quick check (default) hashes only files whose stamp does not vouch for them; `full`
        hashes every file. Raises StoreError listing every file that is missing, extra, of
        another size or another digest.
        """
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        manifest = self.locate(ref)
        problems = store_verify.check(self.layout, ref.hex, manifest, full=full, log=log)
        if problems:
            lines = "\n  ".join(problems)
            raise StoreError(f"{ref}: the files do not match the manifest:\n  {lines}")
        return self.layout.tree(ref.hex)

    def locate(self, ref: Ref) -> Manifest:
        """The manifest of `ref`, once the store is known to hold it under its name (no hashing)."""
        record = self._record(ref.name)
        if ref.digest not in record.held():
            raise StoreError(
                f"{ref}: {ref.name} holds no such digest in {self.layout.root} "
                f"(its current content is {record.current})"
            )
        return self.manifest(ref.hex)

    def verify(
        self, target: str | None = None, log: store_verify.Log | None = None
    ) -> list[Checked]:
        """Hash every file of `target` (NAME, NAME@sha256:HEX, sha256:HEX; None: everything)."""
        by_hex: dict[str, list[str]] = {}
        for name, hex_ in self._select(target):
            by_hex.setdefault(hex_, []).append(name)
        out = []
        for hex_, names in by_hex.items():
            try:
                problems = store_verify.check(
                    self.layout, hex_, self.manifest(hex_), full=True, log=log
                )
            except StoreError as exc:
                problems = [str(exc)]
            out.append(Checked(names, hex_, problems))
        return out

    def remove(self, target: str) -> Removed:
        """Drop NAME (every digest it holds) or one NAME@sha256:HEX that is not its current one;
        then delete what no name holds any more."""
        ref = parse_ref(target) if "@" in target else None
        name = ref.name if ref else target
        self._record(name)  # an unknown name is refused before the store is touched
        with locked(self.layout.lock):
            record = self._record(name)
            if ref is not None:
                if ref.digest == record.current:
                    raise StoreError(
                        f"{ref} is the current content of {ref.name}: remove {ref.name} "
                        "(all its digests), or add other content under it first"
                    )
                if ref.digest not in record.held():
                    raise StoreError(f"{ref}: {ref.name} holds no such digest")
                write_atomic(self.layout.name(ref.name), record.without(ref.digest).to_bytes())
            else:
                self.layout.name(target).unlink()
                fsync_dir(self.layout.names)
            return self._collect()

    # -- internals

    @contextlib.contextmanager
    def _staging(self) -> Iterator[Path]:
        stage = Path(tempfile.mkdtemp(prefix="add-", dir=self.layout.tmp))
        try:
            # Held for the whole add: a garbage collection skips staging it cannot lock.
            with locked(stage / ".lock"):
                yield stage
        finally:
            remove_tree(stage)

    def _stage(
        self, changes: Iterable[Change], stage: Path
    ) -> tuple[dict[str, FileEntry], dict[str, Path]]:
        files: dict[str, FileEntry] = {}
        staged: dict[str, Path] = {}  # content hex -> its staged copy
        for n, change in enumerate(changes):
            if isinstance(change, Put):
                path = check_relpath(change.path)
                tmp = stage / str(n)
                size, hex_ = copy_hashing(change.reader, tmp)
                if hex_ in staged:
                    tmp.unlink()
                else:
                    staged[hex_] = tmp
                files[path] = FileEntry(path, size, hex_)
            elif isinstance(change, Alias):
                if change.target not in files:
                    raise StoreError(f"{change.path}: a hard link to {change.target}, not seen")
                path = check_relpath(change.path)
                files[path] = replace(files[change.target], path=path)
            elif isinstance(change, Delete):
                under = change.path + "/" if change.path else ""
                for p in [p for p in files if p.startswith(under)]:
                    del files[p]
                if not change.children_only:
                    files.pop(change.path, None)
        return files, staged

    def _commit(
        self, manifest: Manifest, staged: dict[str, Path], stage: Path
    ) -> dict[str, os.stat_result]:
        layout = self.layout
        stamps = store_verify.Stamps(layout)
        fresh: dict[str, os.stat_result] = {}
        for hex_ in sorted({f.sha256 for f in manifest.files}):
            blob = layout.blob(hex_)
            with contextlib.suppress(FileNotFoundError):
                if stamps.get(hex_) == identity(os.lstat(blob)):
                    continue  # vouched for: keep it (trees elsewhere use it)
            # New, or never checked, or found bad by verify: this add's copy is known good.
            os.replace(staged[hex_], blob)
            fresh[hex_] = os.lstat(blob)
        fsync_dir(layout.blobs)
        tree = layout.tree(manifest.hex)
        if tree.exists() and store_verify.structure(layout, manifest.hex, manifest):
            tree.chmod(0o755)  # damaged (a link gone, a file added): rebuilt, the old one dropped
            os.rename(tree, stage / "damaged")
        if not tree.exists():
            building = stage / "tree"
            building.mkdir()
            for f in manifest.files:
                link = building / f.path
                link.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(layout.link_target(f.path, f.sha256), link)
            for d in sorted((building / d for d in manifest.directories()), reverse=True):
                fsync_dir(d)
                d.chmod(0o555)
            fsync_dir(building)
            # Read-only once in place: moving a directory needs write access to it (its "..").
            os.rename(building, tree)
            tree.chmod(0o555)
            fsync_dir(layout.trees)
        if not layout.manifest(manifest.hex).exists():
            write_atomic(layout.manifest(manifest.hex), manifest.canonical())
        return fresh

    def _point(self, name: str, hex_: str) -> bool:
        path = self.layout.name(name)
        record = self._record(name) if path.exists() else NameRecord.empty()
        digest = f"sha256:{hex_}"
        if record.current == digest:
            return False
        added = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        write_atomic(path, record.pointing_to(digest, added).to_bytes())
        return True

    def _names(self) -> list[str]:
        if not self.layout.names.is_dir():
            return []
        return sorted(p.name[: -len(".json")] for p in self.layout.names.glob("[!.]*.json"))

    def _record(self, name: str) -> NameRecord:
        path = self.layout.name(check_name(name))
        try:
            return NameRecord.from_bytes(path.read_bytes(), name)
        except FileNotFoundError:
            known = ", ".join(self._names()) or "none"
            raise StoreError(
                f"model {name!r} is not in the store {self.layout.root} (known: {known})"
            ) from None

    def _select(self, target: str | None) -> list[tuple[str, str]]:
        if target is None:
            return [(n, h) for n in self._names() for h in self._record(n).hexes()]
        if target.startswith("sha256:"):
            hex_ = check_hex(target)
            found = [(n, hex_) for n in self._names() if hex_ in self._record(n).hexes()]
            if not found:
                raise StoreError(f"no model in {self.layout.root} has digest {target}")
            return found
        if "@" in target:
            ref = parse_ref(target)
            if ref.digest not in self._record(ref.name).held():
                raise StoreError(f"{ref}: {ref.name} holds no such digest")
            return [(ref.name, ref.hex)]
        return [(target, h) for h in self._record(target).hexes()]

    def _collect(self) -> Removed:
        live = {h for n in self._names() for h in self._record(n).hexes()}
        return store_gc.collect(self.layout, live)
