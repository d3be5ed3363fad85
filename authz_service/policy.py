"""The route policy: which issuers are trusted and which scopes each method + path requires.

The YAML file is parsed once into frozen dataclasses and compiled into a segment trie, so the
hot path does one dictionary walk per path segment and allocates nothing per route.

Matching rule (documented in docs/policy.md): the most specific route wins regardless of file order.
Specificity is decided segment by segment from the left: a literal segment beats ``{param}``,
which beats a trailing ``/**``; at equal paths a route listing methods beats one for any method.
Two routes that could match the same request with equal specificity are refused at load.
A route that lists GET also takes HEAD (apps serve HEAD with the GET handler), unless another
route at the same path lists HEAD itself. A path ending in '/' must meet the route that matches it
as written and the one that matches it without the '/' (``Policy.routes_for``: lenient routers
serve /a/ with /a's handler). ``path_case: insensitive`` matches literal segments ignoring case.

Besides its scopes (any of them), a route may require all of some scopes, name the app clients
allowed on it and set conditions on custom claims (``conditions``); an issuer entry may accept
Cognito's newer issuer URL and the regions of a multi-Region user pool (one ``Issuer`` per
accepted ``iss``). The policy reference is docs/policy.md.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from .claims import SCOPE_TOKEN
from .cognito import POOL_ID, REGION
from .conditions import ClaimCondition, Conditions, parse_claim_conditions
from .files import FileReadError, read_bounded, too_large
from .urls import authority_problem, shown
from .yamlfile import Where, YamlValidator, kind, place

# RFC 3986 pchar without percent-encoding: what a literal policy segment may contain.
_LITERAL_SEGMENT = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@]+\Z")
_PARAM_SEGMENT = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")
_METHOD = re.compile(r"^[A-Z][A-Z0-9_-]*\Z")  # RFC 9110 token, upper case as HTTP methods are written
_SCOPE = re.compile(rf"^{SCOPE_TOKEN}\Z")
# Emulators name pools differently (cognito-local: local_Abc123); accepted with an explicit issuer.
_ANY_POOL_ID = re.compile(r"^[A-Za-z0-9-]{1,50}_[0-9A-Za-z]+\Z")
_ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/ {}*-]{0,99}\Z")
_CLIENT_ID = re.compile(r"^[\x21-\x7E]{1,128}\Z")
# The ``client`` metric label of every client the policy does not name (Policy.client_label).
OTHER_CLIENT = "other"
_JTI = re.compile(r"^[\x21-\x7E]{1,256}\Z")  # Cognito's are UUIDs; any printable ASCII is compared exactly


class PolicyError(ValueError):
    """A policy file that cannot serve. The message names the file, line:column, the place and the fix.

    ``where``/``line``/``column`` are kept structured so tools (``validate``) can sort and report
    errors without parsing the message; ``code`` names the kind of mistake where tools need to
    tell it apart (e.g. ``unknown-path-parameter``), None otherwise.
    """

    def __init__(
        self,
        message: str,
        where: Where = (),
        line: int | None = None,
        column: int | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.where = where
        self.line = line
        self.column = column
        self.code = code


class Mode(enum.Enum):
    """Whether a route's denials are enforced or only reported (dry-run rollout of a new rule)."""

    ENFORCE = "enforce"
    DRY_RUN = "dry-run"


class PathCase(enum.Enum):
    """How the app's router compares literal path segments (``path_case``). A case-insensitive
    router serves /ADMIN/report with the /admin/report handler, so the policy must match it so too."""

    SENSITIVE = "sensitive"
    INSENSITIVE = "insensitive"


class IssuerFormat(enum.Enum):
    """Which issuer URL a Cognito user pool writes into ``iss`` (its IssuerConfiguration)."""

    ORIGINAL = "original"  # https://cognito-idp.<region>.amazonaws.com/<pool id>
    UPDATED = "updated"  # https://issuer-cognito-idp.<region>.amazonaws.com/<pool id>


_ISSUER_HOSTS = {IssuerFormat.ORIGINAL: "cognito-idp", IssuerFormat.UPDATED: "issuer-cognito-idp"}


def cognito_issuer(issuer_format: IssuerFormat, region: str, user_pool_id: str) -> str:
    """The ``iss`` a Cognito user pool (or one region of a multi-Region pool) puts in its tokens."""
    return f"https://{_ISSUER_HOSTS[issuer_format]}.{region}.amazonaws.com/{user_pool_id}"


@dataclass(frozen=True, slots=True)
class Issuer:
    """One accepted ``iss`` of a trusted Cognito user pool, and where its signing keys are.

    An ``issuers`` entry of the policy yields one Issuer, or one per region for a multi-Region pool
    (``replica`` marks the replica regions'); each has its own JWKS state and metric label.
    """

    user_pool_id: str
    region: str
    issuer: str
    jwks_uri: str
    client_ids: frozenset[str] | None  # None: any app client of the pool
    format: IssuerFormat | None = IssuerFormat.ORIGINAL  # None: an explicit ``issuer`` URL
    replica: bool = False
    block: int = 0  # index of the ``issuers`` entry that accepts it

    @property
    def metric_label(self) -> str:
        """The ``issuer`` label of the JWKS metrics: the pool id, plus ``@<region>`` for a replica
        region (one pool's regions must not share a series)."""
        return f"{self.user_pool_id}@{self.region}" if self.replica else self.user_pool_id


@dataclass(frozen=True, slots=True)
class DenyList:
    """The policy's ``deny`` section: app clients and token ids refused on every protected route.

    Why: Cognito cannot revoke or introspect a client_credentials token, so a leaked client secret
    or token stays valid until it expires (up to a day). Checked after the token verified, on
    every Check (a cached token included), before the route's own conditions; never on a public
    route, where no token is read."""

    client_ids: frozenset[str]
    jtis: frozenset[str]


