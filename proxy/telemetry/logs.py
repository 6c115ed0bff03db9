"""Structured logs: one JSON object per line on stderr (journald keeps it), or readable text.

Every record logged while a request is being handled carries its `request_id`: the endpoint puts
the id in a context variable (each ASGI request runs in its own task, so ids never leak between
requests) and the formatter reads it. Fields go in `extra={"fields": {...}}`.

What is logged about a request is chosen by `proxy.telemetry.observe`: names and numbers, never an
API key,
its hash, or prompt or completion text.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar
from typing import Any

import orjson

from proxy.core.config import LoggingConfig

REQUEST_ID: ContextVar[str | None] = ContextVar("vgate_request_id", default=None)
# Loggers routed through our handler at the configured level: ours (by name or by module) and
# uvicorn's. Every other logger (asyncio's "Fatal error on transport" tracebacks, httpx,
# pybreaker) reaches it through the root logger, at warning and above: one format, one record
# per line, for everything the process logs.
LOGGERS = ("vgate", "uvicorn", "engine", "proxy", "policies")


class _Formatter(logging.Formatter):
    """The fields every line has; the timestamp's date part is formatted once per second."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker  # which worker process of the box logged it, when several
        self._second = -1
        self._prefix = ""

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        data: dict[str, Any] = {
            "ts": f"{self._prefix}.{int(record.created * 1000) % 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            data["worker"] = self._worker
        # A record made away from its request (batched) carries the id itself.
        rid = getattr(record, "request_id", None) or REQUEST_ID.get()
        if rid is not None:
            data["request_id"] = rid
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            if extra.keys() & data.keys():
                # Fields never replace the base ones (a stage cannot forge the request id).
                extra = {k: v for k, v in extra.items() if k not in data}
            data.update(extra)
        return data


# orjson escapes C0 controls but writes DEL, C1 controls (NEL among them) and the Unicode line
# and paragraph separators as they are: line splitters other than journald's split on some, and
# terminals act on others. Escaped here, as JSON escapes (only strings can hold them).
_JSON_RAW = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")


def _json_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(match.group().decode())


class JsonFormatter(_Formatter):
    """`{"ts", "level", "logger", "msg", "request_id"?, ...fields, "exc"?}` on one line, always:
    a traceback, or client text with line breaks in it, is escaped inside its string."""

    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        try:
            line = orjson.dumps(data, default=str)
        except TypeError:
            # Not valid UTF-8 (a lone surrogate, e.g. from a file name): ASCII escapes instead,
            # rather than logging's own multi-line "--- Logging error ---".
            line = orjson.dumps({k: v if _plain(v) else ascii(v) for k, v in data.items()})
        if b"\x7f" in line or b"\xc2" in line or b"\xe2\x80" in line:
            line = _JSON_RAW.sub(_json_escape, line)
        return line.decode()


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float)


# What a text line shows escaped: C0 controls (line breaks, tabs, terminal escapes), DEL, C1
# controls (NEL), the Unicode line and paragraph separators, and the backslash (so an escape in
# the line always means an escaped character).
_TEXT_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\\]")
_TEXT_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
# A value with these (or empty) is quoted, so `key=value` pairs cannot be forged by a value.
_TEXT_QUOTE = re.compile(r'[\s="]')
_TEXT_KEY = re.compile(r"[^A-Za-z0-9_.:-]")


def _text_escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _TEXT_NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def text_escape(text: str) -> str:
    """`text` with nothing in it that can end a line or act on a terminal."""
    return _TEXT_UNSAFE.sub(_text_escape_one, text) if _TEXT_UNSAFE.search(text) else text


def text_value(value: object) -> str:
    """A value of a `key=value` pair: escaped, and quoted if it holds a space, `=` or `"`."""
    text = text_escape(str(value))
    if not text or _TEXT_QUOTE.search(text):
        return '"' + text.replace('"', '\\"') + '"'
    return text


