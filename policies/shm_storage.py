"""Rate-limit buckets shared by the worker processes of one box: a table in a mapped file.

`storage = "memory"` with `[server] workers` above 1 must still be one limit for the box, and
the single-box case must need no extra service (Redis is for several boxes). Each bucket is
one slot of 16 bytes, `(hash of its key, TAT)`, in a fixed-size open-addressing table in a
file of the supervisor's private directory, mapped by every worker. A charge takes an
exclusive `flock` on the file for the few microseconds of reading and writing its slots, so
the GCRA step (policies.buckets.apply) is atomic across processes as MemoryStorage's is
within one. TATs are on CLOCK_MONOTONIC, which every process of the machine shares.

Slots are never emptied, only reused once their TAT has passed (a bucket that is full again is
the same as a bucket never charged), so probe chains never break. A chain with no reusable slot
in reach gives up the slot closest to full: a slightly generous limit rather than a refusal.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from policies.buckets import Charge, Decision, Storage, apply

log = logging.getLogger("vgate.ratelimit")

SLOTS = 1 << 16  # 1 MiB: far more buckets than keys x models x (requests, tokens)
_SLOT = struct.Struct("<Qd")
_PROBES = 64


def _hash(key: str) -> int:
    # 64 bits: two bucket keys colliding would share one budget; at 2^16 keys, odds ~1e-10.
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1


class SharedFileStorage(Storage):
    def __init__(self, path: str | Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._locked():
                if os.fstat(self._fd).st_size < SLOTS * _SLOT.size:
                    os.ftruncate(self._fd, SLOTS * _SLOT.size)  # zeros: every slot empty
            self._map = mmap.mmap(self._fd, SLOTS * _SLOT.size)
        except BaseException:
            os.close(self._fd)
            raise
        self._slot_of: dict[str, tuple[int, int]] = {}  # key -> (hash, home slot): cached
        self._warned = False

    def _locked(self) -> _Lock:
        return _Lock(self._fd)

    def _find(self, key: str, now: float) -> tuple[int, float | None]:
        """The slot of `key` and its TAT; a new key gets a slot (marked with TAT `now`, so
        a second new key of the same charge cannot take it too) and TAT None."""
        cached = self._slot_of.get(key)
        if cached is None:
            h = _hash(key)
            cached = self._slot_of[key] = (h, h & (SLOTS - 1))
        h, home = cached
        table = self._map
        reuse = -1
        oldest, oldest_tat = home, float("inf")
        for i in range(_PROBES):
            index = (home + i) & (SLOTS - 1)
            owner, tat = _SLOT.unpack_from(table, index * _SLOT.size)
            if owner == h:
                return index, tat
            if owner == 0:
                break
            if tat < now and reuse < 0:
                reuse = index
            if tat < oldest_tat:
                oldest, oldest_tat = index, tat
        else:
            if reuse < 0:
                reuse = oldest
                if not self._warned:
                    self._warned = True
                    log.warning("rate-limit table crowded: a bucket lost its state early")
        if reuse < 0:
            reuse = index
        _SLOT.pack_into(table, reuse * _SLOT.size, h, now)
        return reuse, None

    async def charge(self, charges: Sequence[Charge], *, force: bool = False) -> Decision:
        with self._locked():
            now = self._clock()
            found = {bucket.key: self._find(bucket.key, now) for bucket, _ in charges}
            decision, tats = apply(charges, force, now, lambda key: found[key][1])
            for (bucket, _), tat in zip(charges, tats, strict=False):
                index = found[bucket.key][0]
                _SLOT.pack_into(self._map, index * _SLOT.size, self._slot_of[bucket.key][0], tat)
        return decision

    async def aclose(self) -> None:
        if self._fd >= 0:
            self._map.close()
            os.close(self._fd)
            self._fd = -1


class _Lock:
    """`with`: an exclusive flock on `fd` (blocking: held only for a table lookup)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
