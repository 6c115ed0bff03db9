"""Config checks, log formatting and outcome classification, without a server."""

from __future__ import annotations

import logging
import logging.config
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from proxy.core.binder import ConfigError
from proxy.core.config import Config, LoggingConfig
from proxy.core.errors import (
    InvalidRequest,
    Overloaded,
    RateLimited,
    ShuttingDown,
    UpstreamStreamBroken,
    UpstreamTimeout,
    VgateError,
)
from proxy.core.pipeline import Outcome
from proxy.runtime import load as config_module
from proxy.telemetry.logs import (
    REQUEST_ID,
    JsonFormatter,
    StderrHandler,
    TextFormatter,
    dict_config,
    flush_handlers,
    request_record,
)
from proxy.telemetry.metrics import OUTCOMES, reason_label, upstream_label
from proxy.telemetry.observe import classify


def _config(**sections: Any) -> Config:
    data = {"models": {"tiny": {"upstreams": ["http://127.0.0.1:9"]}}, **sections}
    return config_module.from_dict(data, "vgate.toml")


def test_admin_is_off_and_loopback_by_default() -> None:
    cfg = _config()
    assert cfg.admin.enabled is False and cfg.admin.host == "127.0.0.1"
    assert cfg.logging == LoggingConfig(level="info", format="json", requests=True)


def test_public_admin_bind_is_refused_unless_deliberate() -> None:
    with pytest.raises(ConfigError) as info:
        _config(admin={"enabled": True, "host": "0.0.0.0"})
    assert info.value.source == "vgate.toml"
    assert info.value.problems[0].startswith("admin.host: '0.0.0.0' is not a loopback address")
    assert _config(admin={"enabled": True, "host": "0.0.0.0", "allow_public": True}).admin.host
    # Disabled, the host is not used: nothing to refuse.
    assert not _config(admin={"host": "0.0.0.0"}).admin.enabled


