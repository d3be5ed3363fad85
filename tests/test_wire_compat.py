"""Wire compatibility of our ext_authz v3 subset with Envoy's full API.

The independent encoder/decoder is envoy-data-plane (betterproto2 classes generated from the full
Envoy API, no shared code with our protoc output):

* schema parity: every field we declare has Envoy's number, type, cardinality, oneof and message
  type; every enum value has Envoy's number;
* CheckRequest: encoded by envoy-data-plane (including fields we do not model), decoded by our
  stubs: every modelled value arrives exactly, and re-encoding our message keeps the unmodelled
  fields (protobuf preserves unknown fields) so envoy-data-plane reads back the same request;
* CheckResponse: built with our stubs (denied / OK / error), decoded by envoy-data-plane;
* gRPC method path: identical in both stubs;
* hypothesis properties for random HTTP attributes and response headers.
"""

from __future__ import annotations

import datetime as dt
import json

import betterproto2
import envoy_data_plane.envoy.config.core.v3 as e_core
import envoy_data_plane.envoy.service.auth.v3 as e_auth
import envoy_data_plane.envoy.type.v3 as e_type
import envoy_data_plane.google.protobuf as e_pb
import envoy_data_plane.google.rpc as e_rpc
import pytest
from envoy_data_plane.message_pool import default_message_pool
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service._proto.envoy.config.core.v3 import address_pb2, base_pb2
from authz_service._proto.envoy.service.auth.v3 import (
    attribute_context_pb2,
    external_auth_pb2,
    external_auth_pb2_grpc,
)
from authz_service._proto.envoy.type.v3 import http_status_pb2
from authz_service._proto.google.rpc import status_pb2

CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
E_APPEND_ACTION = e_core.HeaderValueOptionHeaderAppendAction

# ---------------------------------------------------------------------------------------------
# Schema parity: our descriptors vs envoy-data-plane's field metadata
# ---------------------------------------------------------------------------------------------

_BP_TYPE = {
    FieldDescriptor.TYPE_DOUBLE: betterproto2.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FLOAT: betterproto2.TYPE_FLOAT,
    FieldDescriptor.TYPE_INT64: betterproto2.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64: betterproto2.TYPE_UINT64,
    FieldDescriptor.TYPE_INT32: betterproto2.TYPE_INT32,
    FieldDescriptor.TYPE_FIXED64: betterproto2.TYPE_FIXED64,
    FieldDescriptor.TYPE_FIXED32: betterproto2.TYPE_FIXED32,
    FieldDescriptor.TYPE_BOOL: betterproto2.TYPE_BOOL,
    FieldDescriptor.TYPE_STRING: betterproto2.TYPE_STRING,
    FieldDescriptor.TYPE_MESSAGE: betterproto2.TYPE_MESSAGE,
    FieldDescriptor.TYPE_BYTES: betterproto2.TYPE_BYTES,
    FieldDescriptor.TYPE_UINT32: betterproto2.TYPE_UINT32,
    FieldDescriptor.TYPE_ENUM: betterproto2.TYPE_ENUM,
    FieldDescriptor.TYPE_SFIXED32: betterproto2.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64: betterproto2.TYPE_SFIXED64,
    FieldDescriptor.TYPE_SINT32: betterproto2.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64: betterproto2.TYPE_SINT64,
}
_URL = "type.googleapis.com/"


def _our_messages():
    def walk(d):
        if d.GetOptions().map_entry:
            return
        yield d
        for n in d.nested_types:
            yield from walk(n)

    for module in (external_auth_pb2, attribute_context_pb2, base_pb2, address_pb2, http_status_pb2, status_pb2):
        for d in module.DESCRIPTOR.message_types_by_name.values():
            yield from walk(d)


def _envoy_full_name(cls: type) -> str:
    return default_message_pool.type_to_url[cls].removeprefix(_URL)


