"""Per-client rate limits (envoy/examples/per-client-ratelimit.yaml), through a real Envoy.

Each test starts its own Envoy on the shipped config of the module's mode (ext_authz over gRPC,
over HTTP, and native: the bootstrap compiled from the policy) with the recipe pasted in as its
comment says, in front of the real service, tokens from the dev issuer's /oauth2/token. Only the
recipe's numbers change: small buckets with a fill interval of an hour, so no token comes back
while a test runs, however slow the machine. Tests count the requests a bucket admits and then see
the 429; nothing waits on the clock.

* a client over its limit gets 429 with Retry-After and never reaches the app; another client is
  unaffected; a client with its own descriptor gets its own limit;
* a copy of x-auth-client-id the client sends (any spelling, repeated) picks no bucket: the
  sender's own bucket pays, and an exhausted client cannot escape into another one;
* requests without a verified identity (anonymous, an invalid token, a token on a public route)
  never touch a client's bucket;
* a route with its own block has buckets of its own.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from authz_service.request import identity_and_override_spellings

from .. import envoyconf
from .harness import NATIVE, PER_CLIENT_RECIPE, UpstreamProcess
from .security_stack import Answer, SecurityStack, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e

LIMIT = 3  # every client's bucket
OWN_LIMIT = 5  # the bucket of the client with a descriptor of its own
OWN_CLIENT = "reporting"
HOUR = "3600s"
READ = ("GET", "/transactions/1")
WRITE = ("POST", "/transactions")
# Every '-'/'_'/'.' spelling of the identity header, plus case variants: what a client may send.
CLIENT_ID_NAME = re.compile(r"x[-_.]auth[-_.]client[-_.]id")
CLIENT_ID_SPELLINGS = [n for n in identity_and_override_spellings() if CLIENT_ID_NAME.fullmatch(n)]
SPOOFED_NAMES = [*CLIENT_ID_SPELLINGS, "X-Auth-Client-Id", "X_AUTH_CLIENT_ID", "x-auth-client-id"]  # the last: twice


def recipe(limit: int = LIMIT, own_limit: int = OWN_LIMIT) -> dict[str, Any]:
    """The shipped recipe with test-sized buckets: ``limit`` per client, ``own_limit`` for OWN_CLIENT
    (the recipe's example client id replaced), never refilled while a test runs."""
    loaded = yaml.safe_load(PER_CLIENT_RECIPE.read_text())
    block = loaded["typed_per_filter_config"][envoyconf.PER_CLIENT_FILTER]
    every, own = block["descriptors"]  # the recipe's shape: every client, then one client's own
    assert every["entries"] == [{"key": "client_id"}] and set(own["entries"][0]) == {"key", "value"}
    every["token_bucket"] = {"max_tokens": limit, "tokens_per_fill": 1, "fill_interval": HOUR}
    own["entries"][0]["value"] = OWN_CLIENT
    own["token_bucket"] = {"max_tokens": own_limit, "tokens_per_fill": 1, "fill_interval": HOUR}
    return loaded


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess, module_envoy_factory, enforcing_mode: str
) -> Iterator[SecurityStack]:
    mode = enforcing_mode
    s = start_security_stack(tmp_path_factory.mktemp(f"per-client-{mode}"), upstream, module_envoy_factory, mode=mode)
    yield s
    stop_security_stack(s)


@pytest.fixture(scope="module")
def tokens(stack: SecurityStack) -> dict[str, str]:
    """Real client_credentials tokens, one per client."""
    return {
        "payments-reader": stack.dev.token("payments-reader", "transactions/get"),
        "payments-writer": stack.dev.token("payments-writer", "transactions/post"),
        OWN_CLIENT: stack.dev.token(OWN_CLIENT, "transactions/get"),
    }


