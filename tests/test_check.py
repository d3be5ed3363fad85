"""check.Checker: the one Check pipeline every front door and tool runs, and its fail-closed rules."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from authz_service.check import Checker
from authz_service.decisionlog import LOGGER as DECISIONS
from authz_service.decision import Reason
from authz_service.metrics import Metrics
from authz_service.policy import parse_policy
from authz_service.request import BadRequest, HttpRequest
from authz_service.response import Answer, Answers
from authz_service.tokens import TokenVerifier

from .conftest import MemoryKeys

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
