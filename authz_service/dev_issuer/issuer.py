"""A local stand-in for an Amazon Cognito user pool, for development and tests only.

Cognito emulators do not implement the client_credentials grant, so this module issues the
machine-to-machine access tokens the sidecar verifies, in the same shape Cognito does:

* ``GET  /<user_pool_id>/.well-known/jwks.json``: RS256 public keys (kty, use, alg, kid, n, e).
* ``POST /oauth2/token``: grant_type=client_credentials only, client authentication by HTTP Basic
  (client_secret_basic) or by form body (client_secret_post). Errors are HTTP 400 with
  ``{"error": "<code>"}``, as Cognito documents for every code, invalid_client included.
* ``POST /<region>/oauth2/token``: the same, for one replica region of a multi-Region pool (the
  token's ``iss`` names that region; every region signs with the same published keys).
* ``POST /admin/rotate[?retire_old=true]`` and ``GET /admin/health``: dev-only helpers.

``iss`` is ``<public URL>/<user_pool_id>``, or, with ``issuer_format`` in the config, Cognito's own
issuer URL (``https://cognito-idp.<region>.amazonaws.com/<pool>`` or the updated
``https://issuer-cognito-idp.<region>.amazonaws.com/<pool>``), so a policy can use Cognito's
default issuers with only ``jwks_uri`` pointing here. A client's ``custom_claims`` are added to its
access tokens, as a pre token generation trigger (event V3_0) adds them.

The admin endpoints are unauthenticated: bind the issuer to loopback, never expose it.
Client secrets and issued tokens are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from .. import ports
from ..claims import cognito_controlled
from ..policy import IssuerFormat, cognito_issuer
from ..yamlfile import Places, Where, YamlError, load_strict_yaml, place

log = logging.getLogger("authz_service.dev_issuer")

CLIENT_CREDENTIALS = "client_credentials"
# Cognito's AllowedOAuthFlows, spelled as OAuth grant names; only client_credentials is served here,
# the others exist so a config can model a client that Cognito would refuse with unauthorized_client.
KNOWN_GRANT_TYPES = frozenset({CLIENT_CREDENTIALS, "authorization_code", "implicit"})
DEFAULT_TOKEN_TTL_SECONDS = 3600
MAX_TOKEN_TTL_SECONDS = 86400  # Cognito's upper bound for access token validity (1 day)
RSA_KEY_BITS = 2048

_POOL_ID = re.compile(r"^(?P<region>[a-z]{2}(?:-[a-z]+)+-\d+)_[0-9A-Za-z]+\Z")
_REGION = re.compile(r"^[a-z]{2}(?:-[a-z]+)+-\d+\Z")
# The claims this issuer writes itself (Cognito's client_credentials access token); custom claims
# may add to them, never replace them, as with Cognito's trigger.
TOKEN_CLAIMS = frozenset({"sub", "token_use", "scope", "auth_time", "iss", "exp", "iat", "version", "jti",
                          "client_id"})
# Cognito's patterns: a resource server identifier may contain '/', a scope name may not, so
# "<identifier>/<name>" stays unambiguous only when split at the last '/'.
_RESOURCE_SERVER_ID = re.compile(r"^[\x21\x23-\x5B\x5D-\x7E]{1,256}\Z")
_SCOPE_NAME = re.compile(r"^[\x21\x23-\x2E\x30-\x5B\x5D-\x7E]{1,256}\Z")
# Printable ASCII without ':' because Basic authentication splits id and secret at the first ':'.
_CLIENT_ID = re.compile(r"^[\x21-\x39\x3B-\x7E]{1,128}\Z")

_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_OAUTH_ERROR_STATUS = 400  # Cognito's documented status for every token endpoint error


# --- configuration -------------------------------------------------------------------------------


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


def load_config(path: Path) -> DevIssuerConfig:
    """Read and validate a dev issuer YAML file; every problem raises DevIssuerConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DevIssuerConfigError(
            f"{path}: cannot read dev issuer config: {exc.strerror or exc}; check the --config path"
        ) from None
    except UnicodeDecodeError as exc:
        raise DevIssuerConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as UTF-8") from None
    try:
        doc = load_strict_yaml(text, str(path))
    except YamlError as exc:
        if exc.line is None:
            raise DevIssuerConfigError(f"{exc}; fix: correct the YAML there") from None
        raise DevIssuerConfigError(
            f"{place(str(path), exc.line, exc.column)}: not valid YAML: {exc.problem}; fix: correct the YAML there"
        ) from None
    return _Parser(str(path), text).config(doc)


