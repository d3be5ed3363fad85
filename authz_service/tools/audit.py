"""`authz-service audit`: the policy against the user pools it trusts, read through the AWS API.

Why: the policy names scopes, app clients and claims; the pool decides which clients can get a
client_credentials token with which scopes. Neither side alone says who can reach what. The audit
reads each pool with read-only calls (DescribeUserPool, ListResourceServers, ListUserPoolClients,
DescribeUserPoolClient, ListUserPoolClientSecrets; the standard AWS credential chain), prints a
matrix of app clients by routes and reports what cannot work. Claims a pre token generation
trigger adds cannot be known from the API: such cells say "depends on claims", and a warning says
that a client can influence them (the trigger receives the client metadata a client sends).

A client gets client_credentials tokens two ways: the OAuth token endpoint (AllowedOAuthFlows
client_credentials; the pool needs a domain) or the GetClientToken API (ExplicitAuthFlows
ALLOW_CLIENT_TOKEN_AUTH, no domain needed); both need a client secret.

boto3 is an optional extra (the ``audit`` extra, see ``install_hint``): the service never needs it.
``read_pool`` is the only code that talks to AWS; ``audit`` is pure, so it is tested with plain data.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

from .. import install_hint
from ..policy import Issuer, IssuerFormat, Policy, PolicyError, Route, load_policy_file

CLIENT_CREDENTIALS = "client_credentials"
CLIENT_TOKEN_AUTH = "ALLOW_CLIENT_TOKEN_AUTH"  # an ExplicitAuthFlows value: GetClientToken issues M2M tokens
# How a client gets a client_credentials token (names in --format json's token_paths).
TOKEN_ENDPOINT, GET_CLIENT_TOKEN = "token_endpoint", "GetClientToken"
LIST_SECRETS = "ListUserPoolClientSecrets"
INSTALL_HINT = install_hint("audit")
# Exit codes for a ConfigMap repository's CI.
CLEAN, FINDINGS, UNUSABLE = 0, 1, 2


class AuditError(Exception):
    """The audit cannot run (boto3 missing, no credentials, an AWS error): exit 2 with this message."""


@dataclass(frozen=True, slots=True)
class AppClient:
    """What an app client's settings allow, as DescribeUserPoolClient (and, for its secrets,
    ListUserPoolClientSecrets) report them."""

    client_id: str
    name: str
    flows: tuple[str, ...]  # AllowedOAuthFlows
    oauth_enabled: bool  # AllowedOAuthFlowsUserPoolClient
    scopes: tuple[str, ...]  # AllowedOAuthScopes
    has_secret: bool
    auth_flows: tuple[str, ...] = ()  # ExplicitAuthFlows
    secrets_listed: int | None = None  # how many ListUserPoolClientSecrets listed; None: not asked
    pool_domain: bool = True  # the pool has a domain (DescribeUserPool Domain or CustomDomain): a token endpoint

    @property
    def token_paths(self) -> tuple[str, ...]:
        """The ways this client gets client_credentials tokens: the token endpoint, GetClientToken."""
        if not self.has_secret:
            return ()
        paths = (TOKEN_ENDPOINT,) if self.oauth_client_credentials and self.pool_domain else ()
        return paths + ((GET_CLIENT_TOKEN,) if CLIENT_TOKEN_AUTH in self.auth_flows else ())

    @property
    def oauth_client_credentials(self) -> bool:
        return CLIENT_CREDENTIALS in self.flows and self.oauth_enabled

    @property
    def may_be_m2m(self) -> bool:
        """Whether a secret is all this client lacks (or has) to get client_credentials tokens."""
        return self.oauth_client_credentials or CLIENT_TOKEN_AUTH in self.auth_flows

    @property
    def no_client_credentials(self) -> str | None:
        """Why this client cannot get client_credentials tokens, or None when it can."""
        if self.token_paths:
            return None
        if self.may_be_m2m and not self.has_secret:
            return "it has no client secret"
        if self.oauth_client_credentials:  # and a secret, but no domain
            return f"the pool has no domain, so no token endpoint, and ExplicitAuthFlows lacks {CLIENT_TOKEN_AUTH}"
        if CLIENT_CREDENTIALS in self.flows:
            return f"AllowedOAuthFlowsUserPoolClient is false and ExplicitAuthFlows lacks {CLIENT_TOKEN_AUTH}"
        return f"AllowedOAuthFlows lacks client_credentials and ExplicitAuthFlows lacks {CLIENT_TOKEN_AUTH}"


@dataclass(frozen=True, slots=True)
class Pool:
    """One user pool as the audit needs it."""

    user_pool_id: str
    region: str
    defined_scopes: frozenset[str]  # <resource server identifier>/<scope name> of every resource server
    clients: tuple[AppClient, ...]
    issuer_type: str | None = None  # IssuerConfiguration.Type: ORIGINAL | UPDATED (None: not reported)
    pre_token_version: str | None = None  # V1_0 | V2_0 | V3_0 of the pre token generation trigger; None: none
    # Why ListUserPoolClientSecrets could not say which clients have a secret (DescribeUserPoolClient's
    # ClientSecret said instead), with the fix; None: it said, or no client needed asking.
    secrets_unlisted: str | None = None
    domain: bool | None = (
        None  # a domain (so a token endpoint): DescribeUserPool Domain or CustomDomain; None: not read
    )

    def client(self, client_id: str) -> AppClient | None:
        return next((c for c in self.clients if c.client_id == client_id), None)


# --- reading a pool (the only AWS calls) -------------------------------------------------------------


def read_pool(idp: Any, user_pool_id: str, region: str) -> Pool:
    """DescribeUserPool, ListResourceServers, ListUserPoolClients, DescribeUserPoolClient and
    ListUserPoolClientSecrets, nothing else."""
    described = _call(idp.describe_user_pool, "DescribeUserPool", UserPoolId=user_pool_id)["UserPool"]
    lambdas = described.get("LambdaConfig") or {}
    version = (lambdas.get("PreTokenGenerationConfig") or {}).get("LambdaVersion")
    if version is None and lambdas.get("PreTokenGeneration"):
        version = "V1_0"  # a trigger set without a version config gets the V1_0 event
    scopes = {
        f"{server['Identifier']}/{scope['ScopeName']}"
        for server in _pages(
            idp.list_resource_servers, "ListResourceServers", "ResourceServers", UserPoolId=user_pool_id, MaxResults=50
        )
        for scope in server.get("Scopes", [])
    }
    domain = bool(described.get("Domain") or described.get("CustomDomain"))
    clients = []
    secrets = _SecretLister(idp, user_pool_id)
    for listed in _pages(
        idp.list_user_pool_clients, "ListUserPoolClients", "UserPoolClients", UserPoolId=user_pool_id, MaxResults=60
    ):
        detail = _call(
            idp.describe_user_pool_client,
            "DescribeUserPoolClient",
            UserPoolId=user_pool_id,
            ClientId=listed["ClientId"],
        )["UserPoolClient"]
        client = AppClient(
            client_id=detail["ClientId"],
            name=detail.get("ClientName") or "",
            flows=tuple(detail.get("AllowedOAuthFlows") or ()),
            oauth_enabled=bool(detail.get("AllowedOAuthFlowsUserPoolClient")),
            scopes=tuple(detail.get("AllowedOAuthScopes") or ()),
            has_secret=bool(detail.get("ClientSecret")),
            auth_flows=tuple(detail.get("ExplicitAuthFlows") or ()),
            pool_domain=domain,
        )
        if client.may_be_m2m:  # whether it has a secret decides whether it gets tokens
            count = secrets.count(client.client_id)
            if count is not None:
                client = replace(client, has_secret=count > 0, secrets_listed=count)
        clients.append(client)
    return Pool(
        user_pool_id,
        region,
        frozenset(scopes),
        tuple(sorted(clients, key=lambda c: c.client_id)),
        (described.get("IssuerConfiguration") or {}).get("Type"),
        version,
        secrets.unlisted,
        domain,
    )


class _SecretLister:
    """ListUserPoolClientSecrets, the call made to know whether a client has a secret: it lists a
    client's secrets (two during a rotation) and never their values. Where it cannot be used (a
    botocore from before it, an endpoint that does not offer it, an IAM policy that does not grant
    it), ``count`` answers None from then on for the pool, ``unlisted`` says why and what to do,
    and the caller keeps DescribeUserPoolClient's ClientSecret."""

    # Error codes that mean "not offered here" rather than "refused": AWS's for an unknown
    # operation, and what an emulator answers for one it does not implement.
    _UNOFFERED = frozenset({"UnknownOperationException", "InvalidAction", "NotImplemented", "500", "501"})

    def __init__(self, idp: Any, user_pool_id: str) -> None:
        self.idp, self.user_pool_id = idp, user_pool_id
        self.unlisted: str | None = None
        if not hasattr(idp, "list_user_pool_client_secrets"):
            import botocore

            self.unlisted = (
                f"botocore {botocore.__version__} has no {LIST_SECRETS}; upgrade boto3 (pip install -U boto3)"
            )

    def count(self, client_id: str) -> int | None:
        if self.unlisted is not None:
            return None
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            page = self.idp.list_user_pool_client_secrets(UserPoolId=self.user_pool_id, ClientId=client_id)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "error"))
            if code in ("AccessDeniedException", "AccessDenied", "UnauthorizedOperation"):
                fix = f"grant cognito-idp:{LIST_SECRETS} on the pool to the audit's role"
            elif code in self._UNOFFERED:
                fix = "the endpoint does not offer it"
            else:
                fix = str(error.get("Message") or "")
            self.unlisted = f"{LIST_SECRETS} failed: {code}" + (f": {fix}" if fix else "")
            return None
        except BotoCoreError as exc:
            self.unlisted = f"{LIST_SECRETS} failed: {exc}"
            return None
        return len(page.get("ClientSecrets") or ())


