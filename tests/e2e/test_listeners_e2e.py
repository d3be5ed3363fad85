"""What the service exposes, started with its documented defaults: loopback-only ext_authz, bounded
authorization requests, and a metrics endpoint whose scrapes cannot each cost a collection."""

from __future__ import annotations

import time
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from ..conftest import check_request
from .harness import ManagedProcess, free_port, http_request, port_open, wait_for_http
from .stack import PUBLIC_HEALTHZ, cli

pytestmark = pytest.mark.e2e

POLICY = """
issuers:
  - user_pool_id: us-east-1_Demo00001
    issuer: http://127.0.0.1:9/us-east-1_Demo00001
routes:
""" + PUBLIC_HEALTHZ


@pytest.fixture
def defaults(tmp_path: Path) -> Iterator[tuple[int, int]]:
    """The service with nothing but its ports chosen: every other setting is the default."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    grpc_port, http_port = free_port(), free_port()
    with ManagedProcess(cli("serve", "--policy", str(policy), "--grpc-port", str(grpc_port),
                            "--http-port", str(http_port)), tmp_path, "authz-service") as process:
        wait_for_http(f"http://127.0.0.1:{http_port}/healthz", 30, expect_status=200, proc=process)
        yield grpc_port, http_port


def test_the_ext_authz_port_listens_on_loopback_only_by_default(defaults: tuple[int, int]) -> None:
    """Bound to 127.0.0.1, not 0.0.0.0: 127.0.0.2 is this host too, but not that address."""
    grpc_port, http_port = defaults
    assert port_open("127.0.0.1", grpc_port, timeout=2)
    assert not port_open("127.0.0.2", grpc_port, timeout=2), "the gRPC port answers on other addresses"
    assert port_open("127.0.0.2", http_port, timeout=2), "the health/metrics port stays on every address (kubelet probes)"


def test_an_oversized_check_request_is_refused_before_it_is_parsed(defaults: tuple[int, int]) -> None:
    grpc_port, _ = defaults
    big = check_request("GET", "/healthz", {"x-pad": "a" * (2400 * 1024)})
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Check(big, timeout=10)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        # What Envoy can send (its headers stay under max_request_headers_kb) is still answered.
        fits = check_request("GET", "/healthz", {"x-pad": "a" * (60 * 1024)})
        reply: external_auth_pb2.CheckResponse = stub.Check(fits, timeout=10)
        assert reply.status.code == 0


def test_a_burst_of_scrapes_shares_expositions(defaults: tuple[int, int]) -> None:
    """With the default --metrics-min-interval (1 s) a burst of scrapes is served from at most one
    exposition per second of the burst; each scrape generating its own would show in the bodies
    (process CPU, GC and our counters move between collections)."""
    _, http_port = defaults
    bodies: list[bytes] = []
    lock = threading.Lock()


    def scrape() -> None:
        for _ in range(10):
            status, _, body = http_request("GET", f"http://127.0.0.1:{http_port}/metrics")
            assert status == 200
            with lock:
                bodies.append(body)

    started = time.monotonic()
    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    elapsed = time.monotonic() - started
    assert len(bodies) == 80
    assert len(set(bodies)) <= int(elapsed) + 2, f"{len(set(bodies))} expositions in {elapsed:.1f} s"
