"""logs.configure's one JSON stream: what it lets through of the libraries' own records."""

from __future__ import annotations

import json
import logging

import pytest
from aiohttp.http_exceptions import BadHttpMessage

from authz_service import logs

SECRET = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.SIGNATURE-SECRET"


def server_error(exc: BaseException) -> None:
    """What aiohttp's RequestHandler.log_exception writes for a request it could not handle."""
    logging.getLogger(logs.AIOHTTP_SERVER_LOGGER).error("Error handling request from %s", "10.0.0.7", exc_info=exc)


def written(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], level: str,
            exc: BaseException) -> list[dict]:
    root = logging.getLogger()
    server = logging.getLogger(logs.AIOHTTP_SERVER_LOGGER)
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(server, "filters", list(server.filters))
    monkeypatch.setattr(logs, "_output", None)
    monkeypatch.setattr(root, "level", root.level)
    logs.configure(level)
    server_error(exc)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def refused_line() -> BadHttpMessage:
    # As aiohttp's parser words it: the refused header line, quoted whole.
    return BadHttpMessage(f"Invalid header value char:\n\n  b'Authorization: Bearer {SECRET}\\x01'\n  ^")


def test_a_refused_request_is_one_debug_line_without_the_line_it_refused(monkeypatch, capsys) -> None:
    (entry,) = written(monkeypatch, capsys, "DEBUG", refused_line())
    assert (entry["level"], entry["logger"], entry["msg"], entry["error"]) == (
        "debug", logs.AIOHTTP_SERVER_LOGGER, logs.REFUSED_REQUEST, "BadHttpMessage")
    assert "exception" not in entry and "SIGNATURE-SECRET" not in json.dumps(entry)


def test_a_refused_request_writes_nothing_above_debug(monkeypatch, capsys) -> None:
    assert written(monkeypatch, capsys, "INFO", refused_line()) == []


def test_any_other_server_error_keeps_its_exception(monkeypatch, capsys) -> None:
    (entry,) = written(monkeypatch, capsys, "INFO", RuntimeError("handler bug"))
    assert entry["level"] == "error" and "RuntimeError: handler bug" in entry["exception"]