def _pages(method: Any, name: str, key: str, **params: Any) -> Iterable[dict[str, Any]]:
    token = None
    while True:
        page = _call(method, name, **params, **({"NextToken": token} if token else {}))
        yield from page.get(key, [])
        token = page.get("NextToken")
        if not token:
            return


def _call(method: Any, name: str, **params: Any) -> dict[str, Any]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return method(**params)
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise AuditError(
            f"{name} {params.get('UserPoolId', '')}: {error.get('Code', 'error')}: {error.get('Message', exc)}"
        ) from None
    except BotoCoreError as exc:  # no credentials, no region, endpoint unreachable
        raise AuditError(f"{name} {params.get('UserPoolId', '')}: {exc}") from None


# --- the audit (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cell:
    """Whether one client can reach one route: yes, no, claims (depends on claims) or public."""

    access: str
    why: str = ""

    @property
    def text(self) -> str:
        if self.access == "claims":
            return "depends on claims"
        return f"no ({self.why})" if self.access == "no" else self.access


@dataclass(frozen=True, slots=True)
class Finding:
    """Something that cannot work (an error), or that the API cannot show to be safe (a warning:
    exit 1 only with --strict)."""

    code: str
    message: str
    severity: str = "error"  # error | warning


@dataclass
class AuditReport:
    policy: Policy
    pools: list[Pool]
    matrix: dict[tuple[str, str], dict[str, Cell]] = field(default_factory=dict)  # (pool, client) -> route -> cell
    findings: list[Finding] = field(default_factory=list)
    strict: bool = False  # warnings count as findings for the exit code

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def exit_code(self) -> int:
        return FINDINGS if self.errors or (self.strict and self.findings) else CLEAN