def deny_list_sizes(policy: Policy) -> dict[str, int]:
    """How many client ids and jtis ``policy`` denies (Metrics.policy_loaded's keywords)."""
    deny = policy.deny
    return {
        "deny_client_ids": len(deny.client_ids) if deny else 0,
        "deny_jtis": len(deny.jtis) if deny else 0,
    }


# Lint warnings (``authz-service validate``) a route may acknowledge as intended with
# ``acknowledge: [code, ...]``; the loader refuses unknown codes so a typo cannot silence nothing.
LINT_CODES = {
    "fallthrough": "other methods on this route's paths fall through to a public or weaker route",
    "public-hole": "this public route is more specific than a protected route it carves a hole in",
    "public-catch-all": "this public route's pattern covers protected routes' paths",
    "case-variant": "this public route takes case variants of protected routes' paths (a case-insensitive "
    "router serves them with the protected handler)",
}


@dataclass(frozen=True, slots=True)
class Route:
    """One policy rule. A public route has no scopes and no conditions; a protected one requires
    ``scopes`` (any of them), ``all_scopes`` (all of them) or both."""

    name: str
    path: str
    methods: frozenset[str] | None  # None: any method
    scopes: frozenset[str]  # any of them (empty: no any-of requirement)
    public: bool
    mode: Mode
    index: int  # position in the file, for messages
    scopes_text: str = field(default="", compare=False)  # precomputed for the 403 header and body
    acknowledge: frozenset[str] = frozenset()  # lint codes (LINT_CODES) the author marked as intended
    all_scopes: frozenset[str] = frozenset()
    client_ids: frozenset[str] | None = None  # None: any client the issuer accepts
    claims: tuple[ClaimCondition, ...] = ()
    all_scopes_text: str = field(default="", compare=False)
    # The scopes and conditions compiled for decide(); None when the route has only (any-of) scopes.
    conditions: Conditions | None = field(default=None, compare=False)
    # Whether the request reaches the app with its Authorization header (``forward_token``); by
    # default it is removed, as jwt_authn (forward: false) and Istio (forwardOriginalToken) do.
    forward_token: bool = False
    # Every scope the route names, any-of and all-of (the decision log's ``scopes_used``).
    required_scopes: frozenset[str] = field(default=frozenset(), compare=False)

    @property
    def requirements(self) -> Conditions:
        """What a verified token must meet on this route, as ``Conditions`` (for tools: a
        scopes-only route has no ``conditions``, and decide() checks its scopes directly)."""
        return self.conditions or Conditions(self.scopes, frozenset(), None, ())

    def takes(self, method: str) -> bool:
        """Whether this route's methods include ``method`` (GET implies HEAD; see the module doc)."""
        methods = self.methods
        return methods is None or method in methods or (method == "HEAD" and "GET" in methods)


