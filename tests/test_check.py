"""check.Checker: the one Check pipeline every front door and tool runs, and its fail-closed rules."""

from __future__ import annotations

import logging

import pytest
from jwt.api_jwk import PyJWK
from prometheus_client import CollectorRegistry

from authz_service.check import Checker
from authz_service.decisionlog import LOGGER as DECISIONS
from authz_service.decision import Reason
from authz_service.metrics import Metrics
from authz_service.policy import Issuer, Policy, parse_policy
from authz_service.request import BadRequest, HttpRequest
from authz_service.response import Answer, Answers
from authz_service.tokencache import TokenCache
from authz_service.tokens import PolicyReloaded, TokenVerifier

from .conftest import MemoryKeys, SigningKey

POLICY = parse_policy("""
issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - name: health
    path: /healthz
    public: true
""", "check-test.yaml")


class Fixed:
    policy = POLICY


def request(path: str = "/healthz", method: str = "GET") -> HttpRequest:
    return HttpRequest(method, path, tuple(path[1:].split("/")), (), "rid-1", ())


def checker() -> tuple[Checker, Metrics]:
    metrics = Metrics(CollectorRegistry())
    return Checker(Fixed(), TokenVerifier(MemoryKeys()), Answers("r"), metrics.per_check), metrics


def counted(metrics: Metrics, reason: str, status: str) -> float:
    value = metrics.registry.get_sample_value(
        "authz_check_decisions_total", {"decision": "deny" if reason not in ("public", "allowed") else "allow",
                                        "reason": reason, "route": "health" if reason == "public" else "no_route",
                                        "status": status})
    return value or 0.0


def plain(answer: Answer, decision) -> Answer:
    return answer


async def test_a_request_goes_through_parse_decide_answer_render_and_is_counted():
    check, metrics = checker()
    answer = await check.check(lambda raw: raw, request(), plain)
    assert answer.allowed and answer.reason is Reason.PUBLIC and answer.status == 200
    assert counted(metrics, "public", "200") == 1
    assert metrics.registry.get_sample_value("authz_check_duration_seconds_count") == 1


async def test_an_unreadable_request_is_a_counted_400():
    check, metrics = checker()

    def parse(raw: object) -> HttpRequest:
        raise BadRequest("no HTTP attributes")

    answer = await check.check(parse, None, plain)
    assert (answer.allowed, answer.status, answer.reason) == (False, 400, Reason.BAD_REQUEST)
    assert '"error_description":"no HTTP attributes"' in answer.body
    assert counted(metrics, "bad_request", "400") == 1


@pytest.mark.parametrize("where", ["parse", "decide", "render"])
async def test_an_exception_anywhere_is_a_logged_and_counted_500(where, caplog):
    check, metrics = checker()

    def parse(raw: object) -> HttpRequest:
        if where == "parse":
            raise RuntimeError("parser bug")
        return request()

    async def decide(*args: object):
        raise RuntimeError("decision bug")

    if where == "decide":
        check.decide = decide
    rendered: list[Answer] = []

    def render(answer: Answer, decision) -> Answer:
        if where == "render" and answer.allowed:
            raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")
        rendered.append(answer)
        return answer

    with caplog.at_level(logging.INFO):
        answer = await check.check(parse, None, render)
    assert (answer.allowed, answer.status, answer.reason) == (False, 500, Reason.INTERNAL_ERROR)
    assert rendered == [answer]
    assert counted(metrics, "internal_error", "500") == 1
    assert counted(metrics, "public", "200") == 0, "what was counted is what was sent"
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    deny = [r for r in caplog.records if r.getMessage() == "deny"]
    assert len(deny) == 1 and deny[0].reason == "internal_error" and deny[0].name == DECISIONS


async def test_allows_are_not_logged_by_default(caplog):
    check, _ = checker()
    with caplog.at_level(logging.DEBUG):
        await check.check(lambda raw: raw, request(), plain)
    assert [r for r in caplog.records if r.name.startswith("authz_service")] == []


async def test_the_same_decision_reuses_one_answer_object():
    """Answers are cached, so front doors render each distinct answer once (Answer.rendered)."""
    check, _ = checker()
    first = await check.check(lambda raw: raw, request("/nope"), plain)
    second = await check.check(lambda raw: raw, request("/nope"), plain)
    assert first is second and first.status == 403


# --- a policy loaded while a Check waits on the issuer's keys -------------------------------------------

SERVING = """
issuers:
  - user_pool_id: us-east-1_Test00001
routes:
  - name: post
    path: /x
    scopes: [transactions/post]
"""
RELOADED = {
    "client deny-listed": (SERVING + "deny:\n  client_ids: [client-a]\n", Reason.DENY_LISTED, "client is revoked"),
    "route tightened": (SERVING.replace("[transactions/post]", "[admin/all]"), Reason.INSUFFICIENT_SCOPE,
                        "token lacks a required scope"),
    "route removed": (SERVING.replace("path: /x", "path: /y"), Reason.NO_ROUTE, "no route matches this request"),
}