def _check_message_type(where: str, ours, bp_meta, bp_cls) -> None:
    """Compare a message/enum-typed slot (field or map value) of ours with envoy-data-plane's."""
    if ours.type == FieldDescriptor.TYPE_MESSAGE:
        cls = bp_meta.unwrap() if bp_meta.unwrap else bp_cls
        assert _envoy_full_name(cls) == ours.message_type.full_name, f"{where}: message type"
    elif ours.type == FieldDescriptor.TYPE_ENUM:
        envoy_values = {m.proto_name or m.name: m.value for m in bp_cls}
        our_values = {v.name: v.number for v in ours.enum_type.values}
        for name, number in our_values.items():
            assert envoy_values.get(name) == number, f"{where}: enum {ours.enum_type.full_name}.{name}={number}"


@pytest.mark.parametrize("descriptor", list(_our_messages()), ids=lambda d: d.full_name)
def test_schema_matches_envoy(descriptor) -> None:
    cls = default_message_pool.url_to_type.get(_URL + descriptor.full_name)
    assert cls is not None, f"{descriptor.full_name} is not a message of Envoy's API"
    meta = cls._betterproto
    for f in descriptor.fields:
        where = f"{f.full_name} (= {f.number})"
        assert f.name in meta.meta_by_field_name, f"{where}: Envoy has no field named {f.name}"
        bp = meta.meta_by_field_name[f.name]
        assert bp.number == f.number, f"{where}: Envoy numbers it {bp.number}"
        oneof = f.containing_oneof.name if f.containing_oneof else None
        assert bp.group == oneof, f"{where}: oneof {oneof}, Envoy {bp.group}"
        if f.message_type is not None and f.message_type.GetOptions().map_entry:
            assert bp.proto_type == betterproto2.TYPE_MAP, f"{where}: Envoy's is not a map"
            key, value = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            assert bp.map_meta[0].proto_type == _BP_TYPE[key.type], f"{where}: map key type"
            assert bp.map_meta[1].proto_type == _BP_TYPE[value.type], f"{where}: map value type"
            _check_message_type(where, value, bp.map_meta[1], meta.cls_by_field[f"{f.name}.value"])
            continue
        assert bp.proto_type == _BP_TYPE[f.type], f"{where}: type {_BP_TYPE[f.type]}, Envoy {bp.proto_type}"
        assert bool(bp.repeated) == f.is_repeated, f"{where}: repeated={f.is_repeated}, Envoy {bp.repeated}"
        _check_message_type(where, f, bp, meta.cls_by_field[f.name])


# ---------------------------------------------------------------------------------------------
# CheckRequest: envoy-data-plane encodes, we decode (and keep what we do not model)
# ---------------------------------------------------------------------------------------------

REQUEST_TIME = dt.datetime(2024, 5, 17, 12, 34, 56, 789123, tzinfo=dt.timezone.utc)
TOKEN = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjbGllbnQifQ.c2ln"
HEADERS = {
    ":authority": "api.example.com",
    ":method": "POST",
    ":path": "/v1/orders?limit=10#top",
    ":scheme": "https",
    "authorization": TOKEN,
    "x-request-id": "5b0c2f8e-7c55-4b7e-9a43-3a4f2b2d9e11",
    "x-unicode": "grüße ✓",
}
RAW_HEADERS = [
    ("authorization", TOKEN.encode()),
    ("x-request-id", b"5b0c2f8e-7c55-4b7e-9a43-3a4f2b2d9e11"),
    ("x-binary", b"\x00\xff\xfe latin-1 \xe9"),  # not UTF-8: why Envoy uses raw_value (bytes)
]