def _kind(value: object) -> str:
    names = {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}
    return names.get(type(value), type(value).__name__)


class _Parser:
    """Validation that knows the file (name and text), so every message can name file:line:column."""

    def __init__(self, source: str, text: str) -> None:
        self.places = Places(source, text)

    def fail(self, where: Where, problem: str, fix: str, at_key: bool = False) -> DevIssuerConfigError:
        return DevIssuerConfigError(f"{self.places.prefix(where, at_key)}: {problem}; fix: {fix}")

    def mapping(self, value: object, where: Where, allowed: Sequence[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {_kind(value)}", f"use keys {', '.join(allowed)}")
        for key in value:
            if key not in allowed:
                raise self.fail((*where, str(key)), "unknown key", f"remove it or use one of {', '.join(allowed)}",
                                at_key=True)
        return value

    def required(self, item: Mapping[str, Any], key: str, where: Where, example: str) -> Any:
        if key not in item or item[key] is None:
            raise self.fail((*where, key), "missing required field", f"add `{key}: {example}`")
        return item[key]

    def string(self, value: object, where: Where, fix: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(where, f"must be a non-empty string, got {_kind(value)}", fix)
        return value

    def string_list(self, value: object, where: Where, fix: str, allow_empty: bool) -> tuple[str, ...]:
        if not isinstance(value, list) or (not value and not allow_empty):
            kind = "an empty list" if value == [] else _kind(value)
            raise self.fail(where, f"must be a {'' if allow_empty else 'non-empty '}list of strings, got {kind}", fix)
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
        if not _POOL_ID.match(pool_id):
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
                f"must be a non-empty list, got {_kind(raw_servers)}",
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
                f"must be a non-empty list, got {_kind(raw_clients)}",
                "define at least one {client_id: ..., client_secret: ..., allowed_scopes: [...]}",
            )
        clients = tuple(self.client(item, ("clients", i), defined) for i, item in enumerate(raw_clients))
        client_ids = [client.client_id for client in clients]
        for i, client_id in enumerate(client_ids):
            if client_id in client_ids[:i]:
                raise self.fail(("clients", i, "client_id"), f"{client_id!r} is defined twice", "rename one client")
        return DevIssuerConfig(
            user_pool_id=pool_id, token_ttl_seconds=ttl, resource_servers=servers, clients=clients,
            issuer_format=issuer_format, replica_regions=replicas,
        )

    def issuer_format(self, top: Mapping[str, Any], pool_id: str) -> tuple[IssuerFormat | None, tuple[str, ...]]:
        raw = top.get("issuer_format")
        try:
            issuer_format = IssuerFormat(raw) if raw is not None else None
        except ValueError:
            raise self.fail(("issuer_format",), f"{raw!r} is not an issuer format",
                            "use original (cognito-idp.<region>) or updated (issuer-cognito-idp.<region>), or omit "
                            "it for <public URL>/<pool id>") from None
        fix = "list regions such as eu-west-1, other than the pool's own"
        replicas = self.string_list(top.get("replica_regions", []), ("replica_regions",), fix, True)
        if replicas and issuer_format is not IssuerFormat.UPDATED:
            raise self.fail(("replica_regions",), "a multi-Region pool issues with the updated issuer",
                            "add issuer_format: updated")
        for i, region in enumerate(replicas):
            if not _REGION.match(region) or region == pool_id.split("_")[0]:
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
                f"must be a non-empty string, got {_kind(secret)}",
                "quote the secret in YAML, e.g. client_secret: \"123456\"",
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
        return ClientConfig(client_id=client_id, client_secret=secret, allowed_scopes=scopes, grant_types=grant_types,
                            custom_claims=custom)

    def custom_claims(self, value: object, where: Where) -> dict[str, Any]:
        """What a pre token generation trigger would add: names Cognito does not control, JSON values."""
        fix = "map claim names to JSON values, e.g. {tenant: acme, tier: gold, environments: [prod]}"
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {_kind(value)}", fix)
        for name, claim in value.items():
            if not isinstance(name, str) or not name:
                raise self.fail(where, f"claim name {name!r} is not a string", fix)
            if name in TOKEN_CLAIMS or cognito_controlled(name):
                raise self.fail((*where, name), "Cognito sets this claim; a trigger cannot add or override it",
                                "use another name", at_key=True)
            try:
                json.dumps(claim, allow_nan=False)
            except (TypeError, ValueError):
                raise self.fail((*where, name), f"{claim!r} is not a JSON value", fix) from None
        return dict(value)


# --- keys and tokens -----------------------------------------------------------------------------


class TokenRequestError(Exception):
    """A request Cognito would refuse. ``error`` is the OAuth 2.0 code; ``reason`` is for logs only."""

    def __init__(self, error: str, reason: str) -> None:
        super().__init__(f"{error}: {reason}")
        self.error = error
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey = field(repr=False)


def _new_signing_key() -> _SigningKey:
    """A fresh RSA key whose kid mimics Cognito's: base64 of SHA-256 over the public key's DER SPKI."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    kid = base64.b64encode(hashlib.sha256(der).digest()).decode("ascii")
    return _SigningKey(kid=kid, private_key=private_key)


def _normalize_public_url(public_url: str) -> str:
    parts = urlsplit(public_url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            f"public URL {public_url!r} must be http(s)://host[:port][/path] without query or fragment"
        )
    return public_url.rstrip("/")


class DevIssuer:
    """Keys and clients of one emulated user pool. Pure: usable and testable without HTTP."""

    def __init__(self, config: DevIssuerConfig, public_url: str) -> None:
        self.config = config
        self.base_url = _normalize_public_url(public_url)
        pool = config.user_pool_id
        if config.issuer_format is None:
            self._issuer = f"{self.base_url}/{pool}"
        else:
            self._issuer = cognito_issuer(config.issuer_format, pool.split("_")[0], pool)
        # The iss of each replica region (its token endpoint is /<region>/oauth2/token).
        self.region_issuers = {region: cognito_issuer(IssuerFormat.UPDATED, region, pool)
                               for region in config.replica_regions}
        self._clients = {client.client_id: client for client in config.clients}
        self._keys: list[_SigningKey] = [_new_signing_key()]  # last one signs

    @property
    def issuer(self) -> str:
        """The ``iss`` claim of the pool's (primary region's) tokens. The JWKS is served at
        ``<public URL>/<pool id>/.well-known/jwks.json`` (``<issuer>/.well-known/jwks.json`` when the
        issuer is the public URL's, as with Cognito)."""
        return self._issuer

    @property
    def jwks_path(self) -> str:
        return f"/{self.config.user_pool_id}/.well-known/jwks.json"

    @property
    def signing_kid(self) -> str:
        return self._keys[-1].kid

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The published public keys, each exactly Cognito's members: alg, e, kid, kty, n, use."""
        keys = []
        for key in self._keys:
            jwk = RSAAlgorithm.to_jwk(key.private_key.public_key(), as_dict=True)
            keys.append({"alg": "RS256", "e": jwk["e"], "kid": key.kid, "kty": "RSA", "n": jwk["n"], "use": "sig"})
        return {"keys": keys}

    def authenticate(self, client_id: str, client_secret: str) -> None:
        """Raise invalid_client unless the pair matches; compared in constant time, known id or not."""
        client = self._clients.get(client_id)
        expected = client.client_secret if client is not None else "\x00unknown-client"
        secret_ok = hmac.compare_digest(client_secret.encode("utf-8"), expected.encode("utf-8"))
        if client is None:
            raise TokenRequestError("invalid_client", f"unknown client_id {client_id[:128]!r}")
        if not secret_ok:
            raise TokenRequestError("invalid_client", f"wrong client_secret for client_id {client_id[:128]!r}")

    def issue(self, client_id: str, scopes: list[str] | None = None, region: str | None = None) -> str:
        """A signed Cognito-shaped access token. None or [] means all the client's scopes, as Cognito does.
        ``region``: a replica region's token (its ``iss``); None: the pool's own.

        Does not check the secret (see ``authenticate``); raises TokenRequestError with
        invalid_client, unauthorized_client or invalid_scope, the codes Cognito would return.
        """
        if region is not None and region not in self.region_issuers:
            raise ValueError(f"{region!r} is not a replica region of this issuer")
        client = self._clients.get(client_id)
        if client is None:
            raise TokenRequestError("invalid_client", f"unknown client_id {client_id!r}")
        if CLIENT_CREDENTIALS not in client.grant_types:
            raise TokenRequestError(
                "unauthorized_client", f"client {client_id!r} is not allowed the client_credentials grant"
            )
        if scopes:
            granted = list(dict.fromkeys(scopes))  # drop repeats, keep the caller's order
            refused = [scope for scope in granted if scope not in client.allowed_scopes]
            if refused:
                raise TokenRequestError(
                    "invalid_scope", f"client {client_id!r} is not allowed scope(s) {' '.join(refused)}"
                )
        else:
            granted = list(client.allowed_scopes)
        now = int(time.time())
        # Cognito's client_credentials access token claims, in Cognito's order, after the trigger's.
        claims = {
            **client.custom_claims,
            "sub": client_id,
            "token_use": "access",
            "scope": " ".join(granted),
            "auth_time": now,
            "iss": self._issuer if region is None else self.region_issuers[region],
            "exp": now + self.config.token_ttl_seconds,
            "iat": now,
            "version": 2,
            "jti": str(uuid.uuid4()),
            "client_id": client_id,
        }
        key = self._keys[-1]
        # typ=None makes PyJWT leave "typ" out: Cognito's header is only kid and alg.
        return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid, "typ": None})

    def rotate(self, retire_old: bool = False) -> str:
        """Sign with a new key from now on; keep older keys published unless ``retire_old``."""
        new_key = _new_signing_key()
        self._keys = [new_key] if retire_old else [*self._keys, new_key]
        log.info(
            "dev issuer rotated signing key: kid=%s published=%s",
            new_key.kid,
            [key.kid for key in self._keys],
        )
        return new_key.kid