@dataclass(frozen=True, slots=True)
class Policy:
    """A loaded, validated and compiled policy. Immutable: a reload builds a new one."""

    source: str
    sha256: str
    issuers: tuple[Issuer, ...]
    routes: tuple[Route, ...]
    issuers_by_iss: Mapping[str, Issuer]
    _trie: _Node = field(repr=False, compare=False)
    version: int = 1  # the policy format (``version:``); see POLICY_VERSIONS
    # Custom claims some route's conditions name: the verifier keeps exactly these in Claims.custom.
    claim_names: frozenset[str] = frozenset()
    path_case: PathCase = PathCase.SENSITIVE
    # The app client ids the policy names (issuer and route client_ids): the only values of the
    # per-client metrics' ``client`` label (see client_label).
    clients: frozenset[str] = frozenset()

    def client_label(self, client_id: str) -> str:
        """A client's ``client`` metric label: its id when the policy names it, else ``other``, so
        the label's values are bounded by the policy, never by whoever presents a valid token."""
        return client_id if client_id in self.clients else OTHER_CLIENT

    deny: DenyList | None = None  # None: no deny section, or an empty one (nothing to look up)
    # The percent-escapes of the characters the routes' literal segments hold that a request may
    # also send escaped (see routes_for); None when no literal holds one.
    literal_escapes: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def match(self, method: str, segments: tuple[str, ...]) -> Route | None:
        """The most specific route for this method and path segments as written, or None.

        Only ``routes_for`` knows the trailing-slash rule: decide() and the tools go through it for
        a path ending in '/'."""
        return _match(self._trie, segments, 0, method)

    def methods_of(self, route: Route) -> frozenset[str] | None:
        """The methods ``route`` takes in this policy (None: any): its own, plus HEAD where its GET
        implies it (see the module doc). Read from the compiled trie, so a translation of the
        policy into another matcher (``native``) takes exactly what ``match`` takes."""
        if route.methods is None:
            return None
        node = self._trie
        parts = pattern_parts(route.path)
        for part in parts:
            if part is REST:
                break
            if isinstance(part, str):
                node = node.literals[self.fold(part)]
            else:  # PARAM: compiled from this very route, so the trie has it
                assert node.param is not None
                node = node.param
        endpoint = node.rest if parts and parts[-1] is REST else node.exact
        return frozenset(method for method, owner in endpoint.by_method.items() if owner is route)

    def routes_for(self, method: str, segments: tuple[str, ...]) -> tuple[Route, ...]:
        """Every route whose requirements the request must meet; empty: no route (deny).

        Why two for a path ending in '/': a strict router serves it as written (where only a
        ``/**`` route can take it), a lenient one (Flask ``strict_slashes=False``, Express, Spring
        MVC up to 5) with the handler of the path without the '/'. Why two for a path escaping a
        character some literal of the policy holds (``/v1/items%3AbatchGet`` beside a
        ``/v1/items:batchGet`` route): most routers (Spring, Go's) decode it and serve the literal's
        handler, a strict one serves it as written. The policy cannot know which the app runs, so
        the request must meet the route of each reading: the route as written, then, when another
        one, the route of each other reading. Never more than any reading allows.
        """
        escapes = self.literal_escapes
        if escapes is None and (not segments or segments[-1]):  # one reading: most requests
            route = self.match(method, segments)
            return () if route is None else (route,)
        readings = [segments]
        if escapes is not None:
            decoded = tuple(escapes.sub(_unescape, s) if "%" in s else s for s in segments)
            if decoded != segments:
                readings.append(decoded)
        routes: list[Route] = []
        for reading in readings:
            for variant in (reading, reading[:-1]) if reading and not reading[-1] else (reading,):
                route = self.match(method, variant)
                if route is None:
                    return ()
                if route not in routes:
                    routes.append(route)
        return tuple(routes)

    def case_folded(self) -> Policy:
        """The same routes matched as ``path_case: insensitive`` does (what a case-insensitive
        router would serve), for the lint that compares both; routes that would then tie keep the
        first in the file."""
        if self.path_case is PathCase.INSENSITIVE:
            return self
        trie = _compile(self.routes, _Context(self.source), fold=True)
        return _CaseInsensitivePolicy(
            self.source,
            self.sha256,
            self.issuers,
            self.routes,
            self.issuers_by_iss,
            trie,
            self.version,
            self.claim_names,
            PathCase.INSENSITIVE,
            self.clients,
            self.deny,
            self.literal_escapes,
        )

    def representative_paths(
        self, limit: int = 100_000, *, folded: Policy | None = None
    ) -> list[tuple[str, ...]] | None:
        """One request path per class of paths the matcher cannot tell apart (None over ``limit``).

        Why: lints ("this route can never match") must be exact, not guessed. ``match`` only
        looks at which literal keys exist at the trie nodes a path reaches, whether a segment is
        empty (a trailing '/'), and the path length, so a segment that is no literal of any
        reachable node behaves like any other such segment. Walking the trie with those classes
        yields a finite set of paths that together exercise every way ``match`` can go; a path
        ending in '/' and the same path without it are both in the set, so ``routes_for`` is
        covered too.

        With ``folded`` (``case_folded()``), the classes also tell apart what that matcher sees:
        for each literal it knows, one spelling that no literal of this policy's reachable nodes
        has (``/ADMIN`` beside ``/admin``), which this policy matches like any other segment and
        ``folded`` like the literal.
        """
        out: list[tuple[str, ...]] = []
        tries = (self, folded) if folded is not None else (self,)

        def walk(prefix: tuple[str, ...], alive: tuple[list[_Node], ...]) -> bool:
            out.append(prefix)
            if prefix:  # a trailing slash ("/a/"); "//" is refused earlier
                out.append((*prefix, ""))
            if len(out) > limit:
                return False
            if not any(alive):
                return True
            keys = {k for n in alive[0] for k in n.literals}
            segments = sorted(keys)
            if folded is not None:
                for key in sorted({k for n in alive[1] for k in n.literals}):
                    spelling = _other_spelling(key, keys)
                    if spelling is not None:
                        segments.append(spelling)
            params = [[n.param for n in nodes if n.param is not None] for nodes in alive]
            for segment in (*segments, OTHER_SEGMENT):
                nxt = tuple(
                    [n.literals[key] for n in nodes if (key := policy.fold(segment)) in n.literals] + ps
                    for policy, nodes, ps in zip(tries, alive, params, strict=True)
                )
                if not walk((*prefix, segment), nxt):
                    return False
            return True

        return out if walk((), tuple([p._trie] for p in tries)) else None  # noqa: SLF001 - Policy's own

    def fold(self, segment: str) -> str:
        """A request segment as this policy's trie keys spell literals (lower case when insensitive)."""
        return segment.lower() if self.path_case is PathCase.INSENSITIVE else segment


class PolicySource(Protocol):
    """Where the policy in force is read (reloader.PolicyReloader in the service): once per Check,
    and again by a Check that waited on the issuer's keys (tokens.PolicyReloaded)."""

    @property
    def policy(self) -> Policy: ...


class _CaseInsensitivePolicy(Policy):
    """A policy with ``path_case: insensitive``: its trie keys literals in lower case, so a request's
    segments are looked up in lower case. A subclass, so a case-sensitive policy's match runs exactly
    the plain trie walk."""

    __slots__ = ()

    def match(self, method: str, segments: tuple[str, ...]) -> Route | None:
        return _match(self._trie, tuple([s.lower() for s in segments]), 0, method)


def _other_spelling(literal: str, taken: set[str]) -> str | None:
    """A spelling of ``literal`` in other letter case that is not in ``taken`` (None: there is none)."""
    letters = [i for i, c in enumerate(literal) if c.isalpha()]
    for k in reversed(range(1 << len(letters))):  # all lower case first, all upper case last
        chars = list(literal.lower())
        for bit, i in enumerate(letters):
            if not (k >> bit) & 1:
                chars[i] = chars[i].upper()
        spelling = "".join(chars)
        if spelling not in taken:
            return spelling
    return None


# A segment no policy literal can equal ('%' is not allowed in literals), standing for "any other".
OTHER_SEGMENT = "%7Bother%7D"


# --- compiled trie -------------------------------------------------------------------------------


class _Node:
    """Trie node. ``exact`` holds routes ending here; ``rest`` holds routes ending in ``/**``."""

    __slots__ = ("exact", "literals", "param", "rest")

    def __init__(self) -> None:
        self.literals: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.exact = _Endpoint()
        self.rest = _Endpoint()


class _Endpoint:
    """Routes ending at one trie position: per explicit method first, then the any-method route."""

    __slots__ = ("any_method", "by_method")

    def __init__(self) -> None:
        self.by_method: dict[str, Route] = {}
        self.any_method: Route | None = None

    def pick(self, method: str) -> Route | None:
        return self.by_method.get(method) or self.any_method