def _envoy_check_request(*, size: int = 42) -> e_auth.CheckRequest:
    peer_address = e_core.Address(
        socket_address=e_core.SocketAddress(
            protocol=e_core.SocketAddressProtocol.TCP,
            address="10.1.2.3",
            port_value=54321,
            resolver_name="custom-resolver",
            ipv4_compat=True,
            network_namespace_filepath="/var/run/netns/client",  # field 7: not in our address.proto
        )
    )
    return e_auth.CheckRequest(
        attributes=e_auth.AttributeContext(
            source=e_auth.AttributeContextPeer(
                address=peer_address,
                service="orders-client",
                labels={"app": "client", "version": "v2"},
                principal="spiffe://cluster.local/ns/default/sa/client",
                certificate="-----BEGIN%20CERTIFICATE-----%0AMIIB...",
            ),
            destination=e_auth.AttributeContextPeer(
                address=e_core.Address(
                    socket_address=e_core.SocketAddress(
                        protocol=e_core.SocketAddressProtocol.UDP, address="10.9.8.7", named_port="https"
                    )
                ),
                principal="spiffe://cluster.local/ns/default/sa/orders",
            ),
            request=e_auth.AttributeContextRequest(
                time=REQUEST_TIME,
                http=e_auth.AttributeContextHttpRequest(
                    id="10571419935227381411",
                    method="POST",
                    headers=HEADERS,
                    header_map=e_core.HeaderMap(
                        headers=[e_core.HeaderValue(key=k, raw_value=v) for k, v in RAW_HEADERS]
                    ),
                    path="/v1/orders?limit=10#top",
                    host="api.example.com",
                    scheme="https",
                    query="limit=10",
                    fragment="top",
                    size=size,
                    protocol="HTTP/2",
                    body='{"item": "book"}',
                    raw_body=b"\x00\x01\x02 raw body \xff",
                ),
            ),
            context_extensions={"virtual_host": "api", "route": "orders"},
            metadata_context=e_core.Metadata(
                filter_metadata={
                    "envoy.filters.http.jwt_authn": e_pb.Struct(
                        fields={
                            "sub": e_pb.Value(string_value="client-123"),
                            "exp": e_pb.Value(number_value=1715949296.0),
                            "active": e_pb.Value(bool_value=True),
                            "scope": e_pb.Value(
                                list_value=e_pb.ListValue(
                                    values=[e_pb.Value(string_value="orders/read"), e_pb.Value(string_value="orders/write")]
                                )
                            ),
                            "nothing": e_pb.Value(null_value=e_pb.NullValue.NULL_VALUE),
                        }
                    )
                },
                typed_filter_metadata={
                    "envoy.test.typed": e_pb.Any.pack(e_core.HeaderValue(key="typed-key", value="typed-value"))
                },
            ),
            route_metadata_context=e_core.Metadata(
                filter_metadata={
                    "envoy.filters.http.ext_authz": e_pb.Struct(fields={"policy": e_pb.Value(string_value="strict")})
                }
            ),
            tls_session=e_auth.AttributeContextTlsSession(sni="api.example.com"),
        )
    )


def _unknown(message) -> list[tuple[int, int, object]]:
    return [(f.field_number, f.wire_type, f.data) for f in UnknownFieldSet(message)]


