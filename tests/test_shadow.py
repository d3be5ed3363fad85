"""The shadow policy: a candidate decided beside the serving policy, which always answers.

Through check.Checker (the pipeline both front doors run) with real policy files, the reloader
that follows them and real RS256 tokens; tests/e2e/test_shadow_policy_e2e.py runs it through Envoy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from authz_service.check import Checker
from authz_service.decision import Decision, Reason
from authz_service.metrics import Metrics
from authz_service.policy import load_policy_file, parse_policy
from authz_service.request import HttpRequest
from authz_service.response import Answer, Answers
from authz_service.shadow import LOGGER, ShadowPolicy, disagreement
from authz_service.tokencache import TokenCache
from authz_service.tokens import TokenVerifier

from .conftest import MemoryKeys, SigningKey

POLICY = """\
issuers:
  - user_pool_id: us-east-1_Test00001
routes:
  - name: create
    methods: [POST]
    path: /transactions
    scopes: [{scope}]
  - name: health
    path: /healthz
    public: true
"""
SERVING = POLICY.format(scope="transactions/post")
STRICTER = POLICY.format(scope="transactions/admin")  # the candidate: the token's scope no longer does
CREATE = parse_policy(SERVING, "p.yaml").routes[0]


def request(token: str | None, path: str = "/transactions", method: str = "POST") -> HttpRequest:
    authorization = (f"Bearer {token}",) if token else ()
    return HttpRequest(method, path, tuple(path[1:].split("/")), authorization, "rid-7", ())


def plain(answer: Answer, decision: Decision) -> Answer:
    return answer


class Stack:
    """The serving policy's Checker with a shadow of ``candidate`` (the file), as server.py wires them."""

    def __init__(self, tmp_path: Path, keys: MemoryKeys, candidate: str) -> None:
        (tmp_path / "policy.yaml").write_text(SERVING)
        self.shadow_file = tmp_path / "shadow.yaml"
        self.shadow_file.write_text(candidate)
        self.keys = keys
        self.metrics = Metrics(CollectorRegistry())
        self.policy = load_policy_file(tmp_path / "policy.yaml")
        self.verifier = TokenVerifier(keys, cache=TokenCache(100, 1 << 20, self.metrics))

    async def open(self) -> Checker:
        self.shadow = await ShadowPolicy.open(self.shadow_file, self.keys, self.metrics.shadow, leeway=60,
                                              cache_size=100, cache_bytes=1 << 20, watch="poll")
        return Checker(self, self.verifier, Answers("r"), self.metrics.per_check, shadow=self.shadow)

    def sample(self, name: str, **labels: str) -> float:
        self.metrics.per_check.flush()
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def disagreements(self, **labels: str) -> float:
        return self.sample("authz_shadow_disagreements_total", **labels)


def shadow_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [{k: v for k, v in vars(r).items() if k not in vars(logging.makeLogRecord({}))} | {"msg": r.getMessage()}
            for r in caplog.records if r.name == LOGGER]


TIGHTENED = {"route": "create", "decision": "allow", "reason": "allowed", "shadow_decision": "deny",
             "shadow_reason": "insufficient_scope"}


def test_a_disagreement_is_another_decision_or_another_reason() -> None:
    allow = Decision(True, Reason.ALLOWED, route=CREATE)
    deny_scope = Decision(False, Reason.INSUFFICIENT_SCOPE, "x", CREATE)
    assert disagreement(allow, Decision(True, Reason.ALLOWED, route=CREATE)) is None
    assert disagreement(deny_scope, Decision(False, Reason.INSUFFICIENT_SCOPE, "other text", CREATE)) is None
    assert disagreement(allow, deny_scope) == tuple(TIGHTENED.values())
    assert disagreement(deny_scope, Decision(False, Reason.MISSING_SCOPE, "x", CREATE)) == (
        "create", "deny", "insufficient_scope", "deny", "missing_scope")
    # A candidate that makes the route dry-run allows what is denied today, for the same reason.
    assert disagreement(deny_scope, Decision(True, Reason.INSUFFICIENT_SCOPE, "x", CREATE, dry_run=True)) == (
        "create", "deny", "insufficient_scope", "dry_run_deny", "insufficient_scope")
    # A dry-run candidate allows what it would deny: the answer is the same, the decision is not.
    assert disagreement(allow, Decision(True, Reason.INSUFFICIENT_SCOPE, "x", CREATE, dry_run=True)) == (
        "create", "allow", "allowed", "dry_run_deny", "insufficient_scope")


async def test_the_serving_policy_answers_and_the_disagreement_is_counted_and_logged(tmp_path, key_a: SigningKey,
                                                                                      caplog) -> None:
    stack = Stack(tmp_path, MemoryKeys(key_a), STRICTER)
    check = await stack.open()
    token = key_a.token()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        answer = await check.check(lambda raw: raw, request(token), plain)
    assert answer.allowed and answer.status == 200  # the serving policy's answer
    assert stack.disagreements(**TIGHTENED) == 1
    (line,) = shadow_lines(caplog)
    assert {k: line[k] for k in ("msg", "decision", "reason", "route", "client_id", "scopes_used", "request_id",
                                 "policy_sha256", "policy_version", "shadow_decision", "shadow_reason",
                                 "shadow_status", "shadow_route", "shadow_scopes_used", "shadow_policy_sha256",
                                 "suppressed_since_last")} == {
        "msg": "shadow disagreement", "decision": "allow", "reason": "allowed", "route": "create",
        "client_id": "client-a", "scopes_used": ["transactions/post"], "request_id": "rid-7",
        "policy_sha256": stack.policy.sha256, "policy_version": 1, "shadow_decision": "deny",
        "shadow_reason": "insufficient_scope", "shadow_status": 403, "shadow_route": "create",
        "shadow_scopes_used": [], "shadow_policy_sha256": stack.shadow.reloader.policy.sha256,
        "suppressed_since_last": 0}
    assert token.split(".")[2] not in json.dumps(line, default=str) and "Bearer" not in json.dumps(line, default=str)


