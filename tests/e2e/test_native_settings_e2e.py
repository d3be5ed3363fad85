"""Native mode configured only through the environment, as docs/cli.md allows: the service's
``AUTHZ_*`` variables that the compiled Envoy must mirror (the realm of its challenges, the leeway
of jwt_authn's clock, the service's ports) reach ``authz-service compile envoy`` too, so Envoy's
own answers are the service's and it reaches the service where it listens. Without that, Envoy compiled in the same environment kept the defaults: a token
expired past the service's leeway was let through by jwt_authn (a 60 s clock skew), and Envoy's
challenges named another realm than the service's."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.test_cli import cli

from .harness import UpstreamProcess, free_port, http_request, start_envoy
from .security_stack import envoy_fetches, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e
ENVIRONMENT = {"AUTHZ_LEEWAY": "5", "AUTHZ_REALM": "shop"}


def test_compile_envoy_takes_the_services_environment_so_envoy_answers_as_the_service(
        tmp_path: Path, upstream: UpstreamProcess, envoy_factory) -> None:
    s = start_security_stack(tmp_path, upstream, envoy_factory, env=ENVIRONMENT)  # gRPC mode: the service decides
    native = None
    try:
        listen = free_port()
        bootstrap = tmp_path / "envoy-native.yaml"
        # The service's ports, as its own variables would set them (the harness gave it flags).
        doors = {"AUTHZ_GRPC_PORT": str(s.service.grpc_port), "AUTHZ_HTTP_PORT": str(s.service.http_port)}
        run = cli("compile", "envoy", str(s.policy.path), "--listen", f"127.0.0.1:{listen}",
                  "--admin", f"127.0.0.1:{free_port()}", "--health", f"127.0.0.1:{free_port()}",
                  "--app", f"127.0.0.1:{upstream.port}", "-o", str(bootstrap), "--report", "none",
                  env={**ENVIRONMENT, **doors})
        assert run.returncode == 0, run.stderr
        native = start_envoy(bootstrap, tmp_path, name="envoy-native-env")
        expired = s.fake.token(exp=int(time.time()) - 30)  # past the 5 s leeway, within Envoy's default 60 s
        for label, token in (("expired", expired), ("no token", None), ("valid", s.fake.token())):
            headers = [] if token is None else [("Authorization", f"Bearer {token}")]
            want = s.send("POST", "/transactions", token)
            status, got_headers, body = http_request("POST", native.url("/transactions"), headers)
            got = {k.lower(): v for k, v in got_headers}
            assert (status, got.get("www-authenticate"), body if status != 200 else b"") == (
                want.status, want.headers.get("www-authenticate"), want.body if want.status != 200 else b""), label
        assert s.send("POST", "/transactions", expired).status == 401
        assert envoy_fetches(native) >= 1  # the keys came from the service's HTTP port its variable names
    finally:
        if native is not None:
            native.stop()
        stop_security_stack(s)
