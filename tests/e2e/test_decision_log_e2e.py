"""The decision log and the per-client metrics through a real Envoy, in both ext_authz modes.

With ``--decision-log all`` every decision is one JSON line naming the caller (client id, the
scopes that counted, the route, the policy), allowed M2M calls included; never the token or the
query. The per-client series carry only the policy's allow-listed client ids, every other client
folded into ``other``. The default (denials only) is checked by test_default_logs_denials_only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from .harness import UpstreamProcess, wait_for
from .security_stack import SecurityStack, logged, serving, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e

DECISIONS = "authz_service.decisions"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess, module_envoy_factory,
          mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("decision-log"), upstream, module_envoy_factory,
                             "--decision-log", "all", "--new-tokens-alert-per-minute", "3.5", mode=mode)
    yield s
    stop_security_stack(s)


def envoy_request_id(stack: SecurityStack) -> str:
    """The request id Envoy made for the last request sent (its access log; the service logs the same)."""
    entries = wait_for(lambda: (lambda log: log if len(log) >= stack.sent else None)(stack.envoy.access_log()),
                       30, f"Envoy's access log of every request answered ({stack.sent})")
    return entries[-1]["request_id"]


def lines_of(stack: SecurityStack, request_id: str) -> list[dict]:
    """Every log line of the service about one request (any logger), once its decision is logged."""
    wait_for(lambda: logged(stack, logger=DECISIONS, request_id=request_id), 10, "the decision log line")
    return logged(stack, request_id=request_id)


def test_an_allowed_call_is_logged_with_its_caller(stack: SecurityStack) -> None:
    token = stack.fake.token("payments-writer", "transactions/post admin/read")
    answer = stack.send("POST", "/transactions?access_token=hunter2", token)
    assert answer.status == 200, answer.body
    request_id = answer.reached_upstream[0]["headers"]["x-request-id"][0]
    lines = lines_of(stack, request_id)
    assert len(lines) == 1, lines  # one line per decision
    entry = lines[0]
    assert {key: entry.get(key) for key in ("level", "msg", "decision", "reason", "status", "route", "client_id",
                                            "scopes_used", "method", "path", "policy_sha256", "policy_version")} == {
        "level": "info", "msg": "allow", "decision": "allow", "reason": "allowed", "status": 200,
        "route": "create-transaction", "client_id": "payments-writer", "scopes_used": ["transactions/post"],
        "method": "POST", "path": "/transactions", "policy_sha256": serving(stack)["sha256"], "policy_version": 1}
    assert entry["ts"].endswith("Z")
    text = json.dumps(entry)
    assert token not in text and token.split(".")[2] not in text and "hunter2" not in text


def test_a_denial_is_one_line_and_names_the_reason(stack: SecurityStack) -> None:
    reader = stack.fake.token("payments-reader", "transactions/get")
    answer = stack.send("POST", "/transactions", reader)
    assert answer.status == 403 and answer.reached_upstream == []
    lines = lines_of(stack, envoy_request_id(stack))
    assert len(lines) == 1, lines
    entry = lines[0]
    assert (entry["msg"], entry["decision"], entry["reason"], entry["status"], entry["client_id"],
            entry["scopes_used"]) == ("deny", "deny", "insufficient_scope", 403, "payments-reader", [])
    assert reader not in json.dumps(entry)


def test_a_call_without_a_verified_token_has_no_client(stack: SecurityStack) -> None:
    assert stack.send("GET", "/healthz").status == 200
    (entry,) = lines_of(stack, envoy_request_id(stack))
    assert (entry["decision"], entry["reason"], entry["route"], entry["client_id"], entry["scopes_used"]) == (
        "allow", "public", "healthz", None, [])
    assert stack.send("POST", "/transactions").status == 401
    (entry,) = lines_of(stack, envoy_request_id(stack))
    assert (entry["decision"], entry["reason"], entry["client_id"]) == ("deny", "missing_token", None)


def client_decisions(stack: SecurityStack, client: str, decision: str) -> float:
    return stack.service.sample("authz_client_decisions_total", client=client, decision=decision)


def test_decisions_per_client_name_only_the_policys_clients(stack: SecurityStack) -> None:
    """payments-writer is in the policy's client_ids: a series of its own. The dev issuer's
    "reporting" client is in no allow-list: counted under "other", never by its id."""
    before = {(client, decision): client_decisions(stack, client, decision)
              for client in ("payments-writer", "other") for decision in ("allow", "deny")}
    assert stack.send("POST", "/transactions", stack.fake.token("payments-writer")).status == 200
    assert stack.send("POST", "/transactions", stack.dev.token("reporting")).status == 200
    assert stack.send("GET", "/admin/report", stack.dev.token("reporting")).status == 403
    after = {key: client_decisions(stack, *key) for key in before}
    assert {key: after[key] - before[key] for key in before} == {
        ("payments-writer", "allow"): 1, ("payments-writer", "deny"): 0, ("other", "allow"): 1, ("other", "deny"): 1}
    assert "reporting" not in stack.service.metrics()


def test_the_apps_minting_threshold_is_exported_for_the_alert(stack: SecurityStack) -> None:
    """AuthzClientMintingTokens compares with the threshold each app's service exports."""
    assert stack.service.sample("authz_client_new_tokens_alert_per_minute") == 3.5


def test_new_tokens_are_counted_per_client_once_each(stack: SecurityStack) -> None:
    """A client that reuses its token counts one new token; one that mints a token per call, one per call."""
    before = stack.service.sample("authz_client_new_tokens_total", client="payments-writer")
    reused = stack.fake.token("payments-writer")
    for _ in range(3):
        assert stack.send("POST", "/transactions", reused).status == 200
    assert stack.service.sample("authz_client_new_tokens_total", client="payments-writer") == before + 1
    for _ in range(3):
        assert stack.send("POST", "/transactions", stack.fake.token("payments-writer")).status == 200
    assert stack.service.sample("authz_client_new_tokens_total", client="payments-writer") == before + 4