async def test_lines_are_bounded_per_kind_of_disagreement_and_every_one_is_counted(tmp_path, key_a, caplog) -> None:
    stack = Stack(tmp_path, MemoryKeys(key_a), STRICTER)
    check = await stack.open()
    token = key_a.token()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(3):
            assert (await check.check(lambda raw: raw, request(token), plain)).allowed
        # Another kind: no token at all is missing_token in both (no disagreement) ...
        assert not (await check.check(lambda raw: raw, request(None), plain)).allowed
        # ... and a token without the scope is denied by both, for the same reason.
        other = key_a.token(scope="orders/read")
        assert (await check.check(lambda raw: raw, request(other), plain)).status == 403
    assert stack.disagreements(**TIGHTENED) == 3
    assert len(shadow_lines(caplog)) == 1  # the same disagreement again within LOG_INTERVAL: counted, not logged
    assert stack.sample("authz_check_decisions_total", decision="allow", reason="allowed", route="create",
                        status="200") == 3


async def test_the_shadow_reads_the_token_cache_of_its_own(tmp_path, key_a) -> None:
    """The service's cache metrics and new-token counts see each Check once, shadow or not."""
    stack = Stack(tmp_path, MemoryKeys(key_a), STRICTER)
    check = await stack.open()
    token = key_a.token()
    for _ in range(3):
        await check.check(lambda raw: raw, request(token), plain)
    assert stack.sample("authz_token_cache_lookups_total", result="hit") == 2
    assert stack.sample("authz_token_cache_lookups_total", result="miss") == 1
    assert stack.sample("authz_client_new_tokens_total", client="other") == 1


async def test_a_shadow_file_that_does_not_load_changes_nothing_until_it_does(tmp_path, key_a, caplog) -> None:
    stack = Stack(tmp_path, MemoryKeys(key_a), "routes: [unclosed\n")
    with caplog.at_level(logging.INFO):
        check = await stack.open()  # no exception: the service starts
    assert stack.shadow.reloader.current is None and stack.shadow.reloader.last_error
    assert stack.sample("authz_shadow_policy_reloads_total", result="error") == 1
    assert stack.sample("authz_shadow_policy_file_refused", sha256=stack.shadow.reloader.refused_sha256) == 1
    assert any(r.levelno == logging.ERROR and r.getMessage().startswith("shadow policy reload failed")
               for r in caplog.records)
    token = key_a.token()
    assert (await check.check(lambda raw: raw, request(token), plain)).allowed
    assert stack.disagreements(**TIGHTENED) == 0
    # The file fixed: it loads as a policy reload does, and is compared from the next Check on.
    stack.shadow_file.write_text(STRICTER)
    assert await stack.shadow.reloader.reload("SIGHUP")
    assert stack.sample("authz_shadow_policy_info", sha256=stack.shadow.reloader.policy.sha256) == 1
    assert stack.sample("authz_shadow_policy_file_refused", sha256="") == 0
    assert (await check.check(lambda raw: raw, request(token), plain)).allowed
    assert stack.disagreements(**TIGHTENED) == 1
    # Broken again: the previous candidate is still compared; the policy serving never noticed.
    stack.shadow_file.write_text("routes: [unclosed\n")
    assert not await stack.shadow.reloader.reload("SIGHUP")
    assert (await check.check(lambda raw: raw, request(token), plain)).allowed
    assert stack.disagreements(**TIGHTENED) == 2
    assert stack.sample("authz_policy_reloads_total", result="error") == 0


async def test_a_failing_shadow_decision_is_counted_never_answered(tmp_path, key_a, monkeypatch, caplog) -> None:
    stack = Stack(tmp_path, MemoryKeys(key_a), STRICTER)
    check = await stack.open()

    async def broken(token: str, policy) -> None:
        raise RuntimeError("a bug in the candidate's path")

    monkeypatch.setattr(stack.shadow.verifier, "verify_uncached", broken)
    answer = await check.check(lambda raw: raw, request(key_a.token()), plain)
    assert answer.allowed and answer.status == 200
    assert stack.disagreements(route="create", decision="allow", reason="allowed", shadow_decision="deny",
                               shadow_reason="internal_error") == 1


async def test_the_shadow_never_fetches_keys(tmp_path, key_a, key_b) -> None:
    """A Check never waits on the shadow's I/O: a kid the keys lack is refetched for the serving
    policy (its decision comes first), never for the candidate."""
    keys = MemoryKeys(key_a)
    stack = Stack(tmp_path, keys, STRICTER)
    check = await stack.open()
    unknown = request(key_b.token())
    answer = await check.check(lambda raw: raw, unknown, plain)
    assert answer.reason is Reason.UNKNOWN_KEY and len(keys.refetched) == 1  # the serving policy's refetch
    await stack.shadow.compare(unknown, Decision(True, Reason.ALLOWED, route=CREATE), stack.policy)
    assert len(keys.refetched) == 1
