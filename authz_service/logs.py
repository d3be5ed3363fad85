"""Structured JSON log lines on stdout, one object per line (what log collectors in Kubernetes expect).

Fields come from ``extra={...}``; callers never pass tokens, signatures or secrets.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping

from aiohttp.http_exceptions import HttpProcessingError

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_ENCODE = json.JSONEncoder(default=str, separators=(",", ":")).encode
_output: logging.StreamHandler | None = None  # configure()'s handler: the one log stream
# aiohttp's servers (the admin port, the HTTP front door, the dev issuer) log through this logger.
AIOHTTP_SERVER_LOGGER = "aiohttp.server"
REFUSED_REQUEST = "malformed HTTP request refused"


def timestamp(created: float) -> str:
    """Every line's ``ts``: UTC, ISO 8601, milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created * 1000) % 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return _ENCODE(entry)


def configure(level: str) -> None:
    """Route every logger to one JSON stream on stdout."""
    global _output
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    server = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    if not any(isinstance(f, RefusedRequestFilter) for f in server.filters):
        server.addFilter(RefusedRequestFilter())
    _output = handler


class RefusedRequestFilter(logging.Filter):
    """aiohttp logs a request its HTTP parser refused at ERROR, its exception quoting the refused
    header line as sent: an ``Authorization`` or ``Cookie`` line with one stray byte put a whole
    credential in the log, once per request a client sends. Such a record becomes a DEBUG line
    naming the error's type only (dropped unless the logger is at DEBUG); the client has its 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        refused = record.exc_info[1] if record.exc_info else None
        if not isinstance(refused, HttpProcessingError):
            return True
        record.msg, record.args = REFUSED_REQUEST, ()
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.error = type(refused).__name__
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def record(logger: str, msg: str, fields: Mapping[str, object]) -> None:
    """An INFO line of ``logger`` with ``fields``, as JsonFormatter writes one, whatever the log
    level: for records that are not diagnostics (the decision log, one line per Check at most).

    Written straight to the stream configure() set up, under its handler's lock and flushed as the
    handler does, so lines never interleave; the logging machinery (a LogRecord, the caller's frame,
    the formatter's walk over the record) cost twice the line itself (bench/micro_verify.py).
    Before configure() (tools, tests) it goes through ``logger`` like any record. A line that
    cannot be written is dropped, as logging drops it: writing a log never fails a Check."""
    handler = _output
    if handler is None:
        logging.getLogger(logger).info(msg, extra=dict(fields))
        return
    line = _ENCODE({"ts": timestamp(time.time()), "level": "info", "logger": logger, "msg": msg, **fields})
    handler.acquire()
    try:
        handler.stream.write(line + "\n")
        handler.stream.flush()
    except (OSError, ValueError):
        pass
    finally:
        handler.release()


class Throttle:
    """At most one log line per key every ``interval`` seconds, for a condition that can repeat on
    every request (a misconfiguration): the first occurrence is logged at once, the ones within the
    interval are only counted, and the next line that gets through says how many were left out."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def admit(self, key: str) -> int | None:
        """None: do not log this occurrence; else log it, with this many left out since the last line."""
        now = time.monotonic()
        if now < self._next.get(key, float("-inf")):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._next[key] = now + self.interval
        return self._suppressed.pop(key, 0)
