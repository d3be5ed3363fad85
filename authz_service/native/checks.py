"""The checks Envoy's RBAC filter makes natively, each an RBAC DENY policy with the service's answer.

RBAC filters run them, after jwt_authn, in the order the service checks (authz_service.check,
decision, tokens): the request screen alone on the routes nobody else decides, and on native routes
the screen and the token checks (one filter, configured once), then the route's (its own config):

* the request screen (every route the service does not decide): a target longer than the service
  reads, and method or URL override headers in any spelling: 400, as ``request.py`` answers;
* the token checks (native routes): no Authorization at all (401), and what jwt_authn does not
  check of a token it verified: the JOSE header's kid, crit and key members, ``iat`` in the future,
  ``token_use``, ``client_id`` and the issuer's client allow-list, the types and text of the claims
  forwarded upstream (``scope`` as RFC 6749 scope tokens), the policy's deny list
  (401 ``invalid_token``);
* the route's conditions (native routes): client allow-list, any-of and all-of scopes, claim
  conditions (403 ``insufficient_scope``).

A token jwt_authn could not verify never meets these checks but ``missing``: the service decides
it (see bootstrap.py). Every description is obtained from the service's own code (the verifier,
refusing probe tokens minted by ``simulate.Simulator``; ``Conditions.unmet`` on probe claims), so
the texts cannot drift apart; a probe answered otherwise than expected stops the compiler.

Each check costs Envoy CPU on every request it sees, and an RBAC ``condition`` (CEL) costs several
times a metadata or header matcher: only the checks that need the clock or a size are CEL (the
token's only for a verified token, the target's only for a long one in bytes: RBAC evaluates a
policy's condition only once its principal matched), and the canonical form of the token is
left to the pattern jwt_authn verifies (patterns.BEARER_JWT).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from ..claims import SCOPE_CHARS, SCOPE_TOKEN, UNSUPPORTED, Claims, ClaimValue
from ..conditions import ANY_SCOPE_TEXT, ClaimCondition, Unmet
from ..decision import MISSING_TOKEN_TEXT, UNMET_REASONS, Reason
from ..policy import DenyList, Policy, Route
from ..request import MAX_PATH_LENGTH, BadRequest, normalized_path, override_spellings, special_names
from ..tokens import MAX_TOKEN_BYTES, TokenError, check_deny_list
from ..tools.simulate import Simulator
from . import cel
from .answers import AnswerBook
from .patterns import BEARER, re2_literal

Principal = dict[str, Any]
PAYLOAD, HEADER = "payload", "header"  # jwt_authn's payload_in_metadata and header_in_metadata
NOT_A_CLIENT = "native-probe-of-a-client-no-list-names"
# A claim the service refuses to forward as a header (tokens._check_header_text: client_id, sub): a
# control character other than HTAB anywhere, or a space or tab at either end.
INVALID_HEADER_TEXT = r"(?s)[ \t].*|.*[ \t]|.*[\x00-\x08\x0a-\x1f\x7f].*"
# The target length's CEL runs only for a target longer than this in bytes (checks.at_least_bytes).
# A gate of the limit itself (8193 bytes) would be an RE2 program of as many instructions, about
# 150 kB of memory for each native route's copy of the screen checks; few targets are this long.
TARGET_GATE_BYTES = 1024
# A kid the service accepts (tokens._check_header): a string of 1 to 256 characters.
VALID_KID = "(?s).{1,256}"


@dataclass(frozen=True, slots=True)
class Check:
    """One RBAC DENY policy: when ``principal`` and ``condition`` both hold, the request is denied
    with the service's answer to ``reason`` and ``description`` (``route``: for a 403's scope=)."""

    reason: Reason
    description: str
    principal: Principal
    condition: cel.Expr | None = None
    route: Route | None = None

    def policy(self) -> dict[str, Any]:
        out: dict[str, Any] = {"permissions": [{"any": True}], "principals": [self.principal]}
        if self.condition is not None:
            out["condition"] = self.condition
        return out


def rules(book: AnswerBook, checks: list[Check], other_route: Route | None = None, *, first: int = 0) -> dict[str, Any]:
    """RBAC rules denying on the first of ``checks`` that matches: RBAC tries policies in name order,
    and each name starts with the check's position (answers.AnswerBook.policy_name), counted from
    ``first`` (the checks another filter made before). The checks of ``other_route`` (the second
    route a request must meet) are marked so in their names. Every position is written with as many
    digits as the last one, so that name order stays numeric order past 999 checks."""
    digits = len(str(first + len(checks) - 1))
    return {
        "action": "DENY",
        "policies": {
            book.policy_name(
                order,
                check.reason,
                check.description,
                check.route,
                other_route=other_route is not None and check.route is other_route,
                digits=digits,
            ): check.policy()
            for order, check in enumerate(checks, start=first)
        },
    }


# --- principals --------------------------------------------------------------------------------

ANY: Principal = {"any": True}


def metadata(key: str, claim: str, value: dict[str, Any]) -> Principal:
    """The verified token's ``claim`` (in jwt_authn's ``key`` metadata) matches ``value``."""
    return {
        "sourced_metadata": {
            "metadata_matcher": {"filter": cel.JWT_AUTHN, "path": [{"key": key}, {"key": claim}], "value": value}
        }
    }


def present(key: str, claim: str) -> Principal:
    return metadata(key, claim, {"present_match": True})


def not_(principal: Principal) -> Principal:
    return {"not_id": principal}


def and_(*principals: Principal) -> Principal:
    return principals[0] if len(principals) == 1 else {"and_ids": {"ids": list(principals)}}


def or_(*principals: Principal) -> Principal:
    return principals[0] if len(principals) == 1 else {"or_ids": {"ids": list(principals)}}


def regex(pattern: str) -> dict[str, Any]:
    return {"string_match": {"safe_regex": {"regex": pattern}}}


def exact(text: str) -> dict[str, Any]:
    return {"string_match": {"exact": text}}


# jwt_authn verified the token: only then is its payload in the metadata (its iss is a string).
# The one sign of it the RBAC checks, the ext_authz filter's matcher and the decision stats read.
VERIFIED_PATH = (PAYLOAD, "iss")
VERIFIED = present(*VERIFIED_PATH)
# A string claim (a string matcher never matches a number, a boolean, a list or an object).
ANY_STRING = regex("(?s).*")


def header_present(name: str) -> Principal:
    return {"header": {"name": name, "present_match": True}}


def at_least_bytes(name: str, count: int) -> Principal:
    """The header ``name`` holds at least ``count`` bytes (RE2's ``\\C``: any one byte, whatever the
    UTF-8). A CEL ``size()`` of at least ``count`` (code points, each at least one byte) needs it,
    so it goes before that CEL condition: a few DFA steps over a short value spare the CEL
    evaluation, the dearest part of a check, on every request it cannot deny. RE2 repeats at most
    1000 times."""
    thousands, rest = divmod(count, 1000)
    return {"header": {"name": name, **regex("\\C{1000}" * thousands + f"\\C{{{rest}}}\\C*")}}


def scope_holds(scopes: frozenset[str]) -> Principal:
    """The token's space-separated ``scope`` claim holds one of ``scopes`` (str.split(" ") rules)."""
    alternatives = "|".join(re2_literal(scope) for scope in sorted(scopes))
    return metadata(PAYLOAD, "scope", regex(f"(?s)(?:.* )?(?:{alternatives})(?: .*)?"))


