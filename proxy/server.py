"""Run the app under uvicorn, refusing unsafe binds."""

from __future__ import annotations

import uvicorn

from proxy.app import create_app
from proxy.config import Config, is_loopback
from proxy.settings import ConfigError


def check_bind(config: Config, authenticated: bool) -> None:
    """A public listener without authentication is refused unless the config says so."""
    host = config.server.host
    if is_loopback(host) or authenticated or config.server.allow_unauthenticated:
        return
    raise ConfigError(
        config.source,
        [
            f"server.host: {host!r} is not a loopback address and no authentication is "
            "configured; add the auth policy or set server.allow_unauthenticated = true"
        ],
    )


def uvicorn_config(config: Config) -> uvicorn.Config:
    server = config.server
    return uvicorn.Config(
        create_app(config),
        host=server.host,
        port=server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,  # one structured line per request comes from vgate itself
        log_level="info",
        server_header=False,
        date_header=False,
        timeout_keep_alive=int(server.keepalive_timeout),
        timeout_graceful_shutdown=int(server.drain_timeout),
        limit_concurrency=server.max_concurrency,
        proxy_headers=False,
    )


def serve(config: Config) -> None:
    check_bind(config, authenticated=_has_auth(config))
    uvicorn.Server(uvicorn_config(config)).run()


def _has_auth(config: Config) -> bool:
    order = config.policies.get("order", [])
    return isinstance(order, list) and "auth" in order
