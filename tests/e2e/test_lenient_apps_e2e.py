"""What a lenient app does with a request must still be what the policy authorized.

Three ways an app reads a request more loosely than an exact match, each proven closed through the
shipped Envoy, in both ext_authz modes and native mode, under the reviewer's policy (a GET-only protected route
beside a public catch-all):

* a trailing slash: Flask (``strict_slashes=False``), Express and Spring MVC up to 5 serve
  ``/admin/report/`` with the ``/admin/report`` handler, so it must need that route's scopes;
* letter case: a case-insensitive router serves ``/ADMIN/Report`` with the same handler, which the
  policy protects once it says ``path_case: insensitive``;
* header names with dots: servers that map '-' and '.' to '_' (PHP's ``$_SERVER``) read
  ``x.auth.client.id`` as the identity header, so it never reaches the app.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..test_policytool import REVIEW_POLICY
from .harness import NATIVE, NATIVE_XDS, UpstreamProcess, wait_for
from .security_stack import (SecurityStack, native_decisions, policy_text, serve, service_checks,
                             start_security_stack, stop_security_stack)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory, enforcing_mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("lenient"), upstream, module_envoy_factory, mode=enforcing_mode,
                             routes=REVIEW_POLICY)
    yield s
    stop_security_stack(s)


# --- a trailing slash -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_a_trailing_slash_needs_the_scopes_of_the_route_without_it(stack: SecurityStack, method: str) -> None:
    assert stack.send(method, "/admin/report").status == 401  # the route really is protected
    answer = stack.send(method, "/admin/report/")
    assert (answer.status, answer.reached_upstream) == (401, []), "a lenient router serves the admin handler"
    assert stack.check(method, "/admin/report/").status == 401  # the front door itself, not only Envoy
    reader = stack.fake.token("payments-reader", "admin/read")
    answer = stack.send(method, "/admin/report/", reader)
    assert answer.status == 200 and [r["path"] for r in answer.reached_upstream] == ["/admin/report/"]


def test_the_denial_of_a_trailing_slash_names_the_route_that_failed(stack: SecurityStack) -> None:
    """The 403 asks for the admin route's scope, and the metric (the service's, or in native mode
    Envoy's native decisions) and the log line name that route."""
    native = stack.mode in (NATIVE, NATIVE_XDS)
    labels = ("deny", "insufficient_scope", "admin-report", "403")

    def counted() -> float:
        if native:
            return native_decisions(stack.envoy)[labels]
        return stack.service.total("authz_check_decisions_total", route="admin-report", reason="insufficient_scope")

    before = counted()
    answer = stack.send("GET", "/admin/report/", stack.fake.token("payments-reader", "transactions/get"))
    assert (answer.status, answer.error, answer.reached_upstream) == (403, "insufficient_scope", [])
    assert 'scope="admin/read"' in answer.headers["www-authenticate"]
    wait_for(lambda: counted() == before + 1, 10, "the denial counted under the admin route")


@pytest.mark.parametrize(("method", "path"), [("GET", "/elsewhere/"), ("DELETE", "/admin/report/"), ("GET", "/")])
def test_a_trailing_slash_on_a_public_path_stays_public(stack: SecurityStack, method: str, path: str) -> None:
    """Control: only what the route without the '/' protects is protected (DELETE /admin/report is
    public in this policy, so DELETE /admin/report/ is too)."""
    answer = stack.send(method, path)
    assert answer.status == 200 and len(answer.reached_upstream) == 1


def test_native_mode_decides_every_trailing_slash_without_a_check(stack: SecurityStack) -> None:
    """Under the public /** route: /elsewhere/deeper/ (the /** route takes both readings),
    DELETE /admin/report/ (the GET-only route does not take DELETE: /** again), GET /admin/report/
    (the public /** as written, then the protected route without the '/') and GET /transactions/7/
    (the same with a parameter): Envoy decides each, allowing and denying, and never asks the service."""
    if stack.mode not in (NATIVE, NATIVE_XDS):
        pytest.skip("native mode's trailing-slash routes")
    before = service_checks(stack.envoy)
    reader = stack.fake.token("payments-reader", "admin/read")
    getter = stack.fake.token("payments-reader", "transactions/get")
    assert stack.send("GET", "/elsewhere/deeper/").status == 200
    assert stack.send("DELETE", "/admin/report/").status == 200
    assert (stack.send("GET", "/admin/report/").status, stack.send("GET", "/admin/report/", reader).status) == (401, 200)
    assert stack.send("GET", "/admin/report/", getter).status == 403
    assert (stack.send("GET", "/transactions/7/", getter).status, stack.send("GET", "/transactions/7/", reader).status) \
        == (200, 403)
    assert service_checks(stack.envoy) == before


# --- letter case ----------------------------------------------------------------------------------


def test_path_case_insensitive_protects_case_variants(stack: SecurityStack) -> None:
    if stack.mode == NATIVE:
        pytest.skip("a policy change reaches native mode's bootstrap form only by a new compile and restart")
    reader = stack.fake.token("payments-reader", "admin/read")
    # A case-sensitive router (the default) serves no admin handler for /ADMIN/Report: public /** takes it.
    assert stack.send("GET", "/ADMIN/Report").status == 200
    serve(stack, policy_text(stack.fake, stack.dev, REVIEW_POLICY, routes="").replace(
        "routes:\n", "path_case: insensitive\nroutes:\n", 1))
    try:
        for path in ("/ADMIN/Report", "/Admin/report", "/admin/REPORT/"):
            answer = stack.send("GET", path)
            assert (answer.status, answer.reached_upstream) == (401, []), path
            assert stack.check("GET", path).status == 401, path
            answer = stack.send("GET", path, reader)
            assert answer.status == 200 and [r["path"] for r in answer.reached_upstream] == [path]
        assert stack.send("GET", "/ADMIN/Reports").status == 200  # still whole segments: another path
    finally:
        serve(stack, policy_text(stack.fake, stack.dev, REVIEW_POLICY, routes=""))


# --- identity header look-alikes with dots ---------------------------------------------------------

DOTTED = [("x.auth.client.id", "admin"), ("X.Auth.Scopes", "admin/all"), ("x.auth.sub", "root"),
          ("x-auth.client_id", "admin"), ("x_auth.scopes", "admin/all"), ("x-auth.sub", "root")]


@pytest.mark.parametrize("token_scope", [None, "admin/read"], ids=["public-route", "protected-route"])
def test_identity_header_look_alikes_with_dots_never_reach_the_app(stack: SecurityStack,
                                                                  token_scope: str | None) -> None:
    token = stack.fake.token("payments-reader", token_scope) if token_scope else None
    path = "/admin/report" if token else "/elsewhere"
    answer = stack.send("GET", path, token, DOTTED + [("x.other", "kept")])
    assert answer.status == 200 and len(answer.reached_upstream) == 1, answer.body
    seen = answer.reached_upstream[0]["headers"]
    assert not [name for name, _ in DOTTED if name.lower() in seen], seen
    assert seen.get("x.other") == ["kept"]  # other dotted names pass
    assert seen.get("x-auth-client-id") == (["payments-reader"] if token else None)


@pytest.mark.parametrize("name", ["x.http.method.override", "X.HTTP.Method", "x.original.url", "x-rewrite.url"])
def test_override_header_look_alikes_with_dots_are_refused(stack: SecurityStack, name: str) -> None:
    answer = stack.send("GET", "/elsewhere", None, [(name, "DELETE" if "method" in name.lower() else "/admin/x")])
    assert (answer.status, answer.error, answer.reached_upstream) == (400, "invalid_request", [])