def audit(policy: Policy, pools: list[Pool], strict: bool = False) -> AuditReport:
    """Who can reach what, and everything that cannot work, for these pools under this policy."""
    report = AuditReport(policy, pools, strict=strict)
    for pool in pools:
        for client in pool.clients:
            report.matrix[(pool.user_pool_id, client.client_id)] = {
                route.name: _cell(policy, pool, client, route) for route in policy.routes
            }
    add = report.findings.append
    for pool in pools:
        _issuer_findings(policy, pool, add)
    _scope_findings(policy, pools, add)
    _client_findings(policy, pools, add)
    for pool in pools:
        _influenced_claim_findings(policy, pool, report.matrix, add)
        if pool.secrets_unlisted and any(c.may_be_m2m for c in pool.clients):
            add(
                Finding(
                    "client-secrets-unverified",
                    f"{pool.user_pool_id}: {pool.secrets_unlisted}; whether an app client has a secret was "
                    "read from DescribeUserPoolClient's ClientSecret instead",
                    "warning",
                )
            )
    for route in policy.routes:
        if route.public:
            continue
        route_cells = [row[route.name] for row in report.matrix.values()]
        if not any(c.access in ("yes", "claims") for c in route_cells):
            add(
                Finding(
                    "unreachable-route",
                    f"routes[{route.index}] {route.name!r} ({route.path}): no app client of "
                    "the audited pools can reach it",
                )
            )
    protected = [r for r in policy.routes if not r.public]
    for (pool_id, client_id), cells in report.matrix.items():
        app_client = next(p for p in pools if p.user_pool_id == pool_id).client(client_id)
        assert app_client is not None
        if app_client.no_client_credentials or not protected:
            continue
        if all(cells[r.name].access == "no" for r in protected):
            public = [r.name for r in policy.routes if r.public]
            add(
                Finding(
                    "public-only-client",
                    f"app client {client_id} ({app_client.name or 'no name'}) of {pool_id} reaches "
                    + (f"only public routes ({', '.join(public)})" if public else "no route")
                    + f"; its scopes [{' '.join(app_client.scopes)}] meet no protected route",
                )
            )
    return report


