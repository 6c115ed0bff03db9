"""Checking a model's tree against its manifest before anything loads it.

The tree must hold exactly the manifest's paths, each the store's symlink to its blob, and every
blob must have the manifest's size and SHA-256. Hashing is what costs (minutes for a 140 GB
model), so a blob whose content was hashed once gets a stamp: its stat (device, inode, size,
mtime, ctime) at that time. The quick check trusts a blob whose stat still equals its stamp and
hashes every other one; the full check hashes them all.

Why the stamp sees a flipped byte: writing a file sets its mtime and ctime, and ctime cannot be
set back from user space (setting the mtime back with `touch -d` sets the ctime to now), so an
edit through the filesystem always changes the stat. Blobs are read-only, and the chmod needed to
write one changes the ctime too. What it cannot see is a change that bypasses the file system's
timestamps: bit rot on the disk, writes to the raw device, a clock set back before the write.
`vgate models verify` (or `full`) hashes everything and sees those. Nor are stamps a defence
against someone who can write the store (they can write stamps too); `full` is: the digest in
the engine's config names the manifest's bytes, and the manifest every file's SHA-256.

Timestamps have a granularity (a clock tick; a second on some file systems), so a write within
the same tick as the stat the stamp records would leave the stat equal. As git does with its
index, a stamp is only recorded for a file whose mtime and ctime are at least a margin older
than the moment its hashing started; a younger file is hashed again the next time.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

from engine.store.io import hash_file, human_size, identity, plural, write_atomic
from engine.store.layout import Layout
from engine.store.manifest import Manifest

MARGIN_NS = 100_000_000  # well above a kernel clock tick (1-10 ms)
COARSE_MARGIN_NS = 2_100_000_000  # file systems with whole-second timestamps
HASH_THREADS = min(4, os.cpu_count() or 1)

Log = Callable[[str], None]


def margin_ns(st: os.stat_result) -> int:
    coarse = st.st_ctime_ns % 1_000_000_000 == 0 and st.st_mtime_ns % 1_000_000_000 == 0
    return COARSE_MARGIN_NS if coarse else MARGIN_NS


def settled(st: os.stat_result, at_ns: int) -> bool:
    """Whether any write after `at_ns` is sure to change this stat (see the module docstring)."""
    return max(st.st_mtime_ns, st.st_ctime_ns) + margin_ns(st) <= at_ns


@dataclass(frozen=True)
class Stamps:
    layout: Layout

    def get(self, hex_: str) -> list[int] | None:
        try:
            value = json.loads(self.layout.stamp(hex_).read_bytes())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, list) else None

    def put(self, hex_: str, st: os.stat_result, hashed_from_ns: int) -> None:
        """Record `st` for a blob whose content, hashed from `hashed_from_ns` on, was right."""
        if not settled(st, hashed_from_ns):
            return
        # Best effort: an engine that cannot write its stamps hashes again at its next start.
        with suppress(OSError):
            write_atomic(self.layout.stamp(hex_), json.dumps(identity(st)).encode(), durable=False)

    def drop(self, hex_: str) -> None:
        with suppress(OSError):
            self.layout.stamp(hex_).unlink()


def structure(layout: Layout, hex_: str, manifest: Manifest) -> list[str]:
    """The problems of model `hex_`'s tree itself (paths and links; no content is read)."""
    return _links(layout, hex_, manifest)[0]


