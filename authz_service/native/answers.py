"""Native denials, answered exactly as the service answers them.

Every answer Envoy gives on its own (an RBAC denial turned into a local reply, the no-route direct
response) is rendered by the service's own ``response.Answers`` from the Decision the service
would make, so its status, ``WWW-Authenticate`` challenge and JSON body are the service's byte for
byte. Each RBAC policy that denies is named ``<order>-<reason>-a<answer>``: the order (as many
digits in every name of one filter) makes RBAC (which tries policies in name order) report the
first unmet check, as the service does; the answer
id is what a ``local_reply_config`` mapper recognises in ``response.code_details`` to rewrite
Envoy's plain 403 into that answer. A check of the second route a request must meet (a path ending
in '/': routes.py) is named ``<order>o-<reason>-a<answer>``: the mark, after the order, leaves the
order alone and tells the decision stats to label the denial with that route (decisions.py).
"""

from __future__ import annotations

from typing import Any

from ..decision import Decision, Reason
from ..policy import Route
from ..response import Answer, Answers

# What RBAC writes into the response code details of a denial, around the policy's name.
RBAC_DENIED = "rbac_access_denied_matched_policy[{}]"
RBAC_DENIED_STATUS = 403
CEL_FILTER = "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter"
OTHER_ROUTE_MARK = "o"  # in the name of a check of a request's other route (see the module doc)
ORDER_DIGITS = 3  # the least width of the order in a policy's name (more past 999 checks)


class AnswerBook:
    """The distinct native answers of one compiled policy, each with its id."""

    def __init__(self, realm: str) -> None:
        self._answers = Answers(realm)
        self._ids: dict[tuple[int, tuple[tuple[str, str], ...], str], str] = {}
        self._rendered: dict[str, Answer] = {}

    def denial(self, reason: Reason, description: str, route: Route | None = None) -> Answer:
        """The service's answer to a denial (``route`` matters only to the 403 ``scope=``)."""
        return self._answers.answer(Decision(False, reason, description, route), None)

    def policy_name(
        self,
        order: int,
        reason: Reason,
        description: str,
        route: Route | None = None,
        *,
        other_route: bool = False,
        digits: int = ORDER_DIGITS,
    ) -> str:
        """The name of the RBAC policy whose match is this denial (registers the answer);
        ``other_route``: a check of the second route the request must meet; ``digits``: the
        order's least width (every name of one filter the same, so name order is numeric order)."""
        answer = self.denial(reason, description, route)
        key = (answer.status, answer.headers, answer.body)  # routes whose denials read alike share one
        answer_id = self._ids.get(key)
        if answer_id is None:
            answer_id = self._ids[key] = f"a{len(self._ids)}"
            self._rendered[answer_id] = answer
        mark = OTHER_ROUTE_MARK if other_route else ""
        return f"{order:0{max(digits, ORDER_DIGITS)}d}{mark}-{reason.value}-{answer_id}"

    def mappers(self) -> list[dict[str, Any]]:
        """``local_reply_config`` mappers rewriting each registered denial into its answer, behind
        one that lets every other local reply through untouched: Envoy tries mappers in order
        until one matches, and each answer's CEL costs far more than one status comparison (a
        direct response is a local reply too)."""
        return [OTHER_LOCAL_REPLIES, *(_mapper(answer_id, answer) for answer_id, answer in self._rendered.items())]

    def direct_response(self, reason: Reason, description: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A route's ``direct_response`` and ``response_headers_to_add`` answering this denial."""
        answer = self.denial(reason, description)
        return (
            {"status": answer.status, "body": {"inline_string": answer.body}},
            [_header(name, value) for name, value in answer.headers],
        )


def status_filter(op: str, value: int, runtime_key: str) -> dict[str, Any]:
    return {
        "status_code_filter": {"comparison": {"op": op, "value": {"default_value": value, "runtime_key": runtime_key}}}
    }


# RBAC denies with 403, so any other status is no answer of ours: matched here, and left as it is.
OTHER_LOCAL_REPLIES: dict[str, Any] = {
    "filter": {
        "or_filter": {
            "filters": [
                status_filter("LE", RBAC_DENIED_STATUS - 1, "local_reply.authz_not_rbac_below"),
                status_filter("GE", RBAC_DENIED_STATUS + 1, "local_reply.authz_not_rbac_above"),
            ]
        }
    }
}


def _header(name: str, value: str) -> dict[str, Any]:
    return {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _mapper(answer_id: str, answer: Answer) -> dict[str, Any]:
    # The body goes through %LOCAL_REPLY_BODY% so that no character of it is read as a command.
    content_type = dict(answer.headers)["content-type"]
    return {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": {
                    "@type": CEL_FILTER,
                    "expression": f"response.code_details.endsWith('-{answer_id}]') && "
                    "response.code_details.startsWith('rbac_access_denied_matched_policy[')",
                },
            }
        },
        "status_code": answer.status,
        "headers_to_add": [_header(name, value) for name, value in answer.headers if name != "content-type"],
        "body": {"inline_string": answer.body},
        "body_format_override": {
            "text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
            "content_type": content_type,
        },
    }