# --- HTTP ----------------------------------------------------------------------------------------

ISSUER_KEY = web.AppKey("dev_issuer", DevIssuer)


def build_app(issuer: DevIssuer) -> web.Application:
    """The aiohttp application serving the JWKS, token and admin endpoints for ``issuer``."""
    app = web.Application(client_max_size=64 * 1024)
    app[ISSUER_KEY] = issuer
    app.router.add_get(issuer.jwks_path, _handle_jwks)
    app.router.add_post("/oauth2/token", _handle_token)
    for region in issuer.region_issuers:
        app.router.add_post(f"/{region}/oauth2/token", _handle_token)
    app.router.add_post("/admin/rotate", _handle_rotate)
    app.router.add_get("/admin/health", _handle_health)
    return app


async def _handle_jwks(request: web.Request) -> web.Response:
    return web.json_response(request.app[ISSUER_KEY].jwks())


async def _handle_health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _handle_rotate(request: web.Request) -> web.Response:
    raw = request.query.get("retire_old", "false").lower()
    if raw not in ("true", "false", "1", "0"):
        return web.json_response({"error": "retire_old must be true or false"}, status=400)
    issuer = request.app[ISSUER_KEY]
    kid = issuer.rotate(retire_old=raw in ("true", "1"))
    return web.json_response({"kid": kid, "published": [key["kid"] for key in issuer.jwks()["keys"]]})


