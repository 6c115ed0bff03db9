"""Process groups: how an engine is stopped without orphans.

vLLM's API server forks EngineCore/worker processes; SIGKILL of the server alone leaves them
running. Each child is therefore started in its own session (its own process group) and stopped
as a group, and "stopped" means no process of the group is left, not just that the leader exited.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is `pgid`, by scanning /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        # The command name may contain spaces and parentheses: fields start after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def stop_group(pgid: int, timeout: float = 15.0, poll: float = 0.1) -> bool:
    """SIGTERM the group, wait for every member to go, SIGKILL what is left after `timeout`.

    Returns True if the group ended on SIGTERM alone. Blocking; for a running event loop use
    `asyncio.to_thread`.
    """
    signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_members(pgid):
            return True
        time.sleep(poll)
    signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5.0
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(poll)
    return False


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `sig` if its parent dies, even by SIGKILL (Linux only).

    Survives exec (of taskset, then python), so an engine never outlives a killed `vgate up`.
    """
    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return preexec