class TextFormatter(_Formatter):
    """`ts LEVEL logger: msg key=value ...` for a person at a terminal, one line per record.

    Whatever a client can put in a message or a field (a model name, header text in an
    exception) is escaped: a line break shows as `\\n`, a terminal escape as `\\x1b`. A value
    with a space, `=` or `"` is quoted, and so is a message with `=` or `"`: neither can pass
    for a pair. A traceback follows its record as continuation lines, each beginning `  | `:
    never a line that could be taken for a record of its own.
    """

    def format(self, record: logging.LogRecord) -> str:
        data = self.fields(record)
        head = f"{data.pop('ts')} {data.pop('level').upper():7} {data.pop('logger')}: "
        msg = text_escape(str(data.pop("msg")))
        if "=" in msg or '"' in msg:
            msg = '"' + msg.replace('"', '\\"') + '"'
        line: str = head + msg
        pairs = " ".join(
            f"{_TEXT_KEY.sub('_', str(k))}={text_value(v)}"
            for k, v in data.items()
            if v is not None
        )
        if pairs:
            line += " " + pairs
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join("\n  | " + text_escape(part) for part in trace.splitlines())
        return line


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lines to stderr (fd 2); records marked `batched` are written together at `flush()`.

    sys.stderr is line-buffered: one write(2) per line, which costs more than formatting the
    line when thousands of requests end per second. Request lines are logged in batches and
    flushed once per batch; every other record is written at once, as usual.
    """

    def __init__(self, fd: int = 2) -> None:
        stream = open(fd, "w", buffering=1 << 16, encoding="utf-8", closefd=False)  # noqa: SIM115
        super().__init__(stream)

    def emit(self, record: logging.LogRecord) -> None:
        if not getattr(record, "batched", False):
            super().emit(record)
            return
        try:
            self.stream.write(self.format(record) + self.terminator)
        except Exception:
            self.handleError(record)


def flush_handlers(logger: logging.Logger) -> None:
    """Flush every handler a record of `logger` reaches (the end of a batch)."""
    current: logging.Logger | None = logger
    while current is not None:
        for handler in current.handlers:
            handler.flush()
        current = current.parent if current.propagate else None


# What LogRecord.__init__ computes that never changes in this process (module, thread and
# process names): copied into per-request records instead of being recomputed each time.
_TEMPLATE = dict(vars(logging.LogRecord("vgate.request", logging.INFO, __file__, 0, "", (), None)))
_EPOCH = _TEMPLATE["created"] - _TEMPLATE["relativeCreated"] / 1000


def request_record(
    logger: str, msg: str, request_id: str, created: float, fields: dict[str, Any]
) -> logging.LogRecord:
    """An info record made at `created` (time.time()) for `Logger.handle`, without
    `Logger.info`'s stack walk and lookups: thousands of these are logged per second."""
    record = logging.LogRecord.__new__(logging.LogRecord)
    data = vars(record)
    data.update(_TEMPLATE)
    now = created
    data["name"] = logger
    data["msg"] = msg
    data["created"] = now
    data["msecs"] = (now - int(now)) * 1000
    data["relativeCreated"] = (now - _EPOCH) * 1000
    data["request_id"] = request_id
    data["batched"] = True  # written at the end of its batch (StderrHandler)
    data["fields"] = fields
    return record


def dict_config(config: LoggingConfig, worker: int | None = None) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config` (it applies it at startup);
    `worker`: every line says which worker process of the box it comes from."""
    level = config.level.upper()
    formatter = JsonFormatter if config.format == "json" else TextFormatter
    return {
        "version": 1,
        # Loggers created at import time (engine monitors) must keep working.
        "disable_existing_loggers": False,
        "formatters": {"vgate": {"()": formatter, "worker": worker}},
        "handlers": {"stderr": {"()": StderrHandler, "formatter": "vgate"}},
        "loggers": {
            name: {"handlers": ["stderr"], "level": level, "propagate": False} for name in LOGGERS
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