def test_check_request_from_envoy_decodes_with_our_stubs() -> None:
    wire = bytes(_envoy_check_request())
    ours = external_auth_pb2.CheckRequest.FromString(wire)
    attrs = ours.attributes

    source = attrs.source
    assert source.address.WhichOneof("address") == "socket_address"
    sa = source.address.socket_address
    assert sa.protocol == address_pb2.SocketAddress.TCP
    assert sa.address == "10.1.2.3"
    assert sa.WhichOneof("port_specifier") == "port_value"
    assert sa.port_value == 54321
    assert sa.resolver_name == "custom-resolver"
    assert sa.ipv4_compat is True
    assert source.service == "orders-client"
    assert dict(source.labels) == {"app": "client", "version": "v2"}
    assert source.principal == "spiffe://cluster.local/ns/default/sa/client"
    assert source.certificate == "-----BEGIN%20CERTIFICATE-----%0AMIIB..."

    dest = attrs.destination.address.socket_address
    assert dest.protocol == address_pb2.SocketAddress.UDP
    assert dest.address == "10.9.8.7"
    assert dest.WhichOneof("port_specifier") == "named_port"
    assert dest.named_port == "https"
    assert attrs.destination.principal == "spiffe://cluster.local/ns/default/sa/orders"

    assert attrs.request.HasField("time")
    assert attrs.request.time.ToDatetime(tzinfo=dt.timezone.utc) == REQUEST_TIME
    assert (attrs.request.time.seconds, attrs.request.time.nanos) == (1715949296, 789123000)

    http = attrs.request.http
    assert http.id == "10571419935227381411"
    assert http.method == "POST"
    assert dict(http.headers) == HEADERS
    assert http.headers["authorization"] == TOKEN
    assert http.headers["x-request-id"] == "5b0c2f8e-7c55-4b7e-9a43-3a4f2b2d9e11"
    assert [(h.key, h.value, h.raw_value) for h in http.header_map.headers] == [(k, "", v) for k, v in RAW_HEADERS]
    assert http.path == "/v1/orders?limit=10#top"
    assert http.host == "api.example.com"
    assert http.scheme == "https"
    assert http.query == "limit=10"
    assert http.fragment == "top"
    assert http.size == 42
    assert http.protocol == "HTTP/2"
    assert http.body == '{"item": "book"}'
    assert http.raw_body == b"\x00\x01\x02 raw body \xff"

    assert dict(attrs.context_extensions) == {"virtual_host": "api", "route": "orders"}

    jwt = attrs.metadata_context.filter_metadata["envoy.filters.http.jwt_authn"]
    assert jwt["sub"] == "client-123"
    assert jwt["exp"] == 1715949296.0
    assert jwt["active"] is True
    assert list(jwt["scope"]) == ["orders/read", "orders/write"]
    assert jwt["nothing"] is None
    assert set(jwt.keys()) == {"sub", "exp", "active", "scope", "nothing"}
    typed = attrs.metadata_context.typed_filter_metadata["envoy.test.typed"]
    assert typed.type_url == "type.googleapis.com/envoy.config.core.v3.HeaderValue"
    unpacked = base_pb2.HeaderValue()
    assert typed.Unpack(unpacked)
    assert (unpacked.key, unpacked.value) == ("typed-key", "typed-value")
    assert attrs.route_metadata_context.filter_metadata["envoy.filters.http.ext_authz"]["policy"] == "strict"

    assert attrs.tls_session.sni == "api.example.com"

    # The one field Envoy has here that we do not model is kept as an unknown field, not dropped.
    assert _unknown(sa) == [(7, 2, b"/var/run/netns/client")]
    assert _unknown(ours) == []
    assert _unknown(http) == []


def test_check_request_round_trips_unmodelled_fields() -> None:
    original = _envoy_check_request()
    ours = external_auth_pb2.CheckRequest.FromString(bytes(original))

    back = e_auth.CheckRequest.parse(ours.SerializeToString())

    assert back == original
    assert back.attributes.source.address.socket_address.network_namespace_filepath == "/var/run/netns/client"
    assert back.attributes.request.http.raw_body == b"\x00\x01\x02 raw body \xff"
    assert back.attributes.metadata_context.typed_filter_metadata["envoy.test.typed"].unpack() == e_core.HeaderValue(
        key="typed-key", value="typed-value"
    )
    assert back.attributes.route_metadata_context == original.attributes.route_metadata_context


