"""The decision log: one structured JSON line per decision, as OPA's decision logs.

Why: an allowed machine-to-machine call otherwise leaves no record of who made it (Envoy's access
log has no client id, the metrics count routes). A line names the caller (client id), what was
decided and why (decision, reason, status, route, the token's scopes that counted), where (method,
path without the query, Envoy's request id) and under which policy (sha256, format version); the
JSON formatter (logs.py) adds the time. Never the token, the query string or a header value.

Which decisions are logged (``--decision-log``): ``deny`` (the default: every denial and dry-run
denial), ``all``, ``sampled`` (every denial, and allows at ``--decision-log-sample-rate``) or
``off``. The lines are INFO lines of their own logger (``authz_service.decisions``) in the one
JSON log stream, whatever ``--log-level`` says: the decision log is a record, not a diagnostic.

Hot path: an allow that is not logged costs one attribute test (a sampled one, a random draw), and
nothing of the line is built for a decision that is not logged; a line is written without the
logging machinery's per-record work (logs.record).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import logs

if TYPE_CHECKING:
    from .decision import Decision
    from .policy import Policy
    from .request import HttpRequest

LOGGER = "authz_service.decisions"


class DecisionLogMode(enum.Enum):
    """Which decisions get a line (``--decision-log``)."""

    DENY = "deny"  # every denial and dry-run denial
    ALL = "all"  # every decision
    SAMPLED = "sampled"  # every denial, and a sample of the allows
    OFF = "off"  # none


class DecisionLog:
    """Writes the decision log lines (one per decision the mode selects)."""

    def __init__(
        self,
        mode: DecisionLogMode = DecisionLogMode.DENY,
        sample_rate: float = 1.0,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.mode = mode
        self.denials = mode is not DecisionLogMode.OFF
        self.allows = mode in (DecisionLogMode.ALL, DecisionLogMode.SAMPLED)
        self._rate = sample_rate if mode is DecisionLogMode.SAMPLED else 1.0
        self._draw = draw

    def record(self, decision: Decision, request: HttpRequest | None, policy: Policy) -> None:
        """One decision: its line, when the mode selects it."""
        if decision.allowed and not decision.dry_run:
            if not self.allows or (self._rate < 1.0 and self._draw() >= self._rate):
                return
            logs.record(LOGGER, "allow", decision_fields(decision, request, policy))
        elif self.denials:
            logs.record(
                LOGGER, "dry-run deny" if decision.dry_run else "deny", decision_fields(decision, request, policy)
            )


def decision_fields(decision: Decision, request: HttpRequest | None, policy: Policy) -> dict[str, object]:
    """One decision's fields. Never the token, never the query string (it may carry secrets)."""
    claims = decision.claims
    route = decision.route
    return {
        "decision": decision.kind,
        "reason": decision.reason.value,
        "status": decision.status,
        "route": decision.route_label,
        "description": decision.description,
        "client_id": claims.client_id if claims is not None else None,
        # The token's scopes the route asks for (any-of and all-of): what the decision relied on.
        "scopes_used": sorted(claims.scopes & route.required_scopes) if claims is not None and route else [],
        "method": request.method if request is not None else None,
        "path": request.path if request is not None else None,
        "request_id": request.request_id if request is not None else None,
        "policy_sha256": policy.sha256,
        "policy_version": policy.version,
    }
