"""The RE2 patterns the compiled Envoy matches requests with: route paths, the request screen and
the credentials jwt_authn may verify.

The request screen sends every request the service would refuse or read differently (a method or
path not in its normal form, a ``_method`` query parameter, credentials of another scheme) to the
service itself, and jwt_authn verifies only a token sent exactly as the service reads it (one
canonical ``Bearer`` JWT, ``BEARER_JWT``), so Envoy's own filters only ever decide requests whose
parsing both sides agree on. Each pattern is the service's own rule (authz_service.request,
authz_service.tokens) written for RE2; tests/test_native.py checks them against those rules.
Envoy matches a ``safe_regex`` against the whole value, so no pattern needs anchors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import cache

from ..policy import PARAM, REST
from ..request import FORBIDDEN_ESCAPES
from ..tokens import MAX_HEADER_CHARS

# An upper-case RFC 9110 token of at most 32 characters (request.checked_method).
METHOD = r"[!#$%&'*+\-.^_`|~0-9A-Z]{1,32}"

BEARER = "Bearer "  # jwt_authn's value_prefix: the scheme as the service's canonical spelling
_B64 = "[A-Za-z0-9_-]"
# The end of a canonical base64url segment (RFC 7515 section 2, as tokens._b64 insists): no
# padding, and the unused low bits of the last character zero (2 chars left over: 4 bits, 3: 2 bits).
_TAIL = f"(?:{_B64}{{4}}|{_B64}[AQgw]|{_B64}{{2}}[AEIMQUYcgkosw048])"
_SEGMENT = f"(?:{_B64}{{4}})*{_TAIL}"
# A JOSE header no longer than the service parses (tokens.MAX_HEADER_CHARS; "malformed" there).
_HEADER = f"(?:{_B64}{{4}}){{0,{MAX_HEADER_CHARS // 4 - 1}}}{_TAIL}"
# Exactly one ``Bearer`` credential holding a three-part JWS in canonical encoding: what jwt_authn
# extracts is then byte for byte what the service would parse. The scheme is case-insensitive for
# the service (RFC 6750) but not for jwt_authn's prefix, so other spellings go to the service.
# Envoy joins repeated headers with "," before matching, which this never matches. Only the JOSE
# header's length is bounded here: a bound makes RE2 step through one state per character, which
# costs a bounded payload several microseconds of memory traffic per request, more than the RBAC
# check of the token's size (checks.token_checks).
BEARER_JWT = f"{BEARER}{_HEADER}\\.{_SEGMENT}\\.{_SEGMENT}"

# RFC 3986 path characters the service accepts unescaped within a segment (request._PATH_CHARS
# without '%' and '/'), and the same without '.'.
_SEGMENT_CHAR = r"[!$&'()*+,\-.0-9:=@A-Z_a-z~]"
_SEGMENT_CHAR_NOT_DOT = r"[!$&'()*+,\-0-9:=@A-Z_a-z~]"


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Sorted ``values`` as runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] == value - 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


# Escaped bytes above 0x7F the service accepts: well-formed UTF-8 (RFC 3629).
_UTF8_SEQUENCES = [
    [(0xC2, 0xDF), (0x80, 0xBF)],
    [(0xE0, 0xE0), (0xA0, 0xBF), (0x80, 0xBF)],
    [(0xE1, 0xEC), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xED, 0xED), (0x80, 0x9F), (0x80, 0xBF)],
    [(0xEE, 0xEF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF0, 0xF0), (0x90, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF1, 0xF3), (0x80, 0xBF), (0x80, 0xBF), (0x80, 0xBF)],
    [(0xF4, 0xF4), (0x80, 0x8F), (0x80, 0xBF), (0x80, 0xBF)],
]


def re2_literal(text: str) -> str:
    """``text`` matched literally (policy literals hold RFC 3986 characters only)."""
    return "".join(f"\\{c}" if c in ".^$|?*+()[]{}\\" else c for c in text)


def _hex_digit(value: int) -> str:
    digit = f"{value:X}"
    return f"[{digit}{digit.lower()}]" if digit.isalpha() else digit


def _hex_range(lo: int, hi: int) -> str:
    """A character class for the hex digits lo..hi (either case)."""
    if lo == hi:
        return _hex_digit(lo)
    digits = [f"{v:X}" for v in range(lo, hi + 1)]
    return "[" + "".join(sorted(set(digits + [d.lower() for d in digits]))) + "]"


def _escaped_bytes(lo: int, hi: int) -> str:
    """``%XX`` for every byte lo..hi, hex digits in either case."""
    out = []
    for high in range(lo >> 4, (hi >> 4) + 1):
        first = max(lo, high << 4) & 0xF
        last = min(hi, (high << 4) | 0xF) & 0xF
        out.append(f"%{_hex_digit(high)}{_hex_range(first, last)}")
    return out[0] if len(out) == 1 else "(?:" + "|".join(out) + ")"


@cache
def native_target(literal_chars: str) -> str:
    """A request target (``:path``, query included) whose path the service accepts as it is and
    whose escapes it reads one way: '/', or non-empty segments other than "." and "..", then
    perhaps one '/' (such a path is read without it too: see ``trailing_slash_target``).

    Escaped ASCII passes unless the service refuses it (unreserved, '/', '\\', '%', ';' or a
    control: request.FORBIDDEN_ESCAPES) or it escapes one of ``literal_chars``, the characters the
    policy's literals hold that a request may send escaped (policy.escaped_literal_chars): a path
    escaping one of those must meet the route of its decoded reading too, and one ending in '/'
    the route of the path without it (Policy.routes_for), which one Envoy route cannot say: the
    service decides them. The listener resolves dot segments and merges slashes, but not in every
    case ("//" alone reaches the service as it is), hence the segment rule."""
    ascii_escapes = _runs(sorted(set(range(0x80)) - FORBIDDEN_ESCAPES - {ord(c) for c in literal_chars}))
    escape = "|".join(
        [_escaped_bytes(lo, hi) for lo, hi in ascii_escapes]
        + ["".join(_escaped_bytes(lo, hi) for lo, hi in sequence) for sequence in _UTF8_SEQUENCES]
    )
    char = f"(?:{_SEGMENT_CHAR}|{escape})"
    not_dot = f"(?:{_SEGMENT_CHAR_NOT_DOT}|{escape})"
    # A segment other than "." and "..": one starting with another character, with '.' and
    # another, or with ".." and more.
    segment = f"(?:{not_dot}{char}*|\\.{not_dot}{char}*|\\.\\.{char}+)"
    return f"(?s)/(?:{segment}(?:/{segment})*/?)?(?:\\?.*)?"


def trailing_slash_target(route_parts: Iterable[Sequence[object]], case_insensitive: bool) -> str | None:
    """A request target ending its path in '/' whose path without the '/' some route pattern
    without ``/**`` takes (whatever the method); None when the policy has no such pattern.

    Such a path must meet the route of each reading (Policy.routes_for): the one without the '/',
    and the one as written, which only a ``/**`` route can take. Envoy matches it as written only,
    so the ``/**`` routes refuse it whenever the two can differ, for the trailing-slash routes after
    every policy route to decide (plan.trailing_slash_plan). They can only when a pattern without
    ``/**`` takes the path without the '/': every ``/**`` route that takes one reading takes the
    other, so when the most specific route of the path without the '/' is a ``/**`` one, it is the
    route of both, the one Envoy takes. "/" is read one way."""
    bodies = sorted(
        {
            "".join("/[^/?]+" if part is PARAM else "/" + re2_literal(str(part)) for part in parts)
            for parts in route_parts
            if parts and parts[-1] is not REST
        }
    )
    if not bodies:
        return None
    return ("(?i)" if case_insensitive else "") + "(?s)(?:" + "|".join(bodies) + ")/(?:\\?.*)?"


def _letter(char: str) -> str:
    """``char`` as the service's query check reads it: either case, or percent-encoded in either (an
    ASCII letter's two cases differ only in the high hex digit)."""
    code = ord(char)
    if not char.isalpha():
        return f"(?:{re2_literal(char)}|%{_hex_digit(code >> 4)}{_hex_digit(code & 0xF)})"
    upper, lower = ord(char.upper()), ord(char.lower())
    return f"(?:[{char.upper()}{char.lower()}]|%[{upper >> 4:X}{lower >> 4:X}]{_hex_digit(code & 0xF)})"


# A query naming the ``_method`` parameter however it is spelled (request._has_method_override:
# names split on '&' and ';', compared percent-decoded with '+' a space, as PHP reads them: leading
# spaces dropped, '.' read as '_', ended at "[" or a NUL; case-folded).
METHOD_OVERRIDE_QUERY = (
    "(?s)[^?]*\\?(?:.*[&;])?(?:[ +]|%20)*"
    + f"(?:{_letter('_')}|{_letter('.')})"
    + "".join(_letter(c) for c in "method")
    + "(?:[=&;\\[]|%5[Bb]|%00|$).*"
)


def route_path(parts: tuple[object, ...], case_insensitive: bool = False) -> dict[str, object]:
    """The Envoy RouteMatch path specifier taking exactly the paths a route pattern covers.

    A literal pattern is an exact ``path``; a literal prefix with ``/**`` a ``path_separated_prefix``
    (the prefix itself and anything below it); patterns with ``{param}`` (one non-empty segment) a
    regex. The query string is never part of the match. ``case_insensitive`` (``path_case:
    insensitive``): literals match in any letter case (ASCII, as paths the service accepts are).
    """
    literals = [p for p in parts if isinstance(p, str)]
    rest = bool(parts) and parts[-1] is REST
    case = {"case_sensitive": False} if case_insensitive else {}
    if len(literals) == len(parts):
        return {"path": "/" + "/".join(literals), **case}
    if len(literals) == len(parts) - 1 and rest:
        return {"prefix": "/"} if not literals else {"path_separated_prefix": "/" + "/".join(literals), **case}
    regex = "".join("/[^/]+" if p is PARAM else "(?:/.*)?" if p is REST else "/" + re2_literal(str(p)) for p in parts)
    return {"safe_regex": {"regex": ("(?i)" if case_insensitive else "") + regex}}
