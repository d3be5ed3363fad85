"""The HTTP front door: Envoy's ext_authz filter in HTTP mode (``http_service``).

Envoy sends the original request's method and path (behind ``path_prefix``) with the headers its
``allowed_headers`` lets through, and reads our answer: 200 allows (the ``x-auth-*`` headers are
copied upstream through ``allowed_upstream_headers``), anything else is the denial the client gets.
The request goes through the same ``check.Checker`` as gRPC's Check, so both modes decide alike.

Which path is asked about: Envoy's authorization request path is its ``path_prefix`` followed by
the original request's path, and a prefix that differs from ours (``--ext-authz-http-path-prefix``)
would have us decide on another path than the one the app serves (``/ext-authz/admin/x``, which a
public catch-all takes, instead of ``/admin/x``). The path alone cannot tell a prefix from the
client's own first segments, so Envoy also sends the original path on its own, in
``x-authz-original-path`` (``headers_to_add`` with ``%REQ(:PATH)%``: Envoy's value, overwriting any
client copy). A request is decided only when its path is exactly our prefix followed by that
header, on that header; any other request is refused (400), counted
(``authz_ext_authz_http_config_mismatches_total``) and logged (rate-limited, with the prefix Envoy
actually sends). So no prefix Envoy sends or omits can move the decision to another path.

The known trap of HTTP mode: Envoy forwards only the headers it is told to, so we may never see a
spoofed ``x_auth_client_id`` the client sent. Every answer therefore carries
``x-envoy-auth-headers-to-remove`` with every '-'/'_'/'.' spelling of the identity and override headers
(minus the ones the answer sets), and Envoy strips them all from the upstream request. Spellings
with other separators (``x~auth~sub``) run into thousands: an allow names those it was sent, which
Envoy forwards when its ``allowed_headers`` take their shape (docs/deploy.md) and no early header
mutation removed them first.

Tracing (on only when configured, see tracing.py): when Envoy traces, it sends the trace context
of its ext_authz span in the authorization request's headers, and a Check continues it. The
client's own trace headers are not forwarded (envoy/envoy-http.yaml's ``allowed_headers`` leaves
them out), so every trace context this door sees is Envoy's, and no client decides sampling.

Served with aiohttp's low-level server (no router, no middleware): chosen by measurement over
uvicorn with httptools (docs/performance.md), and already a dependency.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod, HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from .. import ports
from ..admin import QuietRefusals, listen
from ..check import Checker, TracedChecker
from ..config import Settings
from ..decision import Decision
from ..logs import Throttle
from ..request import (
    INVALID_METHOD,
    BadRequest,
    HeaderFacts,
    HttpRequest,
    http_request,
    identity_and_override_spellings,
)
from ..response import Answer
from ..tracing import CheckSpanKind
from .base import DoorKind, Wiring

log = logging.getLogger("authz_service.ext_authz_http")  # the name it always had: log queries keep working
REMOVE_HEADER = "x-envoy-auth-headers-to-remove"
# The original request's path (and query), as Envoy's http_service must send it on every
# authorization request: authorization_request.headers_to_add {key: ORIGINAL_PATH, value: ENVOY_VALUE}.
ORIGINAL_PATH = "x-authz-original-path"
ENVOY_VALUE = "%REQ(:PATH)%"
_SPELLINGS = identity_and_override_spellings()
_LISTED = frozenset(_SPELLINGS)
_RENDERED = "http"
MISMATCH = "ext_authz misconfigured: Envoy's http_service does not send the original path as this service expects"
_SHOWN_PREFIX = 64  # characters of the prefix Envoy sends that a log line shows at most
SPAN_KIND = CheckSpanKind("HTTP", {}, http_server=True)  # renamed "{method} {http.route}" once known


class Mismatch(enum.Enum):
    """Why an authorization request was refused as not matching this service (metric label values)."""

    ORIGINAL_PATH_MISSING = "original_path_missing"  # Envoy does not send x-authz-original-path
    PATH_PREFIX_MISMATCH = "path_prefix_mismatch"  # Envoy's path_prefix is not ours
    ORIGINAL_PATH_MISMATCH = "original_path_mismatch"  # the header does not end the path: not Envoy's own


_FIXES = {
    Mismatch.ORIGINAL_PATH_MISSING: f"add to Envoy's http_service: authorization_request: headers_to_add: "
    f"[{{key: {ORIGINAL_PATH}, value: '{ENVOY_VALUE}'}}] (docs/deploy.md)",
    Mismatch.PATH_PREFIX_MISMATCH: "make Envoy's http_service.path_prefix and --ext-authz-http-path-prefix "
    "equal (docs/deploy.md)",
    Mismatch.ORIGINAL_PATH_MISMATCH: f"{ORIGINAL_PATH} must be set by Envoy (headers_to_add, '{ENVOY_VALUE}'), "
    "never forwarded from the client (docs/deploy.md)",
}


class HttpFrontDoor:
    """Envoy's HTTP authorization requests on their own port (never the health/metrics port).

    ``on_mismatch`` is told of every request refused as not matching this service (a ``Mismatch``),
    for the metrics; ``mismatches`` counts them for /readyz."""

    span_kind = SPAN_KIND

    def __init__(
        self,
        checker: Checker,
        path_prefix: str = "",
        max_request_bytes: int = 128 * 1024,
        on_mismatch: Callable[[Mismatch], None] | None = None,
        shutdown_grace: float = 10.0,
    ) -> None:
        self._checker = checker
        self._check = checker.check
        self._prefix = path_prefix
        self._max_request_bytes = max_request_bytes
        self._on_mismatch = on_mismatch
        self._grace = shutdown_grace
        self._throttle = Throttle()
        self.mismatches = 0
        self._runner: web.ServerRunner | None = None

    @classmethod
    def build(cls, wiring: Wiring) -> HttpFrontDoor:
        """The door as the service wires it: its mismatches counted in the metrics (and, in a
        --workers worker, for the parent's /readyz)."""
        metrics, on_refused = wiring.metrics, wiring.on_refused
        metrics.http_door_enabled(m.value for m in Mismatch)

        def on_mismatch(problem: Mismatch) -> None:
            metrics.http_config_mismatches.labels(problem.value).inc()
            if on_refused is not None:
                on_refused()

        settings = wiring.settings
        return cls(
            wiring.checker,
            settings.ext_authz_http_path_prefix,
            settings.max_request_bytes,
            on_mismatch,
            settings.shutdown_grace,
        )

    @property
    def refused(self) -> int:
        return self.mismatches

    def parse(self, request: web.BaseRequest) -> HttpRequest:
        """The original request as Envoy forwarded it; BadRequest when it cannot be decided on."""
        return http_request(request, request.method, self._original_path, _headers, fold_names=True)

    def _original_path(self, request: web.BaseRequest) -> str:
        """The path to decide on: x-authz-original-path, when the request's own is exactly our
        prefix followed by it (see the module doc); else the request is refused as a mismatch."""
        target = request.raw_path  # as sent: the prefix, then the path and query, not decoded
        original = request.headers.get(ORIGINAL_PATH)
        if (
            original is None
            or len(target) != len(self._prefix) + len(original)
            or not target.endswith(original)
            or not target.startswith(self._prefix)
        ):
            raise self._mismatch(target, original)
        return original

    def _mismatch(self, target: str, original: str | None) -> BadRequest:
        """Count and log (rate-limited) a request that does not match this service: the refusal."""
        if original is None:
            problem, envoy_prefix = Mismatch.ORIGINAL_PATH_MISSING, None
        elif original and target.endswith(original):
            problem, envoy_prefix = Mismatch.PATH_PREFIX_MISMATCH, target[: len(target) - len(original)]
        else:
            problem, envoy_prefix = Mismatch.ORIGINAL_PATH_MISMATCH, None
        self.mismatches += 1
        if self._on_mismatch is not None:
            self._on_mismatch(problem)
        suppressed = self._throttle.admit(problem.value)
        if suppressed is not None:
            fields: dict[str, object] = {
                "problem": problem.value,
                "expected_path_prefix": self._prefix,
                "original_path_header": ORIGINAL_PATH,
                "fix": _FIXES[problem],
                "suppressed_since_last": suppressed,
            }
            if envoy_prefix is not None:  # Envoy's configuration text; bounded all the same
                fields["envoy_path_prefix"] = envoy_prefix[:_SHOWN_PREFIX]
            log.error(
                "HTTP ext_authz request refused: Envoy's http_service does not match this service; "
                "every such request is refused (400) until it does",
                extra=fields,
            )
        return BadRequest(MISMATCH)

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
        return await self._checker.check_traced(self.span_kind, request.headers, self.parse, request, self.render)

    def refusal(self, exc: HttpProcessingError) -> web.Response:
        """Our JSON 400 for a request aiohttp's parser refused.

        llhttp refuses a method that is not an upper-case token (``get``, which Envoy forwards from
        HTTP/2) before ``handle`` runs; it must still get the 400 gRPC mode gives, and be counted.
        """
        description = INVALID_METHOD if isinstance(exc, BadHttpMethod) else "malformed HTTP request"
        return self._checker.refuse(description, self.render)

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Bind and serve; the bound port. OSError naming the address when it cannot be bound."""
        handler = self.handle_traced if isinstance(self._checker, TracedChecker) else self.handle
        server = _Server(self, handler, self._max_request_bytes)
        runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=self._grace)
        bound = await listen(runner, host, port, ports.EXT_AUTHZ_HTTP, reuse_port)
        self._runner = runner
        return bound

    async def set_ready(self, ready: bool) -> None:
        pass  # Envoy's HTTP ext_authz has no health protocol: readiness is the admin port's /readyz

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (up to the grace period), then close."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _headers(request: web.BaseRequest) -> HeaderFacts:
    headers = request.headers
    return tuple(headers.getall("authorization", ())), headers.get("x-request-id", ""), headers


def door_status(settings: Settings, mismatches: int) -> dict[str, object]:
    """/readyz's view of the HTTP front door: what Envoy must send, and how many requests did not.

    Not a readiness condition: whoever can reach the door could otherwise take the service out of
    rotation. The metric and its alert (AuthzHttpConfigMismatch) are what an operator watches."""
    return {
        "path_prefix": settings.ext_authz_http_path_prefix,
        "original_path_header": ORIGINAL_PATH,
        "config_mismatches": mismatches,
    }


class _Server(web.Server):
    """aiohttp's low-level server whose connections answer parse errors with our denial."""

    def __init__(self, door: HttpFrontDoor, handler: Any, max_request_bytes: int) -> None:
        # No access log; a request head (line or field) over max_request_bytes is a parse error.
        self._handler_args: dict[str, Any] = {
            "access_log": None,
            "max_line_size": max_request_bytes,
            "max_field_size": max_request_bytes,
        }
        super().__init__(handler, **self._handler_args)
        self._door = door

    def __call__(self) -> RequestHandler:
        door = self._door

        class Handler(QuietRefusals):
            def refused(self, exc: HttpProcessingError) -> web.StreamResponse:
                return door.refusal(exc)

        return Handler(self, loop=asyncio.get_running_loop(), **self._handler_args)


def _parts(answer: Answer) -> tuple[int, dict[str, str], bytes | None]:
    headers = dict(answer.headers)
    if answer.allowed:
        # Strip every spelling we did not set: Envoy may not have forwarded the client's copies to
        # us (allowed_headers), so only this tells it to remove them. Then what the answer removes
        # beyond them: the token, unless the route forwards it, and the spellings with other
        # separators (x~auth~sub) the client sent, which Envoy forwards to us where no early header
        # mutation removed them (docs/deploy.md): too many to list, so named when seen.
        removed = [n for n in _SPELLINGS if n not in headers]
        removed.extend(n for n in answer.remove if n not in _LISTED)
        headers[REMOVE_HEADER] = ",".join(removed)
        return 200, headers, None
    headers[REMOVE_HEADER] = ",".join(_SPELLINGS)
    return answer.status, headers, answer.body.encode()


EXT_AUTHZ_HTTP = DoorKind(
    "ext_authz_http",
    ports.EXT_AUTHZ_HTTP,
    "ext_authz_http_port",
    HttpFrontDoor.build,
    optional=True,
    status=door_status,
)
