"""The dev issuer over HTTP: a local stand-in for an Amazon Cognito user pool, for development and
tests only.

Cognito emulators do not implement the client_credentials grant, so this module issues the
machine-to-machine access tokens the sidecar verifies, in the same shape Cognito does:

* ``GET  /<user_pool_id>/.well-known/jwks.json``: RS256 public keys (kty, use, alg, kid, n, e).
* ``POST /oauth2/token``: grant_type=client_credentials only, client authentication by HTTP Basic
  (client_secret_basic) or by form body (client_secret_post). Errors are HTTP 400 with
  ``{"error": "<code>"}``, as Cognito documents for every code, invalid_client included.
* ``POST /<region>/oauth2/token``: the same, for one replica region of a multi-Region pool (the
  token's ``iss`` names that region; every region signs with the same published keys).
* ``POST /admin/id-token``: an ID token (token_use "id", ``aud`` the client id, the user named
  by the form's ``username``, default ``dev-user``) for the same client authentication as
  ``/oauth2/token``, so a developer can see the sidecar refuse one. Cognito gives ID tokens only to
  signed-in users; this shortcut is a dev-only helper like the two below.
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
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Mapping

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .. import ports
from ..admin import QuietRefusals
from .config import CLIENT_CREDENTIALS, DevIssuerConfig
from .issuer import DevIssuer, TokenRequestError

log = logging.getLogger("authz_service.dev_issuer")

_FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
_OAUTH_ERROR_STATUS = 400  # Cognito's documented status for every token endpoint error

ISSUER_KEY = web.AppKey("dev_issuer", DevIssuer)


def build_app(issuer: DevIssuer) -> web.Application:
    """The aiohttp application serving the JWKS, token and admin endpoints for ``issuer``."""
    app = web.Application(client_max_size=64 * 1024)
    app[ISSUER_KEY] = issuer
    app.router.add_get(issuer.jwks_path, _handle_jwks)
    app.router.add_post("/oauth2/token", _handle_token)
    for region in issuer.region_issuers:
        app.router.add_post(f"/{region}/oauth2/token", _handle_token)
    app.router.add_post("/admin/id-token", _handle_id_token)
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
        client_id = _authenticated_client(request, form)
        scope = form.get("scope")
        region = request.path.split("/")[1] if request.path != "/oauth2/token" else None
        token = issuer.issue(client_id, scope.split() if scope else None, region)
    except TokenRequestError as exc:
        return _refused(exc)
    log.info("dev issuer issued an access token to client_id=%r", client_id)
    return _token_response(issuer, "access_token", token)


async def _handle_id_token(request: web.Request) -> web.Response:
    issuer = request.app[ISSUER_KEY]
    try:
        form = await _read_form(request)
        client_id = _authenticated_client(request, form)
        username = form.get("username", "dev-user")
        token = issuer.issue_id_token(client_id, username)
    except TokenRequestError as exc:
        return _refused(exc)
    log.info("dev issuer issued an ID token to client_id=%r for username=%r", client_id, username)
    return _token_response(issuer, "id_token", token)


def _authenticated_client(request: web.Request, form: Mapping[str, str]) -> str:
    """The client id, once its secret checked out (TokenRequestError otherwise)."""
    client_id, client_secret = _client_credentials(request, form)
    request.app[ISSUER_KEY].authenticate(client_id, client_secret)
    return client_id


def _refused(exc: TokenRequestError) -> web.Response:
    log.info("dev issuer refused token request: %s (%s)", exc.error, exc.reason)
    return web.json_response({"error": exc.error}, status=_OAUTH_ERROR_STATUS)


def _token_response(issuer: DevIssuer, member: str, token: str) -> web.Response:
    """A token endpoint's answer, never cached (RFC 6749 section 5.1)."""
    return web.json_response(
        {member: token, "expires_in": issuer.config.token_ttl_seconds, "token_type": "Bearer"},
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def _read_form(request: web.Request) -> dict[str, str]:
    """Form parameters with RFC 6749 rules: no repeats, and an empty value counts as absent."""
    if request.content_type != _FORM_CONTENT_TYPE:
        raise TokenRequestError("invalid_request", f"Content-Type {request.content_type!r} is not {_FORM_CONTENT_TYPE}")
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


class _QuietServer(web.Server):
    """The application's server, its connections answering a request aiohttp's parser refused
    with a plain 400 (admin.QuietRefusals) rather than aiohttp's, which quotes the refused line:
    a token request's ``Authorization: Basic`` line with one stray byte is a client secret."""

    def __call__(self) -> RequestHandler:
        return QuietRefusals(self, loop=asyncio.get_running_loop())


class _QuietAppRunner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # the application's startup and its request handler
        return _QuietServer(made.request_handler, request_factory=made.request_factory)


async def serve(config: DevIssuerConfig, host: str, port: int, public_url: str | None) -> None:
    """Serve the dev issuer until cancelled. ``public_url`` defaults to ``http://<host>:<bound port>``."""
    sock = _bind(host, port)
    bound_port = sock.getsockname()[1]
    try:
        issuer = DevIssuer(config, public_url or _default_public_url(host, bound_port))
    except BaseException:
        sock.close()
        raise
    runner = _QuietAppRunner(build_app(issuer))
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
            log.info(
                "dev issuer replica region %s: issuer=%s token_endpoint=%s/%s/oauth2/token",
                region,
                iss,
                issuer.base_url,
                region,
            )
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        sock.close()


async def serve_until_stopped(config: DevIssuerConfig, host: str, port: int, public_url: str | None) -> None:
    """``serve`` until SIGTERM or SIGINT, then shut down cleanly, as ``authz-service serve`` does:
    a stop signal is the normal end of the process (exit code 0), not a crash. An error of
    ``serve`` (a port in use) propagates."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    serving = asyncio.create_task(serve(config, host, port, public_url))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if serving.done():
        serving.result()  # serve only ends by itself with an error
    serving.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await serving
    log.info("dev issuer stopped (%s)", received[0])
