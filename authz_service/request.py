"""The original HTTP request, as every front door hands it to the decision: the few facts it needs.

Front doors (``doors.grpc``: Envoy's CheckRequest; ``doors.http``: Envoy's HTTP
authorization request) only extract the method, request target and headers; the rules for them
live here, once, so both doors accept and refuse exactly the same requests.

The path rule (docs/security.md, "Paths: one rule"): Envoy normalizes paths with the hardened settings in
envoy/envoy.yaml, and this module refuses (400) any path that is not already in normal form, so
the route we match is the resource the upstream will serve. Refused: no leading '/', '.' or '..'
segments, '//' , backslashes, ';' path parameters, control or non-ASCII characters, malformed
percent-escapes, percent-encoded unreserved characters, '/', '\\', '%', ';' or controls, and escaped
bytes that are not valid UTF-8 (overlong forms).

Headers: a method or URL override header is refused (400); a client-sent copy of an identity
header, in any spelling some server reads as it (any separator in place of a '-'), is reported so
the response strips it.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

MAX_PATH_LENGTH = 8192
MAX_REQUEST_ID = 128  # characters of x-request-id kept for the logs
IDENTITY_HEADERS = ("x-auth-client-id", "x-auth-scopes", "x-auth-sub")
_IDENTITY_SPELLINGS = frozenset(IDENTITY_HEADERS)
# Frameworks that honour these run another method or path than the one we authorize (GET allowed,
# DELETE run; /public allowed, X-Original-URL: /admin served).
_OVERRIDES = frozenset(
    ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url")
)


# The separators an app may read as one: CGI-style servers name x-auth-sub HTTP_X_AUTH_SUB, so
# x_auth_sub lands on the same variable, and PHP also turns '.' into '_' in variable names
# ($_SERVER under FrankenPHP or `php -S`), so x.auth.sub does too.
_SEPARATORS = "-_."
_TO_DASH = str.maketrans("_.", "--")


def _spellings(name: str) -> set[str]:
    """Every '-'/'_'/'.' spelling of ``name`` (what ``translate(_TO_DASH)`` maps back to it)."""
    head, sep, tail = name.partition("-")
    if not sep:
        return {name}
    return {head + s + rest for s in _SEPARATORS for rest in _spellings(tail)}


# Every lower-case '-'/'_'/'.' spelling of an identity or override header.
SPECIAL_NAMES = frozenset().union(*(_spellings(n) for n in (*IDENTITY_HEADERS, *_OVERRIDES)))

# The other characters a header name may hold besides letters and digits (RFC 9110 tchar). lighttpd
# passes a header to CGI, FastCGI and SCGI apps (PHP among them) as HTTP_ + its name with every one
# of them turned into '_', so x~auth~sub reaches such an app as x-auth-sub would.
_OTHER_SEPARATORS = "!#$%&'*+^`|~"
_ANY_TO_DASH = str.maketrans(dict.fromkeys("_." + _OTHER_SEPARATORS, "-"))
_SECOND_WORDS = tuple(sorted({name.split("-")[1] for name in (*IDENTITY_HEADERS, *_OVERRIDES)}))
# What front doors screen the header names with (joined by newlines): any name holding the shape
# of a spelling of an identity or override header (``x``, any separator, one of their second words,
# any separator). One regex over one string, cheaper than testing each name; ``special_names``
# looks closer only on a hit (x-auth-token or a-x-auth-b, say, are hits and no identity header).
_LOOK_CLOSER = re.compile("x[^0-9a-z\n](?:" + "|".join(_SECOND_WORDS) + ")[^0-9a-z\n]")
_LOOK_CLOSER_ANY_CASE = re.compile(_LOOK_CLOSER.pattern, re.IGNORECASE)

# An RFC 9110 token without lower-case letters. Methods are case-sensitive (RFC 9110 9.1) and the
# policy names them in upper case, but frameworks (Flask, Express...) upper-case what they receive,
# and HTTP/2 carries ``:method: get`` unchanged: a lower-case spelling would match no method-limited
# route, fall through to a weaker one, and still run the protected handler.
_METHOD = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Z]{1,32}\Z")
# Visible ASCII except '\\' and ';' (see module docstring); '%' is checked separately.
_PATH_CHARS = re.compile(r"^/[!$&'()*+,\-./0-9:=@A-Z_a-z~%]*\Z")
_ESCAPE = re.compile(r"%(.?.?)")
_HEX2 = re.compile(r"^[0-9A-Fa-f]{2}\Z")
# Escapes a normalizing proxy or framework would decode into something that changes the route:
# unreserved characters (RFC 3986 6.2.2.2 says they must not be encoded), '/', '\\', '%'
# (double encoding), ';' (a path parameter to a framework that strips it once decoded: Apache Shiro
# read /admin/%3Bx as /admin/, CVE-2020-13933; refused unescaped too) and control characters.
FORBIDDEN_ESCAPES = frozenset(
    [
        *range(0x20),
        0x7F,
        ord("/"),
        ord("\\"),
        ord("%"),
        ord(";"),
        ord("-"),
        ord("."),
        ord("_"),
        ord("~"),
        *range(ord("0"), ord("9") + 1),
        *range(ord("A"), ord("Z") + 1),
        *range(ord("a"), ord("z") + 1),
    ]
)


# Methods and request targets already found valid, with their normal form and segments: clients
# repeat the same few, so the regexes run once per distinct value. Only accepted values are kept
# (a refused one is checked again every time) and each memo is emptied when it reaches its bound,
# so random paths cost memory only up to the bound.
_MEMO_LIMIT = 4096
_GOOD_METHODS: dict[str, bool] = {}
_GOOD_PATHS: dict[str, tuple[str, tuple[str, ...]]] = {}
_MEMO_MAX_TARGET = 512  # longer targets are checked every time, so the memo stays small


def _remember(memo: dict, key: str, value: object = True) -> None:
    if len(memo) >= _MEMO_LIMIT:
        memo.clear()
    memo[key] = value


class BadRequest(Exception):
    """A request we cannot decide on safely; the message is safe to return to the client."""


@dataclass(slots=True)  # not frozen: built on every Check, and frozen costs ~0.8 us more (see Decision)
class HttpRequest:
    """The parts of the original HTTP request the decision uses (never modified once built)."""

    method: str
    path: str  # without query string or fragment
    segments: tuple[str, ...]
    authorization: tuple[str, ...]  # every Authorization value, so duplicates can be refused
    request_id: str
    spoofed_identity_headers: tuple[str, ...]  # client-sent names that spell one of ours


INVALID_METHOD = "missing or invalid method (an upper-case RFC 9110 token, e.g. GET)"

Source = TypeVar("Source")
# What a front door reads of a request's headers: every Authorization value, x-request-id ("" when
# absent) and every header name (lower-case, unless the door asks http_request to fold them).
HeaderFacts = tuple[tuple[str, ...], str, Collection[str]]


def http_request(
    source: Source,
    method: str,
    target: Callable[[Source], str],
    headers: Callable[[Source], HeaderFacts],
    *,
    fold_names: bool = False,
) -> HttpRequest:
    """The one way every caller (each front door, the policy tools) builds an HttpRequest.

    The checks run here, in one order (the method, then the request target, then the headers), so
    every door refuses the same requests with the same first reason. ``target`` and ``headers``
    read ``source`` only once the checks before them passed (a door's own refusals, such as the
    HTTP door's misconfigured-prefix check, come after the method's as they always did); either
    may raise BadRequest. ``fold_names``: the header names are as the client spelled them (the
    HTTP door), so they are lower-cased as they are screened (no copy of them is made).
    """
    method = checked_method(method)
    path, segments = path_and_segments(target(source))
    authorization, request_id, names = headers(source)
    # Names are screened with one regex over all of them; looked at closer only on a hit.
    if fold_names:
        hit = _LOOK_CLOSER_ANY_CASE.search("\n".join(names))
        spoofed = special_names(map(str.lower, names)) if hit else ()
    else:
        spoofed = special_names(names) if _LOOK_CLOSER.search("\n".join(names)) else ()
    return HttpRequest(method, path, segments, authorization, request_id[:MAX_REQUEST_ID], spoofed)


def request_from(method: str, target: str, headers: Mapping[str, str]) -> HttpRequest:
    """An HttpRequest from plain values (the policy tools' requests), through ``http_request``."""
    return http_request(headers, method, lambda _: target, _plain_headers)


def _plain_headers(headers: Mapping[str, str]) -> HeaderFacts:
    lowered = {name.lower(): value for name, value in headers.items()}
    authorization = lowered.get("authorization")
    return (authorization,) if authorization is not None else (), lowered.get("x-request-id", ""), tuple(lowered)


def checked_method(method: str) -> str:
    """``method`` when it is an upper-case RFC 9110 token; BadRequest otherwise."""
    if method not in _GOOD_METHODS:
        if not _METHOD.match(method):
            raise BadRequest(INVALID_METHOD)
        _remember(_GOOD_METHODS, method)
    return method


def path_and_segments(target: str) -> tuple[str, tuple[str, ...]]:
    """The normal-form path of a request target and its segments (see ``normalized_path``)."""
    known = _GOOD_PATHS.get(target)
    if known is None:
        path = normalized_path(target)
        known = (path, path_segments(path))
        if len(target) <= _MEMO_MAX_TARGET:
            _remember(_GOOD_PATHS, target, known)
    return known


def special_names(names: Iterable[str]) -> tuple[str, ...]:
    """The identity-header spellings among ``names`` (lower-case), sorted; BadRequest on an override
    header (naming the first in alphabetical order, so the answer does not depend on header order,
    which differs between Envoy's gRPC map and its HTTP request).

    A spelling is the name with any separator in place of each '-': x_auth.sub as PHP reads it,
    x~auth~sub as lighttpd hands it to CGI apps. Envoy configs of this project remove the spellings
    with other separators than '-', '_' and '.' before any filter runs; under Istio's sidecar, or an
    Envoy config of the user's own, they reach the gRPC door, which sees every header. Sorted and
    without repeats, however a client orders or repeats them: they are part of the cached allow
    answers' key (``response.Answers``)."""
    spoofed = set()
    overrides = []
    for name in names:
        dashed = name.translate(_ANY_TO_DASH)
        if dashed in _IDENTITY_SPELLINGS:
            spoofed.add(name)
        elif dashed in _OVERRIDES:
            overrides.append(dashed)
    if overrides:
        raise BadRequest(f"{min(overrides)} (method or URL override) is not accepted")
    return tuple(sorted(spoofed))


def identity_and_override_spellings() -> tuple[str, ...]:
    """Every '-'/'_'/'.' spelling of every identity and override header name, sorted: what must
    never reach the app from the client (the HTTP front door tells Envoy to strip them all)."""
    return tuple(sorted(SPECIAL_NAMES))


def other_separator_spellings_pattern() -> str:
    """An RE2 pattern for the lower-case names shaped like an identity or override header (``x``, a
    separator, one of their second words, a separator, anything) that hold a separator other than
    '-', '_' or '.' anywhere: x~auth~sub, x-http-method+override.

    The shipped Envoy configs remove these before any filter runs (an early header mutation), so
    neither the app nor a lenient server in front of it ever sees them; the '-'/'_'/'.' spellings
    go on to the front doors, which strip the identity ones and refuse the overrides as before.
    A shape rather than the names: with twelve more separators they run into thousands, and Envoy
    refuses a regex whose RE2 program is over 100 instructions. It also takes names no client
    sends (x-auth-other~x): nothing legitimate is spelled so."""
    other = f"[{_OTHER_SEPARATORS}]"
    dotted = f"[{_SEPARATORS}]"  # '-' first: a literal in a class
    words = "(?:" + "|".join(_SECOND_WORDS) + ")"
    return f"x(?:{other}{words}[{_SEPARATORS}{_OTHER_SEPARATORS}]|{dotted}{words}(?:{other}|{dotted}.*{other})).*"


def identity_spellings() -> tuple[str, ...]:
    """Every spelling of every identity header, sorted: what is stripped from a client's request
    (``special_names`` returns them) rather than refused."""
    return tuple(sorted(name for name in SPECIAL_NAMES if name.translate(_TO_DASH) in _IDENTITY_SPELLINGS))


def override_spellings() -> dict[str, tuple[str, ...]]:
    """Each override header's spellings (sorted), by its name in name order: what is refused
    (``special_names`` raises BadRequest naming the header)."""
    spellings: dict[str, list[str]] = {}
    for name in sorted(SPECIAL_NAMES):
        dashed = name.translate(_TO_DASH)
        if dashed in _OVERRIDES:
            spellings.setdefault(dashed, []).append(name)
    return {header: tuple(spellings[header]) for header in sorted(spellings)}


def _has_method_override(query: str) -> bool:
    """Whether the query names a ``_method`` parameter, however it is spelled.

    Rails, Laravel and Express's method-override honour ``?_method=DELETE``: the app would run
    another method than the one authorized. Names are split on both ``&`` and ``;`` and read as
    the most lenient of those parsers, PHP's (Laravel, Symfony), reads them: percent-decoded
    (``+`` a space), ended at a NUL, leading spaces dropped, ended at ``[`` (``_method[]=``), a
    space or ``.`` read as ``_`` (so ``+_method``, ``.method`` and ``_method%00x`` are all
    ``_method``), and case-folded. The cheap substring test keeps ordinary queries on the fast path.
    """
    if "%" not in query and "method" not in query.lower():  # without an escape, the letters are as sent
        return False
    for pair in re.split(r"[&;]", query):
        name = urllib.parse.unquote_plus(pair.partition("=")[0], errors="replace")
        name = name.partition("\x00")[0].lstrip(" ").partition("[")[0]
        if name.translate(_PHP_NAME).lower() == "_method":
            return True
    return False


# PHP reads a space or a dot in a query parameter's name as '_' (php_register_variable_ex).
_PHP_NAME = str.maketrans(" .", "__")


def path_segments(path: str) -> tuple[str, ...]:
    """The segments the policy matches ('/' has none) of a path ``normalized_path`` accepted."""
    return tuple(path[1:].split("/")) if path != "/" else ()


def normalized_path(target: str) -> str:
    """The path part of an origin-form request target, refused unless already in normal form."""
    if not target:
        raise BadRequest("empty path")
    if len(target) > MAX_PATH_LENGTH:
        raise BadRequest("path too long")
    path, _, query = target.partition("#")[0].partition("?")
    if query and _has_method_override(query):
        raise BadRequest("_method (method override) in the query is not accepted")
    if not path.startswith("/"):
        raise BadRequest("path must start with '/'")
    if not _PATH_CHARS.match(path):
        raise BadRequest("path contains characters that are not allowed")
    if "%" in path:
        for escape in _ESCAPE.finditer(path):
            if not _HEX2.match(escape[1]) or int(escape[1], 16) in FORBIDDEN_ESCAPES:
                raise BadRequest("path contains a malformed or disallowed percent-escape")
        # Escaped bytes must decode as UTF-8: overlong forms like %c0%ae ('.' to lenient decoders)
        # would otherwise pass as an opaque segment here and become a dot segment upstream.
        try:
            urllib.parse.unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("path percent-escapes are not valid UTF-8") from None
    if "//" in path or "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        raise BadRequest("path is not normalized")
    return path