def limited(
    stack: SecurityStack, envoy_factory, upstream: UpstreamProcess, edit: Callable[[dict[str, Any]], None] | None = None
) -> SecurityStack:
    """The stack behind a new Envoy (fresh buckets): the shipped config of the stack's mode with the
    test-sized recipe applied, then ``edit``."""

    def configure(config: dict[str, Any]) -> None:
        envoyconf.with_per_client_limits(config, recipe())
        if edit is not None:
            edit(config)

    if stack.mode == NATIVE:
        envoy = envoy_factory.native(stack.service, stack.policy.path, transform=configure)
    else:
        envoy = envoy_factory.for_service(stack.service, stack.mode, edit=configure)
    return SecurityStack(stack.fake, stack.dev, stack.policy, stack.service, envoy, upstream, stack.work, stack.mode)


@pytest.fixture
def rig(stack: SecurityStack, envoy_factory, upstream: UpstreamProcess) -> Iterator[SecurityStack]:
    s = limited(stack, envoy_factory, upstream)
    yield s
    s.close()


def spend(
    rig: SecurityStack,
    request: tuple[str, str],
    token: str | None,
    count: int,
    headers: list[tuple[str, str]] | None = None,
    *,
    client: str | None,
) -> None:
    """``count`` requests, each allowed and reaching the app as ``client`` (None: no identity)."""
    for sent in range(count):
        answer = rig.send(*request, token, headers)
        assert answer.status == 200, (sent, answer.status, answer.body)
        assert [seen_client(r) for r in answer.reached_upstream] == [client], answer.reached_upstream


def seen_client(reached: dict) -> str | None:
    """The client id the app received: the verified one, in the only spelling that may reach it."""
    names = [name for name in reached["headers"] if CLIENT_ID_NAME.fullmatch(name)]
    assert names in ([], ["x-auth-client-id"]), names
    values = reached["headers"].get("x-auth-client-id")
    assert values is None or len(values) == 1, values
    return values[0] if values else None


def assert_rate_limited(answer: Answer) -> None:
    """Envoy's per-client 429: Retry-After in whole seconds (within the test bucket's hour), the
    JSON body, and nothing reached the app."""
    assert answer.status == 429, (answer.status, answer.body)
    assert 1 <= int(answer.headers["retry-after"]) <= 3600, answer.headers
    assert answer.error == "rate_limited" and "this client" in (answer.description or ""), answer.body
    assert answer.headers.get("cache-control") == "no-store"
    assert answer.reached_upstream == []


def spoofed(client_id: str) -> list[tuple[str, str]]:
    return [(name, client_id) for name in SPOOFED_NAMES]


def test_a_client_over_its_limit_gets_429_with_retry_after_and_others_are_unaffected(
    rig: SecurityStack, tokens: dict[str, str]
) -> None:
    reader, writer = tokens["payments-reader"], tokens["payments-writer"]
    spend(rig, READ, reader, LIMIT, client="payments-reader")
    assert_rate_limited(rig.send(*READ, reader))
    # Another client: its own full bucket, whatever the reader did ...
    spend(rig, WRITE, writer, LIMIT, client="payments-writer")
    assert_rate_limited(rig.send(*WRITE, writer))
    # ... and the reader's stays empty (the writer's requests refilled nothing).
    assert_rate_limited(rig.send(*READ, reader))
    stats = rig.envoy.stats(r"^per_client\.http_local_rate_limit\.")
    assert stats["per_client.http_local_rate_limit.rate_limited"] == 3, stats


def test_a_client_with_a_descriptor_of_its_own_gets_its_own_limit(rig: SecurityStack, tokens: dict[str, str]) -> None:
    spend(rig, READ, tokens[OWN_CLIENT], OWN_LIMIT, client=OWN_CLIENT)
    assert_rate_limited(rig.send(*READ, tokens[OWN_CLIENT]))
    spend(rig, READ, tokens["payments-reader"], LIMIT, client="payments-reader")
    assert_rate_limited(rig.send(*READ, tokens["payments-reader"]))


