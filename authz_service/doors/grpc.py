"""The gRPC front door: Envoy's ext_authz v3 ``Authorization/Check``.

CheckRequest -> ``request.HttpRequest`` (``parse_check_request``), the shared ``check.Checker``,
then Answer -> CheckResponse (``check_response``, built once per distinct answer).

Tracing (on only when configured, see tracing.py): Envoy puts the trace context of its ext_authz
span in the gRPC request's metadata, which a Check continues; the CheckRequest's headers carry the
client's own, which a Check only links to (from_client) when Envoy does not trace.

Headers: Envoy sends the ``headers`` map (keys lower-cased, as the ext_authz API guarantees;
repeated headers comma-joined) or, with ``encode_raw_headers``, ``header_map`` (one entry per
line, bytes values).
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .. import ports
from .._proto.envoy.config.core.v3 import base_pb2
from .._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from ..check import Checker, TracedChecker
from ..request import BadRequest, HeaderFacts, HttpRequest, http_request
from ..response import Answer
from ..tracing import CheckSpanKind
from .base import DoorKind, Wiring

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
SPAN_KIND = CheckSpanKind(
    f"{SERVICE_NAME}/Check",
    {"rpc.system": "grpc", "rpc.service": SERVICE_NAME, "rpc.method": "Check"},
    http_server=False,
)
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_RENDERED = "grpc"


def parse_check_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    """Extract and validate the HTTP attributes; BadRequest when anything is missing or unsafe."""
    http = check.attributes.request.http  # absent messages read as empty: diagnosed on failure
    try:
        return http_request(http, http.method, _path, _raw_headers if http.header_map.headers else _headers)
    except BadRequest:
        # Absent attributes leave the method empty, so the method's refusal is the one raised: say why.
        if not check.HasField("attributes") or not check.attributes.HasField("request"):
            raise BadRequest("no request attributes") from None
        if not check.attributes.request.HasField("http"):
            raise BadRequest("no HTTP attributes") from None
        raise


def _path(http: Any) -> str:
    return http.path


def _headers(http: Any) -> HeaderFacts:
    """The ``headers`` map: keys lower-case, repeated headers comma-joined (two lookups, no scan)."""
    headers = http.headers
    value = headers.get("authorization")
    return (value,) if value is not None else (), headers.get("x-request-id", ""), headers


def _raw_headers(http: Any) -> HeaderFacts:
    """``header_map`` (``encode_raw_headers``): one entry per header line, the value as bytes."""
    authorization: list[str] = []
    names: list[str] = []
    request_id = ""
    for entry in http.header_map.headers:
        raw = entry.raw_value if entry.raw_value else entry.value.encode()
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"header {entry.key[:64]!r} is not UTF-8") from None
        name = entry.key.lower()
        names.append(name)
        if name == "authorization":
            authorization.append(value)
        elif name == "x-request-id":
            request_id = value
    return tuple(authorization), request_id, names


def check_response(answer: Answer, decision: object = None) -> external_auth_pb2.CheckResponse:
    """The CheckResponse for an answer, built on first use and kept on the (cached) answer."""
    response = answer.rendered.get(_RENDERED)
    if response is None:
        response = answer.rendered[_RENDERED] = _build(answer)
    return response


def _build(answer: Answer) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    response.status.code = answer.grpc_code
    if answer.allowed:
        ok = response.ok_response
        for name, value in answer.headers:
            _add(ok.headers, name, value)
        ok.headers_to_remove.extend(answer.remove)
    else:
        response.status.message = answer.reason.value
        denied = response.denied_response
        denied.status.code = answer.status  # type: ignore[assignment]  # proto3 enums are open
        for name, value in answer.headers:
            _add(denied.headers, name, value)
        denied.body = answer.body
    response.SerializeToString()  # fail here, inside Checker.check, if a value cannot be encoded
    return response


def _add(headers: Any, name: str, value: str) -> None:
    option = headers.add(append_action=_OVERWRITE)
    option.header.key = name
    option.header.value = value


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):
    """Envoy's Authorization/Check. Never raises: every failure becomes a deny (see check.Checker)."""

    def __init__(self, checker: Checker) -> None:
        self._check = checker.check

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        return await self._check(parse_check_request, request, check_response)


class TracedAuthorizationServicer(AuthorizationServicer):
    """Check with a span continuing Envoy's trace (tracing on)."""

    def __init__(self, checker: TracedChecker) -> None:
        super().__init__(checker)
        self._traced = checker.check_traced
        self._fields = checker.tracing.propagation_fields

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: Any
    ) -> external_auth_pb2.CheckResponse:
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        if not self._fields.isdisjoint(metadata):
            return await self._traced(SPAN_KIND, metadata, parse_check_request, request, check_response)
        return await self._traced(
            SPAN_KIND,
            _client_headers(request, self._fields),
            parse_check_request,
            request,
            check_response,
            from_client=True,
        )


def authorization_servicer(checker: Checker) -> AuthorizationServicer:
    """The servicer for ``checker``: traced only when tracing is on."""
    return (
        TracedAuthorizationServicer(checker) if isinstance(checker, TracedChecker) else AuthorizationServicer(checker)
    )


def _client_headers(request: external_auth_pb2.CheckRequest, fields: frozenset[str]) -> Any:
    """The original request's headers, for their trace context (either encoding Envoy uses; of
    ``header_map``, only the ``fields`` the propagators read)."""
    http = request.attributes.request.http
    if http.headers or not http.header_map.headers:
        return http.headers
    return {
        name: entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
        for entry in http.header_map.headers
        if (name := entry.key.lower()) in fields
    }


class GrpcDoor:
    """The gRPC server: Authorization/Check and grpc.health.v1 (whose status follows readiness)."""

    span_kind = SPAN_KIND

    def __init__(self, checker: Checker, max_request_bytes: int, shutdown_grace: float) -> None:
        self._checker = checker
        self._max_request_bytes = max_request_bytes
        self._grace = shutdown_grace
        self._health = health.aio.HealthServicer()
        self._server: grpc.aio.Server | None = None

    @classmethod
    def build(cls, wiring: Wiring) -> GrpcDoor:
        return cls(wiring.checker, wiring.settings.max_request_bytes, wiring.settings.shutdown_grace)

    @property
    def refused(self) -> int:
        return 0  # nothing of Envoy's gRPC configuration can mismatch ours

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        # One process: SO_REUSEPORT off, so a port already in use is an error, not a silent share.
        # Workers share the port the parent reserved (ports.Listener.reserve keeps that guarantee).
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.max_receive_message_length", self._max_request_bytes),
            ]
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(authorization_servicer(self._checker), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            if not reuse_port:  # a port in use fails here, with its errno, before grpcio logs it on stderr
                ports.GRPC.reserve(host, port, share=False).close()
            try:
                bound = server.add_insecure_port(f"{_bracketed(host)}:{port}")
            except RuntimeError:  # grpcio raises (it no longer returns 0) when the address cannot be bound
                bound = 0
            if bound == 0:
                raise ports.GRPC.error(host, port)
            await server.start()
        except BaseException:
            await server.stop(None)
            raise
        self._server = server
        return bound

    async def set_ready(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(self._grace)
            self._server = None


def _bracketed(host: str) -> str:
    """An IPv6 address in brackets, as gRPC's address syntax needs it."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


GRPC = DoorKind("grpc", ports.GRPC, "grpc_port", GrpcDoor.build)