def _cell(policy: Policy, pool: Pool, client: AppClient, route: Route) -> Cell:
    if route.public:
        return Cell("public")
    entries = [i for i in policy.issuers if i.user_pool_id == pool.user_pool_id]
    if not entries:
        return Cell("no", "pool not in the policy")
    if all(_wrong_format(i, pool) for i in entries if not i.replica):
        return Cell("no", "issuer format")
    if client.no_client_credentials:
        return Cell("no", "no client_credentials")
    if all(i.client_ids is not None and client.client_id not in i.client_ids for i in entries):
        return Cell("no", "issuer client_ids")
    if route.client_ids is not None and client.client_id not in route.client_ids:
        return Cell("no", "route client_ids")
    # A client_credentials token carries the custom scopes the client is allowed (all of them when
    # the request names none); a V3_0 trigger could add or remove scopes, which the API cannot show.
    grantable = frozenset(client.scopes) & pool.defined_scopes
    if route.scopes and route.scopes.isdisjoint(grantable):
        return Cell("no", "scope")
    if not route.all_scopes <= grantable:
        return Cell("no", "all_scopes")
    if route.claims:
        if pool.pre_token_version != "V3_0":
            return Cell("no", "no V3_0 pre token generation trigger, so no custom claims")
        return Cell("claims")
    return Cell("yes")


_ISSUER_TYPES = {IssuerFormat.ORIGINAL: "ORIGINAL", IssuerFormat.UPDATED: "UPDATED"}


def _wrong_format(issuer: Issuer, pool: Pool) -> bool:
    """Whether the pool's IssuerConfiguration puts another issuer URL in ``iss`` than this entry expects."""
    return (
        issuer.format is not None and pool.issuer_type is not None and pool.issuer_type != _ISSUER_TYPES[issuer.format]
    )


def _issuer_findings(policy: Policy, pool: Pool, add: Any) -> None:
    for issuer in policy.issuers:
        if issuer.user_pool_id != pool.user_pool_id or issuer.replica:
            continue
        if _wrong_format(issuer, pool):
            assert issuer.format is not None
            other = "updated" if pool.issuer_type == "UPDATED" else "original"
            add(
                Finding(
                    "issuer-format",
                    f"issuers[{issuer.block}] {pool.user_pool_id} expects the {issuer.format.value} "
                    f"issuer ({issuer.issuer}) but the pool issues with the {other} one "
                    f"(IssuerConfiguration {pool.issuer_type}): every token would be refused as "
                    f"wrong_issuer; set issuer_format: {other}",
                )
            )
    claim_routes = [r for r in policy.routes if r.claims]
    if claim_routes and pool.pre_token_version != "V3_0":
        have = f"a {pool.pre_token_version} trigger" if pool.pre_token_version else "no trigger"
        add(
            Finding(
                "claims-without-trigger",
                f"{pool.user_pool_id} has {have}: only a V3_0 pre token generation trigger adds claims to "
                f"client_credentials tokens, so {', '.join(repr(r.name) for r in claim_routes)} "
                "(claim conditions) cannot be met by its clients",
            )
        )


