"""The dev issuer's configuration file: one emulated user pool (its id, token lifetime, resource
servers and app clients), validated into frozen dataclasses with messages naming file:line:column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..claims import cognito_controlled
from ..cognito import POOL_ID, REGION, TOKEN_CLAIMS
from ..files import REGULAR_FILE_FIX, FileReadError, read_bounded
from ..policy import IssuerFormat
from ..yamlfile import Where, YamlValidator, kind

CLIENT_CREDENTIALS = "client_credentials"
# Cognito's AllowedOAuthFlows, spelled as OAuth grant names; only client_credentials is served here,
# the others exist so a config can model a client that Cognito would refuse with unauthorized_client.
KNOWN_GRANT_TYPES = frozenset({CLIENT_CREDENTIALS, "authorization_code", "implicit"})
DEFAULT_TOKEN_TTL_SECONDS = 3600
MAX_TOKEN_TTL_SECONDS = 86400  # Cognito's upper bound for access token validity (1 day)

# Cognito's patterns: a resource server identifier may contain '/', a scope name may not, so
# "<identifier>/<name>" stays unambiguous only when split at the last '/'.
_RESOURCE_SERVER_ID = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,256}\Z")
_SCOPE_NAME = re.compile(r"^[\x21\x23-\x2E\x30-\x5B\x5D-\x7E]{1,256}\Z")
# Printable ASCII without ':' because Basic authentication splits id and secret at the first ':'.
_CLIENT_ID = re.compile(r"^[\x21-\x39\x3B-\x7E]{1,128}\Z")


class DevIssuerConfigError(Exception):
    """A dev issuer config file that cannot be used. The message names the file, field and fix."""


@dataclass(frozen=True, slots=True)
class ResourceServer:
    """A Cognito resource server: scopes are granted as ``<identifier>/<name>``."""

    identifier: str
    scopes: tuple[str, ...]

    @property
    def full_scopes(self) -> tuple[str, ...]:
        return tuple(f"{self.identifier}/{name}" for name in self.scopes)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """A confidential app client. The secret is kept out of repr so a logged config cannot leak it."""

    client_id: str
    client_secret: str = field(repr=False)
    allowed_scopes: tuple[str, ...]
    grant_types: tuple[str, ...]
    custom_claims: Mapping[str, Any] = field(default_factory=dict)  # added to every access token


@dataclass(frozen=True, slots=True)
class DevIssuerConfig:
    """One emulated user pool: its id, token lifetime, resource servers and app clients."""

    user_pool_id: str
    token_ttl_seconds: int
    resource_servers: tuple[ResourceServer, ...]
    clients: tuple[ClientConfig, ...]
    issuer_format: IssuerFormat | None = None  # None: iss is <public URL>/<pool id>
    replica_regions: tuple[str, ...] = ()


_TOP_KEYS = ("user_pool_id", "token_ttl_seconds", "issuer_format", "replica_regions", "resource_servers", "clients")
_RESOURCE_SERVER_KEYS = ("identifier", "scopes")
_CLIENT_KEYS = ("client_id", "client_secret", "allowed_scopes", "grant_types", "custom_claims")


# A dev issuer config is a few KB; anything near this is the wrong path (or /dev/zero).
CONFIG_MAX_BYTES = 1024 * 1024
_CONFIG_PATH_FIX = "check the --config path"


def load_config(path: Path) -> DevIssuerConfig:
    """Read and validate a dev issuer YAML file; every problem raises DevIssuerConfigError."""
    path = Path(path)
    try:
        raw = read_bounded(
            path,
            "dev issuer config",
            CONFIG_MAX_BYTES,
            _CONFIG_PATH_FIX,
            regular_fix=REGULAR_FILE_FIX,
            read_fix=_CONFIG_PATH_FIX,
        )
    except FileReadError as exc:
        raise DevIssuerConfigError(str(exc)) from None
    parser = _Parser.from_bytes(raw, str(path))
    assert isinstance(parser, _Parser)
    return parser.config(parser.document())


class _Parser(YamlValidator):
    """Validation that knows the file (name and text), so every message can name file:line:column."""

    yaml_fix = "; fix: correct the YAML there"

    @classmethod
    def error(
        cls, message: str, where: Where = (), line: int | None = None, column: int | None = None
    ) -> DevIssuerConfigError:
        return DevIssuerConfigError(message)

    def mapping(self, value: object, where: Where, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {kind(value)}", f"use keys {', '.join(allowed)}")
        for key in value:
            if key not in allowed:
                raise self.fail(
                    (*where, str(key)), "unknown key", f"remove it or use one of {', '.join(allowed)}", at_key=True
                )
        return value

    def required(self, item: Mapping[str, Any], key: str, where: Where, example: str) -> Any:
        if key not in item or item[key] is None:
            raise self.fail((*where, key), "missing required field", f"add `{key}: {example}`")
        return item[key]

    def string(self, value: object, where: Where, fix: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {kind(value)}", fix)
        return value

    def string_list(self, value: object, where: Where, fix: str, allow_empty: bool) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not allow_empty):
            got = "an empty list" if value == [] else kind(value)
            raise self.fail(where, f"must be a {'' if allow_empty else 'non-empty '}list of strings, got {got}", fix)
        items: list[str] = []
        for i, element in enumerate(value):
            text = self.string(element, (*where, i), fix)
            if text in items:
                raise self.fail((*where, i), f"{text!r} is listed twice", "keep one entry")
            items.append(text)
        return tuple(items)

    def config(self, doc: object) -> DevIssuerConfig:
        top = self.mapping(doc, (), _TOP_KEYS)
        pool_id = self.string(
            self.required(top, "user_pool_id", (), "us-east-1_Demo00001"),
            ("user_pool_id",),
            "use Cognito's shape <region>_<letters and digits>, e.g. us-east-1_Demo00001",
        )
        if not POOL_ID.match(pool_id):
            raise self.fail(
                ("user_pool_id",),
                f"{pool_id!r} is not a Cognito user pool id",
                "use Cognito's shape <region>_<letters and digits>, e.g. us-east-1_Demo00001",
            )
        ttl = top.get("token_ttl_seconds", DEFAULT_TOKEN_TTL_SECONDS)
        if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= MAX_TOKEN_TTL_SECONDS:
            raise self.fail(
                ("token_ttl_seconds",),
                f"must be a whole number of seconds from 1 to {MAX_TOKEN_TTL_SECONDS}, got {ttl!r}",
                f"omit it for the default {DEFAULT_TOKEN_TTL_SECONDS}, or give e.g. 300",
            )

        issuer_format, replicas = self.issuer_format(top, pool_id)
        raw_servers = self.required(top, "resource_servers", (), "[{identifier: ..., scopes: [...]}]")
        if not isinstance(raw_servers, list) or not raw_servers:
            raise self.fail(
                ("resource_servers",),
                f"must be a non-empty list, got {kind(raw_servers)}",
                "define at least one {identifier: ..., scopes: [...]}",
            )
        servers = tuple(self.resource_server(item, ("resource_servers", i)) for i, item in enumerate(raw_servers))
        identifiers = [server.identifier for server in servers]
        for i, identifier in enumerate(identifiers):
            if identifier in identifiers[:i]:
                raise self.fail(
                    ("resource_servers", i, "identifier"),
                    f"{identifier!r} is defined twice",
                    "merge the scopes into one entry",
                )
        defined = {scope for server in servers for scope in server.full_scopes}

        raw_clients = self.required(top, "clients", (), "[{client_id: ..., client_secret: ...}]")
        if not isinstance(raw_clients, list) or not raw_clients:
            raise self.fail(
                ("clients",),
                f"must be a non-empty list, got {kind(raw_clients)}",
                "define at least one {client_id: ..., client_secret: ..., allowed_scopes: [...]}",
            )
        clients = tuple(self.client(item, ("clients", i), defined) for i, item in enumerate(raw_clients))
        client_ids = [client.client_id for client in clients]
        for i, client_id in enumerate(client_ids):
            if client_id in client_ids[:i]:
                raise self.fail(("clients", i, "client_id"), f"{client_id!r} is defined twice", "rename one client")
        return DevIssuerConfig(
            user_pool_id=pool_id,
            token_ttl_seconds=ttl,
            resource_servers=servers,
            clients=clients,
            issuer_format=issuer_format,
            replica_regions=replicas,
        )

    def issuer_format(self, top: Mapping[str, Any], pool_id: str) -> tuple[IssuerFormat | None, tuple[str, ...]]:
        raw = top.get("issuer_format")
        try:
            issuer_format = IssuerFormat(raw) if raw is not None else None
        except ValueError:
            raise self.fail(
                ("issuer_format",),
                f"{raw!r} is not an issuer format",
                "use original (cognito-idp.<region>) or updated (issuer-cognito-idp.<region>), or omit "
                "it for <public URL>/<pool id>",
            ) from None
        fix = "list regions such as eu-west-1, other than the pool's own"
        replicas = self.string_list(top.get("replica_regions", []), ("replica_regions",), fix, True)
        if replicas and issuer_format is not IssuerFormat.UPDATED:
            raise self.fail(
                ("replica_regions",), "a multi-Region pool issues with the updated issuer", "add issuer_format: updated"
            )
        for i, region in enumerate(replicas):
            if not REGION.match(region) or region == pool_id.split("_")[0]:
                raise self.fail(("replica_regions", i), f"{region!r} is not a replica region", fix)
        return issuer_format, replicas

    def resource_server(self, value: object, where: Where) -> ResourceServer:
        item = self.mapping(value, where, _RESOURCE_SERVER_KEYS)
        identifier = self.string(
            self.required(item, "identifier", where, "transactions"),
            (*where, "identifier"),
            "give the identifier as a string, e.g. transactions or https://api.example.com",
        )
        if not _RESOURCE_SERVER_ID.match(identifier):
            raise self.fail(
                (*where, "identifier"),
                f"{identifier!r} has characters Cognito refuses (space, quote, backslash or control)",
                "use printable ASCII without spaces, quotes or backslashes",
            )
        fix = "list scope names without the identifier, e.g. [get, post]"
        names = self.string_list(self.required(item, "scopes", where, "[get, post]"), (*where, "scopes"), fix, False)
        for i, name in enumerate(names):
            if not _SCOPE_NAME.match(name):
                raise self.fail(
                    (*where, "scopes", i),
                    f"{name!r} is not a valid scope name ('/', space, quote and backslash are not allowed)",
                    fix,
                )
        return ResourceServer(identifier=identifier, scopes=names)

    def client(self, value: object, where: Where, defined_scopes: set[str]) -> ClientConfig:
        item = self.mapping(value, where, _CLIENT_KEYS)
        client_id = self.string(
            self.required(item, "client_id", where, "payments-writer"),
            (*where, "client_id"),
            "give the client id as a string",
        )
        if not _CLIENT_ID.match(client_id):
            raise self.fail(
                (*where, "client_id"),
                f"{client_id!r} must be 1-128 printable ASCII characters without ':' or spaces",
                "rename the client",
            )
        secret = self.required(item, "client_secret", where, "<a secret string>")
        if not isinstance(secret, str) or not secret:
            raise self.fail(
                (*where, "client_secret"),
                f"must be a non-empty string, got {kind(secret)}",
                'quote the secret in YAML, e.g. client_secret: "123456"',
            )
        grant_types = self.string_list(
            item.get("grant_types", [CLIENT_CREDENTIALS]),
            (*where, "grant_types"),
            f"list grant types from {', '.join(sorted(KNOWN_GRANT_TYPES))}, or omit for [{CLIENT_CREDENTIALS}]",
            True,
        )
        for i, grant in enumerate(grant_types):
            if grant not in KNOWN_GRANT_TYPES:
                raise self.fail(
                    (*where, "grant_types", i),
                    f"unknown grant type {grant!r}",
                    f"use one of {', '.join(sorted(KNOWN_GRANT_TYPES))}",
                )
        if CLIENT_CREDENTIALS in grant_types and len(grant_types) > 1:
            raise self.fail(
                (*where, "grant_types"),
                "Cognito does not allow client_credentials together with user flows in one app client",
                f"keep only {CLIENT_CREDENTIALS}, or make a separate client",
            )
        defined_text = ", ".join(sorted(defined_scopes))
        scopes = self.string_list(
            item.get("allowed_scopes", []),
            (*where, "allowed_scopes"),
            f"list full scope names <identifier>/<name> from: {defined_text}",
            True,
        )
        for i, scope in enumerate(scopes):
            if scope not in defined_scopes:
                raise self.fail(
                    (*where, "allowed_scopes", i),
                    f"{scope!r} is not defined by any resource server",
                    f"use one of {defined_text}, or add it to a resource server's scopes",
                )
        if CLIENT_CREDENTIALS in grant_types and not scopes:
            raise self.fail(
                (*where, "allowed_scopes"),
                "a client_credentials client needs at least one allowed scope, or no token can be issued",
                f"add scopes from: {defined_text}",
            )
        custom = self.custom_claims(item.get("custom_claims", {}), (*where, "custom_claims"))
        return ClientConfig(
            client_id=client_id,
            client_secret=secret,
            allowed_scopes=scopes,
            grant_types=grant_types,
            custom_claims=custom,
        )

    def custom_claims(self, value: object, where: Where) -> dict[str, Any]:
        """What a pre token generation trigger would add: names Cognito does not control, JSON values."""
        fix = "map claim names to JSON values, e.g. {tenant: acme, tier: gold, environments: [prod]}"
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {kind(value)}", fix)
        for name, claim in value.items():
            if not isinstance(name, str) or not name:
                raise self.fail(where, f"claim name {name!r} is not a string", fix)
            if name in TOKEN_CLAIMS or cognito_controlled(name):
                raise self.fail(
                    (*where, name),
                    "Cognito sets this claim; a trigger cannot add or override it",
                    "use another name",
                    at_key=True,
                )
            try:
                json.dumps(claim, allow_nan=False)
            except (TypeError, ValueError):
                raise self.fail((*where, name), f"{claim!r} is not a JSON value", fix) from None
        return dict(value)
