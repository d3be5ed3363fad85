"""A scriptable JWKS endpoint (real HTTP, in the test process) with signing keys the test controls.

The dev issuer is the honest issuer; this one exists to misbehave on demand: answer 500, HTML,
invalid JSON, an empty key set, 10 MB, keys of the wrong type, hang, or be down, while counting
every fetch. Tokens are signed here with keys the test owns, so any header or claim can be forged.

``FakeIssuer.script(kind)`` picks what the next fetches get; ``hold()`` / ``release()`` keep a fetch
hanging until the test lets it go (to prove Checks with cached keys never wait for it).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from authz_service.cognito import access_claims

from .harness import free_port

_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def rsa_key(name: str, public_exponent: int = 65537) -> rsa.RSAPrivateKey:
    """2048-bit RSA keys, generated once per test session per name (key generation is slow)."""
    if name not in _KEYS:
        _KEYS[name] = rsa.generate_private_key(public_exponent=public_exponent, key_size=2048)
    return _KEYS[name]


def public_jwk(private: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(private.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}


class FakeIssuer:
    """JWKS at ``http://127.0.0.1:<port>/jwks.json`` for the pool ``pool``; ``issuer`` is Cognito-shaped."""

    def __init__(self, pool: str = "us-east-1_Fake00001", tls: ssl.SSLContext | None = None) -> None:
        self.pool = pool
        self.tls = tls  # a server context: the JWKS is then served over HTTPS
        self.issuer = f"https://cognito-idp.us-east-1.amazonaws.com/{pool}"
        self.keys: dict[str, rsa.RSAPrivateKey] = {"kid-1": rsa_key("kid-1")}
        self.also_published: list[dict[str, Any]] = []  # raw JWKS entries served after the keys'
        self.kind = "ok"
        self.fetches: list[float] = []
        self._lock = threading.Lock()
        self._hold = threading.Event()
        self._hold.set()  # set = not holding
        self.held = threading.Event()  # set while a fetch is being held
        self._server: ThreadingHTTPServer | None = None
        self.port = free_port()

    # --- HTTP ------------------------------------------------------------------------------------

    @property
    def jwks_uri(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/jwks.json"

    def start(self) -> "FakeIssuer":
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                with issuer._lock:
                    issuer.fetches.append(time.monotonic())
                    kind = issuer.kind
                status, ctype, body, extra = issuer._answer(kind)
                if kind == "slow":
                    issuer._held_here()
                self.close_connection = True  # no keep-alive: stop() really takes the issuer down
                try:
                    self.send_response(status)
                    self.send_header("Connection", "close")
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    for name, value in extra.items():
                        self.send_header(name, value)
                    self.end_headers()
                    if kind == "trickle":  # the headers and half the body, then nothing until release()
                        self.wfile.write(body[: len(body) // 2])
                        issuer._held_here()
                        body = body[len(body) // 2:]
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (timeout): fine

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    @property
    def running(self) -> bool:
        """Serving (between ``start()`` and ``stop()``)."""
        return self._server is not None

    def stop(self) -> None:
        """Down: the port refuses connections until ``start()`` again."""
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def script(self, kind: str) -> None:
        """ok | 500 | html | badjson | empty | huge | wrongtype | many | gzipbomb | redirect |
        emptybody | 304 | slow and trickle (held until release(), see hold())."""
        with self._lock:
            self.kind = kind

    def hold(self, kind: str = "slow") -> None:
        """The next fetches hang until release(): before the headers ("slow"), or half way through
        the body ("trickle")."""
        self._hold.clear()
        self.script(kind)

    def _held_here(self) -> None:
        self.held.set()
        self._hold.wait(60)
        self.held.clear()

    def release(self) -> None:
        self._hold.set()

    def fetch_count(self) -> int:
        with self._lock:
            return len(self.fetches)

    def _answer(self, kind: str) -> tuple[int, str, bytes, dict[str, str]]:
        """Status, content type, body and further headers of the answer ``kind`` names."""
        keys = [*(public_jwk(k, kid) for kid, k in self.keys.items()), *self.also_published]
        good = json.dumps({"keys": keys}).encode()
        if kind in ("ok", "slow", "trickle"):
            return 200, "application/json", good, {}
        if kind == "500":
            return 500, "application/json", b'{"message": "internal error"}', {}
        if kind == "html":
            return 200, "text/html", b"<html><body><h1>Sign in</h1></body></html>", {}
        if kind == "badjson":
            return 200, "application/json", good[: len(good) // 2], {}
        if kind == "empty":
            return 200, "application/json", b'{"keys": []}', {}
        if kind == "emptybody":
            return 200, "application/json", b"", {}
        if kind == "304":  # never asked for: the service sends no If-None-Match
            return 304, "application/json", b"", {"ETag": '"v1"'}
        if kind == "redirect":  # to another host, over http: never followed
            return 302, "text/html", b"", {"Location": "http://127.0.0.1:9/elsewhere/jwks.json"}
        if kind == "many":  # the good keys among ten thousand entries
            return 200, "application/json", json.dumps({"keys": [*keys, *[{}] * (10_000 - len(keys))]}).encode(), {}
        if kind == "gzipbomb":  # 64 MB of white space in about 64 KB
            packer = zlib.compressobj(9, zlib.DEFLATED, 31)
            spaces = b" " * 1024 * 1024
            body = b"".join([packer.compress(good[:-1] + b","), *(packer.compress(spaces) for _ in range(64)),
                             packer.compress(b"}"), packer.flush()])
            return 200, "application/json", body, {"Content-Encoding": "gzip"}
        if kind == "huge":
            pad = "x" * (10 * 1024 * 1024)
            return 200, "application/json", json.dumps({"keys": [], "pad": pad}).encode(), {}
        if kind == "wrongtype":
            ec_key = ec.generate_private_key(ec.SECP256R1())
            small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
            entries = []
            for kid in self.keys:
                entries.append({**ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True), "kid": kid, "alg": "ES256"})
            entries.append({"kty": "oct", "kid": "kid-1", "k": "c2VjcmV0", "alg": "HS256"})
            entries.append({**public_jwk(small, "kid-1")})
            entries.append({**public_jwk(rsa_key("kid-1"), "kid-1"), "use": "enc"})
            return 200, "application/json", json.dumps({"keys": entries}).encode(), {}
        raise ValueError(kind)

    # --- tokens ----------------------------------------------------------------------------------

    def token(self, client_id: str = "payments-writer", scope: Any = "transactions/post", *,
              kid: str = "kid-1", key: rsa.RSAPrivateKey | None = None,
              header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A Cognito-shaped access token signed with ``key`` (default: the key published as ``kid``).
        Pass claim=None to drop a claim; ``header`` entries with value None are dropped."""
        body = access_claims(self.issuer, client_id, "", replace={"scope": scope, **claims})
        headers: dict[str, Any] = {"kid": kid, "alg": "RS256"}
        for name, value in (header or {}).items():
            if value is None:
                headers.pop(name, None)
            else:
                headers[name] = value
        signer = key if key is not None else self.keys.get(kid, rsa_key("kid-1"))
        return jwt.encode(body, signer, algorithm="RS256", headers=headers)