def client_is(client_ids: frozenset[str]) -> Principal:
    return or_(*(metadata(PAYLOAD, "client_id", exact(c)) for c in sorted(client_ids)))


def claim_equals(name: str, value: object) -> Principal:
    """The claim is the value, compared by JSON type as ClaimCondition.holds compares."""
    if isinstance(value, bool):
        return metadata(PAYLOAD, name, {"bool_match": value})
    if isinstance(value, str):
        return metadata(PAYLOAD, name, exact(value))
    assert isinstance(value, (int, float))
    return metadata(PAYLOAD, name, {"double_match": {"exact": float(value)}})


# --- the request screen ------------------------------------------------------------------------


def screen_checks() -> list[Check]:
    """400s the service answers before it matches a route, for requests the route screen (routes.py)
    lets through: a target over its length limit, then override headers (the first in name order)."""
    checks = [
        Check(
            Reason.BAD_REQUEST,
            _refusal(lambda: normalized_path("/" + "a" * MAX_PATH_LENGTH)),
            at_least_bytes(":path", min(TARGET_GATE_BYTES + 1, MAX_PATH_LENGTH + 1)),  # request.path is :path
            cel.call("_>_", cel.call("size", cel.request_target()), cel.integer(MAX_PATH_LENGTH)),
        )
    ]
    # Every spelling of one override header is refused in the same words, which name the header:
    # the service names the first in name order, and so does the first of these checks to match.
    for spellings in override_spellings().values():
        description = _refusal(partial(special_names, spellings[:1]))
        checks.append(Check(Reason.BAD_REQUEST, description, or_(*(header_present(n) for n in spellings))))
    return checks