def _match(node: _Node, segments: tuple[str, ...], i: int, method: str) -> Route | None:
    # Depth-first in specificity order: literal, then {param}, then /** at this depth.
    if i == len(segments):
        return node.exact.pick(method) or node.rest.pick(method)
    segment = segments[i]
    child = node.literals.get(segment)
    if child is not None:
        found = _match(child, segments, i + 1, method)
        if found is not None:
            return found
    if node.param is not None and segment:
        found = _match(node.param, segments, i + 1, method)
        if found is not None:
            return found
    return node.rest.pick(method)


# --- loading -------------------------------------------------------------------------------------

_TOP_KEYS = {"version", "issuers", "routes", "mode", "path_case", "forward_token", "deny"}
_DENY_KEYS = {"client_ids", "jtis"}
# Policy formats this loader reads. Why a version at all: a policy written for a later format
# (new keys, or old keys with a new meaning) must be refused by an older service, not half-read.
POLICY_VERSIONS = (1,)
_ISSUER_KEYS = {"user_pool_id", "region", "issuer", "jwks_uri", "client_ids", "issuer_format", "replica_regions"}
_ROUTE_KEYS = {
    "name",
    "methods",
    "path",
    "scopes",
    "public",
    "mode",
    "acknowledge",
    "all_scopes",
    "client_ids",
    "claims",
    "forward_token",
}


# A policy is a few KB; anything near this is a mistake (or /dev/zero), not a policy.
POLICY_MAX_BYTES = 1024 * 1024
_REGULAR_FILE_FIX = (
    "point the policy path at a regular file (a ConfigMap mounted as a directory, or a file "
    "written elsewhere and renamed into place)"
)
_TOO_LARGE_FIX = "check that the path names the policy file (a policy is a few KB)"


def read_policy_file(path: Path | str) -> bytes:
    """The bytes of a policy file, read so that no file can hang or exhaust the reader (files.py):
    a regular file only, at most ``POLICY_MAX_BYTES``. Every reader of policy files (the server at
    start-up and on reload, ``validate``, ``explain``, ``test``) goes through here."""
    try:
        return read_bounded(path, "policy file", POLICY_MAX_BYTES, _TOO_LARGE_FIX, regular_fix=_REGULAR_FILE_FIX)
    except FileReadError as exc:
        raise PolicyError(str(exc)) from None


def read_policy_stream(stream: BinaryIO, source: str) -> bytes:
    """A policy piped in (``validate -``), with the same size cap as a file."""
    data = stream.read(POLICY_MAX_BYTES + 1)
    if len(data) > POLICY_MAX_BYTES:
        raise PolicyError(str(too_large(source, "more", "policy file", POLICY_MAX_BYTES, _TOO_LARGE_FIX)))
    return data


def load_policy_file(path: Path | str) -> Policy:
    """Read and compile a policy file; any problem raises PolicyError naming the file."""
    return parse_policy(read_policy_file(path), source=str(path))


def parse_policy(data: bytes | str, source: str = "<policy>") -> Policy:
    """Parse policy YAML text into a compiled Policy (PolicyError on any mistake)."""
    policy, errors = check_policy(data, source)
    if errors:
        raise errors[0]
    assert policy is not None
    return policy


def check_policy(data: bytes | str, source: str = "<policy>") -> tuple[Policy | None, list[PolicyError]]:
    """Load like the server does, but collect every error instead of stopping at the first.

    Each issuer and route is checked independently, so ``validate`` can report all of them; the
    first error (in file order) is exactly what ``parse_policy`` raises. A Policy is returned only
    when there is no error at all.
    """
    raw = data.encode() if isinstance(data, str) else data
    try:
        ctx = _Context.from_bytes(raw, source)
        doc = ctx.document()
    except PolicyError as exc:  # not UTF-8, not YAML: nothing else can be checked
        return None, [exc]
    try:
        policy = ctx.policy(doc, raw)
    except PolicyError as exc:  # a top-level problem: nothing else can be checked
        ctx.errors.append(exc)
        policy = None
    ctx.errors.sort(key=lambda e: (e.line or 0, e.column or 0))  # stable: same place keeps its order
    return (policy if not ctx.errors else None), ctx.errors


