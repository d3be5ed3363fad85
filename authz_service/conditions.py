"""Route conditions beyond "any of these scopes": all-of scopes, a per-route client allow-list and
conditions on custom claims (what a Cognito pre token generation trigger adds to a token).

Why a module of its own: the policy loader builds them (once, at load, into frozen objects with
their client-safe denial texts precomputed), decide() evaluates them against a verified token's
Claims, and explain, the lints and the audit describe them. A route without conditions has none
(``Route.conditions is None``), so it costs decide() nothing. No expression language: each claim
condition is one claim name and one of three operators.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .claims import VERIFIED_CLAIM_KEYS, Claims, ClaimValue, cognito_controlled
from .yamlfile import kind

Scalar = str | int | float | bool
# Printable ASCII without space, quote and backslash: a claim name appears as is in a 403's
# error_description (a quoted-string), and Cognito's own names (custom:tenant) fit.
CLAIM_NAME = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,128}\Z")
OPERATORS = ("equals", "any_of", "contains")
MAX_ANY_OF = 256
CLIENT_NOT_ALLOWED_TEXT = "client is not allowed on this route"
ANY_SCOPE_TEXT = "token lacks a required scope"


class Unmet(enum.Enum):
    """Which condition a verified token failed (decide maps each to its Reason)."""

    CLIENT = "client"  # the route's client_ids do not list the token's client
    ANY_SCOPE = "any_scope"  # none of the route's scopes
    ALL_SCOPES = "all_scopes"  # one of the route's all_scopes is missing
    CLAIM = "claim"  # a claim condition does not hold (claim absent, or another value)


@dataclass(frozen=True, slots=True)
class ClaimCondition:
    """One condition on one claim. ``values`` has one element for equals and contains.

    Comparison is by JSON type: a string equals only a string, a boolean only a boolean, a number
    only a number (1 equals 1.0, never true). ``any_of`` holds when the claim is one of the values,
    or, for a list-of-strings claim, holds one of them; ``contains`` holds when a list-of-strings
    claim holds the value. A claim of another type (an object, null) never satisfies a condition.
    """

    name: str
    operator: str
    values: tuple[Scalar, ...]
    strings: frozenset[str]
    numbers: frozenset[int | float]
    booleans: frozenset[bool]
    missing: str  # the client-visible description when the claim is absent: names the claim, no value
    mismatch: str  # ... when it is present with another value

    def holds(self, value: ClaimValue) -> bool:
        if type(value) is tuple:  # a list of strings
            if self.operator == "equals":
                return False
            return not self.strings.isdisjoint(value)
        if self.operator == "contains":
            return False
        kind = type(value)
        if kind is str:
            return value in self.strings
        if kind is bool:
            return value in self.booleans
        if kind is int or kind is float:
            return value in self.numbers
        return False

    @property
    def text(self) -> str:
        """For people: ``tenant = 'acme'``, ``tier any of ['gold', 'silver']``, ``envs contains 'prod'``."""
        if self.operator == "any_of":
            return f"{self.name} any of [{', '.join(_show(v) for v in self.values)}]"
        sign = "=" if self.operator == "equals" else "contains"
        return f"{self.name} {sign} {_show(self.values[0])}"

    def describe(self) -> dict[str, Any]:
        """JSON form (explain --json, audit --format json)."""
        return {"claim": self.name, self.operator: list(self.values) if self.operator == "any_of" else self.values[0]}


def _show(value: Scalar) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else repr(value)


def condition(name: str, operator: str, values: tuple[Scalar, ...]) -> ClaimCondition:
    """A compiled condition: values are split by JSON type once, so a check is one set lookup."""
    return ClaimCondition(
        name=name,
        operator=operator,
        values=values,
        strings=frozenset(v for v in values if isinstance(v, str)),
        numbers=frozenset(v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)),
        booleans=frozenset(v for v in values if isinstance(v, bool)),
        missing=f"token lacks a required claim: {name}",
        mismatch=f"token claim does not have a required value: {name}",
    )


@dataclass(frozen=True, slots=True)
class Conditions:
    """A route's conditions besides its path and methods, checked in this order: client, any-of
    scopes, all-of scopes, claims (the first unmet one is the answer)."""

    any_scopes: frozenset[str]  # the route's ``scopes`` (empty: no any-of requirement)
    all_scopes: frozenset[str]
    client_ids: frozenset[str] | None
    claims: tuple[ClaimCondition, ...]

    def each(self, claims: Claims) -> Iterator[tuple[Unmet, ClaimCondition | None, str | None]]:
        """Every condition, in the order ``unmet`` checks them: which one (with its ClaimCondition
        for a claim condition) and the client-safe description of its failure (None: it holds).
        For tools that show each condition (explain, tests); ``unmet`` is the same checks without
        the generator, for decide() (tests/test_conditions.py holds the two equal)."""
        if self.client_ids is not None:
            yield Unmet.CLIENT, None, None if claims.client_id in self.client_ids else CLIENT_NOT_ALLOWED_TEXT
        if self.any_scopes:
            yield Unmet.ANY_SCOPE, None, None if not self.any_scopes.isdisjoint(claims.scopes) else ANY_SCOPE_TEXT
        if self.all_scopes:
            missing = self.all_scopes - claims.scopes
            yield Unmet.ALL_SCOPES, None, f"token lacks a required scope: {min(missing)}" if missing else None
        custom = claims.custom
        for cond in self.claims:
            value = custom.get(cond.name)  # None: absent (a JSON null is kept as UNSUPPORTED)
            yield Unmet.CLAIM, cond, cond.missing if value is None else None if cond.holds(value) else cond.mismatch

    def unmet(self, claims: Claims) -> tuple[Unmet, str] | None:
        """The first condition the token fails and its client-safe description; None when all hold."""
        if self.client_ids is not None and claims.client_id not in self.client_ids:
            return Unmet.CLIENT, CLIENT_NOT_ALLOWED_TEXT
        if self.any_scopes and self.any_scopes.isdisjoint(claims.scopes):
            return Unmet.ANY_SCOPE, ANY_SCOPE_TEXT
        if self.all_scopes and not self.all_scopes <= claims.scopes:
            return Unmet.ALL_SCOPES, f"token lacks a required scope: {min(self.all_scopes - claims.scopes)}"
        custom = claims.custom
        for cond in self.claims:
            value = custom.get(cond.name)  # None: absent (a JSON null is kept as UNSUPPORTED)
            if value is None:
                return Unmet.CLAIM, cond.missing
            if not cond.holds(value):
                return Unmet.CLAIM, cond.mismatch
        return None


# --- parsing (called by the policy loader, which supplies ``fail`` with file:line:column) --------

Fail = Callable[[tuple[str | int, ...], str], Exception]  # (place below the route's claims key, problem)


def parse_claim_conditions(raw: object, fail: Fail) -> tuple[ClaimCondition, ...]:
    """``claims:`` of a route: {name: value | {equals|any_of|contains: ...}} -> conditions (all must hold)."""
    if not isinstance(raw, dict) or not raw:
        raise fail((), "must be a mapping of claim name to condition, e.g. {tenant: acme}")
    out = []
    for name, spec in raw.items():
        if not isinstance(name, str) or not CLAIM_NAME.match(name):
            raise fail(
                (),
                f"claim name {name!r}: use 1 to 128 printable ASCII characters without spaces, "
                "quotes or backslashes (e.g. tenant, custom:tenant)",
            )
        if cognito_controlled(name):
            fix = (
                f"use the route key '{VERIFIED_CLAIM_KEYS[name]}' instead"
                if name in VERIFIED_CLAIM_KEYS
                else "claim conditions are for custom claims (a pre token generation trigger cannot set this one)"
            )
            raise fail((name,), f"{name!r} is set by Cognito itself; {fix}")
        out.append(_one_condition(name, spec, _below(fail, name)))
    return tuple(out)


def _below(fail: Fail, name: str) -> Fail:
    """``fail`` for the places below one claim's condition."""
    return lambda where, problem: fail((name, *where), problem)


