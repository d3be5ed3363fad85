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

from ._proto.envoy.config.core.v3 import base_pb2
from ._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from .check import Checker, TracedChecker
from .request import SPECIAL_NAMES, BadRequest, HttpRequest, checked_method, path_and_segments, special_names
from .response import Answer
from .tracing import GRPC_CHECK

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
# The largest CheckRequest accepted. Envoy caps a request's headers at max_request_headers_kb
# (60 KiB by default) and sends no body unless with_request_body is set, so a real CheckRequest
# stays far below this; a larger one is refused by gRPC before it is parsed (RESOURCE_EXHAUSTED,
# which Envoy turns into its status_on_error 503) instead of costing ~65 us of CPU per KiB.
DEFAULT_MAX_REQUEST_BYTES = 128 * 1024
_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_RENDERED = "grpc"


def parse_check_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    """Extract and validate the HTTP attributes; BadRequest when anything is missing or unsafe."""
    http = check.attributes.request.http  # absent messages read as empty: diagnosed on failure
    try:
        method = checked_method(http.method)
    except BadRequest:
        if not check.HasField("attributes") or not check.attributes.HasField("request"):
            raise BadRequest("no request attributes") from None
        if not check.attributes.request.HasField("http"):
            raise BadRequest("no HTTP attributes") from None
        raise
    path, segments = path_and_segments(http.path)
    if http.HasField("header_map") and http.header_map.headers:
        authorization, request_id, spoofed = _raw_headers(http.header_map.headers)
    else:
        # Look up the two headers we read; scan names only when one of the spellings we refuse or
        # strip is present (one C-level set operation in the common case).
        headers = http.headers
        value = headers.get("authorization")
        authorization = (value,) if value is not None else ()
        request_id = headers.get("x-request-id", "")[:128]
        spoofed = () if SPECIAL_NAMES.isdisjoint(headers) else special_names(headers)
    return HttpRequest(method, path, segments, authorization, request_id, spoofed)


def _raw_headers(entries: Any) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    authorization: list[str] = []
    names: list[str] = []
    request_id = ""
    for entry in entries:
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
            request_id = value[:128]
    return tuple(authorization), request_id, special_names(names)


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
            return await self._traced(GRPC_CHECK, metadata, parse_check_request, request, check_response)
        return await self._traced(GRPC_CHECK, _client_headers(request, self._fields), parse_check_request, request,
                                  check_response, from_client=True)


def authorization_servicer(checker: Checker) -> AuthorizationServicer:
    """The servicer for ``checker``: traced only when tracing is on."""
    return TracedAuthorizationServicer(checker) if isinstance(checker, TracedChecker) else AuthorizationServicer(checker)


def _client_headers(request: external_auth_pb2.CheckRequest, fields: frozenset[str]) -> Any:
    """The original request's headers, for their trace context (either encoding Envoy uses; of
    ``header_map``, only the ``fields`` the propagators read)."""
    http = request.attributes.request.http
    if http.headers or not http.header_map.headers:
        return http.headers
    return {name: entry.raw_value.decode("utf-8", "replace") if entry.raw_value else entry.value
            for entry in http.header_map.headers if (name := entry.key.lower()) in fields}
