"""What the product writes out, attacked with the bytes a client controls: a credential sent with
a request never reaches a log line or an answer, whichever port it is sent to.

Through Envoy (every enforcing mode) a header Envoy passes on reaches the service; the admin port
(probes, Prometheus) and the dev issuer's token endpoint are reached directly, so a request their
HTTP parser refuses must not be logged with the refused line in it (nor, on the admin port,
answered with it).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from .harness import UpstreamProcess, http_request
from .security_stack import SecurityStack, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess, module_envoy_factory,
          enforcing_mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("outputs"), upstream, module_envoy_factory,
                             "--decision-log", "all", "--log-level", "DEBUG", mode=enforcing_mode)
    yield s
    stop_security_stack(s)


def assert_never_emitted(secrets: list[str], *outputs: str | bytes) -> None:
    for output in outputs:
        text = output.decode("latin-1") if isinstance(output, bytes) else output
        for secret in secrets:
            assert secret not in text


@pytest.mark.parametrize("byte", ["\x7f", "\x01"], ids=["DEL", "SOH"])
def test_a_control_byte_after_a_token_never_logs_or_echoes_it(stack: SecurityStack, byte: str) -> None:
    token = stack.fake.token("payments-writer", "transactions/post")
    answer = stack.send("POST", "/transactions?access_token=hunter2",
                        headers=[("Authorization", f"Bearer {token}{byte}"), ("X-Api-Key", f"hunter3{byte}")])
    assert answer.status >= 400 and answer.reached_upstream == [], answer.body
    assert_never_emitted([token.split(".")[2], "hunter2", "hunter3"], stack.service.process.log_text(),
                         stack.envoy.log_text(), answer.body)


@pytest.mark.parametrize("byte", ["\x7f", "\x01"], ids=["DEL", "SOH"])
def test_the_admin_port_never_logs_or_echoes_a_refused_header_line(stack: SecurityStack, byte: str) -> None:
    """A scraper's credentials (Prometheus' authorization, a cookie) on a line the parser refuses."""
    token = stack.fake.token("payments-writer", "transactions/post")
    for path in ("/metrics", "/readyz"):
        status, _, body = http_request("GET", f"http://127.0.0.1:{stack.service.http_port}{path}",
                                       [("Authorization", f"Bearer {token}{byte}"), ("Cookie", f"s=hunter6{byte}")])
        assert status == 400
        assert_never_emitted([token.split(".")[2], "hunter6"], stack.service.process.log_text(), body)


def test_the_dev_issuer_never_logs_or_echoes_a_refused_client_secret(stack: SecurityStack) -> None:
    """Neither its log nor its 400 (aiohttp's own answer quoted the refused line) holds the secret."""
    basic = base64.b64encode(b"payments-writer:hunter7-secret").decode()
    status, _, body = http_request(
        "POST", f"{stack.dev.base}/oauth2/token",
        [("Authorization", f"Basic {basic}\x01"), ("Content-Type", "application/x-www-form-urlencoded")],
        "grant_type=client_credentials")
    assert status == 400
    assert_never_emitted([basic], stack.dev.process.log_text(), body)