def check(
    layout: Layout, hex_: str, manifest: Manifest, *, full: bool, log: Log | None = None
) -> list[str]:
    """Every problem of model `hex_`'s tree as `path: what is wrong`; empty when it is intact."""
    problems, blobs = _links(layout, hex_, manifest)
    sizes = {f.sha256: f.size for f in manifest.files}
    stamps = Stamps(layout)
    to_hash: list[str] = []
    for blob_hex, paths in blobs.items():
        try:
            st = os.lstat(layout.blob(blob_hex))
        except FileNotFoundError:
            problems += [f"{p}: missing (its content sha256:{blob_hex} is gone)" for p in paths]
            continue
        if not stat.S_ISREG(st.st_mode):
            problems += [f"{p}: its content sha256:{blob_hex} is not a file" for p in paths]
        elif st.st_size != sizes[blob_hex]:
            problems += [
                f"{p}: size differs (manifest {sizes[blob_hex]} bytes, file {st.st_size})"
                for p in paths
            ]
        elif full or stamps.get(blob_hex) != identity(st):
            to_hash.append(blob_hex)
    if to_hash and log is not None:
        total = sum(sizes[h] for h in to_hash)
        log(f"hashing {plural(len(to_hash), 'file')} ({human_size(total)})")
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        results = list(pool.map(lambda h: _hash(layout, h), to_hash))
    for blob_hex, (found, error) in zip(to_hash, results, strict=True):
        if error is not None or found != blob_hex:
            stamps.drop(blob_hex)
            what = error or f"sha256 differs (manifest {blob_hex[:12]}…, file {found[:12]}…)"
            problems += [f"{p}: {what}" for p in blobs[blob_hex]]
    return sorted(problems)


def _links(layout: Layout, hex_: str, manifest: Manifest) -> tuple[list[str], dict[str, list[str]]]:
    """Problems of the tree's paths and links, and the paths of each blob they reach."""
    tree = layout.tree(hex_)
    blobs: dict[str, list[str]] = {}
    if not tree.is_dir() or tree.is_symlink():
        return [f"{tree}: the model's directory is missing"], blobs
    problems = _extra_entries(str(tree), manifest)
    for f in manifest.files:
        try:
            target = os.readlink(tree / f.path)
        except FileNotFoundError:
            problems.append(f"{f.path}: missing")
            continue
        except OSError as exc:
            not_a_link = exc.errno in (errno.EINVAL, errno.ENOTDIR)
            what = "replaced (not the store's link to its content)" if not_a_link else None
            problems.append(f"{f.path}: {what or f'cannot be read: {exc.strerror}'}")
            continue
        if target != layout.link_target(f.path, f.sha256):
            problems.append(f"{f.path}: replaced (links to {target!r}, not to its content)")
            continue
        blobs.setdefault(f.sha256, []).append(f.path)
    return problems, blobs


def _hash(layout: Layout, blob_hex: str) -> tuple[str, str | None]:
    started = time.time_ns()
    try:
        st, found = hash_file(layout.blob(blob_hex))
    except OSError as exc:
        return "", f"cannot be read: {exc.strerror}"
    except ValueError as exc:  # not a regular file, or changed while it was hashed
        return "", str(exc)
    if found == blob_hex:
        Stamps(layout).put(blob_hex, st, started)
    return found, None


def _extra_entries(tree: str, manifest: Manifest) -> list[str]:
    # vLLM loads what is in the directory (an extra *.safetensors shard, a config of its own):
    # anything the manifest does not list is refused, not ignored.
    files = {f.path for f in manifest.files}
    dirs = manifest.directories()
    extra: list[str] = []
    # A directory this process cannot list, vLLM (the same user, next) cannot list either.
    for dirpath, dirnames, filenames in os.walk(tree):
        base = os.path.relpath(dirpath, tree)
        keep = []
        for name in [*dirnames, *filenames]:
            rel = name if base == "." else f"{base}/{name}"
            full = os.path.join(dirpath, name)
            if rel in dirs and os.path.isdir(full) and not os.path.islink(full):
                keep.append(name)
            elif rel not in files:
                extra.append(f"{rel}: not in the manifest")
        dirnames[:] = [d for d in dirnames if d in keep]
    return extra


def stamp_fresh(layout: Layout, fresh: dict[str, os.stat_result]) -> None:
    """Stamp the blobs an add just wrote (their content is what it hashed while writing them).

    Each is stamped with its stat right after the add's commit, once that stat's timestamps are
    settled, and only if the blob is still as it was: a later write shows as a changed stat.
    """
    if not fresh:
        return
    ready = max(max(st.st_mtime_ns, st.st_ctime_ns) + margin_ns(st) for st in fresh.values())
    delay = ready - time.time_ns()
    if delay > 0:
        time.sleep(delay / 1e9)
    stamps = Stamps(layout)
    for hex_, st in fresh.items():
        with suppress(OSError):
            if identity(os.lstat(layout.blob(hex_))) == identity(st):
                stamps.put(hex_, st, time.time_ns())
