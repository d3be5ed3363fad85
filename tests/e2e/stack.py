"""A whole running product for end-to-end tests: dev issuers, our service, Envoy, an echo upstream.

Everything is a real process talking HTTP or gRPC on 127.0.0.1; tokens come from the dev issuer's
/oauth2/token endpoint exactly as a Cognito client would get them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from .harness import ManagedProcess, free_port, http_request, wait_for_http

EXAMPLES = Path(__file__).resolve().parents[2] / "authz_service" / "examples"
SECRETS = {
    "payments-writer": "payments-writer-demo-secret",
    "payments-reader": "payments-reader-demo-secret",
    "reporting": "reporting-demo-secret",
}


# The example API every e2e policy protects, with healthz public. A str.format template (braces
# doubled) appended under `routes:`; suites add their own routes after it.
TRANSACTION_ROUTES = """\
  - name: create-transaction
    methods: [POST]
    path: /transactions
    scopes: [transactions/post]
  - name: get-transaction
    methods: [GET]
    path: /transactions/{{id}}
    scopes: [transactions/get]
"""
PUBLIC_HEALTHZ = """\
  - name: healthz
    path: /healthz
    public: true
"""


def cli(*args: str) -> list[str]:
    """The documented CLI, run with the interpreter running the tests."""
    return [sys.executable, "-m", "authz_service.cli", *args]


@dataclass
class DevIssuer:
    process: ManagedProcess
    port: int
    pool: str
    public_url: str | None = None  # --public-url: the base of the tokens' iss (default: where it listens)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.public_url or self.base}/{self.pool}"

    @property
    def jwks_uri(self) -> str:
        return f"{self.base}/{self.pool}/.well-known/jwks.json"

    def token(self, client_id: str, scope: str | None = None) -> str:
        """client_credentials grant with HTTP Basic client authentication (as in the seed article)."""
        form = {"grant_type": "client_credentials"}
        if scope is not None:
            form["scope"] = scope
        basic = base64.b64encode(f"{client_id}:{SECRETS[client_id]}".encode()).decode()
        request = urllib.request.Request(
            f"{self.base}/oauth2/token",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["access_token"]

    def rotate(self, retire_old: bool) -> str:
        request = urllib.request.Request(
            f"{self.base}/admin/rotate?retire_old={'true' if retire_old else 'false'}", data=b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["kid"]


def start_dev_issuer(workdir: Path, pool: str, ttl: int = 3600, port: int | None = None, *,
                     config: dict | None = None, public_url: str | None = None) -> DevIssuer:
    """The dev issuer for ``pool``: the example clients and resource servers, or ``config``'s (the
    dev-issuer YAML as a dict, e.g. app clients read back from an emulated pool); ``public_url``
    makes the tokens' iss ``<public_url>/<pool>``, e.g. Cognito's own issuer URL."""
    config = dict(config or yaml.safe_load((EXAMPLES / "dev-issuer.yaml").read_text()))
    config["user_pool_id"] = pool
    config["token_ttl_seconds"] = ttl
    path = workdir / f"issuer-{pool}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = port or free_port()
    extra = ("--public-url", public_url) if public_url else ()
    process = ManagedProcess(
        cli("dev-issuer", "--config", str(path), "--port", str(port), *extra), workdir, name=f"issuer-{pool}"
    ).start()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/admin/health", 20, expect_status=200, proc=process)
    except BaseException:
        process.stop()  # an issuer that never answered must not outlive the test
        raise
    return DevIssuer(process, port, pool, public_url)


class PolicyDir:
    """A policy directory laid out like a Kubernetes ConfigMap volume: the file is a symlink into
    ``..data``, and an update atomically swaps the ``..data`` symlink to a new timestamped folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / "policy.yaml"
        self._generation = 0

    def write(self, text: str) -> None:
        self.replace(lambda file: file.write_text(text))

    def replace(self, make: Callable[[Path], None]) -> None:
        """Swap in a new ``..data`` folder whose policy.yaml ``make`` creates (a file, a FIFO, a symlink)."""
        self._generation += 1
        folder = self.root / f"..{time.time_ns()}_{self._generation}"
        folder.mkdir()
        make(folder / "policy.yaml")
        tmp_link = self.root / "..data_tmp"
        if tmp_link.is_symlink():
            tmp_link.unlink()
        tmp_link.symlink_to(folder.name)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        os.replace(tmp_link, self.root / "..data")
        if not self.path.is_symlink():
            self.path.symlink_to("..data/policy.yaml")
        if old:
            shutil.rmtree(self.root / old)


@dataclass
class Service:
    process: ManagedProcess
    grpc_port: int
    http_port: int
    started: float

    def metrics(self) -> str:
        status, _, body = http_request("GET", f"http://127.0.0.1:{self.http_port}/metrics")
        assert status == 200
        return body.decode()

    def readyz(self) -> tuple[int, dict]:
        status, _, body = http_request("GET", f"http://127.0.0.1:{self.http_port}/readyz")
        return status, json.loads(body)

    def sample(self, name: str, **labels: str) -> float:
        """Value of one metric sample (0 when the series does not exist yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0


def start_service(workdir: Path, policy: Path, *extra: str, env: dict[str, str] | None = None,
                  wait_ready: bool = True, wrapper: tuple[str, ...] = ()) -> Service:
    """Our service via its CLI; returns once it is ready, or (``wait_ready=False``) merely alive.
    ``wrapper`` is a command that execs the CLI (e.g. into a namespace with other limits)."""
    grpc_port, http_port = free_port(), free_port()
    process = ManagedProcess(
        [*wrapper, *cli("serve", "--policy", str(policy), "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
                        "--http-host", "127.0.0.1", "--http-port", str(http_port), "--policy-poll-interval", "0.2",
                        # Tests read exact counters right after their requests: no reuse of a recent
                        # exposition (the default, 1 s, is covered by test_listeners_e2e).
                        "--metrics-min-interval", "0", *extra)],
        workdir,
        name="authz-service",
        env={**os.environ, **(env or {})},
    ).start()
    started = time.monotonic()
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/{'readyz' if wait_ready else 'healthz'}", 30,
                      expect_status=200, proc=process)
    except BaseException:
        process.stop()  # a service that never became ready must not outlive the test
        raise
    return Service(process, grpc_port, http_port, started)