class _Context(YamlValidator):
    """Validation helpers that know the file (name and text), so every message can name the line;
    every error is collected (``errors``), so ``validate`` can report them all."""

    def __init__(self, source: str, text: str = "") -> None:
        super().__init__(source, text)
        self.errors: list[PolicyError] = []

    @classmethod
    def error(cls, message: str, where: Where = (), line: int | None = None, column: int | None = None) -> PolicyError:
        return PolicyError(message, where, line, column)

    @classmethod
    def from_bytes(cls, raw: bytes, source: str) -> _Context:
        ctx = super().from_bytes(raw, source)
        assert isinstance(ctx, _Context)
        return ctx

    def fail(
        self,
        where: Where,
        problem: str,
        fix: str | None = None,
        *,
        at: Where | None = None,
        at_key: bool = False,
        code: str | None = None,
    ) -> PolicyError:
        error = super().fail(where, problem, fix, at=at, at_key=at_key)
        assert isinstance(error, PolicyError)
        error.code = code
        return error

    def collect(self, build: Any, *args: Any) -> Any:
        """Run one item's checks; record its error and return None so the next item is checked too."""
        try:
            return build(*args)
        except PolicyError as exc:
            self.errors.append(exc)
            return None

    def policy(self, doc: object, raw: bytes) -> Policy | None:
        if not isinstance(doc, dict):
            raise self.fail((), f"the policy must be a mapping with 'issuers' and 'routes', got {kind(doc)}")
        version = self.version(doc.get("version", 1))  # first: a later format's keys are not ours to judge
        self.check_keys(doc, _TOP_KEYS, ())
        default_mode = self.mode(doc.get("mode", "enforce"), ("mode",))
        forward_token = self.boolean(doc, "forward_token", (), default=False)
        path_case = self.path_case(doc.get("path_case", PathCase.SENSITIVE.value))
        deny = self.collect(self.deny, doc["deny"]) if "deny" in doc else None
        issuer_items = self.nonempty_list(doc, "issuers", ())
        blocks = [self.collect(self.issuer, item, i) for i, item in enumerate(issuer_items)]
        issuers = [issuer for block in blocks if block is not None for issuer in block]
        by_iss: dict[str, Issuer] = {}
        for issuer in issuers:
            if issuer.issuer in by_iss:
                self.errors.append(
                    self.fail(("issuers", issuer.block), f"issuer {issuer.issuer!r} is listed twice; keep one entry")
                )
            by_iss[issuer.issuer] = issuer
        route_items = self.collect(self.nonempty_list, doc, "routes", ()) or []
        routes = [self.collect(self.route, item, i, default_mode, forward_token) for i, item in enumerate(route_items)]
        good_routes = tuple(r for r in routes if r is not None)
        self.unique_names(
            good_routes, {i for i, item in enumerate(route_items) if isinstance(item, dict) and "name" in item}
        )
        fold = path_case is PathCase.INSENSITIVE
        trie = _compile(good_routes, self, fold=fold)
        if self.errors:
            return None
        return (_CaseInsensitivePolicy if fold else Policy)(
            source=self.source,
            sha256=hashlib.sha256(raw).hexdigest(),
            issuers=tuple(issuers),
            routes=good_routes,
            issuers_by_iss=by_iss,
            _trie=trie,
            version=version,
            claim_names=frozenset(c.name for r in good_routes for c in r.claims),
            path_case=path_case,
            clients=frozenset().union(
                *(i.client_ids for i in issuers if i.client_ids), *(r.client_ids for r in good_routes if r.client_ids)
            ),
            deny=deny,
            literal_escapes=_literal_escapes(good_routes),
        )

    def deny(self, value: object) -> DenyList | None:
        """The ``deny`` section. Empty lists are fine (a section kept ready for an incident), and
        so are repeats: a reload refused in an incident would keep the token working."""
        where: Where = ("deny",)
        if value is None:  # "deny:" with every entry commented out
            return None
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping with client_ids and/or jtis, got {kind(value)}")
        self.check_keys(value, _DENY_KEYS, where)
        lists: dict[str, frozenset[str]] = {}
        for key, shape, what in (
            ("client_ids", _CLIENT_ID, "an app client id (1 to 128 printable ASCII characters)"),
            ("jtis", _JTI, "a token's jti claim (1 to 256 printable ASCII characters)"),
        ):
            entries = value.get(key) or []
            if not isinstance(entries, list):
                raise self.fail((*where, key), f"must be a list (it may be empty), got {kind(entries)}")
            for j, entry in enumerate(entries):
                if not isinstance(entry, str) or not shape.match(entry):
                    raise self.fail((*where, key, j), f"{entry!r} is not {what}")
            lists[key] = frozenset(entries)
        if not lists["client_ids"] and not lists["jtis"]:
            return None
        return DenyList(lists["client_ids"], lists["jtis"])

    def path_case(self, value: object) -> PathCase:
        try:
            return PathCase(value)
        except ValueError:
            raise self.fail(
                ("path_case",),
                f"must be 'sensitive' (the default: the app's router tells /Admin "
                f"from /admin) or 'insensitive' (it does not), got {value!r}",
            ) from None

    def version(self, value: object) -> int:
        # JSON numbers: 1.0 is 1 (as the schema sees it); true is not a number.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value in POLICY_VERSIONS:
            return int(value)
        known = ", ".join(str(v) for v in POLICY_VERSIONS)
        raise self.fail(
            ("version",),
            f"{value!r} is not a policy format this authz-service reads (it reads "
            f"version {known}); write 'version: 1' (or leave it out), or upgrade authz-service",
        )

    def unique_names(self, routes: Iterable[Route], named: set[int]) -> None:
        """Two routes with one name would share their metric series (route label) and log lines.

        Only names someone wrote count: two equal default names ("GET /a") mean equal methods and
        path, which the trie already refuses as a conflict."""
        first_by_name: dict[str, Route] = {}
        for route in routes:
            first = first_by_name.setdefault(route.name, route)
            if first is route or (route.index not in named and first.index not in named):
                continue
            first_place = place(self.source, *self.places.position(("routes", first.index, "name")))
            self.errors.append(
                self.fail(
                    ("routes", route.index, "name"),
                    f"{route.name!r} is also the name of routes[{first.index}] ({first_place}); route names label the "
                    "metrics (route=...), so both would be counted as one: give each route its own name",
                )
            )

    def check_keys(self, item: dict[str, Any], allowed: set[str], where: Where) -> None:
        for key in item:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                raise self.fail(
                    where,
                    f"unknown key {key!r}; allowed keys: {hint}",
                    at=(*where, key) if isinstance(key, str) else None,
                    at_key=isinstance(key, str),
                )

    def nonempty_list(self, item: dict[str, Any], key: str, where: Where) -> list[Any]:
        if key not in item:
            raise self.fail(where, f"missing required key {key!r}")
        value = item[key]
        if not isinstance(value, list) or not value:
            got = "an empty list" if value == [] else kind(value)
            raise self.fail((*where, key), f"must be a non-empty list, got {got}")
        return value

    def boolean(self, item: dict[str, Any], key: str, where: Where, *, default: bool) -> bool:
        value = item.get(key, default)
        if not isinstance(value, bool):
            raise self.fail((*where, key), f"must be true or false, got {value!r}")
        return value

    def string(self, item: dict[str, Any], key: str, where: Where, required: bool = False) -> str | None:
        if key not in item:
            if required:
                raise self.fail(where, f"missing required key {key!r}")
            return None
        value = item[key]
        if not isinstance(value, str) or not value.strip():
            raise self.fail((*where, key), f"must be a non-empty string, got {kind(value)}")
        return value

    def string_list(self, item: dict[str, Any], key: str, where: Where) -> list[str] | None:
        if key not in item:
            return None
        value = item[key]
        if isinstance(value, str):
            raise self.fail((*where, key), f"must be a list, e.g. [{value}], not a single string")
        if not isinstance(value, list) or not value:
            raise self.fail((*where, key), f"must be a non-empty list, got {kind(value)}")
        for j, entry in enumerate(value):
            if not isinstance(entry, str) or not entry:
                raise self.fail((*where, key, j), f"must be a non-empty string, got {kind(entry)}")
        return value

    def client_ids(self, item: dict[str, Any], where: Where) -> frozenset[str] | None:
        """An issuer's or a route's ``client_ids`` allow-list (None: any app client)."""
        client_ids = self.string_list(item, "client_ids", where)
        if client_ids is None:
            return None
        for j, cid in enumerate(client_ids):
            if not _CLIENT_ID.match(cid):
                raise self.fail((*where, "client_ids", j), f"{cid!r} is not an app client id")
        return frozenset(client_ids)

    def mode(self, value: object, where: Where) -> Mode:
        try:
            return Mode(value)
        except ValueError:
            raise self.fail(where, f"must be 'enforce' or 'dry-run', got {value!r}") from None

    def issuer(self, item: object, i: int) -> list[Issuer]:
        """One ``issuers`` entry: the Issuer of its primary region, then one per replica region."""
        where: Where = ("issuers", i)
        if not isinstance(item, dict):
            raise self.fail(where, f"must be a mapping with user_pool_id, got {kind(item)}")
        self.check_keys(item, _ISSUER_KEYS, where)
        pool = self.string(item, "user_pool_id", where, required=True)
        assert pool is not None
        m = POOL_ID.match(pool)
        if m is None and not ("issuer" in item and _ANY_POOL_ID.match(pool)):
            raise self.fail(
                (*where, "user_pool_id"),
                f"{pool!r} is not a Cognito user pool id (expected <region>_<id>, e.g. us-east-1_Abc123; "
                "an emulator's pool such as local_Abc123 also needs an explicit issuer)",
            )
        region = self.string(item, "region", where) or (m["region"] if m else "")
        if m is not None and region != m["region"]:
            raise self.fail(
                (*where, "region"), f"{region!r} does not match the pool id's region {m['region']!r}; remove region"
            )
        issuer_format, replicas = self.issuer_format(item, where, region)
        explicit = self.string(item, "issuer", where)
        issuer = explicit or cognito_issuer(issuer_format, region, pool)
        if not re.match(r"^https?://[^\s/?#]+(/[^\s?#]*)?\Z", issuer):
            raise self.fail((*where, "issuer"), _not_a_url(issuer, issuer=True))
        if problem := authority_problem(issuer):
            raise self.fail((*where, "issuer"), f"{shown(issuer)!r}: {problem}")
        if "@" in issuer.split("/")[2]:
            raise self.fail(
                (*where, "issuer"),
                f"{shown(issuer)!r}: an issuer URL carries no credentials (the "
                "token's iss is compared as written); put those the JWKS needs in jwks_uri",
            )
        jwks_override = self.string(item, "jwks_uri", where)
        if jwks_override is not None and not re.match(r"^https?://[^\s/?#]+(/\S*)?\Z", jwks_override):
            raise self.fail((*where, "jwks_uri"), _not_a_url(jwks_override, issuer=False))
        if jwks_override is not None and (problem := authority_problem(jwks_override)):
            raise self.fail((*where, "jwks_uri"), f"{shown(jwks_override)!r}: {problem}")
        allowed = self.client_ids(item, where)
        fmt = None if explicit else issuer_format
        accepted = [(region, issuer, False)]
        accepted += [(r, cognito_issuer(issuer_format, r, pool), True) for r in replicas]
        return [
            Issuer(
                user_pool_id=pool,
                region=r,
                issuer=iss,
                jwks_uri=jwks_override or f"{iss}/.well-known/jwks.json",
                client_ids=allowed,
                format=fmt,
                replica=replica,
                block=i,
            )
            for r, iss, replica in accepted
        ]

    def issuer_format(self, item: dict[str, Any], where: Where, primary: str) -> tuple[IssuerFormat, list[str]]:
        """``issuer_format`` (default original) and ``replica_regions`` of an issuers entry."""
        raw = item.get("issuer_format", IssuerFormat.ORIGINAL.value)
        try:
            issuer_format = IssuerFormat(raw)
        except ValueError:
            raise self.fail(
                (*where, "issuer_format"),
                f"must be 'original' (cognito-idp.<region>) or 'updated' (issuer-cognito-idp.<region>), got {raw!r}",
            ) from None
        replicas = self.string_list(item, "replica_regions", where) or []
        for key in ("issuer_format", "replica_regions"):
            if key in item and "issuer" in item:
                raise self.fail(
                    (*where, key),
                    f"'{key}' derives the issuer URL, which the explicit 'issuer' fixes; remove one of them",
                )
        if "replica_regions" in item and issuer_format is not IssuerFormat.UPDATED:
            raise self.fail(
                (*where, "replica_regions"),
                "a multi-Region user pool needs the updated issuer; add 'issuer_format: updated'",
            )
        for j, region in enumerate(replicas):
            if not REGION.match(region):
                raise self.fail((*where, "replica_regions", j), f"{region!r} is not an AWS region (e.g. eu-west-1)")
            if region == primary:
                raise self.fail(
                    (*where, "replica_regions", j),
                    f"{region!r} is the pool's primary region; list only the replica regions",
                )
            if region in replicas[:j]:
                raise self.fail((*where, "replica_regions", j), f"{region!r} is listed twice")
        return issuer_format, replicas

    def route(self, item: object, i: int, default_mode: Mode, forward_token: bool = False) -> Route:
        where: Where = ("routes", i)
        if not isinstance(item, dict):
            raise self.fail(where, f"must be a mapping with path and scopes, got {kind(item)}")
        self.check_keys(item, _ROUTE_KEYS, where)
        path = self.string(item, "path", where, required=True)
        assert path is not None
        _parse_pattern(path, lambda problem: self.fail((*where, "path"), problem))
        methods = self.string_list(item, "methods", where)
        if methods is not None:
            for j, method in enumerate(methods):
                if not _METHOD.match(method):
                    fix = f"; write {method.upper()!r}" if _METHOD.match(method.upper()) else ""
                    raise self.fail((*where, "methods", j), f"{method!r} is not an HTTP method{fix}")
            if len(set(methods)) != len(methods):
                raise self.fail((*where, "methods"), "lists a method twice")
        public = self.boolean(item, "public", where, default=False)
        requirements = [key for key in ("scopes", "all_scopes", "client_ids", "claims") if key in item]
        if public and requirements:
            raise self.fail(
                where,
                f"a public route takes no {', '.join(requirements)}; remove "
                f"{'it' if len(requirements) == 1 else 'them'} or 'public: true'",
            )
        scopes = self.string_list(item, "scopes", where)
        all_scopes = self.string_list(item, "all_scopes", where)
        if not public and scopes is None and all_scopes is None:
            raise self.fail(
                where,
                "missing 'scopes' (the token must hold one of them), 'all_scopes' (all of them) or 'public: true'",
            )
        for key, listed in (("scopes", scopes), ("all_scopes", all_scopes)):
            for j, scope in enumerate(listed or ()):
                if not _SCOPE.match(scope):
                    raise self.fail(
                        (*where, key, j),
                        f"{scope!r} is not a valid OAuth scope (no spaces, quotes or backslashes)",
                    )
        allowed = self.client_ids(item, where)
        claims = (
            parse_claim_conditions(
                item["claims"],
                lambda at, problem, code: self.fail((*where, "claims", *at), problem, code=code),
                pattern_params(path),
            )
            if "claims" in item
            else ()
        )
        name = self.string(item, "name", where)
        if name is not None and not _ROUTE_NAME.match(name):
            raise self.fail((*where, "name"), f"{name!r}: use letters, digits and -_.:/ (at most 100)")
        if name is None:
            name = f"{'|'.join(methods) if methods else 'ANY'} {path}"
        mode = self.mode(item["mode"], (*where, "mode")) if "mode" in item else default_mode
        acknowledge = self.string_list(item, "acknowledge", where) or []
        for j, code in enumerate(acknowledge):
            if code not in LINT_CODES:
                raise self.fail(
                    (*where, "acknowledge", j),
                    f"{code!r} is not a lint warning code; known: {', '.join(sorted(LINT_CODES))}",
                )
        any_scopes = frozenset(scopes or ())
        required = frozenset(all_scopes or ())
        conditions = (
            Conditions(any_scopes, required, allowed, claims) if required or allowed is not None or claims else None
        )
        return Route(
            name=name,
            path=path,
            methods=frozenset(methods) if methods is not None else None,
            scopes=any_scopes,
            public=public,
            mode=mode,
            index=i,
            scopes_text=" ".join(sorted(any_scopes)),
            acknowledge=frozenset(acknowledge),
            all_scopes=required,
            client_ids=allowed,
            claims=claims,
            all_scopes_text=" ".join(sorted(required)),
            conditions=conditions,
            forward_token=self.boolean(item, "forward_token", where, default=forward_token),
            required_scopes=any_scopes | required,
        )


