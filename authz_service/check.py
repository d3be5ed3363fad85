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
from .policy import Policy
from .request import BadRequest, HttpRequest
from .response import Answer, Answers
from .tokens import TokenVerifier

if TYPE_CHECKING:
    from .metrics import PerCheck
    from .tracing import CheckSpanKind, Tracing

log = logging.getLogger("authz_service.server")
Raw = TypeVar("Raw")
Rendered = TypeVar("Rendered")
_INTERNAL = "internal error"


class PolicySource(Protocol):
    """Where the policy in force is read, once per Check (policy.PolicyReloader in the service)."""

    @property
    def policy(self) -> Policy: ...


class CheckCounter(Protocol):
    """What every Check records (metrics.PerCheck in the service)."""

    def check(self, key: tuple[str, str, str, int], seconds: float) -> None: ...


class Checker:
    """The decision pipeline shared by every front door; stateless apart from its collaborators."""

    def __init__(
        self, policies: PolicySource, verifier: TokenVerifier, answers: Answers, counter: CheckCounter | None = None
    ) -> None:
        self.policies = policies
        self.verifier = verifier
        self.answers = answers
        self.counter = counter
        self.decide = decide  # attributes, so the bench's phase timer can wrap each step

    async def check(
        self, parse: Callable[[Raw], HttpRequest], raw: Raw, render: Callable[[Answer, Decision], Rendered]
    ) -> Rendered:
        """Answer one request: ``parse`` reads the front door's request, ``render`` writes its reply
        (front doors use only the answer; tools also read the decision)."""
        started = time.perf_counter()
        request: HttpRequest | None = None
        try:
            request = parse(raw)
            decision = await self.decide(request, self.policies.policy, self.verifier)
        except BadRequest as exc:
            decision = deny(Reason.BAD_REQUEST, str(exc))
        except Exception:
            log.exception("check failed; denying")
            decision = deny(Reason.INTERNAL_ERROR, _INTERNAL)
        return self.finish(decision, request, render, started)

    def refuse(self, description: str, render: Callable[[Answer, Decision], Rendered]) -> Rendered:
        """A request the front door's own protocol parser refused (no HttpRequest could be built):
        the same counted and logged 400 a refused request gets in ``check``."""
        return self.finish(deny(Reason.BAD_REQUEST, description), None, render, time.perf_counter())

    def finish(
        self,
        decision: Decision,
        request: HttpRequest | None,
        render: Callable[[Answer, Decision], Rendered],
        started: float,
    ) -> Rendered:
        """Answer, render, count and log a decision (the second half of ``check``)."""
        try:
            rendered = render(self.answers.answer(decision, request), decision)
        except Exception:
            log.exception("rendering the answer failed; denying")
            decision = deny(Reason.INTERNAL_ERROR, _INTERNAL)
            rendered = render(self.answers.answer(decision, None), decision)
        if self.counter is not None:
            self.counter.check(
                (decision.kind, decision.reason.value, decision.route_label, decision.status),
                time.perf_counter() - started,
            )
        self.log(decision, request)
        return rendered

    def log(self, decision: Decision, request: HttpRequest | None) -> None:
        """Denials (and dry-run denials) at INFO; allows only at DEBUG (the hot path stays quiet)."""
        if decision.allowed and not decision.dry_run:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("allow", extra=log_fields(decision, request))
            return
        log.info("dry-run deny" if decision.dry_run else "deny", extra=log_fields(decision, request))


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
    ) -> None:
        from .tracing import ExemplarCounter

        super().__init__(
            policies, verifier, answers, ExemplarCounter(counter, tracing) if counter is not None else None
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

    def log(self, decision: Decision, request: HttpRequest | None) -> None:
        # Called once per Check with the final decision (after any rendering failure): the place
        # to describe it on the span.
        self.tracing.record_check(decision, request)
        super().log(decision, request)


def log_fields(decision: Decision, request: HttpRequest | None) -> dict[str, object]:
    """One decision's log fields. Never the token, never the query string (it may carry secrets)."""
    return {
        "decision": "allow" if decision.allowed else "deny",
        "reason": decision.reason.value,
        "status": decision.status,
        "route": decision.route_label,
        "description": decision.description,
        "client_id": decision.claims.client_id if decision.claims else None,
        "method": request.method if request else None,
        "path": request.path if request else None,
        "request_id": request.request_id if request else None,
    }