def test_fields_newer_than_envoy_data_plane_survive_our_round_trip() -> None:
    """A field neither schema knows (e.g. added by a future Envoy) passes through us untouched."""
    future = bytes([0xF8, 0x06]) + b"\x2a"  # field 111, varint 42
    future += bytes([0x82, 0x07, 0x06]) + b"future"  # field 112, length-delimited
    ours = external_auth_pb2.CheckRequest.FromString(bytes(_envoy_check_request()) + future)
    assert _unknown(ours) == [(111, 0, 42), (112, 2, b"future")]

    again = external_auth_pb2.CheckRequest.FromString(ours.SerializeToString())
    assert _unknown(again) == [(111, 0, 42), (112, 2, b"future")]
    assert e_auth.CheckRequest.parse(again.SerializeToString()) == _envoy_check_request()


def test_unknown_request_size_is_minus_one() -> None:
    """Envoy sends size -1 when the body size is unknown: int64 must survive the 10-byte varint."""
    ours = external_auth_pb2.CheckRequest.FromString(bytes(_envoy_check_request(size=-1)))
    assert ours.attributes.request.http.size == -1


def test_empty_check_request() -> None:
    ours = external_auth_pb2.CheckRequest.FromString(bytes(e_auth.CheckRequest()))
    assert not ours.HasField("attributes")
    assert ours.SerializeToString() == b""


# ---------------------------------------------------------------------------------------------
# CheckResponse: we encode, envoy-data-plane decodes
# ---------------------------------------------------------------------------------------------


def _header(key: str, value: str, action=OVERWRITE) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=action)


def _decoded_headers(options) -> list[tuple[str, str, E_APPEND_ACTION]]:
    for option in options:
        assert option.append is None, "we never set the deprecated `append` (it would override append_action)"
    return [(o.header.key, o.header.value, o.append_action) for o in options]


def test_denied_response_decodes_in_envoy() -> None:
    body = json.dumps({"error": "invalid_token", "error_description": "token expired"})
    ours = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=16, message="token expired"),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.StatusCode.Unauthorized),
            headers=[
                _header("www-authenticate", 'Bearer error="invalid_token"'),
                _header("content-type", "application/json"),
            ],
            body=body,
        ),
    )

    envoy = e_auth.CheckResponse.parse(ours.SerializeToString())

    name, denied = betterproto2.which_one_of(envoy, "http_response")
    assert name == "denied_response"
    assert envoy.ok_response is None and envoy.error_response is None
    assert envoy.status == e_rpc.Status(code=16, message="token expired")
    assert envoy.status.code == 16  # UNAUTHENTICATED
    assert denied.status.code is e_type.StatusCode.Unauthorized
    assert denied.status.code == 401
    assert _decoded_headers(denied.headers) == [
        ("www-authenticate", 'Bearer error="invalid_token"', E_APPEND_ACTION.OVERWRITE_IF_EXISTS_OR_ADD),
        ("content-type", "application/json", E_APPEND_ACTION.OVERWRITE_IF_EXISTS_OR_ADD),
    ]
    assert int(E_APPEND_ACTION.OVERWRITE_IF_EXISTS_OR_ADD) == 2
    assert denied.body == body
    assert json.loads(denied.body) == {"error": "invalid_token", "error_description": "token expired"}
    assert envoy.dynamic_metadata is None

    # And back: envoy-data-plane's encoding of what it decoded is what we sent.
    assert external_auth_pb2.CheckResponse.FromString(bytes(envoy)) == ours