_REST = object()
_PARAM = object()
REST, PARAM = _REST, _PARAM  # the kinds of pattern parts besides literal segments (see pattern_parts)


def _not_a_url(url: str, *, issuer: bool) -> str:
    """What is wrong with a URL the loader refused. It is quoted as ``shown`` quotes it (no
    credentials, no query: a signed one is a secret), cut at the first whitespace (what follows is
    no longer the URL to ``shown``), so the message must name what the quote no longer shows."""
    words = url.split()
    head = shown(words[0] if words else url)
    quoted = repr(head) + ("" if head == url else "...")
    if words != [url]:
        return f"{quoted}: the URL holds whitespace (percent-encode it, e.g. %20)"
    if issuer and re.match(r"^https?://[^\s/?#]+[^\s?#]*[?#]", url):
        return f"{quoted}: the issuer URL has a query or fragment; an iss has none (it is compared as written)"
    rest = "an optional path" if issuer else "an optional path and query"
    return f"{quoted} is not an http(s) URL (http:// or https://, a host, then {rest})"


def pattern_parts(pattern: str) -> list[object]:
    """A valid route pattern's parts, left to right: literal segments (str), PARAM for ``{name}``
    and a final REST for ``/**``. "/" has none."""
    return _parse_pattern(pattern, PolicyError)


