"""A path that escapes a character a route's literal holds must meet that literal's route too.

Literal segments may hold RFC 3986 sub-delims, ':' and '@' (``/v1/items:batchGet``, the custom
methods of Google's API design guide). A client may send them escaped: ``/v1/items%3AbatchGet``
is another segment to a router that matches paths as written, but the ``batchGet`` handler to the
many that decode before matching (Spring's, Go's). Matched as written only, it fell to the weaker
``/v1/{name}`` route and its reader's token ran ``batchGet``. Through the shipped Envoy, in every
mode: the request must meet the route of each reading.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ..test_policy import ESCAPED_ROUTES
from .harness import NATIVE, NATIVE_XDS, UpstreamProcess
from .security_stack import SecurityStack, service_checks, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory, enforcing_mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("escapes"), upstream, module_envoy_factory,
                             mode=enforcing_mode, routes=ESCAPED_ROUTES)
    yield s
    stop_security_stack(s)


@pytest.mark.parametrize("target", ["/v1/items%3AbatchGet", "/v1/items%3abatchGet", "/v1/items:batchGet"])
def test_an_escaped_literal_character_needs_the_literal_route(stack: SecurityStack, target: str) -> None:
    reader = stack.fake.token("payments-reader", "items/read")
    assert stack.send("POST", "/v1/items:list", reader).status == 200  # the weaker route itself
    answer = stack.send("POST", "/", reader, target=target)
    assert (answer.status, answer.error, answer.reached_upstream) == (403, "insufficient_scope", [])
    both = stack.fake.token("payments-reader", "items/read items/admin")
    answer = stack.send("POST", "/", both, target=target)
    assert answer.status == 200 and [r["path"] for r in answer.reached_upstream] == [target]


def test_an_escaped_at_sign_needs_the_literal_route_even_under_a_public_one(stack: SecurityStack) -> None:
    answer = stack.send("GET", "/", None, target="/v1/users/a%40b.example")
    assert (answer.status, answer.reached_upstream) == (401, [])
    answer = stack.send("GET", "/", None, target="/v1/users/someone%40b.example")
    assert answer.status == 200 and [r["path"] for r in answer.reached_upstream] == ["/v1/users/someone%40b.example"]


@pytest.mark.parametrize("target", ["/v1/a%2Cb", "/v1/a%2cb%3D"])
def test_an_escape_no_literal_holds_is_read_one_way_and_decided_natively(stack: SecurityStack, target: str) -> None:
    """',' and '=' are in no literal of the policy (':' and '@' are): whether a router decodes
    them or not, the path meets the one route ``/v1/{name}``, and native mode decides it in Envoy
    without asking the service."""
    before = service_checks(stack.envoy)
    answer = stack.send("GET", "/", stack.fake.token("payments-reader", "items/read"), target=target)
    assert answer.status == 200 and [r["path"] for r in answer.reached_upstream] == [target]
    answer = stack.send("GET", "/", stack.fake.token("payments-reader", "users/admin"), target=target)
    assert (answer.status, answer.error, answer.reached_upstream) == (403, "insufficient_scope", [])
    if stack.mode in (NATIVE, NATIVE_XDS):
        assert service_checks(stack.envoy) == before
