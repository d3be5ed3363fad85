"""The HTTP front door: Envoy's ext_authz filter in HTTP mode (``http_service``).

Envoy sends the original request's method and path (behind ``path_prefix``) with the headers its
``allowed_headers`` lets through, and reads our answer: 200 allows (the ``x-auth-*`` headers are
copied upstream through ``allowed_upstream_headers``), anything else is the denial the client gets.
The request goes through the same ``check.Checker`` as gRPC's Check, so both modes decide alike.

The known trap of HTTP mode: Envoy forwards only the headers it is told to, so we may never see a
spoofed ``x_auth_client_id`` the client sent. Every answer therefore carries
``x-envoy-auth-headers-to-remove`` with every '-'/'_'/'.' spelling of the identity and override headers
(minus the ones the answer sets), and Envoy strips them all from the upstream request.

Tracing (on only when configured, see tracing.py): Envoy sends the trace context of its ext_authz
span in the authorization request's headers when it traces, else the client's own when
``allowed_headers`` lets them through (envoy/envoy-http.yaml does).

Served with aiohttp's low-level server (no router, no middleware): chosen by measurement over
uvicorn with httptools (docs/performance.md), and already a dependency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, BadHttpMethod
from aiohttp.web_protocol import RequestHandler

from . import ports
from .admin import listen
from .check import Checker, TracedChecker
from .decision import Decision
from .request import (
    INVALID_METHOD,
    SPECIAL_NAMES,
    BadRequest,
    HttpRequest,
    checked_method,
    identity_and_override_spellings,
    path_and_segments,
    special_names,
)
from .response import Answer
from .tracing import HTTP_CHECK

log = logging.getLogger(__name__)
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
_SPELLINGS = identity_and_override_spellings()
_RENDERED = "http"


class HttpFrontDoor:
    """Envoy's HTTP authorization requests on their own port (never the health/metrics port)."""

    def __init__(self, checker: Checker, path_prefix: str = "", max_request_bytes: int = 128 * 1024) -> None:
        self._checker = checker
        self._check = checker.check
        self._prefix = path_prefix
        self._max_request_bytes = max_request_bytes
        self._runner: web.ServerRunner | None = None

    def parse(self, request: web.BaseRequest) -> HttpRequest:
        """The original request as Envoy forwarded it; BadRequest when it cannot be decided on."""
        method = checked_method(request.method)
        target = request.raw_path  # as sent: path and query, not decoded
        if self._prefix:
            if not target.startswith(self._prefix) or target[len(self._prefix):len(self._prefix) + 1] != "/":
                raise BadRequest("authorization request without the configured path prefix")
            target = target[len(self._prefix):]
        path, segments = path_and_segments(target)
        headers = request.headers
        authorization = tuple(headers.getall("authorization", ()))
        request_id = headers.get("x-request-id", "")[:128]
        spoofed = () if SPECIAL_NAMES.isdisjoint(map(str.lower, headers)) else special_names(map(str.lower, headers))
        return HttpRequest(method, path, segments, authorization, request_id, spoofed)

    @staticmethod
    def render(answer: Answer, decision: Decision | None = None) -> web.Response:
        """The HTTP response for an answer (its parts built once per distinct answer)."""
        parts = answer.rendered.get(_RENDERED)
        if parts is None:
            parts = answer.rendered[_RENDERED] = _parts(answer)
        status, headers, body = parts
        return web.Response(status=status, headers=headers, body=body)

    def handle(self, request: web.BaseRequest) -> Awaitable[web.Response]:
        """The Check's coroutine itself (no wrapping coroutine: one frame less per request)."""
        return self._check(self.parse, request, self.render)

    async def handle_traced(self, request: web.BaseRequest) -> web.Response:
        """``handle`` with a span continuing the trace in the request's headers (tracing on)."""
        assert isinstance(self._checker, TracedChecker)
        return await self._checker.check_traced(HTTP_CHECK, request.headers, self.parse, request, self.render)

    def refusal(self, exc: BaseException | None) -> web.Response | None:
        """Our JSON 400 for a request aiohttp's parser refused, or None for any other error.

        llhttp refuses a method that is not an upper-case token (``get``, which Envoy forwards from
        HTTP/2) before ``handle`` runs; it must still get the 400 gRPC mode gives, and be counted.
        """
        if not isinstance(exc, BadHttpMessage):
            return None
        description = INVALID_METHOD if isinstance(exc, BadHttpMethod) else "malformed HTTP request"
        return self._checker.refuse(description, self.render)

    async def start(self, host: str, port: int, *, reuse_port: bool = False, shutdown_grace: float = 10.0) -> int:
        """Bind and serve; the bound port. OSError naming the address when it cannot be bound."""
        handler = self.handle_traced if isinstance(self._checker, TracedChecker) else self.handle
        server = _Server(self, handler, access_log=None, max_line_size=self._max_request_bytes,
                         max_field_size=self._max_request_bytes)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=shutdown_grace)
        bound = await listen(runner, host, port, ports.EXT_AUTHZ_HTTP, reuse_port)
        self._runner = runner
        return bound

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), then close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class _Server(web.Server):
    """aiohttp's low-level server whose connections answer parse errors with our denial."""

    def __init__(self, door: HttpFrontDoor, handler: Any, **kwargs: object) -> None:
        super().__init__(handler, **kwargs)
        self._door = door
        self._handler_args = kwargs

    def __call__(self) -> RequestHandler:
        door = self._door

        class Handler(RequestHandler):
            def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                             message: str | None = None) -> web.StreamResponse:
                refusal = door.refusal(exc) if status == 400 else None
                return refusal if refusal is not None else super().handle_error(request, status, exc, message)

        return Handler(self, loop=asyncio.get_running_loop(), **self._handler_args)


def _parts(answer: Answer) -> tuple[int, dict[str, str], bytes | None]:
    headers = dict(answer.headers)
    if answer.allowed:
        # Strip every spelling we did not set: Envoy may not have forwarded the client's copies to
        # us (allowed_headers), so only this tells it to remove them.
        headers[REMOVE_HEADER] = ",".join(n for n in _SPELLINGS if n not in headers)
        return 200, headers, None
    headers[REMOVE_HEADER] = ",".join(_SPELLINGS)
    return answer.status, headers, answer.body.encode()

