"""The decision log: which decisions get a line in each mode, what a line holds, and what it never holds."""

from __future__ import annotations

import json
import logging
import re

import pytest

from authz_service import logs
from authz_service.claims import Claims
from authz_service.decision import Decision, Reason
from authz_service.decisionlog import LOGGER, DecisionLog, DecisionLogMode
from authz_service.policy import parse_policy
from authz_service.request import HttpRequest

POLICY = parse_policy("""
issuers:
  - user_pool_id: us-east-1_Abc123
routes:
  - name: export
    path: /export
    scopes: [tx/read, tx/admin]
    all_scopes: [tx/export]
  - name: health
    path: /healthz
    public: true
""", "decision-log-test.yaml")
EXPORT, HEALTH = POLICY.routes
TOKEN = "eyJTOKENHEADER.eyJTOKENPAYLOAD.TOKENSIGNATURE"
CLAIMS = Claims(issuer="https://issuer", client_id="client-a", sub="sub-1",
                scopes=frozenset({"tx/read", "tx/export", "unrelated"}), scope_text="tx/read tx/export unrelated",
                exp=2_000_000_000, kid="kid-a")
REQUEST = HttpRequest(method="GET", path="/export", segments=("export",), authorization=(f"Bearer {TOKEN}",),
                      request_id="rid-1", spoofed_identity_headers=())
ALLOW = Decision(True, Reason.ALLOWED, route=EXPORT, claims=CLAIMS)
DENY = Decision(False, Reason.INSUFFICIENT_SCOPE, "token lacks a required scope", EXPORT, CLAIMS)
DRY_RUN = Decision(True, Reason.MISSING_SCOPE, "token lacks scope tx/export", EXPORT, CLAIMS, dry_run=True)
PUBLIC = Decision(True, Reason.PUBLIC, route=HEALTH)


def lines(caplog: pytest.LogCaptureFixture, decision_log: DecisionLog, *decisions: Decision) -> list[str]:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for decision in decisions:
            decision_log.record(decision, REQUEST, POLICY)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize(("mode", "logged"), [
    (DecisionLogMode.DENY, ["deny", "dry-run deny"]),
    (DecisionLogMode.ALL, ["allow", "deny", "dry-run deny", "allow"]),
    (DecisionLogMode.OFF, []),
])
def test_each_mode_logs_its_decisions_one_line_each(caplog, mode, logged):
    assert lines(caplog, DecisionLog(mode), ALLOW, DENY, DRY_RUN, PUBLIC) == logged


def test_sampled_logs_every_denial_and_the_allows_its_draws_select(caplog):
    draws = iter([0.5, 0.1, 0.2, 0.05])  # one draw per allow; below the rate: logged
    sampled = DecisionLog(DecisionLogMode.SAMPLED, 0.25, draw=lambda: next(draws))
    assert lines(caplog, sampled, ALLOW, DENY, ALLOW, DRY_RUN, ALLOW, ALLOW) == ["deny", "allow", "dry-run deny",
                                                                                "allow", "allow"]
    assert next(draws, None) is None, "exactly one draw per allow, none per denial"


def test_no_draw_unless_sampling(caplog):
    def draw() -> float:
        raise AssertionError("drawn")

    assert lines(caplog, DecisionLog(DecisionLogMode.ALL, 0.5, draw=draw), ALLOW) == ["allow"]
    caplog.clear()
    assert lines(caplog, DecisionLog(DecisionLogMode.DENY, 0.5, draw=draw), ALLOW) == []


@pytest.fixture
def formatted(caplog):
    """A decision's line as the service writes it (logs.JsonFormatter)."""
    def write(decision: Decision, request: HttpRequest | None = REQUEST) -> dict:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger=LOGGER):
            DecisionLog(DecisionLogMode.ALL).record(decision, request, POLICY)
        (record,) = [r for r in caplog.records if r.name == LOGGER]
        return json.loads(logs.JsonFormatter().format(record))
    return write


def test_a_line_names_the_caller_the_scopes_that_counted_and_the_policy(formatted):
    entry = formatted(ALLOW)
    assert {k: v for k, v in entry.items() if k != "ts"} == {
        "level": "info", "logger": LOGGER, "msg": "allow", "decision": "allow", "reason": "allowed", "status": 200,
        "route": "export", "description": "", "client_id": "client-a", "scopes_used": ["tx/export", "tx/read"],
        "method": "GET", "path": "/export", "request_id": "rid-1", "policy_sha256": POLICY.sha256,
        "policy_version": 1}
    assert formatted(DRY_RUN)["decision"] == "dry_run_deny" and formatted(DRY_RUN)["status"] == 403


def test_a_line_without_a_request_or_a_verified_token_still_says_what_it_can(formatted):
    entry = formatted(Decision(False, Reason.BAD_REQUEST, "malformed HTTP request"), request=None)
    assert (entry["client_id"], entry["scopes_used"], entry["method"], entry["path"], entry["request_id"],
            entry["route"], entry["policy_sha256"]) == (None, [], None, None, None, "no_route", POLICY.sha256)
    assert formatted(PUBLIC)["scopes_used"] == []


def test_a_line_never_holds_the_token(formatted):
    for decision in (ALLOW, DENY, DRY_RUN, PUBLIC):
        text = json.dumps(formatted(decision))
        assert not any(part in text for part in ("TOKENHEADER", "TOKENPAYLOAD", "TOKENSIGNATURE", "Bearer"))


def test_the_service_writes_a_line_whatever_the_log_level(monkeypatch, capsys, formatted):
    """--log-level warning quiets the service's diagnostics, not its record of decisions; the line
    is the one the logging path writes (logs.JsonFormatter), field for field."""
    through_logging = formatted(ALLOW)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # restored after the test, as is
    monkeypatch.setattr(logs, "_output", None)  # the stream logs.configure sets
    monkeypatch.setattr(logging.getLogger("aiohttp.access"), "level", logging.NOTSET)
    level = root.level
    try:
        logs.configure("WARNING")  # in the test's call phase: capsys's stdout of this phase
        # Configuring the stream quiets aiohttp's access log (a line per JWKS fetch otherwise).
        assert logging.getLogger("aiohttp.access").level == logging.WARNING
        logging.getLogger("authz_service.server").info("a diagnostic")
        DecisionLog(DecisionLogMode.ALL).record(ALLOW, REQUEST, POLICY)
        DecisionLog(DecisionLogMode.DENY).record(DENY, REQUEST, POLICY)
    finally:
        root.setLevel(level)
    written = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e["logger"], e["level"], e["msg"]) for e in written] == [(LOGGER, "info", "allow"), (LOGGER, "info", "deny")]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", written[0]["ts"])
    assert {k: v for k, v in written[0].items() if k != "ts"} == {k: v for k, v in through_logging.items() if k != "ts"}
