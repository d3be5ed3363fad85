"""What the product remembers between requests, attacked through a real Envoy in every mode that keeps
state: gRPC and HTTP ext_authz (the service's verified-token cache) and native mode's xDS form (the
service's cache, plus Envoy's own: jwt_authn's verified-token cache and the listener the service
rewrites at each policy change).

Every test first makes both caches hold a token (two allowed requests: the second one a hit), then
attacks what they remember:

* the cached token for another route, another method, a path that reads as another route;
* the cached token's header and payload with another signature, and the token with bytes added;
* a policy change while it is cached (a tightened route, a claim condition it does not meet, a
  deny-listed jti or client, its client taken off the issuer's list, its issuer removed): refused on
  the next request, and served again once the change is undone;
* a request waiting on the issuer's keys (a kid not fetched yet) while a policy deny-listing its
  client loads: answered under the new policy once the keys arrive;
* an HTTP/2 connection opened before a deny-list entry, by a client that ignores GOAWAY: at most one
  more answer under the old policy, as an HTTP/1.1 keep-alive connection (native mode drains the old
  listener's connections);
* its expiry (``--leeway 2``): no answer 200 for a request sent once exp plus the leeway (plus the
  whole second Envoy's clock counts in) has passed.

What the other suites pin already is not repeated here: retired keys (test_issuer_faults_e2e.py,
test_native_keys_e2e.py), the unknown-kid re-fetch flood (test_issuer_faults_e2e.py), refused and
half-written policy files (test_reload_hazards_e2e.py, test_native_xds_e2e.py), the shadow policy
(test_shadow_policy_e2e.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import jwt
import pytest

from .fake_issuer import rsa_key
from .harness import MODES, NATIVE_XDS, Http2Connection, UpstreamProcess, wait_for
from .security_stack import (ROUTES, Answer, SecurityStack, listeners_taken_up, policy_text, serve, serving,
                             start_security_stack, start_xds_security_stack, stop_security_stack, wait_for_listener)

pytestmark = pytest.mark.e2e
STATEFUL_MODES = (*MODES, NATIVE_XDS)
LEEWAY = 2  # seconds (native mode's least): a token's expiry is seen within a few seconds


@pytest.fixture(scope="module", params=STATEFUL_MODES, ids=[f"{m}-mode" for m in STATEFUL_MODES])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory) -> Iterator[SecurityStack]:
    work = tmp_path_factory.mktemp("state")
    if request.param == NATIVE_XDS:
        s = start_xds_security_stack(work, upstream, module_envoy_factory, "--leeway", str(LEEWAY))
    else:
        s = start_security_stack(work, upstream, module_envoy_factory, "--leeway", str(LEEWAY), mode=request.param)
    yield s
    stop_security_stack(s)


@pytest.fixture
def s(stack: SecurityStack) -> Iterator[SecurityStack]:
    """The module's stack on its original policy, whatever the test before it left."""
    switch(stack, original(stack))
    yield stack


def original(s: SecurityStack) -> str:
    return policy_text(s.fake, s.dev)


def switch(s: SecurityStack, text: str) -> None:
    """Serve ``text`` and, in native mode, wait until Envoy runs its listener (SecurityStack.serve_policy);
    then until the service is ready."""
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    if serving(s)["sha256"] != sha256:
        s.serve_policy(text, lambda: serving(s)["sha256"] == sha256)
    # An issuer added back has no keys until fetched (its tokens: 503 meanwhile).
    s.service.process.wait_until(lambda: s.service.readyz()[0] == 200, 30, "the service ready")


def cached(s: SecurityStack, method: str = "POST", path: str = "/transactions", **claims) -> str:
    """A token of the fake issuer, allowed twice on ``method path``: the second time from the caches."""
    token = s.fake.token(**claims)
    for _ in range(2):
        answer = s.send(method, path, token)
        assert answer.status == 200 and len(answer.reached_upstream) == 1, answer.body
    return token


def refused(answer: Answer, status: int, description: str) -> None:
    assert (answer.status, answer.description, answer.reached_upstream) == (status, description, []), answer.body


def jti_of(token: str) -> str:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# --- a cached token is decided per request ------------------------------------------------------------


