"""proxy/http/protocol.py subclasses uvicorn's httptools protocol and reads some of its internals.

uvicorn is pinned in pyproject.toml to the range this file was last checked against; if a new
uvicorn changes any internal the subclass relies on, these tests fail by name before any request
behaves differently. Update the pin only together with this file.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import tomllib
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from packaging.specifiers import SpecifierSet
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import ServerState

from proxy.core.config import ServerConfig
from proxy.http.protocol import BoundedHttpProtocol, protocol_class

ROOT = Path(__file__).resolve().parents[2]


def test_status_lines_are_uvicorn_s_table() -> None:
    # proxy/http/direct.py writes uvicorn's own status lines.
    assert STATUS_LINE[200] == b"HTTP/1.1 200 OK\r\n"
    assert all(STATUS_LINE[code].startswith(b"HTTP/1.1 %d " % code) for code in (404, 502, 503))


def test_installed_uvicorn_is_within_the_pinned_range() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if d.startswith("uvicorn")]
    constraint = SpecifierSet(re.sub(r"^uvicorn(\[[^\]]*\])?", "", spec))
    assert constraint.contains(uvicorn.__version__), (uvicorn.__version__, str(constraint))
    assert any(s.operator == "<" for s in constraint), "the pin needs an upper bound"


@pytest.mark.parametrize(
    "name",
    [
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_message_complete",
    ],
)
def test_overridden_methods_keep_their_signatures(name: str) -> None:
    ours = inspect.signature(getattr(BoundedHttpProtocol, name))
    theirs = inspect.signature(getattr(HttpToolsProtocol, name))
    assert list(ours.parameters) == list(theirs.parameters)


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8080)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def test_the_internals_the_subclass_reads_are_there() -> None:
    seen: dict[str, Any] = {}
    answered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        proto = seen["proto"]
        cycle = proto.cycle
        # What protocol.py reads of the cycle while a request is served.
        seen["cycle"] = type(cycle)
        for attribute in (
            "transport",
            "response_complete",
            "more_body",
            "response_started",
            "keep_alive",
            # and proxy/http/direct.py, which writes whole responses itself:
            "disconnected",
            "access_log",
            "waiting_for_100_continue",
            "default_headers",
        ):
            seen[f"cycle.{attribute}"] = getattr(cycle, attribute)
        seen["cycle.flow.write_paused"] = cycle.flow.write_paused
        seen["cycle.message_event"] = cycle.message_event
        seen["cycle.on_response"] = cycle.on_response
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        answered.set()

    config = uvicorn.Config(app, http=protocol_class(ServerConfig()), lifespan="off")
    state = ServerState()
    proto = protocol_class(ServerConfig())(config, state, {}, asyncio.get_running_loop())
    seen["proto"] = proto
    transport = _Transport()
    proto.connection_made(transport)
    # Attributes of the protocol itself.
    assert proto.transport is transport
    assert isinstance(proto.flow, FlowControl) and isinstance(proto.flow.read_paused, bool)
    assert proto in proto.connections and isinstance(proto.connections, set)
    assert isinstance(proto.tasks, set)
    assert isinstance(proto.pipeline, deque)
    assert proto.client == ("127.0.0.1", 5000)
    assert callable(proto._unset_keepalive_if_required)
    assert hasattr(proto.parser, "should_upgrade")
    proto.data_received(b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n{}")
    # on_headers_complete filled these, and made the cycle the app now runs in.
    assert proto.url == b"/x"
    assert proto.headers == [(b"host", b"h"), (b"content-length", b"2")]
    assert proto.scope["path"] == "/x"
    await asyncio.wait_for(answered.wait(), 5)
    assert seen["cycle"] is RequestResponseCycle
    assert seen["cycle.transport"] is transport
    assert seen["cycle.response_complete"] is False
    assert seen["cycle.response_started"] is False
    assert seen["cycle.more_body"] is False
    assert seen["cycle.keep_alive"] is True
    assert seen["cycle.disconnected"] is False
    assert isinstance(seen["cycle.access_log"], bool)
    assert isinstance(seen["cycle.waiting_for_100_continue"], bool)
    assert isinstance(seen["cycle.default_headers"], list)
    assert seen["cycle.flow.write_paused"] is False
    assert isinstance(seen["cycle.message_event"], asyncio.Event)
    assert callable(seen["cycle.on_response"])
    assert transport.written.startswith(b"HTTP/1.1 200 OK\r\n")
    # The concurrency limit is taken over by the subclass (answered in OpenAI's shape).
    assert "limit_concurrency" in vars(proto)
