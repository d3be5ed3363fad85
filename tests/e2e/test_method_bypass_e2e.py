"""The method an app runs must be the method we authorized.

A policy that limits a route to some methods lets every other method fall through to less
specific routes. Three ways a request could reach such a fall-through while the app runs a
protected handler, each proven closed through the shipped Envoy:

* a method spelled in lower or mixed case (HTTP/2 forwards ``:method: get`` unchanged, and
  frameworks such as Flask upper-case it);
* HEAD, which frameworks serve with the GET handler;
* a method override in the query string (``?_method=DELETE``: Rails, Laravel, Express).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..test_policytool import REVIEW_POLICY
from .harness import UpstreamProcess
from .security_stack import (ANY_SEPARATOR_IDENTITY, ANY_SEPARATOR_OVERRIDES, SecurityStack, start_security_stack,
                             stop_security_stack)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory, enforcing_mode: str) -> Iterator[SecurityStack]:
    # The reviewer's policy (method-limited protected routes under a public catch-all), the one
    # validate's fall-through lint is tested with.
    s = start_security_stack(tmp_path_factory.mktemp("methods"), upstream, module_envoy_factory, mode=enforcing_mode,
                             routes=REVIEW_POLICY)
    yield s
    stop_security_stack(s)


def h2(stack: SecurityStack, method: str, target: str, token: str | None = None) -> tuple[int, list]:
    """One HTTP/2 request through Envoy with the method sent exactly as written."""
    return stack.send_h2(method, target, [("authorization", f"Bearer {token}")] if token is not None else [])


@pytest.mark.parametrize("method", ["get", "Get", "gET"])
def test_lower_case_method_cannot_reach_a_protected_get_through_the_public_catch_all(
        stack: SecurityStack, method: str) -> None:
    assert h2(stack, "GET", "/admin/report")[0] == 401  # the route really is protected
    status, reached = h2(stack, method, "/admin/report")
    assert (status, reached) == (400, []), "a method that is not an upper-case token must be refused"


@pytest.mark.parametrize("method", ["delete", "Delete"])
def test_lower_case_delete_with_a_read_token_is_refused(stack: SecurityStack, method: str) -> None:
    reader = stack.fake.token("payments-reader", "transactions/get")
    assert h2(stack, "DELETE", "/transactions/7", reader)[0] == 403
    status, reached = h2(stack, method, "/transactions/7", reader)
    assert (status, reached) == (400, [])


@pytest.mark.parametrize("method", ["FOO", "BREW!", "VERSION-CONTROL"])
def test_a_method_outside_the_http_registry_over_http2(stack: SecurityStack, method: str) -> None:
    """Over HTTP/1.1 Envoy refuses a method it does not know (400) before any filter; over HTTP/2 it
    forwards it. gRPC and native mode decide it like any upper-case token (here the public
    catch-all takes it); HTTP mode's front door cannot parse it (its HTTP parser knows only the
    registered methods) and refuses it with its JSON 400: never an allow, never a 5xx."""
    assert stack.send(method, "/anything").status == 400  # HTTP/1.1: Envoy's own 400
    status, reached = h2(stack, method, "/anything")
    if stack.mode == "http":
        assert (status, reached) == (400, [])
    else:
        assert status == 200 and [r["method"] for r in reached] == [method]


def test_head_is_authorized_like_get(stack: SecurityStack) -> None:
    answer = stack.send("HEAD", "/admin/report")
    assert answer.status == 401 and answer.reached_upstream == [], "HEAD runs the GET handler in most apps"
    reader = stack.fake.token("payments-reader", "admin/read")
    answer = stack.send("HEAD", "/admin/report", reader)
    assert answer.status == 200 and [r["method"] for r in answer.reached_upstream] == ["HEAD"]
    # Over HTTP/2 too.
    assert h2(stack, "HEAD", "/admin/report") == (401, [])


@pytest.mark.parametrize("query", ["_method=DELETE", "x=1&_method=delete", "_METHOD=DELETE", "%5Fmethod=DELETE",
                                   "%5fMethod=PUT", "_method[]=DELETE", "a=b;_method=DELETE", "_method",
                                   # PHP (Laravel, Symfony) drops a name's leading spaces, reads '.' and ' '
                                   # in it as '_' and ends it at a NUL: each of these is its _method.
                                   "+_method=DELETE", "%20_method=DELETE", ".method=DELETE", "%2Emethod=PUT",
                                   "x=1&++.Method=DELETE", "_method%00x=DELETE", "_%6Dethod=DELETE"])
def test_method_override_in_the_query_is_refused(stack: SecurityStack, query: str) -> None:
    reader = stack.fake.token("payments-reader", "transactions/get")
    assert stack.send("GET", "/transactions/7", reader).status == 200
    answer = stack.send("GET", f"/transactions/7?{query}", reader)
    assert (answer.status, answer.error) == (400, "invalid_request") and answer.reached_upstream == []
    answer = stack.send("POST", f"/public/form?{query}")
    assert answer.status == 400 and answer.reached_upstream == [], "a public route is no exception"


@pytest.mark.parametrize("query", ["method=DELETE", "x_method=1", "_methods=1", "q=_method", "%2B_method=1",
                                   "_method.=1", "+method=1"])
def test_other_query_parameters_pass(stack: SecurityStack, query: str) -> None:
    reader = stack.fake.token("payments-reader", "transactions/get")
    answer = stack.send("GET", f"/transactions/7?{query}", reader)
    assert answer.status == 200 and len(answer.reached_upstream) == 1


@pytest.mark.parametrize("token_scope", [None, "admin/read"], ids=["public-route", "protected-route"])
def test_identity_and_override_headers_spelled_with_any_separator_never_reach_the_app(
        stack: SecurityStack, token_scope: str | None) -> None:
    token = stack.fake.token("payments-reader", token_scope) if token_scope else None
    path = "/admin/report" if token else "/elsewhere"
    spoofed = ANY_SEPARATOR_IDENTITY + ANY_SEPARATOR_OVERRIDES
    answer = stack.send("GET", path, token, spoofed + [("x~other", "kept")])
    assert answer.status == 200 and len(answer.reached_upstream) == 1, answer.body
    seen = answer.reached_upstream[0]["headers"]
    assert not [name for name, _ in spoofed if name.lower() in seen], seen
    assert seen.get("x~other") == ["kept"]  # other names pass
    assert seen.get("x-auth-client-id") == (["payments-reader"] if token else None)