def test_a_spoofed_client_id_in_any_spelling_picks_no_bucket(rig: SecurityStack, tokens: dict[str, str]) -> None:
    reader, writer = tokens["payments-reader"], tokens["payments-writer"]
    # The writer claims to be the reader in every spelling: its own bucket pays, and the app sees
    # the writer ...
    spend(rig, WRITE, writer, LIMIT, spoofed("payments-reader"), client="payments-writer")
    assert_rate_limited(rig.send(*WRITE, writer, spoofed("payments-reader")))
    # ... so the reader's bucket is untouched (the spoofed requests would have emptied it) ...
    spend(rig, READ, reader, LIMIT, client="payments-reader")
    assert_rate_limited(rig.send(*READ, reader))
    # ... and the exhausted writer cannot move to another bucket: not an unused client id's, not the
    # client with a larger limit of its own.
    for other in ("not-a-client", OWN_CLIENT):
        assert_rate_limited(rig.send(*WRITE, writer, spoofed(other)))


def test_requests_without_a_verified_identity_never_reach_a_clients_bucket(
    rig: SecurityStack, tokens: dict[str, str]
) -> None:
    reader, writer = tokens["payments-reader"], tokens["payments-writer"]
    # Anonymous requests to a public route claiming to be the writer, more than its limit: allowed,
    # without any identity, out of the shared bucket ...
    spend(rig, ("GET", "/healthz"), None, 2 * LIMIT, spoofed("payments-writer"), client=None)
    # ... and requests the service denies never get to the limiter: no token, an invalid one.
    for credentials in (None, reader[:-4] + "AAAA"):
        for _ in range(LIMIT):
            answer = rig.send(*WRITE, credentials, spoofed("payments-writer"))
            assert answer.status == 401 and answer.reached_upstream == [], answer.body
    # The writer's own valid token on a public route carries no identity either (the service
    # removes the header there), so these take nothing from its bucket.
    spend(rig, ("GET", "/healthz"), writer, 2 * LIMIT, client=None)
    # The writer's bucket is still full.
    spend(rig, WRITE, writer, LIMIT, client="payments-writer")
    assert_rate_limited(rig.send(*WRITE, writer))
    # Once the reader is over its limit, an anonymous request naming it still gets through: it
    # takes no token from the reader's (empty) bucket.
    spend(rig, READ, reader, LIMIT, client="payments-reader")
    assert_rate_limited(rig.send(*READ, reader))
    spend(rig, ("GET", "/healthz"), None, 1, spoofed("payments-reader"), client=None)


def test_a_route_with_its_own_block_has_buckets_of_its_own(
    stack: SecurityStack, envoy_factory, upstream: UpstreamProcess, tokens: dict[str, str]
) -> None:
    """POST /transactions split off the Bearer route with a block of its own (limit 1): writing
    and reading are then counted apart, each per client."""
    if stack.mode == NATIVE:
        pytest.skip("native mode compiles its route table from the policy: no shipped Bearer route to split")

    def writes_apart(config: dict[str, Any]) -> None:
        routes = envoyconf.virtual_host(config)["routes"]
        bearer = next(r for r in routes if r["name"] == "bearer-jwt")
        writes = copy.deepcopy(bearer)
        writes["name"] = "bearer-jwt-writes"
        writes["match"]["prefix"] = "/transactions"
        writes["match"]["headers"].append({"name": ":method", "string_match": {"exact": "POST"}})
        writes["typed_per_filter_config"] = recipe(limit=1)["typed_per_filter_config"]
        routes.insert(routes.index(bearer), writes)

    rig = limited(stack, envoy_factory, upstream, writes_apart)
    try:
        reporting = tokens[OWN_CLIENT]
        token = stack.dev.token(OWN_CLIENT, "transactions/get transactions/post")
        spend(rig, WRITE, token, OWN_LIMIT, client=OWN_CLIENT)  # the route's own bucket for this client
        assert_rate_limited(rig.send(*WRITE, token))
        spend(rig, READ, reporting, OWN_LIMIT, client=OWN_CLIENT)  # the virtual host's: still full
        assert_rate_limited(rig.send(*READ, reporting))
        spend(rig, WRITE, tokens["payments-writer"], 1, client="payments-writer")  # limit=1 on writes
        assert_rate_limited(rig.send(*WRITE, tokens["payments-writer"]))
    finally:
        rig.close()