def test_a_cached_token_is_decided_again_for_every_route_method_and_path_reading(s: SecurityStack) -> None:
    token = cached(s)  # transactions/post only
    refused(s.send("GET", "/transactions/1", token), 403, "token lacks a required scope")
    refused(s.send("PUT", "/transactions", token), 403, "no route matches this request")
    refused(s.send("POST", "/admin/users", token), 403, "token lacks a required scope")
    refused(s.send("GET", "/admin/", token), 403, "token lacks a required scope")  # the route of /admin too
    assert s.send("POST", "/transactions", token).status == 200


def test_another_signature_over_a_cached_tokens_header_and_payload_is_refused(s: SecurityStack) -> None:
    token = cached(s)
    signing_input = token.rsplit(".", 1)[0]
    forged_by_attacker = jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(), rsa_key("attacker"))
    another_genuine = s.fake.token().rsplit(".", 1)[1]  # the issuer's signature of another token
    for signature in (b64(forged_by_attacker), another_genuine):
        refused(s.send("POST", "/transactions", f"{signing_input}.{signature}"), 401, "token is not valid")
    assert s.send("POST", "/transactions", token).status == 200  # the cached token itself is untouched


@pytest.mark.parametrize(("presented", "status", "description"), [
    (lambda t: t + "A", 401, "token is not valid"),  # canonical base64url: a 257-byte signature
    (lambda t: t + "=", 401, "malformed token"),
    (lambda t: t + ".", 401, "malformed token"),
    (lambda t: t + ".AAAA", 401, "malformed token"),
    (lambda t: t + " junk", 400, "malformed Bearer credentials (one token, no spaces)"),
    (lambda t: t + ",Bearer " + t, 400, "more than one Authorization value"),
    (lambda t: " " + t, 400, "malformed Bearer credentials (one token, no spaces)"),
], ids=["char", "padding", "dot", "segment", "second-word", "second-credential", "two-spaces"])
def test_a_cached_token_with_bytes_added_is_refused(s: SecurityStack, presented: Callable[[str], str], status: int,
                                                    description: str) -> None:
    token = cached(s)
    refused(s.send("POST", "/transactions", presented(token)), status, description)


# --- a policy change applies to a cached token at once -------------------------------------------------


def tightened(s: SecurityStack, token: str) -> str:
    return policy_text(s.fake, s.dev, routes=ROUTES.replace("scopes: [transactions/post]",
                                                            "scopes: [transactions/admin]"))


def claim_required(s: SecurityStack, token: str) -> str:
    # The cached entry holds no custom claim (the policy named none): it must be read again.
    assert ROUTES.count("scopes: [transactions/post]\n") == 1
    return policy_text(s.fake, s.dev, routes=ROUTES.replace("scopes: [transactions/post]\n",
                                                            "scopes: [transactions/post]\n"
                                                            "    claims:\n      \"custom:tenant\": acme\n"))


def jti_denied(s: SecurityStack, token: str) -> str:
    return original(s) + f"deny:\n  jtis: [{jti_of(token)}]\n"


def client_denied(s: SecurityStack, token: str) -> str:
    return original(s) + "deny:\n  client_ids: [payments-writer]\n"


def client_off_the_issuers_list(s: SecurityStack, token: str) -> str:
    text = original(s)
    assert text.count("client_ids: [payments-writer, payments-reader]") == 1
    return text.replace("client_ids: [payments-writer, payments-reader]", "client_ids: [payments-reader]")


def issuer_removed(s: SecurityStack, token: str) -> str:
    text = original(s)
    block = (f"  - user_pool_id: {s.fake.pool}\n    issuer: {s.fake.issuer}\n    jwks_uri: {s.fake.jwks_uri}\n"
             "    client_ids: [payments-writer, payments-reader]\n")
    assert text.count(block) == 1
    return text.replace(block, "")


@pytest.mark.parametrize(("change", "status", "description"), [
    (tightened, 403, "token lacks a required scope"),
    (claim_required, 403, "token lacks a required claim: custom:tenant"),
    (jti_denied, 401, "token is revoked"),
    (client_denied, 401, "client is revoked"),
    (client_off_the_issuers_list, 401, "client is not allowed"),
    (issuer_removed, 401, "token is not valid"),
], ids=["route-tightened", "claim-required", "jti-deny-listed", "client-deny-listed", "client-off-issuer-list", "issuer-removed"])
def test_a_policy_change_applies_to_a_cached_token_on_the_next_request_and_its_undoing_too(
        s: SecurityStack, change: Callable[[SecurityStack, str], str], status: int, description: str) -> None:
    token = cached(s)
    other = cached(s, client_id="payments-reader")  # another client's token, for the deny list's reach
    switch(s, change(s, token))
    refused(s.send("POST", "/transactions", token), status, description)
    refused(s.send("POST", "/transactions", token), status, description)  # and again: no allow was kept
    if change in (jti_denied, client_denied):
        assert s.send("POST", "/transactions", other).status == 200  # the deny list names this token only
    switch(s, original(s))
    assert s.send("POST", "/transactions", token).status == 200  # nor was the refusal kept