def _one_condition(name: str, spec: object, fail: Fail) -> ClaimCondition:
    if isinstance(spec, list):
        raise fail(
            (),
            "a list is ambiguous; write {any_of: [...]} (the claim is one of them) or "
            "{contains: ...} (a list claim holds the value)",
        )
    if not isinstance(spec, dict):
        return condition(name, "equals", (_scalar(spec, (), fail),))
    if len(spec) != 1 or next(iter(spec)) not in OPERATORS:
        raise fail(
            (),
            f"must be a value or a mapping with exactly one of {', '.join(OPERATORS)}, "
            f"got keys {', '.join(repr(k) for k in spec) or 'none'}",
        )
    operator, value = next(iter(spec.items()))
    if operator == "equals":
        return condition(name, operator, (_scalar(value, (operator,), fail),))
    if operator == "contains":
        if not isinstance(value, str):
            raise fail((operator,), "must be a string (list claims hold strings)")
        return condition(name, operator, (value,))
    if not isinstance(value, list) or not value or len(value) > MAX_ANY_OF:
        raise fail((operator,), f"must be a non-empty list of at most {MAX_ANY_OF} values")
    values = tuple(_scalar(v, (operator, j), fail) for j, v in enumerate(value))
    seen: set[tuple[str, Scalar]] = set()
    for j, v in enumerate(values):
        typed = (_json_type(v), v)  # 1 and 1.0 are one JSON number; True is not 1
        if typed in seen:
            raise fail((operator, j), f"{_show(v)} is listed twice")
        seen.add(typed)
    return condition(name, operator, values)


def _scalar(value: object, where: tuple[str | int, ...], fail: Fail) -> Scalar:
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(where, f"{value!r} is not a JSON number")
    if isinstance(value, (str, int, float, bool)):
        return value
    raise fail(where, f"must be a string, number or boolean, got {kind(value)}")


def _json_type(value: Scalar) -> str:
    return "boolean" if isinstance(value, bool) else "string" if isinstance(value, str) else "number"
