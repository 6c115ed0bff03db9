"""One box, several worker processes: where they meet (`[server] workers`).

The supervisor (proxy.ops.workers) makes a private directory and starts each worker with
`--worker DIR:INDEX:COUNT`; both sides find everything they share by name in that directory:
the validated config snapshot, the secret response ids are signed with, the rate-limit table,
and each worker's notify and metrics sockets. Nothing else is shared: see the README's
"Worker processes" for what stays per worker and why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SECRET_FILE = "secret"  # in the box directory: written by the supervisor, read by each worker


@dataclass(frozen=True)
class Box:
    directory: Path
    index: int  # this worker's, 0 .. count-1
    count: int
    secret: bytes  # signs response ids: one secret for the box, so any worker reads any id

    @classmethod
    def parse(cls, value: str) -> Box:
        """From `DIR:INDEX:COUNT` (what the supervisor passes); ValueError if malformed."""
        directory, index, count = value.rsplit(":", 2)
        if not 0 <= int(index) < int(count):
            raise ValueError(f"worker index {index} not below {count}")
        path = Path(directory)
        return cls(path, int(index), int(count), (path / SECRET_FILE).read_bytes())

    @property
    def config_file(self) -> Path:
        return self.directory / "config.toml"

    @property
    def ratelimit_file(self) -> Path:
        return self.directory / "ratelimit.table"

    def notify_socket(self, index: int | None = None) -> Path:
        return self.directory / f"notify-{self.index if index is None else index}.sock"

    def admin_socket(self, index: int | None = None) -> Path:
        return self.directory / f"admin-{self.index if index is None else index}.sock"


def cores() -> int:
    """The cores this process may run on (`workers = "auto"`): its CPU affinity, which a
    unit's CPUAffinity= or a container's cpuset narrows, rather than every core of the box."""
    return len(os.sched_getaffinity(0)) or 1