def pattern_params(pattern: str) -> dict[str, int]:
    """A valid route pattern's ``{name}`` parameters and the index of the path segment each is."""
    if pattern == "/":
        return {}
    return {m[1]: k for k, part in enumerate(pattern[1:].split("/")) if (m := _PARAM_SEGMENT.match(part))}


def pattern_matches(pattern: str, segments: tuple[str, ...], path_case: PathCase = PathCase.SENSITIVE) -> bool:
    """Whether a (valid) route pattern covers these path segments, ignoring other routes.

    Used by lints to ask "would this route have taken the request if a more specific one did not".
    """
    parts = _parse_pattern(pattern, PolicyError)
    if path_case is PathCase.INSENSITIVE:
        parts = [p.lower() if isinstance(p, str) else p for p in parts]
        segments = tuple(s.lower() for s in segments)
    for i, part in enumerate(parts):
        if part is _REST:
            return True
        if i >= len(segments):
            return False
        if part is _PARAM:
            if not segments[i]:
                return False
        elif part != segments[i]:
            return False
    return len(segments) == len(parts)


def _parse_pattern(path: str, fail: Any) -> list[object]:
    """Split a route pattern into literal strings, _PARAM and a final _REST; errors via ``fail``."""
    if not path.startswith("/"):
        raise fail(f"{path!r} must start with '/'")
    if path == "/":
        return []
    if path == "/**":
        return [_REST]
    parts = path[1:].split("/")
    out: list[object] = []
    names: set[str] = set()
    for k, part in enumerate(parts):
        if part == "**":
            if k != len(parts) - 1:
                raise fail(f"{path!r}: '**' is only allowed as the last segment ('/prefix/**')")
            out.append(_REST)
            continue
        m = _PARAM_SEGMENT.match(part)
        if m:
            if m[1] in names:
                raise fail(f"{path!r}: parameter {{{m[1]}}} appears twice")
            names.add(m[1])
            out.append(_PARAM)
            continue
        if part == "" and k == len(parts) - 1:
            raise fail(
                f"{path!r}: a pattern cannot end in '/': write {path.rstrip('/')!r}, whose route a request "
                f"for {path!r} must meet too (see 'Trailing slashes' in the policy reference)"
            )
        if part == "":
            raise fail(f"{path!r}: empty segment ('//'); remove it")
        if part in (".", ".."):
            raise fail(f"{path!r}: '.' and '..' segments are not allowed")
        if "{" in part or "}" in part or "*" in part:
            raise fail(
                f"{path!r}: segment {part!r}: a parameter must be a whole segment like {{id}}; '*' only as '/**'"
            )
        if not _LITERAL_SEGMENT.match(part):
            raise fail(
                f"{path!r}: segment {part!r} has characters that are not allowed (percent-encoding, spaces, ';' ...)"
            )
        out.append(part)
    return out


