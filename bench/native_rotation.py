"""How long after a key rotation native mode accepts a token signed by the new key.

The stack is the demo's in native mode's xDS form, every part real: the dev issuer (HTTP, its
``POST /admin/rotate``), an echo app, authz-service (``serve --native-xds-dir``, default key
settings) and Envoy on ``compile envoy --xds-dir``'s bootstrap. Each round rotates the issuer's
signing key, takes a token of the new key from the token endpoint and sends it through Envoy every
50 ms, recording seconds from the rotation to:

* ``accepted``: the first answer 200 (the service decides it, after its re-fetch for the unknown
  kid, which it makes at most once per ``--unknown-kid-cooldown``, 10 s);
* ``native``: the first 200 Envoy gave without asking the service (after Envoy's next fetch of
  the service's keys, every ``--native-jwks-cache`` seconds, 5).

Rounds alternate two cases: ``quiet``, the rotation more than a cool-down after the service's last
re-fetch (the usual case: the keys are otherwise re-fetched every 15 minutes), and
``after-refetch``, the rotation right after a re-fetch (the worst case, e.g. while forged tokens
with unknown kids keep the cool-down running), made by sending such a token first.

    .venv/bin/python bench/native_rotation.py [--rounds 4]   # rounds of each case
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import signal
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from authz_service.dev_issuer.config import load_config
from authz_service.native.xds import ENVOY_FLAGS
from bench.run import BENCH, spawn
from tests.e2e.harness import (
    EnvoyProcess,
    ManagedProcess,
    free_port,
    http_request,
    listening,
    render_native_xds_config,
    start_envoy,
    wait_for_http,
)
from tests.e2e.security_stack import service_checks

ROOT = Path(__file__).resolve().parents[1]
DEV_ISSUER_CONFIG = ROOT / "authz_service" / "examples" / "dev-issuer.yaml"
CLIENT = "payments-writer"
COOLDOWN = 10.0  # serve's --unknown-kid-cooldown default, which this run keeps
NATIVE_JWKS_CACHE = 5.0  # serve's --native-jwks-cache default, likewise
POLL = 0.05


def token(issuer_port: int) -> str:
    """A client_credentials token from the dev issuer: signed by its current key."""
    secret = {c.client_id: c.client_secret for c in load_config(DEV_ISSUER_CONFIG).clients}[CLIENT]
    basic = base64.b64encode(f"{CLIENT}:{secret}".encode()).decode()
    status, _, body = http_request(
        "POST",
        f"http://127.0.0.1:{issuer_port}/oauth2/token",
        [("Authorization", f"Basic {basic}"), ("Content-Type", "application/x-www-form-urlencoded")],
        urllib.parse.urlencode({"grant_type": "client_credentials", "scope": "transactions/post"}).encode(),
    )
    assert status == 200, body
    return json.loads(body)["access_token"]


def unknown_kid_refetches(http_port: int) -> float:
    status, _, body = http_request("GET", f"http://127.0.0.1:{http_port}/metrics")
    assert status == 200
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "authz_jwks_refreshes_total" and sample.labels["trigger"] == "unknown_kid"
    )


def refetch_now(envoy: EnvoyProcess, issuer_port: int, http_port: int) -> None:
    """Make the service re-fetch the keys: a token whose kid nobody publishes (its signature is
    never checked: the kid is looked up first), until a re-fetch is counted."""
    _, payload, signature = token(issuer_port).split(".")
    head = base64.urlsafe_b64encode(json.dumps({"alg": "RS256", "kid": "nobody"}).encode()).rstrip(b"=").decode()
    forged = f"Bearer {head}.{payload}.{signature}"
    before = unknown_kid_refetches(http_port)
    deadline = time.monotonic() + 60
    while unknown_kid_refetches(http_port) == before:
        assert time.monotonic() < deadline, "no re-fetch for an unknown kid within 60 s"
        status, _, _ = http_request("POST", envoy.url("/transactions"), [("Authorization", forged)])
        assert status == 401, status
        time.sleep(POLL)


def one_round(envoy: EnvoyProcess, issuer_port: int) -> tuple[float, float]:
    status, _, body = http_request("POST", f"http://127.0.0.1:{issuer_port}/admin/rotate")
    assert status == 200, body
    rotated = time.monotonic()
    bearer = [("Authorization", f"Bearer {token(issuer_port)}")]
    accepted = native = None
    while native is None:
        assert time.monotonic() - rotated < 60, "a token of the new key not accepted natively within 60 s"
        before = service_checks(envoy)
        status, _, _ = http_request("POST", envoy.url("/transactions"), bearer)
        now = time.monotonic() - rotated
        if status == 200:
            accepted = now if accepted is None else accepted
            if service_checks(envoy) == before:
                native = now
        else:
            assert status == 401, status
            time.sleep(POLL)
    assert accepted is not None
    return accepted, native


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each case")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop what it started (finally) when stopped
    work = BENCH / ".work" / "rotation"
    work.mkdir(parents=True, exist_ok=True)
    issuer_port, app_port, grpc_port, http_port, listen_port = (free_port() for _ in range(5))
    xds = work / "xds"
    xds.mkdir(exist_ok=True)
    policy = work / "policy.yaml"
    pool = load_config(DEV_ISSUER_CONFIG).user_pool_id
    policy.write_text(
        yaml.safe_dump(
            {
                "issuers": [{"user_pool_id": pool, "issuer": f"http://127.0.0.1:{issuer_port}/{pool}"}],
                "routes": [
                    {
                        "name": "create-transaction",
                        "methods": ["POST"],
                        "path": "/transactions",
                        "scopes": ["transactions/post"],
                    }
                ],
            }
        )
    )
    processes: list[ManagedProcess] = []
    try:
        processes.append(
            listening(
                spawn(
                    "dev-issuer",
                    [
                        sys.executable,
                        "-m",
                        "authz_service.cli",
                        "dev-issuer",
                        "--config",
                        str(DEV_ISSUER_CONFIG),
                        "--port",
                        str(issuer_port),
                        "--log-level",
                        "warning",
                    ],
                    work,
                ),
                issuer_port,
                30,
            )
        )
        processes.append(
            listening(
                spawn(
                    "app",
                    [
                        sys.executable,
                        str(ROOT / "tools" / "echo_upstream.py"),
                        "--port",
                        str(app_port),
                        "--host",
                        "127.0.0.1",
                    ],
                    work,
                ),
                app_port,
                30,
            )
        )
        service = spawn(
            "authz-service",
            [
                sys.executable,
                "-m",
                "authz_service.cli",
                "serve",
                "--policy",
                str(policy),
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--native-xds-dir",
                str(xds),
                "--native-listen",
                f"127.0.0.1:{listen_port}",
                "--log-level",
                "warning",
            ],
            work,
        )
        processes.append(service)
        wait_for_http(f"http://127.0.0.1:{http_port}/readyz", 60, expect_status=200, proc=service)
        config = render_native_xds_config(
            work, xds, admin_port=free_port(), app_port=app_port, grpc_port=grpc_port, http_port=http_port
        )
        envoy = start_envoy(config, work, name="envoy", listener_port=listen_port, timeout=60, args=ENVOY_FLAGS)
        processes.append(envoy)
        cases: dict[str, list[tuple[float, float]]] = {"quiet": [], "after-refetch": []}
        for _ in range(args.rounds):
            for case, rounds in cases.items():
                if case == "quiet":
                    # The last re-fetch (the previous round's) a cool-down ago, at a random point of
                    # Envoy's fetch cycle (the previous round ended just after one of its fetches).
                    time.sleep(COOLDOWN + random.uniform(0, NATIVE_JWKS_CACHE))
                else:
                    refetch_now(envoy, issuer_port, http_port)
                rounds.append(one_round(envoy, issuer_port))
                print(f"{case}: accepted after {rounds[-1][0]:.2f} s, natively after {rounds[-1][1]:.2f} s", flush=True)
        print(
            f"A token of a new key, {args.rounds} rounds of each case (defaults: --unknown-kid-cooldown 10, "
            "--native-jwks-cache 5), seconds after the rotation, median (min to max):"
        )
        for case, rounds in cases.items():
            accepted, native = ([r[i] for r in rounds] for i in (0, 1))
            print(
                f"  {case:<14} accepted {statistics.median(accepted):.2f} ({min(accepted):.2f} to "
                f"{max(accepted):.2f}), natively {statistics.median(native):.2f} ({min(native):.2f} to "
                f"{max(native):.2f})"
            )
    finally:
        for process in reversed(processes):
            process.stop()


if __name__ == "__main__":
    main()
