"""`vgate status [--config FILE] [--watch [SECONDS]] [--json]`: one screen for an operator.

Every model, upstream and engine of a running proxy with health, breaker, in-flight and queued
requests, KV-cache use, and requests/s and TTFT over the last minute (the proxy keeps that
window itself: see proxy.ops.status). Exit codes: 0 everything ready, 1 something is not (a
model, or an upstream unhealthy, warming up or behind a breaker that is not closed), 2 the
proxy cannot be reached (or the config cannot be read). With --watch, the last frame's code.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TextIO

import orjson

from proxy.cli.status_view import render, render_unreachable
from proxy.ops.installer import Layout
from proxy.ops.status import Endpoints, Unreachable, collect
from proxy.runtime import load

WATCH_SECONDS = 2.0
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear the screen: each frame replaces the last


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `vgate status` to `vgate`'s subparsers; it sets `func(args) -> int`."""
    default = Layout().config
    p = sub.add_parser(
        "status", help="models, upstreams and engines of a running proxy, on one screen"
    )
    p.add_argument("--config", default=default, help=f"TOML config file ({default})")
    p.add_argument(
        "--watch",
        nargs="?",
        const=WATCH_SECONDS,
        type=_seconds,
        metavar="SECONDS",
        help=f"refresh every SECONDS ({WATCH_SECONDS:g}) until Ctrl-C",
    )
    p.add_argument("--json", action="store_true", help="JSON (with --watch: one line a refresh)")
    # Frames to show before exiting: lets tests (and scripts) bound --watch.
    p.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=_status)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be between 0 and 86400 seconds: {text}")
    return value


def _status(args: argparse.Namespace) -> int:
    endpoints = Endpoints.of(load.load(args.config))
    out: TextIO = sys.stdout
    tty = out.isatty()
    colour = tty and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"
    frames = 0
    while True:
        code = _frame(endpoints, args, out, colour, clear=tty and args.watch is not None)
        frames += 1
        if args.watch is None or (args.count is not None and frames >= args.count):
            return code
        time.sleep(args.watch)


def _frame(
    endpoints: Endpoints, args: argparse.Namespace, out: TextIO, colour: bool, clear: bool
) -> int:
    """Show one look at the proxy; its exit code."""
    every = args.watch
    # A --watch frame replaces the last one on a terminal; in a pipe or a file each is kept,
    # a blank line after it. JSON is one line a look.
    before, after = (_CLEAR, "\n") if clear else ("", "\n\n" if every is not None else "\n")
    if args.json:
        before, after = "", "\n"
    try:
        status = collect(endpoints)
    except Unreachable as exc:
        message = f"cannot reach {exc.url}: {exc.reason} — is vgate running?"
        if every is None:
            print(f"vgate status: {message}", file=sys.stderr)
        if args.json:
            text = orjson.dumps({"state": "unreachable", "error": message}).decode()
        elif every is not None:
            text = render_unreachable(exc.url, exc.reason, colour, every)
        else:
            return 2
        out.write(before + text + after)
        out.flush()
        return 2
    text = orjson.dumps(status.to_json()).decode() if args.json else render(status, colour, every)
    out.write(before + text + after)
    out.flush()
    return status.exit_code()
