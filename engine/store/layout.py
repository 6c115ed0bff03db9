"""Where the model store keeps what, under its root directory.

<root>/blobs/sha256/<hex>            file contents, named by their SHA-256, read-only
<root>/manifests/sha256/<hex>.json   canonical manifests, named by their own SHA-256
<root>/names/<NAME>.json             which digests a name holds, and its current one
<root>/trees/<hex>/                  what vLLM loads: the manifest's paths as relative
                                     symlinks into blobs/ (read-only directories)
<root>/stamps/sha256/<hex>           a blob's stat when its content was last hashed
<root>/tmp/                          staging of adds and removals (same filesystem)
<root>/lock                          flock held while the store is changed
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def blobs(self) -> Path:
        return self.root / "blobs" / "sha256"

    @property
    def manifests(self) -> Path:
        return self.root / "manifests" / "sha256"

    @property
    def names(self) -> Path:
        return self.root / "names"

    @property
    def trees(self) -> Path:
        return self.root / "trees"

    @property
    def stamps(self) -> Path:
        return self.root / "stamps" / "sha256"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    def blob(self, hex_: str) -> Path:
        return self.blobs / hex_

    def manifest(self, hex_: str) -> Path:
        return self.manifests / f"{hex_}.json"

    def name(self, name: str) -> Path:
        return self.names / f"{name}.json"

    def tree(self, hex_: str) -> Path:
        return self.trees / hex_

    def stamp(self, hex_: str) -> Path:
        return self.stamps / hex_

    @staticmethod
    def link_target(path: str, blob_hex: str) -> str:
        """The relative symlink at trees/<hex>/<path> to its blob (the store can be moved)."""
        return "../" * (2 + path.count("/")) + f"blobs/sha256/{blob_hex}"

    def create(self) -> None:
        for d in (self.blobs, self.manifests, self.names, self.trees, self.stamps):
            d.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(mode=0o700, exist_ok=True)
