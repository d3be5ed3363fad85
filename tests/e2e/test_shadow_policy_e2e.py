"""The shadow policy through a real Envoy, in both ext_authz modes.

``serve --shadow-policy FILE``: every Check is decided again with the candidate policy; the answer
Envoy gets, and what reaches the app, stay the serving policy's; a Check the candidate decides
otherwise is counted by route and reasons and logged with the decision log's fields (never the
token or the query). The candidate's file is followed as the policy's is (a ConfigMap-style swap),
and a candidate that does not load (missing at start-up, broken later) changes nothing else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import pytest

from .harness import UpstreamProcess, wait_for
from .security_stack import ROUTES, SecurityStack, logged, policy_text, start_security_stack, stop_security_stack
from .stack import PolicyDir

pytestmark = pytest.mark.e2e

SHADOW = "authz_service.shadow"
# The candidate: creating a transaction needs admin/all instead of transactions/post.
TIGHTER = ROUTES.format().replace("scopes: [transactions/post]", "scopes: [admin/all]")
READS_TIGHTER = ROUTES.format().replace("scopes: [transactions/get]", "scopes: [admin/all]")
READ_TIGHTENED = {"route": "get-transaction", "decision": "allow", "reason": "allowed", "shadow_decision": "deny",
                  "shadow_reason": "insufficient_scope"}
TIGHTENED = {"route": "create-transaction", "decision": "allow", "reason": "allowed", "shadow_decision": "deny",
             "shadow_reason": "insufficient_scope"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess, module_envoy_factory,
          mode: str) -> Iterator[SecurityStack]:
    work = tmp_path_factory.mktemp("shadow-policy")
    shadow = PolicyDir(work / "shadow")  # empty: no candidate file yet when the service starts
    s = start_security_stack(work, upstream, module_envoy_factory, "--shadow-policy", str(shadow.path), mode=mode)
    s.shadow = shadow  # type: ignore[attr-defined]
    s.started = (s.service.readyz(), s.service.sample("authz_shadow_policy_reloads_total", result="error"))  # type: ignore[attr-defined]
    yield s
    stop_security_stack(s)


def shadow_state(stack: SecurityStack) -> dict:
    """The candidate as /readyz shows it (sha256, last_reload_error, refused_sha256)."""
    return stack.service.readyz()[1]["shadow_policy"]


def disagreements(stack: SecurityStack, **labels: str) -> float:
    return stack.service.sample("authz_shadow_disagreements_total", **labels)


def write_shadow(stack: SecurityStack, text: str) -> None:
    """Write a candidate and wait until the service compares it, or has refused it."""
    errors = stack.service.sample("authz_shadow_policy_reloads_total", result="error")
    want = hashlib.sha256(text.encode()).hexdigest()
    stack.shadow.write(text)  # type: ignore[attr-defined]
    stack.service.process.wait_until(
        lambda: shadow_state(stack)["sha256"] == want
        or stack.service.sample("authz_shadow_policy_reloads_total", result="error") > errors,
        30, "the shadow policy's reload")


def candidate(stack: SecurityStack, routes: str) -> str:
    return policy_text(stack.fake, stack.dev, routes, routes="")


def test_a_missing_candidate_at_start_up_is_counted_and_the_service_serves(stack: SecurityStack) -> None:
    """The fixture's service started without the candidate's file: ready all the same, the error
    counted and shown (naming the file), nothing compared."""
    (status, body), errors = stack.started  # type: ignore[attr-defined]
    assert status == 200 and body["shadow_policy"]["sha256"] is None and body["policy"]["sha256"]
    assert str(stack.shadow.path) in body["shadow_policy"]["last_reload_error"]  # type: ignore[attr-defined]
    assert errors == 1


def test_a_disagreement_is_counted_and_logged_and_the_serving_policy_answers(stack: SecurityStack) -> None:
    write_shadow(stack, candidate(stack, TIGHTER))
    before = disagreements(stack, **TIGHTENED)
    token = stack.fake.token("payments-writer", "transactions/post")
    answer = stack.send("POST", "/transactions?access_token=hunter2", token)
    assert answer.status == 200, answer.body  # the serving policy's answer: the app got the request
    request_id = answer.reached_upstream[0]["headers"]["x-request-id"][0]
    assert disagreements(stack, **TIGHTENED) == before + 1
    (line,) = wait_for(lambda: logged(stack, logger=SHADOW, request_id=request_id), 10, "the disagreement line")
    assert {k: line.get(k) for k in ("msg", "decision", "reason", "route", "client_id", "scopes_used", "method",
                                     "path", "policy_version", "shadow_decision", "shadow_reason", "shadow_status",
                                     "shadow_route", "shadow_policy_sha256")} == {
        "msg": "shadow disagreement", "decision": "allow", "reason": "allowed", "route": "create-transaction",
        "client_id": "payments-writer", "scopes_used": ["transactions/post"], "method": "POST",
        "path": "/transactions", "policy_version": 1, "shadow_decision": "deny",
        "shadow_reason": "insufficient_scope", "shadow_status": 403, "shadow_route": "create-transaction",
        "shadow_policy_sha256": shadow_state(stack)["sha256"]}
    assert line["policy_sha256"] == stack.service.readyz()[1]["policy"]["sha256"] and line["ts"].endswith("Z")
    text = json.dumps(line)
    assert token.split(".")[2] not in text and "hunter2" not in text


def test_checks_both_decide_alike_are_not_disagreements(stack: SecurityStack) -> None:
    write_shadow(stack, candidate(stack, TIGHTER))
    before = stack.service.total("authz_shadow_disagreements_total")
    assert stack.send("GET", "/healthz").status == 200
    assert stack.send("POST", "/transactions").status == 401
    reader = stack.fake.token("payments-reader", "transactions/get")
    assert stack.send("POST", "/transactions", reader).status == 403
    assert stack.send("GET", "/transactions/7", reader).status == 200
    assert stack.service.total("authz_shadow_disagreements_total") == before


def test_a_candidate_that_breaks_changes_nothing_and_the_previous_one_is_still_compared(
        stack: SecurityStack) -> None:
    """(Its disagreements are of a kind of their own, on reading a transaction: the line of the
    test above is logged whichever test runs first.)"""
    write_shadow(stack, candidate(stack, READS_TIGHTER))
    compared = shadow_state(stack)["sha256"]
    errors = stack.service.sample("authz_shadow_policy_reloads_total", result="error")
    write_shadow(stack, candidate(stack, READS_TIGHTER) + "  - name: [broken\n")
    assert stack.service.sample("authz_shadow_policy_reloads_total", result="error") == errors + 1
    status, body = stack.service.readyz()
    assert status == 200 and body["shadow_policy"]["sha256"] == compared and body["shadow_policy"]["last_reload_error"]
    assert body["policy"]["last_reload_error"] is None
    assert stack.service.sample("authz_shadow_policy_file_refused", sha256=body["shadow_policy"]["refused_sha256"]) == 1
    before = disagreements(stack, **READ_TIGHTENED)
    reader = stack.fake.token("payments-reader", "transactions/get")
    assert stack.send("GET", "/transactions/7", reader).status == 200
    assert disagreements(stack, **READ_TIGHTENED) == before + 1
    # The candidate fixed (here: the serving policy itself): nothing to disagree on any more.
    write_shadow(stack, candidate(stack, ROUTES.format()))
    assert shadow_state(stack)["last_reload_error"] is None
    assert stack.service.sample("authz_shadow_policy_file_refused", sha256="") == 0
    assert stack.send("GET", "/transactions/7", reader).status == 200
    assert disagreements(stack, **READ_TIGHTENED) == before + 1