def test_an_http2_connection_opened_before_a_deny_list_entry_gets_at_most_one_more_answer(s: SecurityStack) -> None:
    """Native mode: the connection belongs to the old listener, which Envoy drains. A client that goes
    on opening streams after Envoy's GOAWAY must not be served under the old policy meanwhile (it
    was, for Envoy's default 5 s grace: hundreds of allowed requests with the revoked token)."""
    token = cached(s)
    credentials = [("authorization", f"Bearer {token}")]
    with Http2Connection(s.envoy.listener_port) as connection:
        assert connection.request("POST", "/transactions", credentials) == 200
        switch(s, jti_denied(s, token))
        statuses = [connection.request("POST", "/transactions", credentials) for _ in range(20)]
    assert statuses.count(200) <= 1, statuses
    refused(s.send("POST", "/transactions", token), 401, "token is revoked")  # a new connection


# --- a policy loaded while a Check waits on the issuer -----------------------------------------------


def test_a_check_waiting_on_a_key_fetch_is_decided_by_the_policy_loaded_meanwhile(s: SecurityStack) -> None:
    """A token signed with a key the service has not fetched yet waits on the issuer's JWKS (at most
    --jwks-timeout); a policy that deny-lists its client loads meanwhile. It must get the new policy's
    answer when the keys arrive, not the old policy's allow (it was allowed)."""
    fake = s.fake
    fake.keys["kid-late"] = rsa_key("kid-late")  # published, not fetched yet: an unknown kid to the service
    token = fake.token(kid="kid-late")
    taken_up = listeners_taken_up(s.envoy) if s.mode == NATIVE_XDS else 0
    denying = client_denied(s, token)
    fake.hold()
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            def sent_and_waiting() -> Future[Answer] | None:
                """The request in flight once its Check waits on the held fetch; None when it was
                answered first (the issuer's unknown-kid cool-down had not run out yet)."""
                answer = pool.submit(s.send, "POST", "/transactions", token)
                wait_for(lambda: fake.held.is_set() or answer.done(), 30, "the request answered or fetching")
                if not answer.done():
                    return answer
                refused(answer.result(), 401, "token is not valid")  # the kid unknown, no fetch: retried
                return None

            waiting = wait_for(sent_and_waiting, 60, "a Check waiting on the issuer's JWKS", poll=0.2)
            serve(s, denying)  # the service serves the new policy (its sha256 in /readyz) ...
            assert not waiting.done(), "the Check must still be waiting on the key fetch"
            fake.release()  # ... before the keys arrive
            answer = waiting.result(timeout=60)
        refused(answer, 401, "client is revoked")
        if s.mode == NATIVE_XDS:
            wait_for_listener(s.envoy, hashlib.sha256(denying.encode()).hexdigest(), taken_up)
        refused(s.send("POST", "/transactions", token), 401, "client is revoked")
    finally:
        fake.release()
        del fake.keys["kid-late"]


# --- expiry --------------------------------------------------------------------------------------------


def test_a_cached_token_is_refused_once_it_expired_with_the_leeway(s: SecurityStack) -> None:
    """Answers are sent until the first 401; none sent after exp + leeway + 1 s may be 200 (the second:
    Envoy counts whole seconds, the service fractions)."""
    exp = int(time.time()) + 5
    token = cached(s, exp=exp)
    answers: list[tuple[float, Answer]] = []

    def until_refused() -> Answer | None:
        sent = time.time()
        answer = s.send("POST", "/transactions", token)
        answers.append((sent, answer))
        return answer if answer.status != 200 else None

    answer = wait_for(until_refused, 60, "the cached token refused once expired", poll=0.2)
    refused(answer, 401, "token expired")
    late = [(round(sent - exp, 2), a.status) for sent, a in answers if sent >= exp + LEEWAY + 1 and a.status == 200]
    assert late == [], f"allowed after exp + leeway (seconds after exp, status): {late}"
    refused(s.send("POST", "/transactions", token), 401, "token expired")
