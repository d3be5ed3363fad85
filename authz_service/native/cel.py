"""A few CEL expressions, written as the parsed syntax tree Envoy's RBAC ``condition`` takes.

Why by hand: RBAC accepts a condition only as a ``google.api.expr.v1alpha1.Expr`` (no source
text), and the compiler needs a few fixed shapes (sizes, a comparison with the request time), not a
CEL parser. Each costs Envoy far more per request than a header or metadata matcher (checks.py).
"""

from __future__ import annotations

from typing import Any

Expr = dict[str, Any]
JWT_AUTHN = "envoy.filters.http.jwt_authn"


def call(function: str, *args: Expr) -> Expr:
    return {"call_expr": {"function": function, "args": list(args)}}


def ident(name: str) -> Expr:
    return {"ident_expr": {"name": name}}


def select(operand: Expr, field: str) -> Expr:
    return {"select_expr": {"operand": operand, "field": field}}


def string(value: str) -> Expr:
    return {"const_expr": {"string_value": value}}


def integer(value: int) -> Expr:
    return {"const_expr": {"int64_value": value}}


def index(operand: Expr, key: str) -> Expr:
    """``operand[key]`` (an error, so no match, when the key is absent)."""
    return call("_[_]", operand, string(key))


def jwt_metadata(key: str) -> Expr:
    """What jwt_authn stored under ``key`` for a verified token (``payload`` or ``header``)."""
    return index(index(select(ident("metadata"), "filter_metadata"), JWT_AUTHN), key)


def request_header(name: str) -> Expr:
    return index(select(ident("request"), "headers"), name)


def byte_size(operand: Expr) -> Expr:
    """``size(bytes(operand))``: a string's length in bytes, without counting its code points one by
    one as ``size()`` of a string does (the same figure for ASCII text)."""
    return call("size", call("bytes", operand))


def request_target() -> Expr:
    """``:path`` as the client sent it after normalization, query included."""
    return select(ident("request"), "path")


def now_seconds() -> Expr:
    """The request's time in whole seconds since the epoch (rounded down)."""
    return call("int", select(ident("request"), "time"))
