"""`vgate models add|list|verify|remove`: the model store from the command line.

Exit codes, as `cmp` has them: 0 done (verify: every file matches), 1 verify found files that
do not match, 2 the command could not do what was asked (bad argument, unknown model, unreadable
source, a refusal such as a symbolic link leaving the model directory).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from engine.store import oci
from engine.store import source as store_source
from engine.store.io import human_size, plural
from engine.store.manifest import StoreError
from engine.store.pinned import DEFAULT_STORE
from engine.store.store import Store

STORE_ENV = "VGATE_MODEL_STORE"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `models` to `vgate`'s subparsers; each verb sets `func(args) -> int`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store",
        help=f"store directory (default: ${STORE_ENV}, else {DEFAULT_STORE})",
    )
    models = sub.add_parser("models", help="models pinned by content (NAME@sha256:...)")
    verbs = models.add_subparsers(dest="models_command", required=True)

    add = verbs.add_parser("add", parents=[common], help="hash a model directory into the store")
    add.add_argument("name", help="model name (letters, digits, '.', '_', '-')")
    add.add_argument("source", help="model directory, or an OCI image layout directory")
    add.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read symbolic links that leave the directory (e.g. a Hugging Face cache snapshot)",
    )
    add.add_argument("--ref", help="OCI layout: the image's org.opencontainers.image.ref.name")
    add.add_argument("--subdir", help="OCI layout: only the files under this image directory")
    add.set_defaults(func=_guarded(_add))

    ls = verbs.add_parser("list", parents=[common], help="names, digests, sizes, file counts")
    ls.set_defaults(func=_guarded(_list))

    verify = verbs.add_parser("verify", parents=[common], help="hash every file again")
    verify.add_argument("target", nargs="?", help="NAME, NAME@sha256:HEX or sha256:HEX (all)")
    verify.set_defaults(func=_guarded(_verify))

    remove = verbs.add_parser(
        "remove", parents=[common], help="drop a name or one of its digests, delete unused files"
    )
    remove.add_argument("target", help="NAME (all its digests) or NAME@sha256:HEX")
    remove.set_defaults(func=_guarded(_remove))


def _guarded(fn: Callable[[argparse.Namespace, Store], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        root = args.store or os.environ.get(STORE_ENV) or DEFAULT_STORE
        try:
            return fn(args, Store(root))
        except StoreError as exc:
            print(f"vgate models: {exc}", file=sys.stderr)
        except OSError as exc:
            where = exc.filename or root
            print(f"vgate models: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2

    return run


def _add(args: argparse.Namespace, store: Store) -> int:
    source = Path(args.source)
    if oci.is_layout(source):
        changes = oci.layout(source, ref=args.ref, subdir=args.subdir)
    elif args.ref or args.subdir:
        raise StoreError(f"{source}: --ref and --subdir are for OCI image layouts (no oci-layout)")
    else:
        changes = store_source.directory(source, follow_symlinks=args.follow_symlinks)
    added = store.add(args.name, changes)
    what = f"{plural(added.files, 'file')}, {human_size(added.size)}"
    if added.changed:
        print(f"added {added.ref} ({what}; {added.new_blobs} written to the store)")
    else:
        print(f"unchanged: {added.ref} is already the current content of {added.ref.name}")
    print(f'pin it in an engine: model = "{added.ref}"')
    return 0


def _list(args: argparse.Namespace, store: Store) -> int:
    rows = store.models()
    if not rows:
        print(f"no models in {store.layout.root}")
    for row in rows:
        size = "manifest damaged" if row.size is None else human_size(row.size)
        current = "  (current)" if row.current else ""
        files = "?" if row.files is None else plural(row.files, "file")
        print(f"{row.name}@sha256:{row.hex}  {size}  {files}  added {row.added}{current}")
    return 0


def _verify(args: argparse.Namespace, store: Store) -> int:
    results = store.verify(args.target, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if not results:
        print(f"no models in {store.layout.root}")
    bad = 0
    for checked in results:
        refs = ", ".join(f"{n}@sha256:{checked.hex}" for n in checked.names)
        if checked.problems:
            bad += 1
            print(f"BAD {refs}")
            for problem in checked.problems:
                print(f"  {problem}")
        else:
            print(f"OK  {refs}")
    return 1 if bad else 0


def _remove(args: argparse.Namespace, store: Store) -> int:
    removed = store.remove(args.target)
    models = plural(len(removed.digests), "model")
    files = plural(removed.blobs, "file")
    print(f"removed {args.target}: deleted {models}, {files} ({human_size(removed.bytes)})")
    return 0