class Serving:
    """The policy in force (PolicyReloader's role), counting how often a Check reads it."""

    def __init__(self, policy: Policy) -> None:
        self.current = policy
        self.reads = 0

    @property
    def policy(self) -> Policy:
        self.reads += 1
        return self.current


class ReloadedDuringFetch(MemoryKeys):
    """The issuer's re-fetch for an unknown kid, during whose await ``reloaded`` comes into force, as
    the service's reloader swaps it in while the fetch waits on the network."""

    def __init__(self, serving: Serving, reloaded: Policy | None, key: SigningKey, late: SigningKey) -> None:
        super().__init__(key)
        self.serving, self.reloaded = serving, reloaded
        self.after_refetch = {**self.keys, late.kid: PyJWK(late.jwk())}

    async def refetch(self, issuer: Issuer) -> None:
        await super().refetch(issuer)
        if self.reloaded is not None:
            self.serving.current = self.reloaded


def waiting_checker(key: SigningKey, late: SigningKey, reloaded: Policy | None) -> tuple[Checker, Serving, Metrics]:
    serving = Serving(parse_policy(SERVING, "serving.yaml"))
    metrics = Metrics(CollectorRegistry())
    keys = ReloadedDuringFetch(serving, reloaded, key, late)
    verifier = TokenVerifier(keys, cache=TokenCache(100, 1 << 20), policies=serving)
    return Checker(serving, verifier, Answers("r"), metrics.per_check), serving, metrics


def posted(token: str) -> HttpRequest:
    return HttpRequest("POST", "/x", ("x",), (f"Bearer {token}",), "rid-1", ())


@pytest.mark.parametrize("change", RELOADED)
async def test_a_check_that_waited_on_keys_is_decided_with_the_policy_loaded_meanwhile(key_a, key_b, change, caplog):
    text, reason, description = RELOADED[change]
    reloaded = parse_policy(text, "reloaded.yaml")
    check, serving, metrics = waiting_checker(key_a, key_b, reloaded)
    with caplog.at_level(logging.INFO):
        answer = await check.check(lambda raw: raw, posted(key_b.token()), plain)  # kid-b: not fetched yet
    assert (answer.allowed, answer.reason) == (False, reason)
    assert f'"error_description":"{description}"' in answer.body
    # Counted and logged as decided: under the policy in force when it was answered.
    assert metrics.registry.get_sample_value(
        "authz_check_decisions_total", {"decision": "deny", "reason": reason.value,
                                        "route": "post" if reason is not Reason.NO_ROUTE else "no_route",
                                        "status": str(answer.status)}) == 1
    (line,) = [r for r in caplog.records if r.getMessage() == "deny"]
    assert line.policy_sha256 == reloaded.sha256


async def test_only_a_check_that_waited_on_keys_reads_the_policy_again(key_a, key_b):
    """The check costs a warm Check nothing: one read of the policy in force per Check, and a second
    one only after a wait on the issuer's keys (whose answer is the serving policy's when nothing loaded)."""
    check, serving, _ = waiting_checker(key_a, key_b, None)
    decide_calls = 0
    decide = check.decide

    async def counted_decide(*args):
        nonlocal decide_calls
        decide_calls += 1
        return await decide(*args)

    check.decide = counted_decide
    waited = await check.check(lambda raw: raw, posted(key_b.token()), plain)
    assert (waited.allowed, serving.reads, decide_calls) == (True, 2, 1)
    for token in (key_b.token(), key_a.token()):  # a known kid, then the cached token: no wait
        first = serving.reads
        assert (await check.check(lambda raw: raw, posted(token), plain)).allowed
        assert serving.reads == first + 1
    assert decide_calls == 3


async def test_the_verifier_says_when_the_policy_changed_during_its_wait(key_a, key_b):
    """TokenVerifier raises PolicyReloaded (the Checker decides again) rather than finish with a
    policy no longer in force; without a source of the policy in force (the tools) it never does."""
    serving = Serving(parse_policy(SERVING, "serving.yaml"))
    reloaded = parse_policy(SERVING + "deny:\n  client_ids: [client-b]\n", "reloaded.yaml")
    started = serving.current
    keys = ReloadedDuringFetch(serving, reloaded, key_a, key_b)
    with pytest.raises(PolicyReloaded):
        await TokenVerifier(keys, policies=serving).verify(key_b.token(), started)
    keys = ReloadedDuringFetch(serving, reloaded, key_a, key_b)
    assert (await TokenVerifier(keys).verify(key_b.token(), started)).client_id == "client-a"
