"""The model store on real files: add, dedupe, atomicity, and every way a model can be damaged."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.store import source as store_source
from engine.store import verify as store_verify
from engine.store.io import identity, remove_tree
from engine.store.manifest import Change, FileEntry, Manifest, Put, StoreError
from engine.store.pinned import check_model, model_path, resolve_model
from engine.store.store import Added, Store
from tests.engine.store_helpers import (
    FILES,
    WEIGHTS,
    add,
    flip,
    model_dir,
    snapshot,
    writable,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store")


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return model_dir(tmp_path / "src")


def test_add_then_resolve_gives_the_same_files(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    assert added.changed and added.files == 3 and added.new_blobs == 3
    assert added.size == sum(len(d) for d in FILES.values())
    tree = store.resolve(str(added.ref))
    assert tree == store.layout.tree(added.ref.hex)
    for rel, data in FILES.items():
        assert (tree / rel).read_bytes() == data
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if not p.is_dir()) == sorted(
        FILES
    )
    [row] = store.models()
    assert (row.name, row.hex, row.current, row.files, row.size) == (
        "tiny",
        added.ref.hex,
        True,
        3,
        added.size,
    )


def test_the_digest_is_of_the_content_only(store: Store, src: Path, tmp_path: Path) -> None:
    # Another directory, other mtimes, another name: the same files are the same digest.
    other = model_dir(tmp_path / "elsewhere")
    os.utime(other / "config.json", (1, 1))
    assert add(store, "a", src).ref.hex == add(store, "b", other).ref.hex
    assert len(list(store.layout.trees.iterdir())) == 1


def test_readding_identical_content_changes_nothing(store: Store, src: Path) -> None:
    first = add(store, "tiny", src)
    before = snapshot(store.layout.root)
    again = add(store, "tiny", src)
    assert again.ref == first.ref and not again.changed and again.new_blobs == 0
    assert snapshot(store.layout.root) == before
    assert list(store.layout.tmp.iterdir()) == []


def test_new_content_moves_the_name_and_keeps_the_old_digest(
    store: Store, src: Path, tmp_path: Path
) -> None:
    old = add(store, "tiny", src)
    (src / "config.json").write_bytes(b'{"v": 2}\n')
    new = add(store, "tiny", src)
    assert new.ref.hex != old.ref.hex and new.new_blobs == 1  # weights and vocab are shared
    rows = store.models()
    assert [(r.hex, r.current) for r in rows] == [(old.ref.hex, False), (new.ref.hex, True)]
    assert (store.resolve(str(old.ref)) / "config.json").read_bytes() == FILES["config.json"]
    assert (store.resolve(str(new.ref)) / "config.json").read_bytes() == b'{"v": 2}\n'

    with pytest.raises(StoreError, match="is the current content of tiny"):
        store.remove(str(new.ref))
    removed = store.remove(str(old.ref))
    assert removed.digests == [old.ref.hex] and removed.blobs == 1  # only the old config
    with pytest.raises(StoreError, match="tiny holds no such digest"):
        store.resolve(str(old.ref))
    assert (store.resolve(str(new.ref)) / "model.safetensors").read_bytes() == WEIGHTS


def test_identical_files_are_stored_once(store: Store, tmp_path: Path) -> None:
    a = model_dir(tmp_path / "a", {"w.bin": WEIGHTS, "config.json": b"a"})
    b = model_dir(tmp_path / "b", {"w.bin": WEIGHTS, "copy/w.bin": WEIGHTS, "config.json": b"b"})
    add(store, "a", a)
    added = add(store, "b", b)
    assert added.new_blobs == 1  # b's config; its two copies of the weights are a's blob
    assert len(list(store.layout.blobs.iterdir())) == 3
    tree = store.resolve(str(added.ref))
    assert (tree / "w.bin").resolve() == (tree / "copy" / "w.bin").resolve()
    assert (tree / "copy" / "w.bin").read_bytes() == WEIGHTS


def test_remove_a_name_deletes_what_only_it_used(store: Store, tmp_path: Path) -> None:
    a = add(store, "a", model_dir(tmp_path / "a", {"w.bin": WEIGHTS, "c": b"a"}))
    b = add(store, "b", model_dir(tmp_path / "b", {"w.bin": WEIGHTS, "c": b"b"}))
    removed = store.remove("a")
    assert removed.digests == [a.ref.hex] and removed.blobs == 1 and removed.bytes == 1
    assert [r.name for r in store.models()] == ["b"]
    assert (store.resolve(str(b.ref)) / "w.bin").read_bytes() == WEIGHTS
    store.remove("b")
    assert store.models() == []
    for d in (store.layout.blobs, store.layout.manifests, store.layout.trees, store.layout.stamps):
        assert list(d.iterdir()) == [], d
    with pytest.raises(StoreError, match="'b' is not in the store"):
        store.remove("b")


def test_a_failure_mid_add_leaves_nothing_visible(store: Store, src: Path) -> None:
    old = add(store, "tiny", src)
    before = snapshot(store.layout.root)

    def failing() -> object:
        yield from store_source.directory(src)
        with open(src / "config.json", "rb") as fh:
            yield Put("extra.json", fh)
        raise OSError("disk on fire")

    with pytest.raises(OSError, match="disk on fire"):
        store.add("tiny", failing())  # type: ignore[arg-type]
    with pytest.raises(OSError, match="disk on fire"):
        store.add("other", failing())  # type: ignore[arg-type]
    assert snapshot(store.layout.root) == before
    assert list(store.layout.tmp.iterdir()) == []
    assert [(r.name, r.hex) for r in store.models()] == [("tiny", old.ref.hex)]


CRASH_IN_COMMIT = """
import os, sys
from pathlib import Path
from engine.store import source as store_source, verify as store_verify
from engine.store.store import Added, Store

