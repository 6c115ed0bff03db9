"""OCI image layouts as a source of the model store, written by hand (tar layers and JSON)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from engine.store import oci
from engine.store.manifest import StoreError
from engine.store.store import Store
from tests.engine.store_helpers import FILES, WEIGHTS, add, model_dir

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"

Entry = tuple[str, bytes | str | None]  # name, then bytes (a file), "->x" / "=>x" (links), None


def tar(entries: list[Entry]) -> bytes:
    """A tar: bytes are files, '=>T' a hard link to T, '->T' a symlink to T, None a directory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, data in entries:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            elif isinstance(data, str):
                info.type = tarfile.LNKTYPE if data.startswith("=>") else tarfile.SYMTYPE
                info.linkname = data[2:]
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Layout:
    """An OCI image layout directory being written: blobs, manifests, index.json."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.manifests: list[dict[str, Any]] = []
        self.write_index()

    def blob(self, data: bytes, media: str, **annotations: str) -> dict[str, Any]:
        hex_ = hashlib.sha256(data).hexdigest()
        (self.root / "blobs" / "sha256" / hex_).write_bytes(data)
        desc: dict[str, Any] = {"mediaType": media, "digest": f"sha256:{hex_}", "size": len(data)}
        if annotations:
            desc["annotations"] = annotations
        return desc

    def image(self, layers: list[dict[str, Any]], ref: str | None = None) -> Layout:
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.example.model",
            "config": self.blob(b"{}", "application/vnd.oci.empty.v1+json"),
            "layers": layers,
        }
        data = json.dumps(manifest).encode()
        desc = self.blob(data, "application/vnd.oci.image.manifest.v1+json")
        if ref is not None:
            desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
        self.manifests.append(desc)
        self.write_index()
        return self

    def write_index(self) -> None:
        index = {"schemaVersion": 2, "manifests": self.manifests}
        (self.root / "index.json").write_text(json.dumps(index))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


def test_an_image_gives_the_digest_of_the_same_directory(store: Store, tmp_path: Path) -> None:
    image = Layout(tmp_path / "image")
    image.image(
        [
            # A stale weights file and a file deleted by a whiteout: later layers win.
            image.blob(
                tar([("./", None), ("./model.safetensors", b"old"), ("./gone.txt", b"x")]), TAR
            ),
            image.blob(
                gzip.compress(
                    tar(
                        [
                            ("tokenizer", None),
                            ("tokenizer/vocab.txt", FILES["tokenizer/vocab.txt"]),
                            ("model.safetensors", WEIGHTS),
                            (".wh.gone.txt", b""),
                        ]
                    )
                ),
                TAR_GZIP,
            ),
            # How `oras push config.json` stores a file: the raw bytes, with the tar media type.
            image.blob(
                FILES["config.json"], TAR, **{"org.opencontainers.image.title": "config.json"}
            ),
        ],
        ref="v1",
    )
    from_image = store.add("tiny", oci.layout(image.root))
    from_dir = add(store, "tiny", model_dir(tmp_path / "dir"))
    assert from_image.ref == from_dir.ref and not from_dir.changed
    tree = store.resolve(str(from_image.ref), full=True)
    assert (tree / "model.safetensors").read_bytes() == WEIGHTS


def test_hard_links_opaque_dirs_and_a_subdirectory(store: Store, tmp_path: Path) -> None:
    image = Layout(tmp_path / "image")
    image.image(
        [
            image.blob(tar([("model/old/a.bin", b"a"), ("other/x", b"x")]), TAR),
            image.blob(
                tar(
                    [
                        ("model/old/.wh..wh..opq", b""),
                        ("model/w.bin", WEIGHTS),
                        ("model/copy.bin", "=>model/w.bin"),
                    ]
                ),
                TAR,
            ),
            image.blob(
                b"raw",
                "application/vnd.cncf.model.weight.config.v1.raw",
                **{"org.cncf.model.filepath": "model/config.json"},
            ),
        ]
    )
    added = store.add("m", oci.layout(image.root, subdir="model"))
    tree = store.resolve(str(added.ref))
    assert sorted(f.path for f in store.manifest(added.ref.hex).files) == [
        "config.json",
        "copy.bin",
        "w.bin",
    ]
    assert (tree / "copy.bin").read_bytes() == WEIGHTS and added.new_blobs == 2


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("../x", "unsafe path '../x'"),
        ("model/../../x", "unsafe path 'model/../../x'"),
        ("/etc/cron.d/x", "unsafe path '/etc/cron.d/x'"),
    ],
)
def test_path_traversal_in_a_layer_is_refused(
    store: Store, tmp_path: Path, name: str, what: str
) -> None:
    image = Layout(tmp_path / "image")
    image.image([image.blob(tar([("config.json", b"{}"), (name, b"evil")]), TAR)])
    with pytest.raises(StoreError, match="layer 0") as info:
        store.add("m", oci.layout(image.root))
    assert what in str(info.value)
    assert store.models() == []
    assert not (tmp_path / "x").exists() and list(store.layout.blobs.iterdir()) == []


def test_links_out_of_a_layer_are_refused(store: Store, tmp_path: Path) -> None:
    image = Layout(tmp_path / "image")
    image.image([image.blob(tar([("config.json", "->/etc/passwd")]), TAR)])
    with pytest.raises(StoreError, match=r"config\.json is a symbolic link to '/etc/passwd'"):
        store.add("m", oci.layout(image.root))
    image = Layout(tmp_path / "image2")
    image.image([image.blob(tar([("config.json", "=>../../etc/passwd")]), TAR)])
    with pytest.raises(StoreError, match=r"unsafe path '\.\./\.\./etc/passwd'"):
        store.add("m", oci.layout(image.root))


def test_a_layer_that_does_not_match_its_digest_is_refused(store: Store, tmp_path: Path) -> None:
    image = Layout(tmp_path / "image")
    layer = image.blob(tar([("config.json", b'{"a": 1}')]), TAR)
    image.image([layer])
    blob = image.root / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    data = bytearray(blob.read_bytes())
    data[513] ^= 1  # in config.json's content, past the tar header: the tar still reads
    blob.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"layer 0 .*: its content does not match its digest"):
        store.add("m", oci.layout(image.root))
    assert store.models() == []


def test_choosing_one_image_by_its_name(store: Store, tmp_path: Path) -> None:
    image = Layout(tmp_path / "image")
    for tag in ("v1", "v2"):
        image.image([image.blob(tar([("version", tag.encode())]), TAR)], ref=tag)
    with pytest.raises(StoreError, match=r"2 manifests; choose one by name \(names: \['v1', 'v2'"):
        store.add("m", oci.layout(image.root))
    with pytest.raises(StoreError, match="0 manifests named 'v3'"):
        store.add("m", oci.layout(image.root, ref="v3"))
    added = store.add("m", oci.layout(image.root, ref="v2"))
    assert (store.resolve(str(added.ref)) / "version").read_bytes() == b"v2"


def test_unsupported_layers_are_refused(store: Store, tmp_path: Path) -> None:
    image = Layout(tmp_path / "image")
    image.image([image.blob(b"\x28\xb5\x2f\xfd", TAR + "+zstd")])
    with pytest.raises(StoreError, match="zstd layers are not supported"):
        store.add("m", oci.layout(image.root))
    image = Layout(tmp_path / "image2")
    image.image([image.blob(b"data", "application/octet-stream")])
    with pytest.raises(StoreError, match="neither a tar layer nor a file named by"):
        store.add("m", oci.layout(image.root))