# Characters a literal segment may hold (_LITERAL_SEGMENT) that a request may also send percent-
# encoded: RFC 3986's sub-delims, ':' and '@' (an escaped unreserved character is refused outright,
# request.normalized_path).
ESCAPABLE_LITERAL_CHARS = "!$&'()*+,=:@"


def escaped_literal_chars(routes: Iterable[Route]) -> str:
    """The characters the routes' literals hold that a request may send escaped, sorted: where a
    path has more than one reading (Policy.routes_for)."""
    return "".join(
        sorted(
            {c for r in routes for part in pattern_parts(r.path) if isinstance(part, str) for c in part}
            & set(ESCAPABLE_LITERAL_CHARS)
        )
    )


def _literal_escapes(routes: Iterable[Route]) -> re.Pattern[str] | None:
    """The escapes (either hex case) of ``escaped_literal_chars``; None when there are none, so
    paths are never decoded for nothing."""
    chars = escaped_literal_chars(routes)
    if not chars:
        return None
    return re.compile("|".join(f"%{ord(c):02X}" for c in chars), re.IGNORECASE)


def _unescape(escape: re.Match[str]) -> str:
    return chr(int(escape[0][1:], 16))


def _compile(routes: Iterable[Route], ctx: _Context, fold: bool = False) -> _Node:
    """Build the trie; every pair of routes with equal specificity is an error (all are collected).
    With ``fold`` (``path_case: insensitive``) literals are keyed in lower case, so /Admin and
    /admin are one place and two routes there tie."""
    root = _Node()
    for route in routes:
        node = root
        rest = False
        for part in _parse_pattern(route.path, PolicyError):
            if part is _REST:
                rest = True
            elif part is _PARAM:
                node.param = node.param or _Node()
                node = node.param
            else:
                assert isinstance(part, str)
                node = node.literals.setdefault(part.lower() if fold else part, _Node())
        endpoint = node.rest if rest else node.exact
        if route.methods is None:
            if endpoint.any_method is not None:
                ctx.errors.append(_conflict(ctx, endpoint.any_method, route))
                continue
            endpoint.any_method = route
        else:
            clash = next((endpoint.by_method[m] for m in sorted(route.methods) if m in endpoint.by_method), None)
            if clash is not None:
                ctx.errors.append(_conflict(ctx, clash, route))
                continue
            for method in route.methods:
                endpoint.by_method[method] = route
    _imply_head(root)
    return root


def _imply_head(node: _Node) -> None:
    """Let each GET route also take HEAD where no route at the same place lists HEAD.

    Done after every route is placed, so an explicit HEAD route wins wherever it is in the file.
    Without it HEAD would fall through to a less specific (perhaps public) route while the app
    runs the GET handler and leaks its headers.
    """
    for endpoint in (node.exact, node.rest):
        if "GET" in endpoint.by_method and "HEAD" not in endpoint.by_method:
            endpoint.by_method["HEAD"] = endpoint.by_method["GET"]
    for child in node.literals.values():
        _imply_head(child)
    if node.param is not None:
        _imply_head(node.param)


def _conflict(ctx: _Context, first: Route, second: Route) -> PolicyError:
    where: Where = ("routes", second.index, "path")
    line, column = ctx.places.position(where)
    return PolicyError(
        f"{place(ctx.source, line, column)}: routes[{second.index}] ({second.path}) conflicts with "
        f"routes[{first.index}] ({first.path}): both match the same requests with equal specificity"
        f"{' (path_case is insensitive)' if first.path != second.path else ''}; "
        "merge them or make their methods disjoint",
        where,
        line,
        column,
    )
