"""Shared test material: RSA keys, a token factory shaped exactly like Cognito's, the one in-memory
key source (what the JWKS cache would hold) for in-process tests; and the session-wide process
ownership (every process a test or fixture starts is stopped when that test or fixture ends; the
run fails if any process it started outlives it)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from jwt.api_jwk import PyJWK

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2
from authz_service.cognito import access_claims
from authz_service.keys import IssuerKey
from authz_service.policy import Issuer

from tests.e2e.harness import RUN_MARKER, Owner, reap_leftovers

ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Test00001"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: rsa.RSAPrivateKey

    def jwk(self) -> dict[str, Any]:
        data = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**data, "kid": self.kid, "alg": "RS256", "use": "sig"}

    def token(self, **overrides: Any) -> str:
        """A Cognito client_credentials access token; pass claim=None to drop a claim."""
        headers = {"kid": self.kid, "alg": "RS256", **overrides.pop("header", {})}
        claims = access_claims(ISSUER, "client-a", "transactions/post", replace=overrides)
        return jwt.encode(claims, self.private, algorithm="RS256", headers=headers)


def check_request(method: str, path: str, headers: Mapping[str, str]) -> external_auth_pb2.CheckRequest:
    """The CheckRequest Envoy's gRPC ext_authz sends for this request (headers lower-cased, as Envoy
    sends the ``headers`` map; join repeated headers with ',' first, as Envoy does)."""
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method = method
    http.path = path
    for name, value in headers.items():
        http.headers[name.lower()] = value
    return check


def make_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="session")
def key_a() -> SigningKey:
    return make_key("kid-a")


@pytest.fixture(scope="session")
def key_b() -> SigningKey:
    return make_key("kid-b")


class MemoryKeys:
    """A real in-memory KeySource: the key sets the JWKS cache would hold per issuer (``keys`` is
    the ``issuer``'s, ``publish`` adds another issuer's), plus a refetch we can script."""

    def __init__(self, *keys: SigningKey, issuer: str = ISSUER) -> None:
        self.issuer = issuer
        self.keys = {k.kid: PyJWK(k.jwk()) for k in keys}
        self.others: dict[str, dict[str, PyJWK]] = {}
        self.after_refetch: dict[str, PyJWK] | None = None
        self.refetched: list[str] = []

    def publish(self, issuer: str, *keys: SigningKey) -> None:
        self.others[issuer] = {k.kid: PyJWK(k.jwk()) for k in keys}

    def _key_sets(self) -> dict[str, dict[str, PyJWK]]:
        return {self.issuer: self.keys, **self.others}

    def keys_for_kid(self, kid: str) -> tuple[IssuerKey, ...]:
        return tuple(IssuerKey(iss, keys[kid]) for iss, keys in self._key_sets().items() if kid in keys)

    def key(self, issuer: Issuer, kid: str) -> PyJWK | None:
        return self._key_sets().get(issuer.issuer, {}).get(kid)

    def has_keys(self, issuer: Issuer) -> bool:
        return bool(self._key_sets().get(issuer.issuer))

    async def refetch(self, issuer: Issuer) -> None:
        self.refetched.append(issuer.issuer)
        if self.after_refetch is not None and issuer.issuer == self.issuer:
            self.keys = self.after_refetch


@pytest.fixture
def traced():
    """Tracing on, its spans kept in memory as each ends: ``(tracing, exporter)``."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from authz_service.tracing import Tracing, tracing_settings

    exporter = InMemorySpanExporter()
    settings = tracing_settings({"OTEL_TRACES_EXPORTER": "otlp"})
    assert settings is not None
    return Tracing(settings, "test", exporter=exporter), exporter


# --- process ownership ------------------------------------------------------------------------------

_LEAKED = pytest.StashKey[list[str]]()


@dataclass(frozen=True)
class LeakedProcess:
    """One entry of the closing line's "N leaked" count (the terminal reporter counts objects)."""

    description: str


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # A value of this run's own: inherited by every process the suite starts, grandchildren too.
    os.environ[RUN_MARKER] = uuid.uuid4().hex


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Generator[None, Any, Any]:
    """What a fixture's setup starts is stopped when the fixture is torn down, after its own teardown
    code ran, and also when its setup failed half-way."""
    owner = Owner(f"fixture {fixturedef.argname}")
    fixturedef.addfinalizer(owner.close)
    with owner.current():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    """What a test body starts is stopped when the test ends (first thing in its teardown)."""
    owner = Owner(f"test {item.nodeid}")
    item.addfinalizer(owner.close)
    with owner.current():
        return (yield)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """After every fixture was torn down: anything this run started that still runs leaked. Stop it
    and fail the run, so a leak is fixed where it happens instead of piling up on the machine."""
    leaked = reap_leftovers(os.environ.get(RUN_MARKER))
    session.config.stash[_LEAKED] = leaked
    if leaked:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.stats.setdefault("leaked", []).extend(LeakedProcess(line) for line in leaked)
        if session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    leaked = config.stash.get(_LEAKED, [])
    if leaked:
        terminalreporter.section("processes that outlived the test run (killed now)", sep="=", red=True)
        for line in leaked:
            terminalreporter.line(line)
