"""JwksCache against a real HTTP JWKS endpoint whose behaviour each test scripts."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import json
import logging
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import to_base64url_uint
from prometheus_client import CollectorRegistry

from authz_service.keys import IssuerKey
from authz_service.jwks import JwksCache, JwksError, JwksSettings, parse_jwks
from authz_service.metrics import Metrics
from authz_service.policy import Issuer, parse_policy
from authz_service.tokens import TokenError, TokenVerifier
from authz_service.tracing import NO_TRACING

from .conftest import SigningKey, make_key


class ScriptedJwks:
    """An HTTP JWKS endpoint: `reply` decides each answer (a response, or a handler that streams
    one: see `in_pieces`); `hits` counts requests."""

    def __init__(self) -> None:
        self.hits = 0
        self.reply: web.Response | Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
        self.delay = 0.0
        self.held: asyncio.Event | None = None  # when set: answers wait until it is set

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.held is not None:
            await self.held.wait()
        assert self.reply is not None
        return self.reply if isinstance(self.reply, web.StreamResponse) else await self.reply(request)

    def keys(self, *keys: SigningKey) -> None:
        self.reply = web.json_response({"keys": [k.jwk() for k in keys]})


def in_pieces(document: bytes, count: int, then: asyncio.Event | None = None,
              ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler sending ``document`` in ``count`` writes (chunked), each flushed before the next,
    as a proxy or a slow link delivers a body; with ``then``, every piece after the first waits
    for it (a slow-loris issuer: headers and a first piece, then nothing)."""

    async def send(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        size = -(-len(document) // count)
        for start in range(0, len(document), size):
            await response.write(document[start:start + size])
            await asyncio.sleep(0)  # the client's reader gets this piece before the next is written
            if then is not None:
                await then.wait()
        await response.write_eof()
        return response

    return send

    def keys(self, *keys: SigningKey) -> None:
        self.reply = web.json_response({"keys": [k.jwk() for k in keys]})


@pytest.fixture
async def endpoint(aiohttp_server_factory):
    return await aiohttp_server_factory()


@pytest.fixture
async def aiohttp_server_factory():
    runners: list[web.AppRunner] = []

    async def start() -> tuple[ScriptedJwks, Issuer]:
        scripted = ScriptedJwks()
        app = web.Application()
        app.router.add_get("/pool/.well-known/jwks.json", scripted.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}/pool"
        issuer = Issuer("us-east-1_Pool1", "us-east-1", base, base + "/.well-known/jwks.json", None)
        return scripted, issuer

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def make_cache():
    sessions: list[aiohttp.ClientSession] = []
    caches: list[JwksCache] = []

    def make(on_key_removed=None, tracing=NO_TRACING, **overrides) -> tuple[JwksCache, Metrics]:
        settings = JwksSettings(**{"refresh_interval": 3600, "timeout": 0.5, "retry_min": 0.05, "retry_max": 0.1,
                                   **overrides})
        metrics = Metrics(CollectorRegistry())
        session = aiohttp.ClientSession()
        sessions.append(session)
        cache = JwksCache(settings, metrics, session, on_key_removed=on_key_removed, tracing=tracing)
        caches.append(cache)
        return cache, metrics

    yield make
    for cache in caches:
        await cache.close()
    for session in sessions:
        await session.close()


async def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def expire_cooldown(cache: JwksCache, issuer: Issuer) -> None:
    """Pretend the unknown-kid cool-down has passed (instead of sleeping 10 s)."""
    cache._states[(issuer.issuer, issuer.jwks_uri)].last_attempt = float("-inf")


# --- parse_jwks ----------------------------------------------------------------------------------


def test_parse_keeps_only_rsa_signing_keys_and_says_why_it_skipped_the_others(key_a: SigningKey,
                                                                              key_b: SigningKey) -> None:
    ec_key = {**json.loads(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key())), "kid": "ec"}
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    weak = {**RSAAlgorithm.to_jwk(small.public_key(), as_dict=True), "kid": "weak"}
    enc = {**key_b.jwk(), "use": "enc", "kid": "enc"}
    other_alg = {**key_b.jwk(), "alg": "RS512", "kid": "rs512"}
    no_verify = {**key_b.jwk(), "key_ops": ["encrypt"], "kid": "no-verify"}
    private = {**RSAAlgorithm.to_jwk(key_b.private, as_dict=True), "kid": "private"}
    doc = {"keys": [key_a.jwk(), ec_key, weak, enc, other_alg, no_verify, private, "junk",
                    {"kty": "RSA", "kid": "broken", "n": "x"}, {**key_b.jwk(), "kid": "k" * 257}]}
    parsed = parse_jwks(json.dumps(doc).encode())
    assert list(parsed.keys) == ["kid-a"]
    assert [(s.kid, s.reason) for s in parsed.skipped] == [
        ("ec", "not an RSA key"), ("weak", "modulus is 1024 bits (accepted: 2048 to 4096)"),
        ("enc", "not a signing key (use)"), ("rs512", "not an RS256 key (alg)"),
        ("no-verify", "key_ops does not allow verify"), ("private", "a private key"),
        (None, "no kid of 1 to 256 characters"), ("broken", "not a valid RSA public key"),
        (None, "no kid of 1 to 256 characters")]


def rsa_jwk(kid: str, n: int, e: int) -> dict:
    """A JWK with the given public numbers (no private key needed to test what we accept)."""
    return {"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
            "n": to_base64url_uint(n).decode(), "e": to_base64url_uint(e).decode()}


def odd_modulus(bits: int) -> int:
    return secrets.randbits(bits) | 1 | (1 << (bits - 1))


@pytest.mark.parametrize(
    ("n", "e", "reason"),
    [
        (odd_modulus(2048), 3, "public exponent is not accepted (odd, 65537 <= e < 2**32 required)"),
        (odd_modulus(2048), 65535, "public exponent is not accepted (odd, 65537 <= e < 2**32 required)"),
        (odd_modulus(2048), 2**32 + 1, "public exponent is not accepted (odd, 65537 <= e < 2**32 required)"),
        (odd_modulus(2048), 2**64 + 1, "public exponent is not accepted (odd, 65537 <= e < 2**32 required)"),
        (odd_modulus(2048), 65536, "not a valid RSA public key"),  # even e: cryptography refuses it already
        (odd_modulus(2048) + 1, 65537, "modulus is even"),
        (odd_modulus(2047), 65537, "modulus is 2047 bits (accepted: 2048 to 4096)"),
        (odd_modulus(4097), 65537, "modulus is 4097 bits (accepted: 2048 to 4096)"),
        (odd_modulus(16384), 65537, "modulus is 16384 bits (accepted: 2048 to 4096)"),
    ],
    ids=["e-3", "e-65535", "e-2^32+1", "e-2^64+1", "e-even", "n-even", "n-2047-bits", "n-4097-bits", "n-16384-bits"],
)
def test_parse_skips_rsa_keys_outside_the_key_rules(key_a: SigningKey, n: int, e: int, reason: str) -> None:
    parsed = parse_jwks(json.dumps({"keys": [key_a.jwk(), rsa_jwk("odd-one", n, e)]}).encode())
    assert list(parsed.keys) == ["kid-a"]
    assert [(s.kid, s.reason) for s in parsed.skipped] == [("odd-one", reason)]
    assert to_base64url_uint(n).decode()[:16] not in reason  # never key material


@pytest.mark.parametrize(("bits", "e"), [(2048, 65537), (4096, 65537), (2048, 2**32 - 1), (3072, 65539)],
                         ids=["2048", "4096", "e-2^32-1", "3072-e-65539"])
def test_parse_accepts_keys_at_the_edges_of_the_rules(bits: int, e: int) -> None:
    parsed = parse_jwks(json.dumps({"keys": [rsa_jwk("edge", odd_modulus(bits), e)]}).encode())
    assert list(parsed.keys) == ["edge"] and parsed.skipped == ()


def self_signed_der(private: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jwks test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(private, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def with_leading_zeros(b64url: str, count: int) -> str:
    raw = base64.urlsafe_b64decode(b64url + "=" * (-len(b64url) % 4))
    return base64.urlsafe_b64encode(b"\0" * count + raw).rstrip(b"=").decode()


NOT_BASE64URL = "n and e must be base64url (A-Z a-z 0-9 - _, unpadded or padded to 4 characters)"
# (id, the entry from key_b's JWK (kid "odd-one"), the reason it is skipped)
SKIPPED_ENTRIES: list[tuple[str, Callable[[SigningKey], dict], str]] = [
    ("n-standard-base64", lambda k: {**k.jwk(), "n": k.jwk()["n"].replace("-", "+").replace("_", "/") + "+/"},
     NOT_BASE64URL),
    ("n-junk-characters", lambda k: {**k.jwk(), "n": k.jwk()["n"][:9] + ".$ \n" + k.jwk()["n"][9:]}, NOT_BASE64URL),
    ("n-padded-past-a-quantum", lambda k: {**k.jwk(), "n": k.jwk()["n"] + "==" + "===="}, NOT_BASE64URL),
    ("n-padded-short", lambda k: {**k.jwk(), "n": k.jwk()["n"] + "="}, NOT_BASE64URL),
    ("e-junk", lambda k: {**k.jwk(), "e": "AQ.AB"}, NOT_BASE64URL),
    ("n-number", lambda k: {**k.jwk(), "n": 12345}, NOT_BASE64URL),
    ("n-1024-bits-zero-padded-to-2048", lambda k: {**rsa_jwk("x", odd_modulus(1024), 65537),
                                                    "n": with_leading_zeros(to_base64url_uint(odd_modulus(1024))
                                                                            .decode(), 128)},
     "modulus is 1024 bits (accepted: 2048 to 4096)"),
    ("e-1", lambda k: {**k.jwk(), "e": "AQ"}, "not a valid RSA public key"),
    ("alg-hs256", lambda k: {**k.jwk(), "alg": "HS256"}, "not an RS256 key (alg)"),
    ("alg-none", lambda k: {**k.jwk(), "alg": "none"}, "not an RS256 key (alg)"),
    ("oct-with-k", lambda k: {"kty": "oct", "k": "c2VjcmV0LWhtYWMta2V5", "alg": "HS256", "use": "sig"},
     "not an RSA key"),
    ("okp", lambda k: {**json.loads(OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate().public_key())),
                       "alg": "EdDSA"}, "not an RSA key"),
    ("x5c-of-another-key", lambda k: {**k.jwk(), "x5c": [base64.b64encode(self_signed_der(k.private)).decode()],
                                      "n": make_key("other").jwk()["n"]},
     "x5c certificate does not hold the key's n and e"),
    ("x5c-not-a-certificate", lambda k: {**k.jwk(), "x5c": ["bm90IGEgY2VydA=="]},
     "x5c certificate does not hold the key's n and e"),
    ("x5c-not-a-list", lambda k: {**k.jwk(), "x5c": "MIIB"}, "x5c certificate does not hold the key's n and e"),
]


@pytest.mark.parametrize(("make_entry", "reason"), [e[1:] for e in SKIPPED_ENTRIES], ids=[e[0] for e in SKIPPED_ENTRIES])
def test_parse_skips_malformed_and_foreign_key_entries(key_a: SigningKey, key_b: SigningKey, make_entry,
                                                       reason: str) -> None:
    parsed = parse_jwks(json.dumps({"keys": [key_a.jwk(), {**make_entry(key_b), "kid": "odd-one"}]}).encode())
    assert list(parsed.keys) == ["kid-a"]
    assert [(s.kid, s.reason) for s in parsed.skipped] == [("odd-one", reason)]


def test_n_and_e_padded_to_a_whole_quantum_are_the_published_numbers(key_b: SigningKey) -> None:
    """Padding changes no number (and Envoy's jwt_authn takes it too): such a key is taken as is."""
    jwk = key_b.jwk()
    padded = jwk["n"] + "=" * (-len(jwk["n"]) % 4)
    assert padded.endswith("=")  # a 2048-bit n needs padding: the case is real
    parsed = parse_jwks(json.dumps({"keys": [{**jwk, "n": padded}]}).encode())
    assert parsed.skipped == ()
    assert parsed.keys[jwk["kid"]].key.public_numbers() == key_b.private.public_key().public_numbers()


@pytest.mark.parametrize("kid", [7, ["kid-b"], None, {"kid": "kid-b"}, ""], ids=["int", "list", "null", "object", "empty"])
def test_parse_skips_entries_without_a_string_kid(key_a: SigningKey, key_b: SigningKey, kid: object) -> None:
    parsed = parse_jwks(json.dumps({"keys": [key_a.jwk(), {**key_b.jwk(), "kid": kid}]}).encode())
    assert list(parsed.keys) == ["kid-a"]
    assert [(s.kid, s.reason) for s in parsed.skipped] == [(None, "no kid of 1 to 256 characters")]


def test_parse_accepts_an_x5c_of_the_same_key_and_a_modulus_with_leading_zero_bytes(key_b: SigningKey) -> None:
    jwk = key_b.jwk()
    entry = {**jwk, "n": with_leading_zeros(jwk["n"], 2), "x5c": [base64.b64encode(self_signed_der(key_b.private)).decode()]}
    parsed = parse_jwks(json.dumps({"keys": [entry]}).encode())
    assert parsed.keys["kid-b"].key.public_numbers() == key_b.private.public_key().public_numbers()


def test_parse_drops_ambiguous_duplicate_kids(key_a: SigningKey, key_b: SigningKey) -> None:
    dup = {**key_b.jwk(), "kid": "kid-a"}
    with pytest.raises(JwksError) as caught:
        parse_jwks(json.dumps({"keys": [key_a.jwk(), dup]}).encode())
    assert [(s.kid, s.reason) for s in caught.value.skipped] == [("kid-a", "kid published more than once")]


@pytest.mark.parametrize("doc", [b"<html>oops</html>", b"{", b"[]", b'{"keys": {}}', b'{"keys": []}', b"\xff\xfe"])
def test_parse_rejects_bad_documents(doc: bytes) -> None:
    with pytest.raises(JwksError):
        parse_jwks(doc)


def gzip_bomb(megabytes: int) -> bytes:
    """A JWKS-looking gzip body under 100 KB that inflates to ``megabytes`` MB of white space."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    spaces = b" " * 1024 * 1024
    return b"".join([packer.compress(b'{"keys": ['), *(packer.compress(spaces) for _ in range(megabytes)),
                     packer.compress(b"]}"), packer.flush()])


# --- the cache -----------------------------------------------------------------------------------


async def test_startup_fetch_and_metrics(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    assert cache.key(issuer, "kid-a") is not None and cache.ready()
    assert metrics.registry.get_sample_value(
        "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "startup", "result": "ok"}) == 1
    assert metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": "us-east-1_Pool1"}) == 1


@pytest.mark.parametrize(
    "reply",
    [
        lambda: web.Response(status=500, text="boom"),
        lambda: web.Response(text="<html>maintenance</html>", content_type="text/html"),
        lambda: web.Response(text="{not json", content_type="application/json"),
        lambda: web.json_response({"keys": []}),
        lambda: web.Response(body=b'{"keys": [' + b" " * (10 * 1024 * 1024) + b"]}", content_type="application/json"),
        lambda: web.Response(status=302, headers={"Location": "http://127.0.0.1:1/elsewhere"}),
        lambda: web.Response(status=301, headers={"Location": "/pool/.well-known/jwks.json"}),
        lambda: web.Response(body=gzip_bomb(64), content_type="application/json", headers={"Content-Encoding": "gzip"}),
        lambda: web.Response(body=b"", content_type="application/json"),
        lambda: web.Response(status=304, headers={"ETag": '"never-asked-for"'}),
    ],
    ids=["500", "html", "invalid-json", "empty-set", "10MB", "redirect", "redirect-loop", "gzip-bomb", "empty-body",
         "304-unasked"],
)
async def test_bad_refresh_keeps_last_good_keys(endpoint, make_cache, key_a, reply) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.reply = reply()
    hits = scripted.hits
    expire_cooldown(cache, issuer)
    await cache.refetch(issuer)
    assert scripted.hits == hits + 1
    assert cache.key(issuer, "kid-a") is not None
    assert cache.status()[0]["last_error"]
    assert metrics.registry.get_sample_value(
        "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "unknown_kid", "result": "error"}) == 1


@pytest.mark.parametrize("content_type", ["text/html", "application/octet-stream", "application/jwk-set+json"])
async def test_the_document_decides_not_its_content_type(endpoint, make_cache, key_a, content_type) -> None:
    """Cognito serves application/json; other issuers and proxies label a JWKS otherwise. What is
    checked is the document: a JWKS labelled text/html is one, HTML labelled JSON is not."""
    scripted, issuer = endpoint
    scripted.reply = web.Response(body=json.dumps({"keys": [key_a.jwk()]}).encode(), content_type=content_type)
    cache, _ = make_cache()
    cache.sync([issuer])
    await cache.wait_first_attempts(60)
    assert cache.status()[0]["last_error"] is None and cache.key(issuer, "kid-a") is not None


# Each answer and the client's reasons for refusing it (any one of them: aiohttp's words differ by
# version; the oldest we support, 3.11, says "Expected HTTP/" for a bad status line and sets no
# header count limit, so there the body "{}" is what is refused).
BROKEN_HTTP: dict[str, tuple[bytes, tuple[str, ...]]] = {
    "no-status-line": (b"NOT HTTP AT ALL\r\n\r\n", ("Bad status line", "Expected HTTP/")),
    "8KB-header": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\n{}",
                   ("Got more than 8190 bytes",)),
    "100000-headers": (b"HTTP/1.1 200 OK\r\n" + b"X-A: a\r\n" * 100_000 + b"Content-Length: 2\r\n\r\n{}",
                       ("Too many headers", "JWKS must be a JSON object with a 'keys' list")),
    "short-body": (b'HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{"keys": [', ("Not enough data",)),
    "bad-chunk": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nabc\r\n0\r\n\r\n",
                  ("Invalid character in chunk size",)),
    "length-and-chunked": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"2\r\n{}\r\n0\r\n\r\n", ("Transfer-Encoding can't be present with Content-Length",)),
    "not-gzip": (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 10\r\n\r\nnotgzip!!!",
                 ("Can not decode content-encoding",)),
}


@pytest.mark.parametrize("name", list(BROKEN_HTTP))
async def test_a_broken_http_answer_is_a_failed_fetch_with_the_clients_reason(make_cache, name: str) -> None:
    answer, reasons = BROKEN_HTTP[name]

    async def answer_raw(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_raw, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        issuer = Issuer("us-east-1_Pool1", "us-east-1", "http://127.0.0.1/pool", f"http://127.0.0.1:{port}/jwks", None)
        cache, metrics = make_cache(retry_min=60, retry_max=60)
        cache.sync([issuer])
        await cache.wait_first_attempts(60)
        error = cache.status()[0]["last_error"]
        assert any(reason in error for reason in reasons), error
        assert len(error) < 400 and not cache.has_keys(issuer)
        assert metrics.registry.get_sample_value(
            "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "startup", "result": "error"}) == 1
    finally:
        server.close()
        await server.wait_closed()


async def test_issuer_down_at_start_then_recovers(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.reply = web.Response(status=503)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: scripted.hits >= 2)
    assert not cache.ready() and not cache.has_keys(issuer)
    scripted.keys(key_a)
    await wait_for(lambda: cache.has_keys(issuer))  # backoff retries, no restart needed
    assert cache.ready()


async def test_timeout_holds_and_keeps_keys(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache(timeout=0.2)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.held = asyncio.Event()  # the answer never comes while the re-fetch runs
    try:
        expire_cooldown(cache, issuer)
        # Only the 0.2 s timeout can end this re-fetch (the bound is generous, not a threshold).
        await asyncio.wait_for(cache.refetch(issuer), 60)
    finally:
        scripted.held.set()
    assert "timed out" in cache.status()[0]["last_error"]
    assert cache.key(issuer, "kid-a") is not None


async def test_a_jwks_delivered_in_pieces_is_read_whole(endpoint, make_cache, key_a, key_b) -> None:
    scripted, issuer = endpoint
    scripted.reply = in_pieces(json.dumps({"keys": [key_a.jwk(), key_b.jwk()]}).encode(), 16)
    cache, _ = make_cache()
    cache.sync([issuer])
    await cache.wait_first_attempts(60)
    assert cache.status()[0]["last_error"] is None
    assert cache.key(issuer, "kid-a") is not None and cache.key(issuer, "kid-b") is not None


async def test_a_body_that_stops_coming_times_out_and_keeps_keys(endpoint, make_cache, key_a, key_b) -> None:
    """Slow loris: the headers and a first piece of the body, then nothing. The fetch's timeout
    covers the body too, and the keys already held stay."""
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache(timeout=0.2)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    never = asyncio.Event()
    scripted.reply = in_pieces(json.dumps({"keys": [key_a.jwk(), key_b.jwk()]}).encode(), 4, then=never)
    try:
        expire_cooldown(cache, issuer)
        await asyncio.wait_for(cache.refetch(issuer), 60)  # only the 0.2 s timeout can end it
    finally:
        never.set()
    assert cache.status()[0]["last_error"] == "timed out after 0.2s"
    assert cache.key(issuer, "kid-a") is not None and cache.key(issuer, "kid-b") is None
    assert metrics.registry.get_sample_value(
        "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "unknown_kid", "result": "error"}) == 1


async def test_unknown_kid_flood_causes_one_fetch_per_cooldown(endpoint, make_cache, key_a, key_b) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache(unknown_kid_cooldown=10)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    expire_cooldown(cache, issuer)
    scripted.keys(key_a, key_b)
    scripted.delay = 0.1
    hits = scripted.hits
    await asyncio.gather(*(cache.refetch(issuer) for _ in range(200)))
    assert scripted.hits == hits + 1  # single flight: 200 concurrent unknown kids, one fetch
    assert cache.key(issuer, "kid-b") is not None
    await asyncio.gather(*(cache.refetch(issuer) for _ in range(200)))
    assert scripted.hits == hits + 1  # within the cool-down: no fetch at all


async def test_rotation_replaces_key_set(endpoint, make_cache, key_a, key_b) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, _ = make_cache(refresh_interval=0.05)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.keys(key_b)
    await wait_for(lambda: cache.key(issuer, "kid-b") is not None)
    assert cache.key(issuer, "kid-a") is None


async def test_routine_refresh_keeps_key_objects_and_reports_removed_kids(endpoint, make_cache, key_a, key_b) -> None:
    # The token cache trusts a hit only while the JWKS holds the very key object that verified it:
    # an unchanged key must keep its identity across refreshes, a removed kid must be reported.
    scripted, issuer = endpoint
    scripted.keys(key_a, key_b)
    removed: list[tuple[str, str]] = []
    cache, _ = make_cache(refresh_interval=0.05, on_key_removed=lambda iss, kid: removed.append((iss, kid)))
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    first = cache.key(issuer, "kid-a")
    hits = scripted.hits
    await wait_for(lambda: scripted.hits >= hits + 2)
    assert cache.key(issuer, "kid-a") is first and removed == []
    scripted.keys(key_b)
    await wait_for(lambda: cache.key(issuer, "kid-a") is None)
    assert removed == [(issuer.issuer, "kid-a")]


async def test_kid_reused_for_other_material_is_reported_and_replaced(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    removed: list[tuple[str, str]] = []
    cache, _ = make_cache(refresh_interval=0.05, on_key_removed=lambda iss, kid: removed.append((iss, kid)))
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    first = cache.key(issuer, "kid-a")
    scripted.keys(make_key("kid-a"))
    await wait_for(lambda: cache.key(issuer, "kid-a") is not first)
    assert removed == [(issuer.issuer, "kid-a")]


async def test_sync_drops_removed_issuers(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, _ = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    cache.sync([])
    assert not cache.has_keys(issuer) and cache.ready()


async def test_issuer_series_exist_at_zero_and_leave_with_the_issuer(endpoint, make_cache, key_a) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    labels = {"issuer": "us-east-1_Pool1", "trigger": "periodic", "result": "error"}
    assert metrics.registry.get_sample_value("authz_jwks_refreshes_total", labels) == 0
    await wait_for(lambda: cache.has_keys(issuer))
    cache.sync([])
    assert metrics.registry.get_sample_value("authz_jwks_refreshes_total", labels) is None
    assert metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": "us-east-1_Pool1"}) is None


async def test_kid_index_follows_every_key_set_swap(aiohttp_server_factory, make_cache, key_a, key_b) -> None:
    # The verifier finds a key by kid alone, across issuers: the index must match the key sets.
    (first, one), (second, two) = await aiohttp_server_factory(), await aiohttp_server_factory()
    two = Issuer("us-east-1_Pool2", "us-east-1", two.issuer + "2", two.jwks_uri, None)
    first.keys(key_a)
    second.keys(key_a, key_b)  # the same kid (and key) published by two issuers
    cache, _ = make_cache(refresh_interval=0.05)
    cache.sync([one, two])
    await wait_for(lambda: cache.has_keys(one) and cache.has_keys(two))
    assert cache.keys_for_kid("kid-a") == (IssuerKey(one.issuer, cache.key(one, "kid-a")),
                                           IssuerKey(two.issuer, cache.key(two, "kid-a")))
    assert cache.keys_for_kid("kid-b") == (IssuerKey(two.issuer, cache.key(two, "kid-b")),)
    assert cache.keys_for_kid("kid-nobody") == ()
    second.keys(key_b)  # rotation at the second issuer drops its kid-a
    await wait_for(lambda: len(cache.keys_for_kid("kid-a")) == 1)
    assert cache.keys_for_kid("kid-a")[0].issuer == one.issuer
    cache.sync([two])  # the first issuer leaves the policy
    assert cache.keys_for_kid("kid-a") == () and len(cache.keys_for_kid("kid-b")) == 1


async def test_each_skipped_key_is_logged_once_per_fetch(endpoint, make_cache, key_a, caplog) -> None:
    scripted, issuer = endpoint
    e3 = rsa_jwk("kid-e3", odd_modulus(2048), 3)
    scripted.reply = web.json_response({"keys": [key_a.jwk(), e3]})
    cache, _ = make_cache()
    with caplog.at_level(logging.WARNING, logger="authz_service.jwks"):
        cache.sync([issuer])
        await wait_for(lambda: cache.has_keys(issuer))
        scripted.reply = web.json_response({"keys": [key_a.jwk(), e3]})  # a response is sent once
        expire_cooldown(cache, issuer)
        await cache.refetch(issuer)
    skipped = [r for r in caplog.records if r.getMessage() == "jwks key skipped"]
    assert [(r.issuer, r.kid, r.reason) for r in skipped] == 2 * [
        (issuer.issuer, "kid-e3", "public exponent is not accepted (odd, 65537 <= e < 2**32 required)")]
    assert cache.keys_for_kid("kid-e3") == () and cache.key(issuer, "kid-e3") is None
    assert e3["n"] not in caplog.text  # never key material


async def test_a_jwks_of_only_skipped_keys_logs_each_and_keeps_the_last_good_keys(endpoint, make_cache, key_a,
                                                                                  caplog) -> None:
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, _ = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.reply = web.json_response({"keys": [rsa_jwk("kid-big", odd_modulus(8192), 65537)]})
    expire_cooldown(cache, issuer)
    with caplog.at_level(logging.WARNING, logger="authz_service.jwks"):
        await cache.refetch(issuer)
    assert [(r.kid, r.reason) for r in caplog.records if r.getMessage() == "jwks key skipped"] == [
        ("kid-big", "modulus is 8192 bits (accepted: 2048 to 4096)")]
    assert cache.key(issuer, "kid-a") is not None and cache.status()[0]["last_error"]


def test_parse_accepts_as_many_keys_as_the_limit(key_a: SigningKey) -> None:
    parsed = parse_jwks(json.dumps({"keys": [{**key_a.jwk(), "kid": f"kid-{i}"} for i in range(100)]}).encode())
    assert len(parsed.keys) == 100 and parsed.skipped == ()


async def test_a_jwks_of_10000_entries_is_refused_whole_with_one_log_line(endpoint, make_cache, key_a,
                                                                          caplog) -> None:
    """Cognito publishes two keys. Ten thousand entries (here: empty objects, 4 bytes each, so
    100,000 of them fit the size limit) were each skipped and logged: a warning line per entry,
    every fetch, and the event loop busy logging them."""
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, metrics = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    scripted.reply = web.json_response({"keys": [key_a.jwk(), *([{}] * 9999)]})
    expire_cooldown(cache, issuer)
    with caplog.at_level(logging.INFO, logger="authz_service.jwks"):
        await cache.refetch(issuer)
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", "jwks refresh failed")]
    assert caplog.records[0].error == cache.status()[0]["last_error"] == "JWKS has 10000 keys (at most 100 accepted)"
    assert cache.key(issuer, "kid-a") is not None
    assert metrics.registry.get_sample_value(
        "authz_jwks_refreshes_total", {"issuer": "us-east-1_Pool1", "trigger": "unknown_kid", "result": "error"}) == 1


# --- tracing ------------------------------------------------------------------------------------


async def test_background_fetches_are_root_spans_and_an_unknown_kid_refetch_is_a_child(endpoint, make_cache,
                                                                                       key_a, traced) -> None:
    tracing, spans = traced
    scripted, issuer = endpoint
    scripted.keys(key_a)
    cache, _ = make_cache(tracing=tracing)
    cache.sync([issuer])
    await wait_for(lambda: cache.has_keys(issuer))
    (startup,) = spans.get_finished_spans()
    assert startup.name == "jwks fetch" and startup.parent is None
    assert dict(startup.attributes) == {"authz.issuer.pool_id": "us-east-1_Pool1", "authz.jwks.trigger": "startup",
                                        "authz.jwks.result": "ok", "authz.jwks.keys": 1}

    scripted.reply = web.Response(status=500)
    expire_cooldown(cache, issuer)
    with tracing._tracer.start_as_current_span("a Check") as check:  # what TracedChecker makes current
        await cache.refetch(issuer)
    refetch = spans.get_finished_spans()[1]
    assert refetch.parent is not None and refetch.parent.span_id == check.get_span_context().span_id
    assert refetch.context.trace_id == check.get_span_context().trace_id
    assert refetch.attributes["authz.jwks.trigger"] == "unknown_kid"
    assert refetch.attributes["authz.jwks.result"] == "error"
    assert refetch.status.description == "JWKS endpoint answered HTTP 500"


async def test_every_region_of_a_multi_region_pool_gets_keys_and_its_own_series(aiohttp_server_factory, make_cache,
                                                                                  key_a, key_b) -> None:
    """One issuers entry with replica regions yields several accepted issuers (one pool id): each
    has its own JWKS state, keys and metric series, and removing one leaves the others alone."""
    from authz_service.policy import parse_policy

    (primary_jwks, primary), (replica_jwks, replica) = await aiohttp_server_factory(), await aiohttp_server_factory()
    policy = parse_policy(f"""
issuers:
  - user_pool_id: us-east-1_Multi1
    issuer_format: updated
    replica_regions: [eu-west-1]
routes:
  - {{path: /a, scopes: [r]}}
""")
    # The same entry, with each region's JWKS served by one of the local endpoints.
    one, two = (dataclasses.replace(i, jwks_uri=served.jwks_uri) for i, served in zip(policy.issuers, (primary, replica)))
    primary_jwks.keys(key_a)
    replica_jwks.keys(key_b)
    cache, metrics = make_cache()
    cache.sync([one, two])
    await wait_for(lambda: cache.has_keys(one) and cache.has_keys(two))
    assert cache.key(one, "kid-a") is not None and cache.key(two, "kid-b") is not None
    assert cache.key(one, "kid-b") is None and cache.key(two, "kid-a") is None
    keys = {label: metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": label})
            for label in ("us-east-1_Multi1", "us-east-1_Multi1@eu-west-1")}
    assert keys == {"us-east-1_Multi1": 1.0, "us-east-1_Multi1@eu-west-1": 1.0}
    cache.sync([one])  # the replica region leaves the policy: the primary's series stay
    assert metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": "us-east-1_Multi1@eu-west-1"}) is None
    assert metrics.registry.get_sample_value("authz_jwks_keys", {"issuer": "us-east-1_Multi1"}) == 1.0


# --- credentials in a jwks_uri ---------------------------------------------------------------------

SECRET = "s3cret-Pa55word"


@pytest.mark.parametrize("uri", [
    # unreachable: the fetch fails, the log names the URL
    "http://jwks-user:{secret}@127.0.0.1:{port}/pool/.well-known/jwks.json?token={secret}",
    # a URL the HTTP client refuses: its error message is the URL itself (-> /readyz last_error)
    "https://jwks-user:{secret}@127.0.0.1:badport/pool/.well-known/jwks.json",
])
async def test_credentials_in_a_jwks_uri_never_reach_the_log_readyz_or_a_span(make_cache, caplog, traced,
                                                                                 uri) -> None:
    from tests.e2e.harness import free_port

    tracing, exporter = traced
    issuer = Issuer("us-east-1_Pool1", "us-east-1", "https://issuer.example/pool",
                    uri.format(secret=SECRET, port=free_port()), None)
    cache, _ = make_cache(tracing=tracing)
    with caplog.at_level(logging.DEBUG):
        cache.sync([issuer])
        await wait_for(lambda: cache.status()[0]["last_error"] is not None)
    [status] = cache.status()  # what /readyz shows
    shown = json.dumps(status) + "\n".join(json.dumps(vars(r), default=str) for r in caplog.records)
    shown += json.dumps([(s.status.description, dict(s.attributes or {})) for s in exporter.get_finished_spans()])
    assert "jwks refresh failed" in shown and "127.0.0.1" in shown
    assert SECRET not in shown and "jwks-user" not in shown


async def test_a_jwks_uri_with_credentials_still_authenticates(endpoint, make_cache, key_a, caplog) -> None:
    """The credentials are used (HTTP Basic, as the URL says), only never shown."""
    scripted, issuer = endpoint
    scripted.keys(key_a)
    with_user = issuer.jwks_uri.replace("http://", f"http://jwks-user:{SECRET}@")
    cache, _ = make_cache()
    with caplog.at_level(logging.DEBUG):
        cache.sync([dataclasses.replace(issuer, jwks_uri=with_user)])
        await wait_for(lambda: cache.ready())
    assert cache.status()[0]["keys"] == 1
    assert SECRET not in "\n".join(json.dumps(vars(r), default=str) for r in caplog.records)


async def test_checks_that_arrive_during_a_rotation_fetch_wait_for_it(endpoint, make_cache, key_a, key_b) -> None:
    """A key rotation seen by many Checks at once: the first unknown kid starts the JWKS fetch, and
    every other Check that needs the new key waits for that fetch (single flight) instead of being
    denied unknown_key because the cool-down has just started."""
    scripted, endpoint_issuer = endpoint
    policy = parse_policy(f"issuers:\n  - user_pool_id: {endpoint_issuer.user_pool_id}\n"
                          f"    issuer: {endpoint_issuer.issuer}\n    jwks_uri: {endpoint_issuer.jwks_uri}\n"
                          "routes:\n  - {path: /a, scopes: [s]}\n")
    [issuer] = policy.issuers
    scripted.keys(key_a)
    cache, _ = make_cache(unknown_kid_cooldown=10)
    cache.sync(policy.issuers)
    await wait_for(lambda: cache.has_keys(issuer))
    expire_cooldown(cache, issuer)
    verifier = TokenVerifier(cache)
    token = key_b.token(iss=issuer.issuer)  # signed by the key the issuer rotates to
    scripted.keys(key_a, key_b)
    scripted.held = asyncio.Event()
    hits = scripted.hits
    checks = [asyncio.create_task(verifier.verify(token, policy)) for _ in range(50)]
    try:
        await wait_for(lambda: scripted.hits == hits + 1)  # the one fetch is in flight, every Check started
    finally:
        scripted.held.set()
    results = await asyncio.gather(*checks, return_exceptions=True)
    refused = [r.failure.value for r in results if isinstance(r, TokenError)]
    assert refused == [] and all(r.client_id == "client-a" for r in results)
    assert scripted.hits == hits + 1


async def test_document_is_the_current_key_set_of_one_issuer(endpoint, make_cache, key_a, key_b) -> None:
    """What the service serves native mode's Envoy (admin /jwks): None before the first keys, the
    keys as parsed, the new set after a rotation; KeyError for a stranger."""
    scripted, issuer = endpoint
    cache, _ = make_cache(refresh_interval=0.05)
    cache.sync([issuer])
    assert cache.document(issuer.issuer) is None
    with pytest.raises(KeyError):
        cache.document("https://issuer.example/not-trusted")
    scripted.keys(key_a)
    await wait_for(lambda: cache.document(issuer.issuer) is not None)
    first = cache.document(issuer.issuer)
    assert [k["kid"] for k in json.loads(first)["keys"]] == ["kid-a"]
    scripted.keys(key_b)
    await wait_for(lambda: cache.key(issuer, "kid-b") is not None)
    assert set(parse_jwks(cache.document(issuer.issuer)).keys) == {"kid-b"}


async def test_the_document_for_envoy_holds_only_the_members_verification_needs(endpoint, make_cache, key_a,
                                                                                key_b) -> None:
    """Native mode's Envoy verifies with this document, never the issuer's: whatever else the
    issuer published (an HS256 secret, an x5c chain, key_ops, a private part of a skipped key) is
    not in it."""
    scripted, issuer = endpoint
    scripted.reply = web.json_response({"keys": [
        {**key_a.jwk(), "x5c": [base64.b64encode(self_signed_der(key_a.private)).decode()], "key_ops": ["verify"],
         "x-extra": "anything"},
        {"kty": "oct", "kid": "kid-hs", "k": "c2VjcmV0LWhtYWMta2V5", "alg": "HS256"},
        {**RSAAlgorithm.to_jwk(key_b.private, as_dict=True), "kid": "kid-b"},
    ]})
    cache, _ = make_cache()
    cache.sync([issuer])
    await wait_for(lambda: cache.document(issuer.issuer) is not None)
    (entry,) = json.loads(cache.document(issuer.issuer))["keys"]
    assert entry == {"kty": "RSA", "kid": "kid-a", "use": "sig", "alg": "RS256", "n": key_a.jwk()["n"],
                     "e": key_a.jwk()["e"]}