def _influenced_claim_findings(
    policy: Policy, pool: Pool, matrix: dict[tuple[str, str], dict[str, Cell]], add: Any
) -> None:
    """A warning per route whose claim conditions a client of this pool may meet through the
    pool's V3_0 trigger. Why: the trigger receives the ClientMetadata the client itself sends
    (GetClientToken's ClientMetadata, the token endpoint's aws_client_metadata); a trigger that
    copies it into claims lets each client choose its own tenant. The policy refuses conditions on
    the claims Cognito sets itself, so every condition reads a claim the trigger can set; whether
    this trigger derives it from the client id or from the metadata, the API cannot show."""
    if pool.pre_token_version != "V3_0":
        return
    for route in policy.routes:
        if not route.claims:
            continue
        clients = [
            cid
            for (pid, cid), cells in matrix.items()
            if pid == pool.user_pool_id and cells[route.name].access == "claims"
        ]
        if not clients:
            continue
        names = ", ".join(repr(c.name) for c in route.claims)
        add(
            Finding(
                "client-influenced-claim",
                f"routes[{route.index}] {route.name!r} reads the claim{'s' if len(route.claims) > 1 else ''} "
                f"{names}, which the V3_0 pre token "
                f"generation trigger of {pool.user_pool_id} sets, and that trigger receives the client "
                f"metadata a client sends ({len(clients)} app client{'s' if len(clients) != 1 else ''} can "
                "reach the route): the trigger must derive the claim from the client id, never from the "
                "client metadata",
                "warning",
            )
        )


def _scope_findings(policy: Policy, pools: list[Pool], add: Any) -> None:
    defined = frozenset().union(*(p.defined_scopes for p in pools))
    for route in policy.routes:
        for scope in sorted(route.scopes | route.all_scopes):
            if scope not in defined:
                add(
                    Finding(
                        "undefined-scope",
                        f"routes[{route.index}] {route.name!r} requires scope {scope!r}, which "
                        "no resource server of the audited pools defines",
                    )
                )


def _client_findings(policy: Policy, pools: list[Pool], add: Any) -> None:
    by_id = {p.user_pool_id: p for p in pools}
    listed: list[tuple[str, str, list[Pool]]] = []  # (where, client id, pools it must be in)
    for issuer in policy.issuers:
        pool = by_id.get(issuer.user_pool_id)
        if issuer.replica or pool is None:
            continue
        listed += [(f"issuers[{issuer.block}].client_ids", cid, [pool]) for cid in sorted(issuer.client_ids or ())]
    for route in policy.routes:
        listed += [
            (f"routes[{route.index}] {route.name!r} client_ids", cid, pools) for cid in sorted(route.client_ids or ())
        ]
    for where, client_id, candidates in listed:
        found = [c for p in candidates if (c := p.client(client_id)) is not None]
        pools_text = ", ".join(p.user_pool_id for p in candidates)
        if not found:
            add(Finding("unknown-client", f"{where}: {client_id} is not an app client of {pools_text}"))
        elif all(c.no_client_credentials for c in found):
            add(
                Finding(
                    "no-client-credentials",
                    f"{where}: app client {client_id} cannot get client_credentials "
                    f"tokens: {found[0].no_client_credentials}",
                )
            )


# --- output ---------------------------------------------------------------------------------------


def render_text(report: AuditReport, out: TextIO) -> None:
    for pool in report.pools:
        trigger = (
            f"pre token generation {pool.pre_token_version}"
            if pool.pre_token_version
            else "no pre token generation trigger"
        )
        issuer = f"issuer {pool.issuer_type.lower()}" if pool.issuer_type else "issuer format not reported"
        print(
            f"pool {pool.user_pool_id} ({pool.region}): {len(pool.clients)} app clients, "
            f"{len(pool.defined_scopes)} resource server scopes, {issuer}, {trigger}"
            + (", no domain (no token endpoint: GetClientToken only)" if pool.domain is False else ""),
            file=out,
        )
    routes = [r.name for r in report.policy.routes]
    names = {(p.user_pool_id, c.client_id): c.name for p in report.pools for c in p.clients}
    rows = [
        [
            client_id
            + (f" {names[(pool_id, client_id)]}" if names[(pool_id, client_id)] else "")
            + (f" ({pool_id})" if len(report.pools) > 1 else ""),
            *(cells[r].text for r in routes),
        ]
        for (pool_id, client_id), cells in report.matrix.items()
    ]
    header = ["app client \\ route", *routes]
    widths = [max(len(row[k]) for row in [header, *rows]) for k in range(len(header))]
    print("", file=out)
    for row in [header, *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip(), file=out)
    if any(p.pre_token_version == "V3_0" for p in report.pools):
        print(
            "\n  (a V3_0 trigger may also add or remove scopes; the matrix shows what AllowedOAuthScopes grant)",
            file=out,
        )
    print("", file=out)
    for finding in report.findings:
        severity = " (warning)" if finding.severity == "warning" else ""
        print(f"{finding.code}{severity}: {finding.message}", file=out)
    count, warned = len(report.errors), len(report.warnings)
    print(
        f"{count} finding{'s' if count != 1 else ''}"
        + (f", {warned} warning{'s' if warned != 1 else ''}" if warned else "")
        + f" ({report.policy.source} against {', '.join(p.user_pool_id for p in report.pools)})",
        file=out,
    )


