"""`vgate engine run` for a headless worker node: vLLM as a child, readiness and liveness from
its connection to the head (engine.joined).

A head engine is exec'd in place and is ready when its /health answers. A worker node has no
HTTP port, and left alone it outlives its head: when the head stops, vLLM's headless workers
keep running, stuck in a group that is gone, and a restarted head then waits for workers that
never come. So here vgate stays the unit's main process: it starts vLLM in a session of its
own, tells systemd READY=1 once vLLM is connected to the head (until then the unit is
"activating" with the status "waiting for the head"), and when every connection to the head
has been gone for `grace` seconds it stops vLLM and exits 1, so the unit restarts and the node
joins the head's next group. SIGTERM stops vLLM as a whole group.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType
from typing import TextIO

from engine import launch, procs
from engine.joined import Address, joined
from proxy.ops.sdnotify import Notifier

LOST_EXIT = 1


def supervise(
    name: str,
    spec: launch.LaunchSpec,
    head: str,
    peers: set[Address],
    *,
    notifier: Notifier | None = None,
    grace: float = 15.0,
    poll: float = 1.0,
    out: TextIO = sys.stdout,
) -> int:
    """Run the worker until vLLM exits (its code), the head is lost (1) or SIGTERM (0)."""
    notify = notifier or Notifier()
    stopping: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    launch.prepare(spec)
    started = time.monotonic()
    child = subprocess.Popen(
        spec.argv,
        env=spec.full_env(),
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=procs.die_with_parent(),
    )
    notify.notify(f"STATUS=waiting for the head at {head}")
    _say(out, f"engine {name}: headless worker (pid {child.pid}), waiting for the head at {head}")
    joined_at: float | None = None
    lost_since: float | None = None
    try:
        while not stopping:
            code = child.poll()
            if code is not None:
                _say(out, f"engine {name}: vLLM exited with {code}")
                return code
            now = time.monotonic()
            if joined(child.pid, peers):
                lost_since = None
                if joined_at is None:
                    joined_at = now
                    _say(out, f"engine {name}: joined the head at {head} in {now - started:.1f} s")
                    notify.ready(f"joined the head at {head}")
            elif joined_at is not None:
                lost_since = lost_since or now
                if now - lost_since >= grace:
                    _say(
                        out,
                        f"engine {name}: no connection to the head at {head} for {grace:g} s; "
                        "stopping to join its next group",
                    )
                    notify.notify(f"STATUS=lost the head at {head}")
                    return LOST_EXIT
            time.sleep(poll)
        notify.stopping(f"stopping (signal {stopping[0]})")
        return 0
    finally:
        procs.stop_group(child.pid, timeout=30.0)
        child.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        notify.close()


def _say(out: TextIO, line: str) -> None:
    print(line, file=out, flush=True)