def test_ok_response_decodes_in_envoy() -> None:
    metadata = struct_pb2.Struct()
    metadata.update({"sub": "client-123", "scopes": ["orders/read"]})
    ours = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=0),
        ok_response=external_auth_pb2.OkHttpResponse(
            headers=[
                _header("x-auth-subject", "client-123"),
                _header("x-auth-scopes", "orders/read orders/write"),
                _header("x-auth-trace", "1", base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD),
            ],
            headers_to_remove=["authorization", "x-api-key"],
            response_headers_to_add=[_header("x-authz-decision", "allow", base_pb2.HeaderValueOption.ADD_IF_ABSENT)],
        ),
        dynamic_metadata=metadata,
    )

    envoy = e_auth.CheckResponse.parse(ours.SerializeToString())

    name, ok = betterproto2.which_one_of(envoy, "http_response")
    assert name == "ok_response"
    assert envoy.denied_response is None and envoy.error_response is None
    assert envoy.status is not None and envoy.status.code == 0  # gRPC OK: allow
    assert _decoded_headers(ok.headers) == [
        ("x-auth-subject", "client-123", E_APPEND_ACTION.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-auth-scopes", "orders/read orders/write", E_APPEND_ACTION.OVERWRITE_IF_EXISTS_OR_ADD),
        ("x-auth-trace", "1", E_APPEND_ACTION.APPEND_IF_EXISTS_OR_ADD),
    ]
    assert ok.headers_to_remove == ["authorization", "x-api-key"]
    assert _decoded_headers(ok.response_headers_to_add) == [
        ("x-authz-decision", "allow", E_APPEND_ACTION.ADD_IF_ABSENT)
    ]
    assert ok.dynamic_metadata is None  # the deprecated per-response field stays unset
    assert ok.query_parameters_to_set == [] and ok.query_parameters_to_remove == []
    assert envoy.dynamic_metadata.to_dict() == {"sub": "client-123", "scopes": ["orders/read"]}

    assert external_auth_pb2.CheckResponse.FromString(bytes(envoy)) == ours


def test_error_response_decodes_in_envoy() -> None:
    ours = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=14, message="JWKS unavailable"),
        error_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.StatusCode.ServiceUnavailable),
            headers=[_header("retry-after", "5")],
            body='{"error": "temporarily_unavailable"}',
        ),
    )

    envoy = e_auth.CheckResponse.parse(ours.SerializeToString())

    name, error = betterproto2.which_one_of(envoy, "http_response")
    assert name == "error_response"
    assert envoy.denied_response is None and envoy.ok_response is None
    assert envoy.status.code == 14  # UNAVAILABLE
    assert envoy.status.message == "JWKS unavailable"
    assert error.status.code is e_type.StatusCode.ServiceUnavailable
    assert error.status.code == 503
    assert _decoded_headers(error.headers) == [("retry-after", "5", E_APPEND_ACTION.OVERWRITE_IF_EXISTS_OR_ADD)]
    assert json.loads(error.body) == {"error": "temporarily_unavailable"}


def test_status_code_enum_matches_envoy() -> None:
    ours = {v.name: v.number for v in http_status_pb2.StatusCode.DESCRIPTOR.values}
    envoy = {m.name: m.value for m in e_type.StatusCode}
    assert ours == envoy
    assert http_status_pb2.StatusCode.Unauthorized == e_type.StatusCode.Unauthorized == 401
    assert http_status_pb2.StatusCode.Forbidden == e_type.StatusCode.Forbidden == 403


# ---------------------------------------------------------------------------------------------
# gRPC method path
# ---------------------------------------------------------------------------------------------


