"""Structured logs: one JSON object per line on stderr (journald keeps it), or readable text.

Every record logged while a request is being handled carries its `request_id`: the endpoint puts
the id in a context variable (each ASGI request runs in its own task, so ids never leak between
requests) and the formatter reads it. Fields go in `extra={"fields": {...}}`.

What is logged about a request is chosen by `proxy.observe`: names and numbers, never an API key,
its hash, or prompt or completion text.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

import orjson

from proxy.config import LoggingConfig

REQUEST_ID: ContextVar[str | None] = ContextVar("vgate_request_id", default=None)
# Loggers routed through our handler: our own and uvicorn's (startup, errors).
LOGGERS = ("vgate", "uvicorn", "engine", "proxy", "policies")


def _timestamp(created: float) -> str:
    ms = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{ms:03d}Z"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    data: dict[str, Any] = {
        "ts": _timestamp(record.created),
        "level": record.levelname.lower(),
        "logger": record.name,
        "msg": record.getMessage(),
    }
    rid = REQUEST_ID.get()
    if rid is not None:
        data["request_id"] = rid
    extra = getattr(record, "fields", None)
    if isinstance(extra, dict):
        for name, value in extra.items():
            data.setdefault(name, value)
    return data


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "request_id"?, ...fields, "exc"?}` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data = _fields(record)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(data, default=str).decode()


class TextFormatter(logging.Formatter):
    """`ts level logger msg key=value ...` for a person at a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        data = _fields(record)
        head = f"{data.pop('ts')} {data.pop('level').upper():7} {data.pop('logger')}: "
        line: str = head + str(data.pop("msg"))
        pairs = " ".join(f"{k}={v}" for k, v in data.items() if v is not None)
        if pairs:
            line += " " + pairs
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def dict_config(config: LoggingConfig) -> dict[str, Any]:
    """A `logging.config.dictConfig` for uvicorn's `log_config` (it applies it at startup)."""
    level = config.level.upper()
    formatter = JsonFormatter if config.format == "json" else TextFormatter
    return {
        "version": 1,
        # Loggers created at import time (engine monitors) must keep working.
        "disable_existing_loggers": False,
        "formatters": {"vgate": {"()": formatter}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "vgate",
                "stream": "ext://sys.stderr",
            }
        },
        "loggers": {
            name: {"handlers": ["stderr"], "level": level, "propagate": False} for name in LOGGERS
        },
    }