def _refusal(parse: Callable[[], object]) -> str:
    """The description of the BadRequest ``parse`` raises (the service's own words)."""
    try:
        parse()
    except BadRequest as exc:
        return str(exc)
    raise AssertionError("the request parser accepted a request the native screen refuses")


# --- the token checks --------------------------------------------------------------------------


def token_checks(policy: Policy, leeway: int) -> list[Check]:
    """401s for a request without credentials, and for a token jwt_authn verified but the service
    refuses, in the service's order. jwt_authn verifies only a token matching patterns.BEARER_JWT
    (canonical, with no longer JOSE header than the service parses), and its own parser refuses a
    kid, sub, iss, exp, nbf or iat of the wrong JSON type."""
    texts = TokenTexts(policy)
    out = [Check(Reason.MISSING_TOKEN, MISSING_TOKEN_TEXT, not_(header_present("authorization")))]

    def add(reason_text: tuple[Reason, str], principal: Principal, condition: cel.Expr | None = None) -> None:
        out.append(Check(*reason_text, principal, condition))

    # The token's size (the header's, less "Bearer "): one check of the request header, as CEL, only
    # for a token jwt_authn verified (another goes to the service, malformed or not). Its header then
    # matched patterns.BEARER_JWT, all ASCII, so its size in bytes is its size in characters, and
    # far cheaper to read; a byte-length regex before the CEL would cost more, reading every byte.
    add(
        texts.refusal("x" * (MAX_TOKEN_BYTES + 1)),
        VERIFIED,
        cel.call("_>_", cel.byte_size(cel.request_header("authorization")), cel.integer(len(BEARER) + MAX_TOKEN_BYTES)),
    )
    # A token without a kid, or with an empty one, is verified with every key of its issuer.
    add(texts.refused(header={"kid": None}), and_(VERIFIED, not_(metadata(HEADER, "kid", regex(VALID_KID)))))
    add(
        texts.refused(header={"crit": ["exp"]}),
        or_(present(HEADER, "crit"), and_(present(HEADER, "b64"), not_(metadata(HEADER, "b64", {"bool_match": True})))),
    )
    add(
        texts.refused(header={"jku": "https://keys.example"}),
        or_(*(present(HEADER, member) for member in ("jku", "x5u", "jwk", "x5c"))),
    )
    # iat in the future: the service refuses int(iat) > now + leeway in whole seconds, i.e. for an
    # iat of at least 0 (jwt_authn's parser checked), iat >= floor(now) + leeway + 1; as a double,
    # so that no iat is too large to compare. It needs the clock, so CEL.
    add(
        texts.refused(overrides={"iat": int(time.time()) + 10**6}),
        VERIFIED,
        cel.call(
            "_>=_",
            cel.index(cel.jwt_metadata(PAYLOAD), "iat"),
            cel.call("double", cel.call("_+_", cel.now_seconds(), cel.integer(leeway + 1))),
        ),
    )
    add(
        texts.refused(overrides={"token_use": "id"}),
        and_(VERIFIED, not_(metadata(PAYLOAD, "token_use", exact("access")))),
    )
    add(
        texts.refused(overrides={"client_id": None}),
        and_(VERIFIED, not_(metadata(PAYLOAD, "client_id", regex("(?s).+")))),
    )
    add(
        texts.refused(overrides={"client_id": "client\x01"}), metadata(PAYLOAD, "client_id", regex(INVALID_HEADER_TEXT))
    )
    restricted = [i for i in policy.issuers if i.client_ids is not None]
    if restricted:
        add(
            texts.refused(issuer=restricted[0].issuer, client_id=NOT_A_CLIENT),
            or_(
                *(
                    and_(metadata(PAYLOAD, "iss", exact(i.issuer)), not_(client_is(i.client_ids)))  # type: ignore[arg-type]
                    for i in restricted
                )
            ),
        )
    add(
        texts.refused(overrides={"scope": ["scope"]}),
        and_(present(PAYLOAD, "scope"), not_(metadata(PAYLOAD, "scope", ANY_STRING))),
    )
    # RFC 6749 scope tokens separated by single spaces (tokens._check_scope): first a character no
    # scope has, then the spacing.
    add(
        texts.refused(overrides={"scope": "scope\x01"}),
        metadata(PAYLOAD, "scope", regex(f"(?s).*[^{SCOPE_CHARS} \\t\\n\\v\\f\\r].*")),
    )
    add(
        texts.refused(overrides={"scope": "scope  other"}),
        and_(
            not_(metadata(PAYLOAD, "scope", regex(f"(?:{SCOPE_TOKEN}(?: {SCOPE_TOKEN})*)?"))),
            metadata(PAYLOAD, "scope", ANY_STRING),
        ),
    )
    add(texts.refused(overrides={"sub": "sub\x01"}), metadata(PAYLOAD, "sub", regex(INVALID_HEADER_TEXT)))
    # The deny list, last as in the verifier: the client, then the token's jti, compared exactly.
    if policy.deny is not None:
        for claim, denied in (("client_id", policy.deny.client_ids), ("jti", policy.deny.jtis)):
            if denied:
                add(
                    _deny_list_refusal(policy.deny, claim, min(denied)),
                    or_(*(metadata(PAYLOAD, claim, exact(value)) for value in sorted(denied))),
                )
    return out


