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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from authz_service.policy import IssuerFormat, cognito_issuer

from .harness import ManagedProcess, free_port, http_request, wait_for_http

EXAMPLES = Path(__file__).resolve().parents[2] / "authz_service" / "examples"


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
    secrets: dict[str, str]  # client id -> secret, from the issuer's config
    issuer_format: str | None = None  # the config's issuer_format: None, "original" or "updated"
    public_url: str | None = None  # --public-url: the base of the tokens' iss (default: where it listens)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        """The pool's iss: <base>/<pool>, or Cognito's URL when the config sets issuer_format."""
        return self.region_issuer(None)

    def region_issuer(self, region: str | None) -> str:
        """The iss of a replica region's tokens (None: the pool's own region)."""
        if self.issuer_format is None:
            return f"{self.public_url or self.base}/{self.pool}"
        return cognito_issuer(IssuerFormat(self.issuer_format), region or self.pool.split("_")[0], self.pool)

    @property
    def jwks_uri(self) -> str:
        return f"{self.base}/{self.pool}/.well-known/jwks.json"

    def token(self, client_id: str, scope: str | None = None, region: str | None = None) -> str:
        """client_credentials grant with HTTP Basic client authentication (as in the seed article);
        ``region``: from a replica region's token endpoint (/<region>/oauth2/token)."""
        form = {"grant_type": "client_credentials"}
        if scope is not None:
            form["scope"] = scope
        return self._post_form(f"{'/' + region if region else ''}/oauth2/token", client_id, form)["access_token"]

    def id_token(self, client_id: str, username: str = "dev-user") -> str:
        """A user's ID token from the dev-only /admin/id-token, with the same client authentication."""
        return self._post_form("/admin/id-token", client_id, {"username": username})["id_token"]

    def _post_form(self, path: str, client_id: str, form: dict[str, str]) -> dict:
        basic = base64.b64encode(f"{client_id}:{self.secrets[client_id]}".encode()).decode()
        request = urllib.request.Request(
            f"{self.base}{path}",
            data=urllib.parse.urlencode(form).encode(),
            headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def rotate(self, retire_old: bool) -> str:
        request = urllib.request.Request(
            f"{self.base}/admin/rotate?retire_old={'true' if retire_old else 'false'}", data=b"", method="POST"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)["kid"]


def start_dev_issuer(workdir: Path, pool: str, ttl: int = 3600, port: int | None = None, *,
                     example: str = "dev-issuer.yaml", config: dict | None = None, public_url: str | None = None,
                     **overrides: object) -> DevIssuer:
    """The dev issuer CLI for ``pool``, once it answers: the clients and resource servers of an
    example config (``example``), or ``config``'s (the dev-issuer YAML as a dict, e.g. app clients
    read back from an emulated pool), with ``ttl`` and ``overrides`` (top-level keys, e.g.
    issuer_format="original") applied; ``public_url`` makes the tokens' iss ``<public_url>/<pool>``.
    Its process belongs to the running test or fixture (harness ``Owner``), which stops it at the
    end; ``.process.stop()`` stops it earlier."""
    config = dict(config or yaml.safe_load((EXAMPLES / example).read_text()))
    config.update(overrides, user_pool_id=pool, token_ttl_seconds=ttl)
    path = workdir / f"issuer-{pool}.yaml"
    path.write_text(yaml.safe_dump(config))
    port = port or free_port()
    extra = ("--public-url", public_url) if public_url else ()
    process = ManagedProcess(
        cli("dev-issuer", "--config", str(path), "--port", str(port), *extra), workdir, name=f"issuer-{pool}"
    ).start()
    try:
        wait_for_http(f"http://127.0.0.1:{port}/admin/health", 60, expect_status=200, proc=process)
    except BaseException:
        process.stop()  # an issuer that never answered must not outlive the test
        raise
    return DevIssuer(process, port, pool, {c["client_id"]: c["client_secret"] for c in config["clients"]},
                     config.get("issuer_format"), public_url)


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
    started: float  # monotonic time the process was started (not when its JWKS was first fetched)
    ext_authz_http_port: int | None = None  # the HTTP front door (Envoy's HTTP ext_authz mode)
    native_xds_dir: Path | None = None  # native mode (--native-xds-dir): where it writes Envoy's listener
    native_listen_port: int | None = None  # ... and the port that listener listens on (--native-listen)

    def authz_port(self, mode: str) -> int:
        """The port Envoy's ext_authz calls in ``mode`` ("grpc" or "http")."""
        if mode == "grpc":
            return self.grpc_port
        assert self.ext_authz_http_port is not None, "started without the HTTP front door"
        return self.ext_authz_http_port

    def metrics(self) -> str:
        status, _, body = http_request("GET", f"http://127.0.0.1:{self.http_port}/metrics")
        assert status == 200
        return body.decode()

    def readyz(self) -> tuple[int, dict]:
        status, _, body = http_request("GET", f"http://127.0.0.1:{self.http_port}/readyz")
        return status, json.loads(body)

    def sample(self, name: str, **labels: str) -> float:
        """Value of one metric sample (0 when the series does not exist yet)."""
        return next(self._samples(name, labels), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels`` (e.g. over all routes)."""
        return sum(self._samples(name, labels))

    def _samples(self, name: str, labels: dict[str, str]) -> Iterator[float]:
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    yield s.value


def start_service(workdir: Path, policy: Path, *extra: str, env: dict[str, str] | None = None,
                  wait_ready: bool = True, wrapper: tuple[str, ...] = (),
                  launch: Callable[[list[str]], ManagedProcess] | None = None) -> Service:
    """Our service via its CLI; returns once it is ready, or (``wait_ready=False``) merely alive.
    ``wrapper`` is a command that execs the CLI (e.g. into a namespace with other limits);
    ``launch`` makes the (unstarted) process from the CLI's arguments instead, e.g. the service
    inside the image (tests/e2e/container.py).

    The process belongs to the running test or fixture (harness ``Owner``), which stops it at the
    end, also when the test fails; ``.process.stop()`` stops it earlier."""
    grpc_port, http_port = free_port(), free_port()
    # Both front doors, so one service serves Envoys of either ext_authz mode (unless the caller
    # chose the HTTP door's port itself).
    door = None if "--ext-authz-http-port" in extra else free_port()
    door_args = ("--ext-authz-http-port", str(door)) if door is not None else ()
    args = ["serve", "--policy", str(policy), "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc_port),
            "--http-host", "127.0.0.1", "--http-port", str(http_port), "--policy-poll-interval", "0.2",
            # Tests read exact counters right after their requests: no reuse of a recent
            # exposition (the default, 1 s, is covered by test_listeners_e2e).
            "--metrics-min-interval", "0", *door_args, *extra]
    if launch is None:
        process = ManagedProcess([*wrapper, *cli(*args)], workdir, name="authz-service",
                                 env={**os.environ, **(env or {})})
    else:
        process = launch(args)
    process.start()
    started = time.monotonic()
    try:
        wait_for_http(f"http://127.0.0.1:{http_port}/{'readyz' if wait_ready else 'healthz'}", 60,
                      expect_status=200, proc=process)
    except BaseException:
        process.stop()
        raise
    if door is None:
        door = int(_flag_value(extra, "--ext-authz-http-port"))
    xds = Path(_flag_value(extra, "--native-xds-dir")) if "--native-xds-dir" in extra else None
    listen = int(_flag_value(extra, "--native-listen").rsplit(":", 1)[1]) if "--native-listen" in extra else None
    return Service(process, grpc_port, http_port, started, door, xds, listen)


def _flag_value(args: tuple[str, ...], flag: str) -> str:
    return args[list(args).index(flag) + 1]