class _RecordingChannel:
    """Stands in for grpc.Channel: records the method paths stubs register."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def unary_unary(self, path, *args, **kwargs):
        self.paths.append(path)
        return lambda request, *a, **kw: e_auth.CheckResponse()


class _RecordingServer:
    def __init__(self) -> None:
        self.paths: list[str] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.paths.extend(f"/{service}/{method}" for method in handlers)


def test_grpc_method_path_matches_envoy_data_plane() -> None:
    ours = _RecordingChannel()
    external_auth_pb2_grpc.AuthorizationStub(ours)
    assert ours.paths == [CHECK_PATH]

    server = _RecordingServer()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(external_auth_pb2_grpc.AuthorizationServicer(), server)
    assert server.paths == [CHECK_PATH]

    theirs = _RecordingChannel()
    e_auth.AuthorizationSyncStub(theirs).check(e_auth.CheckRequest())
    assert theirs.paths == ours.paths
    assert list(e_auth.AuthorizationBase().__mapping__()) == ours.paths

    method = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].methods_by_name["Check"]
    assert f"/{method.containing_service.full_name}/{method.name}" == CHECK_PATH


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

# Protobuf strings are UTF-8: any text without lone surrogates.
_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_header_name = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20)
_http = st.fixed_dictionaries(
    {
        "method": st.one_of(st.sampled_from(["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]), _text),
        "path": _text,
        "host": _text,
        "headers": st.dictionaries(_header_name, _text, max_size=8),
        "size": st.integers(-(2**63), 2**63 - 1),
        "raw": st.lists(st.tuples(_header_name, st.binary(max_size=20)), max_size=4),
    }
)
_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(_http)
def test_property_http_attributes_from_envoy_decode_equal(values) -> None:
    envoy = e_auth.CheckRequest(
        attributes=e_auth.AttributeContext(
            request=e_auth.AttributeContextRequest(
                http=e_auth.AttributeContextHttpRequest(
                    method=values["method"],
                    path=values["path"],
                    host=values["host"],
                    headers=values["headers"],
                    size=values["size"],
                    header_map=e_core.HeaderMap(headers=[e_core.HeaderValue(key=k, raw_value=v) for k, v in values["raw"]]),
                )
            )
        )
    )
    http = external_auth_pb2.CheckRequest.FromString(bytes(envoy)).attributes.request.http
    assert http.method == values["method"]
    assert http.path == values["path"]
    assert http.host == values["host"]
    assert dict(http.headers) == values["headers"]
    assert http.size == values["size"]
    assert [(h.key, h.raw_value) for h in http.header_map.headers] == values["raw"]


@_settings
@given(_http)
def test_property_http_attributes_from_us_decode_equal_in_envoy(values) -> None:
    ours = external_auth_pb2.CheckRequest()
    http = ours.attributes.request.http
    http.method, http.path, http.host, http.size = values["method"], values["path"], values["host"], values["size"]
    http.headers.update(values["headers"])
    for key, raw in values["raw"]:
        http.header_map.headers.add(key=key, raw_value=raw)

    decoded = e_auth.CheckRequest.parse(ours.SerializeToString()).attributes.request.http
    assert (decoded.method, decoded.path, decoded.host, decoded.size) == (
        values["method"],
        values["path"],
        values["host"],
        values["size"],
    )
    assert decoded.headers == values["headers"]
    raw = decoded.header_map.headers if decoded.header_map is not None else []  # absent when we set none
    assert [(h.key, h.raw_value) for h in raw] == values["raw"]


_status_codes = st.sampled_from([v.number for v in http_status_pb2.StatusCode.DESCRIPTOR.values])
_append_actions = st.sampled_from([v.number for v in base_pb2.HeaderValueOption.HeaderAppendAction.DESCRIPTOR.values])


@_settings
@given(
    code=_status_codes,
    grpc_code=st.integers(0, 16),
    headers=st.lists(st.tuples(_header_name, _text, _append_actions), max_size=6),
    body=_text,
    member=st.sampled_from(["denied_response", "error_response"]),
)
def test_property_denied_response_decodes_equal_in_envoy(code, grpc_code, headers, body, member) -> None:
    http_response = external_auth_pb2.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=code),
        headers=[_header(k, v, a) for k, v, a in headers],
        body=body,
    )
    ours = external_auth_pb2.CheckResponse(status=status_pb2.Status(code=grpc_code), **{member: http_response})

    envoy = e_auth.CheckResponse.parse(ours.SerializeToString())

    name, decoded = betterproto2.which_one_of(envoy, "http_response")
    assert name == member
    assert envoy.status.code == grpc_code
    assert decoded.status.code == code
    assert isinstance(decoded.status.code, e_type.StatusCode) and decoded.status.code.name
    assert _decoded_headers(decoded.headers) == [(k, v, E_APPEND_ACTION(a)) for k, v, a in headers]
    assert decoded.body == body