def _deny_list_refusal(deny: DenyList, claim: str, value: str) -> tuple[Reason, str]:
    """How the service's verifier refuses a token whose ``claim`` (client_id or jti) is ``value``."""
    probe = {"client_id": NOT_A_CLIENT, "jti": "", claim: value}
    claims = Claims("", probe["client_id"], "", frozenset(), "", 0, "", jti=probe["jti"])
    try:
        check_deny_list(claims, deny)
    except TokenError as exc:
        return Reason(exc.failure.value), exc.description
    raise AssertionError(f"the verifier accepted a token whose {claim} the deny list names")


class TokenTexts:
    """How the service's verifier refuses probe tokens, each failing exactly one check."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.simulator = Simulator(policy)
        self.issuer = policy.issuers[0].issuer
        allowed = policy.issuers[0].client_ids
        self.client_id = min(allowed) if allowed else "native-probe"

    def refused(
        self,
        *,
        issuer: str | None = None,
        client_id: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        header: Mapping[str, Any] | None = None,
    ) -> tuple[Reason, str]:
        issuer = issuer or self.issuer
        token = self.simulator.token(
            issuer, ["scope"], client_id or self._client(issuer), overrides=overrides, header=header
        )
        return self.refusal(token)

    def refusal(self, token: str) -> tuple[Reason, str]:
        try:
            asyncio.run(self.simulator.verifier.verify(token, self.policy))
        except TokenError as exc:
            return Reason(exc.failure.value), exc.description  # decision: each failure is its reason
        raise AssertionError("the verifier accepted a token the native checks refuse")

    def _client(self, issuer: str) -> str:
        allowed = self.policy.issuers_by_iss[issuer].client_ids
        return min(allowed) if allowed else "native-probe"


# --- the route's conditions --------------------------------------------------------------------


def route_checks(policy: Policy, route: Route) -> list[Check]:
    """403s for a verified token that does not meet ``route``'s conditions, in the service's order
    (Conditions.unmet): client, any-of scopes, each all-of scope (the first missing in name order),
    each claim condition (absent, then another value). Each check also requires a verified token."""
    checks: list[Check] = []

    def add(unmet: tuple[Unmet, str] | None, principal: Principal) -> None:
        if unmet is None:
            return  # no token reaches this check without failing an earlier one
        checks.append(Check(UNMET_REASONS[unmet[0]], unmet[1], and_(VERIFIED, principal), route=route))

    if route.conditions is None:  # any-of scopes only (decide() skips Conditions)
        add((Unmet.ANY_SCOPE, ANY_SCOPE_TEXT), not_(scope_holds(route.scopes)))
        return checks
    probe = _Probe(policy, route)
    if route.client_ids is not None:
        add(probe.failing(client=True), not_(client_is(route.client_ids)))
    if route.scopes:
        add(probe.failing(any_scope=True), not_(scope_holds(route.scopes)))
    for scope in sorted(route.all_scopes):
        add(probe.failing(missing_scope=scope), not_(scope_holds(frozenset({scope}))))
    for condition in route.claims:
        add(probe.failing(claim=(condition, False)), not_(present(PAYLOAD, condition.name)))
        add(
            probe.failing(claim=(condition, True)),
            not_(or_(*(claim_equals(condition.name, v) for v in condition.values))),
        )
    return checks


class _Probe:
    """Verified-token claims meeting every condition of a route but one, to ask ``Conditions.unmet``
    (the service's own evaluation) which condition fails and how it is described."""

    def __init__(self, policy: Policy, route: Route) -> None:
        self.policy, self.route = policy, route

    def failing(
        self,
        *,
        client: bool = False,
        any_scope: bool = False,
        missing_scope: str | None = None,
        claim: tuple[ClaimCondition, bool] | None = None,
    ) -> tuple[Unmet, str] | None:
        route = self.route
        client_id = NOT_A_CLIENT if client else min(route.client_ids or {"native-probe"})
        scopes: set[str] = set()  # none of the any-of scopes (which come first), or:
        if not any_scope:
            scopes = set(route.all_scopes) - {missing_scope}
            if route.scopes:
                others = sorted(route.scopes - {missing_scope})
                if not others:
                    return None  # the any-of scopes are just the missing one: any_scope fails first
                scopes.add(others[0])
        custom: dict[str, ClaimValue] = {}
        for condition in route.claims:
            if claim is not None and condition is claim[0]:
                if claim[1]:
                    custom[condition.name] = UNSUPPORTED  # present, never holds
                break
            custom[condition.name] = _holding(condition)
        claims = Claims(
            issuer=self.policy.issuers[0].issuer,
            client_id=client_id,
            sub="",
            scopes=frozenset(scopes),
            scope_text=" ".join(sorted(scopes)),
            exp=0,
            kid="",
            custom=custom,
            extracted=self.policy.claim_names,
        )
        assert route.conditions is not None
        unmet = route.conditions.unmet(claims)
        expected = (
            Unmet.CLIENT
            if client
            else Unmet.ANY_SCOPE
            if any_scope
            else Unmet.ALL_SCOPES
            if missing_scope is not None
            else Unmet.CLAIM
        )
        if unmet is None or unmet[0] is not expected:
            raise AssertionError(f"route {route.name!r}: the decision core does not fail {expected.value} first")
        return unmet


def _holding(condition: ClaimCondition) -> ClaimValue:
    value = condition.values[0]
    return (value,) if condition.operator == "contains" else value  # type: ignore[return-value]