real, made = os.symlink, []
def symlink(*args, **kwargs):
    made.append(args)
    if len(made) == 2:
        os._exit(9)  # power cut: no finally, no cleanup
    return real(*args, **kwargs)
os.symlink = symlink
Store(sys.argv[1]).add(sys.argv[2], store_source.directory(Path(sys.argv[3])))
"""


def test_a_crash_while_committing_leaves_no_half_model(
    store: Store, src: Path, tmp_path: Path
) -> None:
    old = add(store, "tiny", src)
    (src / "config.json").write_bytes(b'{"v": 2}\n')
    new_src = model_dir(tmp_path / "new", {"a.bin": b"a" * 1000, "b.bin": b"b" * 1000})
    for name, source in (("tiny", src), ("fresh", new_src)):
        cmd = [sys.executable, "-c", CRASH_IN_COMMIT, str(store.layout.root), name, str(source)]
        assert subprocess.run(cmd, cwd=REPO, check=False).returncode == 9
    # Blobs of the new content were in place when the tree was half built: none is visible.
    assert [(r.name, r.hex) for r in store.models()] == [("tiny", old.ref.hex)]
    assert [p.name for p in store.layout.trees.iterdir()] == [old.ref.hex]
    assert len(list(store.layout.tmp.iterdir())) == 2  # what the crashes left
    # And what a crash inside a name's atomic rewrite would leave: it is no name.
    (store.layout.names / ".tmp-1-2-tiny.json").write_bytes(b'{"current": nul')
    assert [(r.name, r.hex) for r in store.models()] == [("tiny", old.ref.hex)]
    store.resolve(str(old.ref))

    # The next change collects the leftovers; the crashed adds can simply run again.
    new = add(store, "fresh", new_src)
    assert list(store.layout.tmp.iterdir()) == []
    assert sorted(p.name for p in store.layout.names.iterdir()) == ["fresh.json", "tiny.json"]
    assert sorted(p.name for p in store.layout.blobs.iterdir()) == sorted(
        {f.sha256 for h in (old.ref.hex, new.ref.hex) for f in store.manifest(h).files}
    )
    assert (store.resolve(str(new.ref)) / "b.bin").read_bytes() == b"b" * 1000


def test_an_add_being_staged_survives_another_adds_collection(store: Store, tmp_path: Path) -> None:
    staged, go = threading.Event(), threading.Event()

    def slow() -> Iterator[Change]:
        yield from store_source.directory(model_dir(tmp_path / "b", {"y": b"b"}))
        staged.set()
        go.wait(10)

    result: list[Added] = []
    thread = threading.Thread(target=lambda: result.append(store.add("b", slow())))
    thread.start()
    assert staged.wait(10)
    add(store, "a", model_dir(tmp_path / "a", {"x": b"a"}))  # commits and collects meanwhile
    go.set()
    thread.join(10)
    assert sorted(r.name for r in store.models()) == ["a", "b"]
    assert (store.resolve(str(result[0].ref), full=True) / "y").read_bytes() == b"b"


def test_the_manifest_format_is_fixed() -> None:
    # Every pinned digest depends on these bytes: changing them breaks every engine's config.
    x = hashlib.sha256(b"x").hexdigest()
    manifest = Manifest.of([FileEntry("b/c", 1, x), FileEntry("a", 1, x)])
    assert manifest.canonical() == (
        b'{"files":[{"path":"a","sha256":"%s","size":1},{"path":"b/c","sha256":"%s","size":1}],'
        b'"mediaType":"application/vnd.vgate.model.manifest.v1+json"}' % (x.encode(), x.encode())
    )
    assert Manifest.parse(manifest.canonical(), manifest.hex) == manifest
    for bad, why in (
        ([FileEntry("./a", 1, x)], "not in normal form"),
        ([FileEntry("../a", 1, x)], "unsafe path"),
        ([FileEntry("a", 1, x), FileEntry("a/b", 1, x)], "'a' is both a file and the directory"),
        ([FileEntry("a", 1, "X" * 64)], "invalid digest"),
    ):
        with pytest.raises(StoreError, match=why):
            Manifest.of(bad)


# -- damage: every check happens before vLLM would load anything


def test_one_flipped_byte_refuses_to_start(store: Store, src: Path) -> None:
    ref = str(add(store, "tiny", src).ref)
    tree = store.resolve(ref)
    flip(tree / "model.safetensors", offset=len(WEIGHTS) // 2)
    with pytest.raises(StoreError) as info:
        store.resolve(ref)
    message = str(info.value)
    assert ref in message and "model.safetensors: sha256 differs" in message
    assert "config.json" not in message
    with pytest.raises(StoreError, match=r"model\.safetensors: sha256 differs"):
        resolve_model(ref, store.layout.root)


def test_a_flipped_byte_with_its_mtime_set_back_is_still_seen(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    ref = str(added.ref)
    weights = store.layout.tree(added.ref.hex) / "model.safetensors"
    st = os.stat(weights)
    flip(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime cannot be set back
    assert os.stat(weights).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(StoreError, match=r"model\.safetensors: sha256 differs"):
        store.resolve(ref)


def test_what_the_quick_check_cannot_see_the_full_one_does(store: Store, src: Path) -> None:
    # Bit rot changes no timestamp: simulated by giving the damaged blob a stamp that vouches
    # for its new stat. The quick check trusts the stamp; `full` and `verify` hash the file.
    added = add(store, "tiny", src)
    ref = str(added.ref)
    weights = store.layout.tree(added.ref.hex) / "model.safetensors"
    flip(weights)
    blob_hex = next(f.sha256 for f in store.manifest(added.ref.hex).files if f.size > 1000)
    store.layout.stamp(blob_hex).write_text(json.dumps(identity(os.stat(weights))))
    store.resolve(ref)
    with pytest.raises(StoreError, match=r"model\.safetensors: sha256 differs"):
        store.resolve(ref, full=True)
    [checked] = store.verify("tiny")
    [problem] = checked.problems
    assert problem.startswith(f"model.safetensors: sha256 differs (manifest {blob_hex[:12]}…")


def test_the_quick_check_hashes_only_what_changed(store: Store, src: Path) -> None:
    ref = str(add(store, "tiny", src).ref)
    hashed: list[str] = []
    store.resolve(ref, log=hashed.append)
    assert hashed == []  # add stamped what it wrote
    os.utime(store.resolve(ref) / "config.json")  # any stat change: hash that file again
    store.resolve(ref, log=hashed.append)
    assert hashed == [f"hashing 1 file ({len(FILES['config.json'])} B)"]
    time.sleep(0.15)  # past the margin: the next hash of it is stamped (if that one was not)
    store.resolve(ref, log=hashed.append)
    count = len(hashed)
    store.resolve(ref, log=hashed.append)
    assert len(hashed) == count
    store.resolve(ref, full=True, log=hashed.append)
    assert hashed[-1] == f"hashing 3 files ({len(WEIGHTS) / 2**20:.1f} MiB)"


def test_a_file_changed_too_recently_is_hashed_every_time(store: Store, src: Path) -> None:
    # A stat whose timestamps are not a margin older than its hash is not stamped: a write in
    # the same clock tick would leave it equal. (An mtime in the future keeps it that young.)
    added = add(store, "tiny", src)
    future = time.time_ns() + 60 * 10**9
    os.utime(store.layout.tree(added.ref.hex) / "config.json", ns=(future, future))
    hashed: list[str] = []
    for _ in range(3):
        store.resolve(str(added.ref), log=hashed.append)
    assert hashed == [f"hashing 1 file ({len(FILES['config.json'])} B)"] * 3


def test_a_stamp_needs_timestamps_older_than_a_clock_tick(tmp_path: Path) -> None:
    # A write within the tick of the stat a stamp records would not change it (racy git).
    path = tmp_path / "f"
    path.write_bytes(b"x")
    st = os.stat(path)
    assert not store_verify.settled(st, time.time_ns())
    assert store_verify.settled(st, st.st_ctime_ns + store_verify.MARGIN_NS)
    whole = os.stat_result(tuple(st)[:10], {"st_mtime_ns": 5 * 10**9, "st_ctime_ns": 6 * 10**9})
    assert store_verify.margin_ns(whole) == store_verify.COARSE_MARGIN_NS  # 1 s granularity


def test_a_deleted_file_refuses_to_start(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    tree = store.layout.tree(added.ref.hex)
    writable(tree / "tokenizer")
    (tree / "tokenizer" / "vocab.txt").unlink()
    with pytest.raises(StoreError, match=r"tokenizer/vocab\.txt: missing"):
        store.resolve(str(added.ref))


def test_a_deleted_blob_refuses_to_start(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    config = next(f for f in store.manifest(added.ref.hex).files if f.path == "config.json")
    store.layout.blob(config.sha256).unlink()
    with pytest.raises(StoreError, match=r"config.json: missing \(its content sha256:"):
        store.resolve(str(added.ref))


def test_an_extra_file_refuses_to_start(store: Store, src: Path) -> None:
    # vLLM loads what is in the directory (an extra shard, a config of its own): refused.
    added = add(store, "tiny", src)
    tree = store.layout.tree(added.ref.hex)
    writable(tree)
    (tree / "model-00002.safetensors").write_bytes(b"x")
    (tree / "extra").mkdir()
    with pytest.raises(StoreError) as info:
        store.resolve(str(added.ref))
    assert "model-00002.safetensors: not in the manifest" in str(info.value)
    assert "extra: not in the manifest" in str(info.value)


def test_a_renamed_file_refuses_to_start(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    tree = store.layout.tree(added.ref.hex)
    writable(tree)
    (tree / "config.json").rename(tree / "config.json.bak")
    with pytest.raises(StoreError) as info:
        store.resolve(str(added.ref))
    assert "config.json: missing" in str(info.value)
    assert "config.json.bak: not in the manifest" in str(info.value)


def test_a_truncated_file_refuses_to_start(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    weights = store.layout.tree(added.ref.hex) / "model.safetensors"
    os.chmod(weights, 0o644)
    os.truncate(weights, 1000)
    with pytest.raises(StoreError, match=r"model.safetensors: size differs \(manifest 1048576"):
        store.resolve(str(added.ref))


def test_a_link_replaced_by_a_copy_refuses_to_start(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    tree = store.layout.tree(added.ref.hex)
    writable(tree)
    (tree / "config.json").unlink()
    (tree / "config.json").write_bytes(FILES["config.json"])  # same bytes, not the store's
    with pytest.raises(StoreError, match=r"config.json: replaced"):
        store.resolve(str(added.ref))


def test_a_damaged_manifest_refuses_to_start(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    path = store.layout.manifest(added.ref.hex)
    size = len(FILES["config.json"])
    path.write_bytes(path.read_bytes().replace(b'"size":%d' % size, b'"size":%d' % (size + 1)))
    with pytest.raises(StoreError, match="is damaged: its bytes do not match"):
        store.resolve(str(added.ref))


def test_adding_the_source_again_repairs_what_verify_found(store: Store, src: Path) -> None:
    added = add(store, "tiny", src)
    tree = store.layout.tree(added.ref.hex)
    flip(tree / "model.safetensors")
    writable(tree)
    (tree / "config.json").unlink()
    (tree / "stray.bin").write_bytes(b"x")
    [checked] = store.verify()
    assert [p.split(":")[0] for p in checked.problems] == [
        "config.json",
        "model.safetensors",
        "stray.bin",
    ]
    # The blob verify found bad has no stamp any more: this add's copy replaces it; the tree
    # is rebuilt.
    assert add(store, "tiny", src).new_blobs == 1
    assert store.verify()[0].problems == []
    store.resolve(str(added.ref), full=True)
    assert list(store.layout.tmp.iterdir()) == []


# -- sources


def test_a_symlink_leaving_the_source_is_refused(store: Store, src: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not model content")
    (src / "leak.json").symlink_to(secret)
    with pytest.raises(StoreError) as info:
        add(store, "tiny", src)
    assert f"{src / 'leak.json'}: a symbolic link to {secret}, outside" in str(info.value)
    assert store.models() == [] and list(store.layout.blobs.iterdir()) == []
    added = add(store, "tiny", src, follow_symlinks=True)  # deliberately
    assert (store.resolve(str(added.ref)) / "leak.json").read_bytes() == b"not model content"


def test_symlinks_inside_the_source_are_read_as_their_files(store: Store, src: Path) -> None:
    (src / "alias.safetensors").symlink_to("model.safetensors")
    added = add(store, "tiny", src)
    assert (store.resolve(str(added.ref)) / "alias.safetensors").read_bytes() == WEIGHTS
    assert added.new_blobs == 3


@pytest.mark.parametrize("kind", ["dangling", "directory", "fifo"])
def test_what_a_source_cannot_hold(store: Store, src: Path, kind: str) -> None:
    if kind == "dangling":
        (src / "gone").symlink_to(src / "nowhere")
        match = "which is not a regular file"
    elif kind == "directory":
        (src / "sub").symlink_to(src / "tokenizer")
        match = "a symbolic link to a directory"
    else:
        os.mkfifo(src / "pipe")
        match = "not a regular file, a directory or a symbolic link"
    with pytest.raises(StoreError, match=match):
        add(store, "tiny", src)
    assert store.models() == []


def test_version_control_and_download_caches_are_not_content(
    store: Store, src: Path, tmp_path: Path
) -> None:
    plain = add(store, "tiny", src).ref.hex
    model_dir(src, {".git/HEAD": b"ref: main", ".cache/huggingface/x.metadata": b"etag"})
    assert add(store, "tiny", src).ref.hex == plain


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "x" * 129])
def test_bad_names_are_refused(store: Store, src: Path, bad: str) -> None:
    with pytest.raises(StoreError, match="invalid model name"):
        add(store, bad, src)


def test_an_empty_source_is_refused(store: Store, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="no files"):
        add(store, "tiny", tmp_path / "empty")


# -- the engine's side: resolve_model (launcher) and check_model (check-config)


def test_resolve_model_passes_other_values_through(store: Store) -> None:
    for value in ("/srv/models/x", "org/name", "build/models/tiny"):
        assert resolve_model(value, store.layout.root) == value
        assert model_path(value, store.layout.root) == value
    with pytest.raises(StoreError, match="is not NAME@sha256:<64 lowercase hex digits>"):
        resolve_model("tiny@sha256:ABC", store.layout.root)


def test_resolve_model_gives_vllm_the_checked_tree(store: Store, src: Path) -> None:
    ref = str(add(store, "tiny", src).ref)
    path = resolve_model(ref, store.layout.root, full=True)
    assert Path(path) == store.layout.tree(ref.split("sha256:")[1])
    assert model_path(ref, store.layout.root) == path
    assert json.loads((Path(path) / "config.json").read_bytes())["architectures"]


def test_check_model(store: Store, src: Path, tmp_path: Path) -> None:
    key = "engines.main.model"
    root = store.layout.root
    assert check_model(key, "/srv/models/x", root) == []
    missing = f"tiny@sha256:{'0' * 64}"
    assert check_model(key, missing, tmp_path / "nowhere") == [
        f"{key}: the model store {tmp_path / 'nowhere'} does not exist (fill it: vgate models add)"
    ]
    added = add(store, "tiny", src)
    ref = str(added.ref)
    assert check_model(key, ref, root) == []
    flip(store.layout.tree(added.ref.hex) / "model.safetensors")
    assert check_model(key, ref, root) == []  # no hashing: the engine's start will refuse
    [problem] = check_model(key, missing, root)
    assert problem.startswith(f"{key}: {missing}: tiny holds no such digest")
    assert problem.endswith(f"(its current content is sha256:{added.ref.hex})")
    [problem] = check_model(key, f"other@sha256:{added.ref.hex}", root)
    assert problem == f"{key}: model 'other' is not in the store {root} (known: tiny)"
    [problem] = check_model(key, "tiny@sha256:abc", root)
    assert problem == f"{key}: 'tiny@sha256:abc' is not NAME@sha256:<64 lowercase hex digits>"
    remove_tree(store.layout.tree(added.ref.hex))
    [problem] = check_model(key, ref, root)
    assert problem == f"{key}: {ref}: its directory is missing from {root} (vgate models verify)"
    store.layout.manifest(added.ref.hex).unlink()
    [problem] = check_model(key, ref, root)
    assert problem == f"{key}: manifest sha256:{added.ref.hex} is missing from the store"


def test_the_dev_model_loads_from_its_tree(store: Store, tiny_model_dir: Path) -> None:
    # What vLLM's loader does first: safetensors and tokenizers, through the tree's symlinks.
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    ref = str(add(store, "tiny", tiny_model_dir).ref)
    tree = Path(resolve_model(ref, store.layout.root, full=True))
    loaded = load_file(str(tree / "model.safetensors"))
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert sorted(loaded) == sorted(original)
    assert all((loaded[k] == original[k]).all() for k in original)
    assert Tokenizer.from_file(str(tree / "tokenizer.json")).encode("def main():").ids
