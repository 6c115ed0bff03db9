"""Run the real proxy app under real uvicorn on a loopback port, on a background thread.

Streaming, disconnect and keep-alive behaviour only shows over real sockets (an in-process ASGI
transport buffers whole bodies), so the proxy tests talk to this server with real clients.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import uvicorn

from proxy.core.config import Config
from proxy.http.app import create_app
from proxy.ops.server import uvicorn_config
from proxy.runtime import load as config_module


def proxy_config(upstream_url: str, **sections: dict[str, Any]) -> dict[str, Any]:
    """A config dict with model `tiny` on `upstream_url`; `sections` override or add tables.

    The defaults keep tests fast: a short drain on shutdown, monitors that poll rarely.
    """
    data: dict[str, Any] = {
        "server": {"drain_timeout": 1.0},
        "upstream": {"health_interval": 30.0, "metrics_interval": 30.0},
        "models": {"tiny": {"upstreams": [upstream_url]}},
    }
    for name, table in sections.items():
        data[name] = {**data.get(name, {}), **table}
    return data


class ProxyServer:
    """The app from `create_app(config)` served by uvicorn exactly as `vgate serve` runs it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(config)
        self.server = uvicorn.Server(uvicorn_config(config, self.app))
        self._thread: threading.Thread | None = None
        self._error: list[BaseException] = []

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyServer:
        return cls(config_module.from_dict(data, "<test>"))

    def start(self, within: float = 10.0) -> ProxyServer:
        def run() -> None:
            try:
                self.server.run(sockets=[self._sock])
            except BaseException as exc:
                self._error.append(exc)

        self._thread = threading.Thread(target=run, name="vgate-proxy", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + within
        # uvicorn offers no startup event to wait on across threads: poll its flag briefly.
        while not self.server.started:
            if self._error or not self._thread.is_alive():
                raise RuntimeError(f"proxy failed to start: {self._error!r}")
            if time.monotonic() > deadline:
                raise TimeoutError("proxy did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.server.should_exit = True
            self._thread.join(15)
            self._thread = None
        self._sock.close()
        if self._error:
            raise self._error[0]

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
