"""One Check, whatever the front door: parse -> decide -> answer -> render -> count -> log.

Every front door (gRPC ``Check``, Envoy's HTTP authorization request) and every tool (simulate,
explain, test, the bench's phase timer) runs requests through ``Checker.check``, so they can never
disagree about a decision. It never raises: a request it cannot read is a 400, and an exception
anywhere, the front door's own rendering included, becomes a logged 500 deny that is still counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol, TypeVar

from .decision import Decision, Reason, decide, deny
from .decisionlog import DecisionLog
from .policy import Policy, PolicySource
from .request import BadRequest, HttpRequest
from .response import Answer, Answers
from .tokens import PolicyReloaded, TokenVerifier

if TYPE_CHECKING:
    from .metrics import CheckKey, PerCheck
    from .shadow import ShadowPolicy
    from .tracing import CheckSpanKind, Tracing

log = logging.getLogger("authz_service.server")
Raw = TypeVar("Raw")
Rendered = TypeVar("Rendered")
_INTERNAL = "internal error"


class CheckCounter(Protocol):
    """What every Check records (metrics.PerCheck in the service)."""

    def check(self, key: CheckKey, seconds: float) -> None: ...


class Checker:
    """The decision pipeline shared by every front door; stateless apart from its collaborators.

    ``decision_log`` writes the decision log (decisionlog.py; default: denials only); ``shadow``
    decides every request again with a candidate policy, which never changes the answer (shadow.py)."""

    def __init__(
        self,
        policies: PolicySource,
        verifier: TokenVerifier,
        answers: Answers,
        counter: CheckCounter | None = None,
        decision_log: DecisionLog | None = None,
        shadow: ShadowPolicy | None = None,
    ) -> None:
        self.policies = policies
        self.verifier = verifier
        self.answers = answers
        self.counter = counter
        self.decision_log = decision_log if decision_log is not None else DecisionLog()
        self.shadow = shadow
        self.decide = decide  # attributes, so the bench's phase timer can wrap each step

    async def check(
        self, parse: Callable[[Raw], HttpRequest], raw: Raw, render: Callable[[Answer, Decision], Rendered]
    ) -> Rendered:
        """Answer one request: ``parse`` reads the front door's request, ``render`` writes its reply
        (front doors use only the answer; tools also read the decision)."""
        started = time.perf_counter()
        request: HttpRequest | None = None
        policy = self.policies.policy  # one policy per Check: the decision and its log line agree
        try:
            request = parse(raw)
            while True:
                try:
                    decision = await self.decide(request, policy, self.verifier)
                    break
                except PolicyReloaded:
                    # A policy loaded while the Check waited on the issuer's keys (an unknown kid's
                    # re-fetch): decided again, whole, with the policy in force now.
                    policy = self.policies.policy
        except BadRequest as exc:
            decision = deny(Reason.BAD_REQUEST, str(exc))
        except Exception:
            log.exception("check failed; denying")
            decision = deny(Reason.INTERNAL_ERROR, _INTERNAL)
        if self.shadow is not None and request is not None:  # outside the try: it cannot change the decision
            await self.shadow.compare(request, decision, policy)
        return self.finish(decision, request, render, started, policy)

    def refuse(self, description: str, render: Callable[[Answer, Decision], Rendered]) -> Rendered:
        """A request the front door's own protocol parser refused (no HttpRequest could be built):
        the same counted and logged 400 a refused request gets in ``check``."""
        decision = deny(Reason.BAD_REQUEST, description)
        return self.finish(decision, None, render, time.perf_counter(), self.policies.policy)

    def finish(
        self,
        decision: Decision,
        request: HttpRequest | None,
        render: Callable[[Answer, Decision], Rendered],
        started: float,
        policy: Policy,
    ) -> Rendered:
        """Answer, render, count and log a decision (the second half of ``check``)."""
        try:
            rendered = render(self.answers.answer(decision, request), decision)
        except Exception:
            log.exception("rendering the answer failed; denying")
            decision = deny(Reason.INTERNAL_ERROR, _INTERNAL)
            rendered = render(self.answers.answer(decision, None), decision)
        if self.counter is not None:
            claims = decision.claims
            client = policy.client_label(claims.client_id) if claims is not None else ""
            self.counter.check(
                (decision.kind, decision.reason.value, decision.route_label, decision.status, client),
                time.perf_counter() - started,
            )
        self.log(decision, request, policy)
        return rendered

    def log(self, decision: Decision, request: HttpRequest | None, policy: Policy) -> None:
        """The decision log's line, if its mode selects this decision (one line per decision)."""
        self.decision_log.record(decision, request, policy)


class TracedChecker(Checker):
    """The same pipeline with one span per Check (tracing on; tracing.py). A subclass, so that with
    tracing off a Check runs exactly the code above: no tracing call, no context extraction.

    Front doors given one call ``check_traced`` with the propagation headers they read.
    """

    def __init__(
        self,
        policies: PolicySource,
        verifier: TokenVerifier,
        answers: Answers,
        counter: PerCheck | None,
        tracing: Tracing,
        decision_log: DecisionLog | None = None,
        shadow: ShadowPolicy | None = None,
    ) -> None:
        from .tracing import ExemplarCounter

        super().__init__(
            policies,
            verifier,
            answers,
            ExemplarCounter(counter, tracing) if counter is not None else None,
            decision_log,
            shadow,
        )
        self.tracing = tracing

    async def check_traced(
        self,
        kind: CheckSpanKind,
        carrier: Mapping[str, str],
        parse: Callable[[Raw], HttpRequest],
        raw: Raw,
        render: Callable[[Answer, Decision], Rendered],
        *,
        from_client: bool = False,
    ) -> Rendered:
        """``check`` inside a span that continues the trace whose context ``carrier`` holds
        (``from_client``: the client's own headers, not Envoy's; see Tracing.check_span)."""
        with self.tracing.check_span(kind, carrier, from_client=from_client):
            return await self.check(parse, raw, render)

    def log(self, decision: Decision, request: HttpRequest | None, policy: Policy) -> None:
        # Called once per Check with the final decision (after any rendering failure): the place
        # to describe it on the span.
        self.tracing.record_check(decision, request)
        super().log(decision, request, policy)
