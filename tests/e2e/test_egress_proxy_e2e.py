"""JWKS fetching through an egress proxy: HTTP_PROXY / HTTPS_PROXY / NO_PROXY, as a pod in a
cluster without direct internet egress is configured.

A real forward proxy (tinyproxy) runs on 127.0.0.1. The dev issuer serves its JWKS over plain HTTP
(the proxy gets ``GET http://...`` in absolute form), the fake issuer over HTTPS (the proxy only
sees ``CONNECT host:port``; TLS runs end to end and the issuer's certificate is still verified).
Keys are proven to arrive through the proxy three ways: the proxy's log names each fetch, tokens
of both issuers are allowed through a real Envoy, and a proxy that is down means no keys at all
(so the service did not quietly go direct). NO_PROXY sends the same fetches around the proxy.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from .fake_issuer import FakeIssuer
from .harness import ForwardProxy, free_port, start_forward_proxy, tinyproxy_binary, wait_for
from .security_stack import SecurityStack, start_security_stack, stop_security_stack
from .test_tls_jwks_e2e import issuer_status, pki  # noqa: F401  (pki is a fixture)

pytestmark = pytest.mark.e2e

PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture
def no_proxy_env(monkeypatch) -> None:
    """Only the upper-case variables a test sets (what a Kubernetes env block usually has) apply: a
    lower-case copy in the runner's environment would take precedence over them."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def proxy(tmp_path, no_proxy_env) -> Iterator[ForwardProxy]:
    if tinyproxy_binary() is None:
        message = "tinyproxy not installed: apt-get install tinyproxy-bin (`make system-deps` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI runs `make test`, which installs it: absent there is a bug
        pytest.skip(message)
    forward = start_forward_proxy(tmp_path / "proxy")
    try:
        yield forward
    finally:
        forward.stop()


def start_stack(tmp_path, upstream, envoy_factory, pki, env: dict[str, str], *, wait_ready: bool = True
                ) -> tuple[SecurityStack, FakeIssuer]:
    ca_file, server_context = pki
    fake = FakeIssuer("us-east-1_Proxy0001", tls=server_context).start()
    try:
        stack = start_security_stack(tmp_path, upstream, envoy_factory, fake=fake, wait_ready=wait_ready,
                                     env={"SSL_CERT_FILE": str(ca_file), "SSL_CERT_DIR": str(tmp_path), **env})
    except BaseException:
        fake.stop()
        raise
    return stack, fake


def test_jwks_arrive_through_the_proxy_over_http_and_https_connect(tmp_path, upstream, envoy_factory, pki,
                                                                    proxy: ForwardProxy) -> None:
    stack, fake = start_stack(tmp_path, upstream, envoy_factory, pki,
                              {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url})
    try:
        lines = proxy.request_lines()
        # Plain HTTP: the proxy fetched the dev issuer's JWKS itself (absolute-form request).
        assert any(l.startswith(f"GET http://127.0.0.1:{stack.dev.port}/") for l in lines), lines
        # HTTPS: a CONNECT tunnel to the fake issuer; the path and the keys stay inside TLS.
        assert f"CONNECT 127.0.0.1:{fake.port} HTTP/1.1" in lines, lines
        assert all(l.startswith("CONNECT ") for l in lines if f":{fake.port}" in l), \
            "an https JWKS URL must be tunnelled, never proxied in clear"
        assert fake.fetch_count() >= 1
        for token in (fake.token(), stack.dev.token("payments-writer")):
            answer = stack.send("POST", "/transactions", token)
            assert answer.status == 200 and len(answer.reached_upstream) == 1
    finally:
        stop_security_stack(stack)


def test_no_proxy_sends_the_fetches_around_the_proxy(tmp_path, upstream, envoy_factory, pki,
                                                      proxy: ForwardProxy) -> None:
    stack, fake = start_stack(tmp_path, upstream, envoy_factory, pki,
                              {"HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "NO_PROXY": "localhost,127.0.0.1"})
    try:
        assert issuer_status(stack.service.http_port, fake.issuer)["keys"] == 1
        assert stack.send("POST", "/transactions", fake.token()).status == 200
        assert proxy.request_lines() == []
    finally:
        stop_security_stack(stack)


def test_a_proxy_that_is_down_means_no_keys_not_a_direct_fetch(tmp_path, upstream, envoy_factory, pki,
                                                                no_proxy_env) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    stack, fake = start_stack(tmp_path, upstream, envoy_factory, pki, {"HTTP_PROXY": dead, "HTTPS_PROXY": dead},
                              wait_ready=False)
    try:
        status = wait_for(lambda: (s := issuer_status(stack.service.http_port, fake.issuer))["last_error"] and s,
                          20, "a failed JWKS fetch")
        assert status["keys"] == 0
        assert fake.fetch_count() == 0, "the service went around the configured proxy"
        answer = stack.send("POST", "/transactions", fake.token())
        assert answer.status == 503 and answer.reached_upstream == []
    finally:
        stop_security_stack(stack)
