"""Native mode's expected Envoy heap (native/sizing.py: what ``compile envoy`` reports and checks
against the heap cap) against a real Envoy's: started on the compiled policy of a few sizes, its
heap in use (tcmalloc's allocated bytes, admin /memory) must stay under the expectation, so that a
policy the compiler lets through does fit. The expectation must also stay near enough to the
real heap to be worth reporting."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from authz_service.native.bootstrap import compile_policy
from authz_service.policy import load_policy_file

from .harness import UpstreamProcess, free_port, sized_routes

pytestmark = pytest.mark.e2e
ISSUER = {"user_pool_id": "us-east-1_Memory001", "region": "us-east-1"}


def conditioned_routes(count: int) -> list[dict[str, object]]:
    """Routes of another shape than sized_routes': parameters, client allow-lists, all-of scopes and
    claim conditions, so more checks per route (the model must hold for them too)."""
    return [
        {
            "name": f"orders-{n}",
            "methods": ["GET", "PUT"],
            "path": f"/tenants/{{tenant}}/app{n}/orders/{{id}}",
            "scopes": [f"app{n}/read", f"app{n}/admin"],
            "all_scopes": [f"app{n}/orders"],
            "client_ids": [f"client-{n}-a", f"client-{n}-b"],
            "claims": {"custom:tier": "gold", "custom:level": 3},
        }
        for n in range(count)
    ]


SHAPES = {"sized": sized_routes, "conditioned": conditioned_routes}


def allocated(admin_url: str) -> int:
    with urllib.request.urlopen(admin_url, timeout=10) as answer:
        return int(json.load(answer)["allocated"])


@pytest.mark.parametrize(("shape", "routes"), [("sized", 10), ("sized", 150), ("sized", 400), ("conditioned", 300)])
def test_the_expected_heap_is_above_a_real_envoys(shape: str, routes: int, tmp_path: Path,
                                                   upstream: UpstreamProcess, envoy_factory) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"issuers": [ISSUER], "routes": SHAPES[shape](routes)}, sort_keys=False))
    expected = compile_policy(load_policy_file(policy)).heap.expected_bytes
    # Envoy starts without the service: it would only fetch keys there, and decide other routes.
    nowhere = SimpleNamespace(grpc_port=free_port(), http_port=free_port())
    envoy = envoy_factory.native(nowhere, policy)
    heap = allocated(envoy.admin_url("/memory"))
    assert heap <= expected, f"{routes} routes: Envoy holds {heap:,} bytes, expected at most {expected:,}"
    assert expected <= 1.5 * heap + 8_000_000, f"{routes} routes: {expected:,} expected for {heap:,} held"