@pytest.mark.parametrize(
    ("sections", "problem"),
    [
        ({"admin": {"enabled": True, "port": 8080}}, "admin.port: 8080 is the main listener's"),
        ({"admin": {"port": 70000}}, "admin.port: must be a port number or 0"),
        ({"logging": {"level": "loud"}}, "logging.level: must be one of 'debug', 'info'"),
        ({"logging": {"format": "xml"}}, "logging.format: must be one of 'json', 'text'"),
        ({"logging": {"requests": "yes"}}, "logging.requests: must be a boolean"),
    ],
)
def test_bad_sections_name_the_key(sections: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        _config(**sections)
    assert any(p.startswith(problem) for p in info.value.problems), info.value.problems


def _record(**fields: Any) -> logging.LogRecord:
    record = logging.LogRecord("vgate.t", logging.WARNING, __file__, 1, "hello", (), None)
    record.fields = fields
    return record


def test_json_lines_carry_the_request_id_of_the_context() -> None:
    token = REQUEST_ID.set("rid-1")
    try:
        line = orjson.loads(JsonFormatter().format(_record(status=200, msg="shadowed")))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "rid-1" and line["level"] == "warning"
    assert line["msg"] == "hello" and line["status"] == 200  # fields never replace the base
    assert line["ts"].endswith("Z") and line["logger"] == "vgate.t"
    assert "request_id" not in orjson.loads(JsonFormatter().format(_record()))


def test_exceptions_and_text_format() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("vgate.t", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    assert "ValueError: boom" in orjson.loads(JsonFormatter().format(record))["exc"]
    text = TextFormatter().format(_record(status=200, model=None))
    assert text.endswith("WARNING vgate.t: hello status=200")


def test_dict_config_applies_level_and_format() -> None:
    logging.config.dictConfig(dict_config(LoggingConfig(level="warning", format="text")))
    vgate = logging.getLogger("vgate")
    assert vgate.level == logging.WARNING and not vgate.propagate
    assert isinstance(vgate.handlers[0].formatter, TextFormatter)
    logging.config.dictConfig(dict_config(LoggingConfig()))
    assert isinstance(logging.getLogger("uvicorn").handlers[0].formatter, JsonFormatter)


def test_other_libraries_records_are_json_lines_even_with_a_traceback() -> None:
    # asyncio logs an exception escaping a protocol callback with its traceback: through the
    # root logger it is one JSON object on one line like every other record.
    logging.config.dictConfig(dict_config(LoggingConfig()))
    root = logging.getLogger()
    [handler] = root.handlers
    assert isinstance(handler, StderrHandler) and isinstance(handler.formatter, JsonFormatter)
    assert root.level == logging.WARNING
    try:
        raise RuntimeError("line one\nline two\r\n\u2028forged")
    except RuntimeError:
        record = logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, "Fatal error on transport\nprotocol: x", (),
            sys.exc_info(),
        )  # fmt: skip
    line = handler.format(record)
    assert len(line.splitlines()) == 1, line
    data = orjson.loads(line)
    assert data["logger"] == "asyncio" and data["msg"].startswith("Fatal error")
    assert "RuntimeError: line one" in data["exc"] and "\u2028forged" in data["exc"]


@pytest.mark.parametrize("text", ["\u2028", "\u2029", "\x85", "\x7f", "\x9b", "\x1b[2J", "\ud800"])
def test_json_lines_escape_every_separator_and_control(text: str) -> None:
    line = JsonFormatter().format(_record(model=f"a{text}b"))
    assert len(line.splitlines()) == 1
    assert line.isascii() or not any(0x7F <= ord(c) <= 0x9F or c in "\u2028\u2029" for c in line)
    if text != "\ud800":
        assert orjson.loads(line)["model"] == f"a{text}b"


@pytest.mark.parametrize(
    ("status", "error", "cancelled", "started", "details", "outcome"),
    [
        (200, None, False, False, {}, "ok"),
        (200, None, False, True, {"retries": 1}, "ok"),
        (400, InvalidRequest("x"), False, False, {}, "client_error"),
        (404, None, False, False, {}, "client_error"),
        (429, RateLimited("x"), False, False, {}, "rate_limited"),
        (429, Overloaded("x"), False, False, {"shed": "queue_full"}, "shed"),
        (503, Overloaded("x"), False, False, {}, "shed"),
        (504, UpstreamTimeout("x"), False, False, {}, "upstream_error"),
        (200, UpstreamStreamBroken("x"), False, True, {}, "stream_failed"),
        (200, UpstreamTimeout("x"), False, True, {}, "stream_failed"),
        (499, None, True, False, {}, "cancelled"),
        (200, None, True, True, {}, "cancelled"),
        (503, ShuttingDown("x"), False, False, {}, "shutdown"),
        (500, VgateError("x"), False, False, {}, "server_error"),
    ],
)
def test_classify(
    status: int,
    error: VgateError | None,
    cancelled: bool,
    started: bool,
    details: dict[str, Any],
    outcome: str,
) -> None:
    record = Outcome()
    for name, value in details.items():
        setattr(record, name, value)
    assert classify(status, error, cancelled, started, record) == outcome
    assert outcome in OUTCOMES


def test_labels_from_outcomes_are_bounded() -> None:
    assert reason_label("queue_full") == "queue_full"
    assert reason_label("has space") == "other" and reason_label("x" * 65) == "other"
    assert reason_label(3) == "other" and reason_label(None) == "other"
    assert upstream_label("engine:a tiny") == "engine:a" and upstream_label(None) == "none"


def test_batched_lines_are_written_at_flush_others_at_once(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        handler = StderrHandler(fd)
        handler.setFormatter(JsonFormatter())
        handler.handle(request_record("vgate.request", "request", "r1", 1.5, {"status": 200}))
        assert path.read_bytes() == b""
        handler.handle(_record(status=500))  # an ordinary record: written now, with the batch
        lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        assert [line.get("request_id") for line in lines] == ["r1", None]
        assert lines[0]["ts"] == "1970-01-01T00:00:01.500Z" and lines[0]["status"] == 200
        handler.handle(request_record("vgate.request", "request", "r2", 2.0, {}))
        logger = logging.getLogger("vgate.test_flush")
        logger.addHandler(handler)
        flush_handlers(logger)
        logger.removeHandler(handler)
        assert orjson.loads(path.read_bytes().splitlines()[-1])["request_id"] == "r2"
    finally:
        os.close(fd)


# -- text lines cannot be forged -------------------------------------------------------------------

FORGERIES = {
    "newline-and-a-fake-line": "x\n2026-01-01T00:00:00.000Z INFO    vgate.request: status=200",
    "carriage-return": "x\rstatus=200",
    "crlf": "x\r\nkey=admin",
    "tab": "a\tb",
    "nul": "a\x00b",
    "escape-sequence": "\x1b[2J\x1b[31mred",
    "del-and-c1": "a\x7fb\x85c\x9bd",
    "line-separator": "a\u2028status=200",
    "paragraph-separator": "a\u2029b",
    "space-and-a-fake-pair": "tiny status=200",
    "equals": "a=b",
    "quote": 'a"b',
    "backslash-escapes-spelled-out": "a\\nb\\x00",
    "empty": "",
    "quoted-already": '"tiny"',
}


def _logfmt(line: str) -> tuple[str, dict[str, str]]:
    """(msg, pairs) of a text line: `ts LEVEL logger: msg key=value ...`, values unescaped."""
    _, _, rest = line.partition(": ")
    tokens: list[str] = []
    i = 0
    while i < len(rest):
        if rest[i] == " ":
            i += 1
            continue
        j, quoted = i, False
        while j < len(rest) and (quoted or rest[j] != " "):
            if rest[j] == "\\":
                j += 1
            elif rest[j] == '"':
                quoted = not quoted
            j += 1
        tokens.append(rest[i:j])
        i = j
    msg = []
    while tokens and "=" not in tokens[0].split('"', 1)[0]:
        msg.append(tokens.pop(0))
    pairs = {}
    for token in tokens:
        key, _, value = token.partition("=")
        pairs[key] = _unescape(value[1:-1] if value.startswith('"') else value)
    return " ".join(msg), pairs


def _unescape(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in "nrt":
            out.append({"n": "\n", "r": "\r", "t": "\t"}[nxt])
            i += 2
        elif nxt == "x":
            out.append(chr(int(text[i + 2 : i + 4], 16)))
            i += 4
        elif nxt == "u":
            out.append(chr(int(text[i + 2 : i + 6], 16)))
            i += 6
        else:
            out.append(nxt)
            i += 2
    return "".join(out)


@pytest.mark.parametrize("text", list(FORGERIES.values()), ids=list(FORGERIES))
def test_text_lines_escape_client_text_in_fields(text: str) -> None:
    line = TextFormatter().format(_record(model=text, status=404, outcome="client_error"))
    assert len(line.splitlines()) == 1, line
    assert line.isprintable(), line
    msg, pairs = _logfmt(line)
    assert msg == "hello"
    assert pairs == {"model": text, "status": "404", "outcome": "client_error"}


@pytest.mark.parametrize("text", list(FORGERIES.values()), ids=list(FORGERIES))
def test_text_lines_escape_client_text_in_messages(text: str) -> None:
    record = logging.LogRecord(
        "vgate.http", logging.INFO, __file__, 1, "refused %s: %s", ("1.2.3.4", text), None
    )
    record.fields = {"reason": "malformed"}
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1, line
    assert line.isprintable(), line
    msg, pairs = _logfmt(line)
    assert pairs == {"reason": "malformed"}  # no key forged
    if msg.startswith('"'):
        assert msg.endswith('"')
        msg = msg[1:-1]
    assert _unescape(msg).split() == f"refused 1.2.3.4: {text}".split()


def test_text_tracebacks_are_continuation_lines() -> None:
    try:
        raise ValueError("boom\n2026-01-01T00:00:00.000Z ERROR   vgate.x: forged")
    except ValueError:
        record = logging.LogRecord("vgate.t", logging.ERROR, __file__, 1, "x", (), sys.exc_info())
    first, *rest = TextFormatter().format(record).splitlines()
    assert first.endswith("ERROR   vgate.t: x")
    assert rest and all(line.startswith("  | ") for line in rest), rest
    assert any("ValueError: boom" in line for line in rest)
    assert all(line.isprintable() for line in rest)