def as_json(report: AuditReport) -> dict[str, Any]:
    return {
        "policy": report.policy.source,
        "pools": [
            {
                "user_pool_id": p.user_pool_id,
                "region": p.region,
                "issuer_type": p.issuer_type,
                "pre_token_generation": p.pre_token_version,
                "resource_server_scopes": sorted(p.defined_scopes),
                "domain": p.domain,
                "client_secrets_from": "DescribeUserPoolClient" if p.secrets_unlisted else LIST_SECRETS,
                "clients": [
                    {
                        "client_id": c.client_id,
                        "name": c.name,
                        "allowed_oauth_flows": list(c.flows),
                        "explicit_auth_flows": list(c.auth_flows),
                        "allowed_oauth_scopes": list(c.scopes),
                        "client_secrets": c.secrets_listed,
                        "client_credentials": c.no_client_credentials is None,
                        "token_paths": list(c.token_paths),
                        "why_not": c.no_client_credentials,
                    }
                    for c in p.clients
                ],
            }
            for p in report.pools
        ],
        "routes": [r.name for r in report.policy.routes],
        "matrix": [
            {
                "user_pool_id": pool_id,
                "client_id": client_id,
                "routes": {
                    name: {
                        "access": "depends_on_claims" if c.access == "claims" else c.access,
                        **({"why": c.why} if c.why else {}),
                    }
                    for name, c in cells.items()
                },
            }
            for (pool_id, client_id), cells in report.matrix.items()
        ],
        "findings": [{"code": f.code, "severity": f.severity, "message": f.message} for f in report.findings],
        "exit_code": report.exit_code,
    }


# --- command --------------------------------------------------------------------------------------


def audit_command(args: argparse.Namespace, out: TextIO) -> int:
    """Exit 0 when nothing was found (or only warnings, without --strict), 1 with findings, 2 when
    the policy or AWS cannot be used."""
    try:
        policy = load_policy_file(args.policy)
        targets = _targets(policy, args.user_pool_id or [], args.region)
        try:
            import boto3
        except ImportError:
            raise AuditError(f"boto3 is not installed; install the audit extra: {INSTALL_HINT}") from None
        pools = []
        for pool_id, region in targets:
            try:
                idp = boto3.client("cognito-idp", region_name=region)
            except Exception as exc:  # noqa: BLE001 - botocore raises several types for a bad configuration
                raise AuditError(f"cannot create a cognito-idp client for {region}: {exc}") from None
            pools.append(read_pool(idp, pool_id, region))
    except (PolicyError, AuditError) as exc:
        print(f"authz-service audit: error: {exc}", file=sys.stderr)
        return UNUSABLE
    report = audit(policy, pools, strict=args.strict)
    if args.format == "json":
        print(json.dumps(as_json(report), indent=2), file=out)
    else:
        render_text(report, out)
    return report.exit_code


def _targets(policy: Policy, pool_ids: list[str], region: str | None) -> list[tuple[str, str]]:
    """(pool id, region) to read: the given pools (each must be one the policy trusts) or every
    pool of the policy; the region is --region, else the pool's (primary) region."""
    trusted = {i.user_pool_id: i.region for i in policy.issuers if not i.replica}
    for pool_id in pool_ids:
        if pool_id not in trusted:
            raise AuditError(f"{pool_id} is not a user pool of {policy.source} (its pools: {', '.join(trusted)})")
    out = []
    for pool_id in dict.fromkeys(pool_ids or trusted):
        pool_region = region or trusted[pool_id]
        if not pool_region:
            raise AuditError(f"{pool_id}: no region in the pool id; give --region")
        out.append((pool_id, pool_region))
    return out
