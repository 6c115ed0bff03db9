"""`vgate keys new NAME`: a fresh API key, and the config line that admits it."""

from __future__ import annotations

import argparse
import json
from typing import Any

from policies.auth import NAME_PATTERN, new_key


def _keys_new(args: argparse.Namespace) -> int:
    if not NAME_PATTERN.fullmatch(args.name):
        print("vgate: NAME must be 1-64 characters of A-Z a-z 0-9 . _ -")
        return 2
    key, digest = new_key()
    models = ""
    if args.models:
        # JSON strings are valid TOML basic strings.
        models = ", models = [" + ", ".join(json.dumps(m) for m in args.models) + "]"
    print(f"API key for {args.name} (shown once, store it now):")
    print(f"  {key}")
    print("Add this line to `keys = [...]` under [policies.auth] (only the digest is stored):")
    print(f'  {{ name = "{args.name}", sha256 = "{digest}"{models} }},')
    return 0


def register(subparsers: Any) -> None:
    """Add `vgate keys ...` to the `vgate` command line."""
    keys = subparsers.add_parser("keys", help="manage API keys")
    sub = keys.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="print a fresh API key and its config line")
    new.add_argument("name", help="the key's name (shown in logs and metrics)")
    new.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="MODEL",
        help="restrict the key to this model (repeatable)",
    )
    new.set_defaults(func=_keys_new)