async def _handle_token(request: web.Request) -> web.Response:
    issuer = request.app[ISSUER_KEY]
    try:
        form = await _read_form(request)
        grant_type = form.get("grant_type")
        if grant_type is None:
            raise TokenRequestError("invalid_request", "grant_type is missing")
        if grant_type != CLIENT_CREDENTIALS:
            raise TokenRequestError("unsupported_grant_type", f"grant_type {grant_type[:64]!r} is not served")
        client_id, client_secret = _client_credentials(request, form)
        issuer.authenticate(client_id, client_secret)
        scope = form.get("scope")
        region = request.path.split("/")[1] if request.path != "/oauth2/token" else None
        token = issuer.issue(client_id, scope.split() if scope else None, region)
    except TokenRequestError as exc:
        log.info("dev issuer refused token request: %s (%s)", exc.error, exc.reason)
        return web.json_response({"error": exc.error}, status=_OAUTH_ERROR_STATUS)
    log.info("dev issuer issued an access token to client_id=%r", client_id)
    return web.json_response(
        {"access_token": token, "expires_in": issuer.config.token_ttl_seconds, "token_type": "Bearer"},
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def _read_form(request: web.Request) -> dict[str, str]:
    """Form parameters with RFC 6749 rules: no repeats, and an empty value counts as absent."""
    if request.content_type != _FORM_CONTENT_TYPE:
        raise TokenRequestError(
            "invalid_request", f"Content-Type {request.content_type!r} is not {_FORM_CONTENT_TYPE}"
        )
    try:
        body = await request.post()
    except (ValueError, UnicodeDecodeError):
        raise TokenRequestError("invalid_request", "the form body cannot be decoded") from None
    form: dict[str, str] = {}
    for name in body:
        values = body.getall(name)
        if len(values) > 1:
            raise TokenRequestError("invalid_request", f"parameter {name!r} is repeated")
        value = values[0]
        if not isinstance(value, str):
            raise TokenRequestError("invalid_request", f"parameter {name!r} is not text")
        if value:
            form[name] = value
    return form


def _client_credentials(request: web.Request, form: Mapping[str, str]) -> tuple[str, str]:
    """(client_id, client_secret) from a Basic header or the form body, never half of each."""
    header = request.headers.get("Authorization")
    if header is None:
        client_id = form.get("client_id")
        if client_id is None:
            raise TokenRequestError("invalid_request", "no Authorization header and no client_id in the body")
        client_secret = form.get("client_secret")
        if client_secret is None:
            raise TokenRequestError("invalid_client", f"client_secret missing for client_id {client_id[:128]!r}")
        return client_id, client_secret

    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        raise TokenRequestError("invalid_client", "Authorization header is not Basic")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise TokenRequestError("invalid_client", "Authorization header is not valid base64 of id:secret") from None
    client_id, colon, client_secret = decoded.partition(":")
    if not colon or not client_id:
        raise TokenRequestError("invalid_client", "Authorization header does not hold id:secret")
    if "client_secret" in form:
        raise TokenRequestError("invalid_request", "client_secret sent both in the header and in the body")
    if form.get("client_id", client_id) != client_id:
        raise TokenRequestError("invalid_request", "client_id in the body differs from the Authorization header")
    return client_id, client_secret


def _default_public_url(host: str, port: int) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"http://[{host}]:{port}" if is_v6 else f"http://{host}:{port}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A bound socket, so port 0 resolves to a real port before the issuer URL is fixed."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:  # not a name or address of this host
        raise ports.DEV_ISSUER.error(host, port, exc) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise ports.DEV_ISSUER.error(host, port, exc) from None
    return sock


async def serve(config: DevIssuerConfig, host: str, port: int, public_url: str | None) -> None:
    """Serve the dev issuer until cancelled. ``public_url`` defaults to ``http://<host>:<bound port>``."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    try:
        issuer = DevIssuer(config, public_url or _default_public_url(host, bound_port))
    except BaseException:
        sock.close()
        raise
    runner = web.AppRunner(build_app(issuer))
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        if not _is_loopback(host):
            log.warning(
                "dev issuer listens on %s, not loopback: /admin/rotate has no authentication; "
                "this is a development tool, keep it off shared networks",
                host,
            )
        log.info(
            "dev issuer ready: issuer=%s token_endpoint=%s/oauth2/token jwks=%s%s (listening on %s:%d)",
            issuer.issuer,
            issuer.base_url,
            issuer.base_url,
            issuer.jwks_path,
            host,
            bound_port,
        )
        for region, iss in issuer.region_issuers.items():
            log.info("dev issuer replica region %s: issuer=%s token_endpoint=%s/%s/oauth2/token",
                     region, iss, issuer.base_url, region)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        sock.close()
