"""A name's record in the store: the digests it holds (oldest first) and its current one.

A name keeps every digest added under it until that digest is removed, so an engine pinned to
an older `NAME@sha256:...` still starts after newer content was added under the same name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.store.manifest import StoreError, check_hex


@dataclass(frozen=True)
class NameRecord:
    current: str | None  # "sha256:HEX"
    digests: tuple[tuple[str, str], ...]  # ("sha256:HEX", added at), oldest first

    @classmethod
    def empty(cls) -> NameRecord:
        return cls(None, ())

    def held(self) -> set[str]:
        return {d for d, _ in self.digests}

    def hexes(self) -> list[str]:
        return [check_hex(d) for d, _ in self.digests]

    def pointing_to(self, digest: str, added: str) -> NameRecord:
        """This name with `digest` as its current content (kept where it was if already held)."""
        digests = self.digests if digest in self.held() else (*self.digests, (digest, added))
        return NameRecord(digest, digests)

    def without(self, digest: str) -> NameRecord:
        return NameRecord(self.current, tuple(d for d in self.digests if d[0] != digest))

    def to_bytes(self) -> bytes:
        doc = {
            "current": self.current,
            "digests": [{"digest": d, "added": a} for d, a in self.digests],
        }
        return json.dumps(doc, indent=1).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> NameRecord:
        try:
            doc: Any = json.loads(data)
            digests = tuple((str(d["digest"]), str(d["added"])) for d in doc["digests"])
            current = doc["current"]
            for d, _ in digests:
                check_hex(d)
        except (ValueError, KeyError, TypeError, StoreError) as exc:
            raise StoreError(f"model {name!r}: its record in the store is damaged: {exc}") from None
        if current not in {d for d, _ in digests}:
            raise StoreError(f"model {name!r}: its record in the store is damaged (no current)")
        return cls(current, digests)
