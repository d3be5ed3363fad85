"""Every start-up failure, through the real CLI as a subprocess: exit code 2 and ONE line on stderr
naming the flag or file to fix; no traceback and no asyncio noise anywhere in the output."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ManagedProcess, free_port
from tests.e2e.stack import start_service
from tests.test_cli import assert_one_clean_line, cli

EXAMPLES = Path(__file__).resolve().parents[1] / "authz_service" / "examples"
POLICY = """\
issuers:
  - user_pool_id: us-east-1_Start0001
    issuer: http://127.0.0.1:9/us-east-1_Start0001
routes:
  - path: /healthz
    public: true
"""
@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port another program listens on (127.0.0.1, no SO_REUSEPORT)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield holder.getsockname()[1]


def serve(policy: Path | str, *extra: str, grpc: int | None = None, http: int | None = None) -> list[str]:
    return ["serve", "--policy", str(policy), "--grpc-host", "127.0.0.1", "--grpc-port", str(grpc or free_port()),
            "--http-host", "127.0.0.1", "--http-port", str(http or free_port()), *extra]


WORKERS = pytest.mark.parametrize("workers", ["1", "2"])


# --- ports ---------------------------------------------------------------------------------------


@WORKERS
def test_grpc_port_in_use(policy: Path, held_port: int, workers: str) -> None:
    result = cli(*serve(policy, "--workers", workers, grpc=held_port))
    line = assert_one_clean_line(result, f"cannot bind the gRPC port 127.0.0.1:{held_port}", "--grpc-port",
                                 "AUTHZ_GRPC_PORT")
    assert line == (f"authz-service: error: cannot bind the gRPC port 127.0.0.1:{held_port} (Address already in "
                    "use): set --grpc-port / AUTHZ_GRPC_PORT")


@WORKERS
def test_http_port_in_use(policy: Path, held_port: int, workers: str) -> None:
    result = cli(*serve(policy, "--workers", workers, http=held_port))
    assert_one_clean_line(result, f"cannot bind the HTTP (health/metrics) port 127.0.0.1:{held_port}",
                          "(Address already in use)", "--http-port / AUTHZ_HTTP_PORT")


@WORKERS
def test_ext_authz_http_port_in_use(policy: Path, held_port: int, workers: str) -> None:
    result = cli(*serve(policy, "--workers", workers, "--ext-authz-http-port", str(held_port)))
    assert_one_clean_line(result, f"cannot bind the HTTP ext_authz port 127.0.0.1:{held_port}",
                          "(Address already in use)", "--ext-authz-http-port / AUTHZ_EXT_AUTHZ_HTTP_PORT")


# Two listeners on one port: named before anything binds, with the two settings and where each came from.
SAME_PORT = {
    "gRPC and health": (("--grpc-port", "--http-port"), "--grpc-port=P and --http-port=P"),
    "gRPC and HTTP door": (("--grpc-port", "--ext-authz-http-port"), "--grpc-port=P and --ext-authz-http-port=P"),
    "HTTP door and health": (("--ext-authz-http-port", "--http-port"), "--ext-authz-http-port=P and --http-port=P"),
}


@WORKERS
@pytest.mark.parametrize("pair", SAME_PORT)
def test_two_listeners_on_one_port_name_both_settings(policy: Path, pair: str, workers: str) -> None:
    flags, named = SAME_PORT[pair]
    port = str(free_port())
    args = ["serve", "--policy", str(policy), "--grpc-host", "127.0.0.1", "--http-host", "127.0.0.1",
            "--workers", workers]
    for flag in ("--grpc-port", "--http-port"):
        if flag not in flags:
            args += [flag, str(free_port())]
    for flag in flags:
        args += [flag, port]
    line = assert_one_clean_line(cli(*args))
    assert line == (f"authz-service: error: {named.replace('P', port)} are the same port on 127.0.0.1: give each "
                    "listener a port of its own"), line


def test_a_port_conflict_names_the_environment_variable_it_came_from(policy: Path) -> None:
    port = str(free_port())
    result = cli("serve", "--policy", str(policy), "--grpc-port", port, env={"AUTHZ_HTTP_PORT": port})
    line = assert_one_clean_line(result)
    assert line == (f"authz-service: error: --grpc-port={port} and AUTHZ_HTTP_PORT={port} are the same port on "
                    "127.0.0.1 and 0.0.0.0: give each listener a port of its own"), line


def test_an_otlp_endpoint_without_a_scheme_is_refused_at_start_up(policy: Path) -> None:
    result = cli(*serve(policy), env={"OTEL_EXPORTER_OTLP_ENDPOINT": "otel-collector:4317"})
    assert_one_clean_line(result, "authz-service: error: OTEL_EXPORTER_OTLP_ENDPOINT='otel-collector:4317' is not a "
                                  "URL with http:// or https:// and a host")


def test_an_address_not_of_this_host_names_the_host_flag(policy: Path) -> None:
    result = cli("serve", "--policy", str(policy), "--grpc-host", "192.0.2.1", "--grpc-port", str(free_port()),
                     "--http-host", "127.0.0.1", "--http-port", str(free_port()))
    assert_one_clean_line(result, "cannot bind the gRPC port 192.0.2.1:", "--grpc-host / AUTHZ_GRPC_HOST")


# --- native mode: a service that does not start writes nothing into the xDS directory ----------------


def test_a_native_service_that_cannot_bind_writes_no_listener(tmp_path: Path, policy: Path, held_port: int) -> None:
    """Envoy follows the directory: a listener written by a process that then fails to start would
    be enforced with nobody serving it."""
    xds = tmp_path / "xds"
    xds.mkdir()
    result = cli(*serve(policy, "--native-xds-dir", str(xds), "--native-listen", f"127.0.0.1:{free_port()}",
                        http=held_port))
    assert_one_clean_line(result, f"cannot bind the HTTP (health/metrics) port 127.0.0.1:{held_port}")
    assert not (xds / "listeners.json").exists()


def test_a_second_writer_of_one_xds_directory_is_refused(tmp_path: Path, policy: Path) -> None:
    """Another process holds the directory's lock (tests/e2e/test_native_xds_e2e.py: a running service)."""
    import fcntl

    from authz_service.native.control import LOCK_FILE

    xds = tmp_path / "xds"
    xds.mkdir()
    (xds / "listeners.json").write_text("the other service's listener")
    with open(xds / LOCK_FILE, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write(f"{os.getpid()}\n")
        held.flush()
        result = cli(*serve(policy, "--native-xds-dir", str(xds), "--native-listen", f"127.0.0.1:{free_port()}"))
    line = assert_one_clean_line(result)
    assert line == (f"authz-service: error: --native-xds-dir {xds} (AUTHZ_NATIVE_XDS_DIR): another authz-service "
                    f"(pid {os.getpid()}) writes Envoy's listener there (it holds {xds / LOCK_FILE}); give each "
                    "service a directory of its own, or stop the other first"), line
    assert (xds / "listeners.json").read_text() == "the other service's listener"


def test_native_listen_on_a_port_of_the_service_is_refused(tmp_path: Path, policy: Path) -> None:
    port = str(free_port())
    result = cli(*serve(policy, "--native-xds-dir", str(tmp_path), "--native-listen", f"127.0.0.1:{port}",
                        http=int(port)))
    line = assert_one_clean_line(result)
    assert line == (f"authz-service: error: --http-port={port} and --native-listen=127.0.0.1:{port} are the same "
                    "port on 127.0.0.1: give each listener a port of its own"), line
    assert not (tmp_path / "listeners.json").exists()


def test_native_listen_without_the_xds_dir_is_refused(policy: Path) -> None:
    result = cli(*serve(policy, "--native-listen", "127.0.0.1:9405"))
    assert_one_clean_line(result, "authz-service: error: --native-listen=127.0.0.1:9405 without --native-xds-dir "
                                  "(AUTHZ_NATIVE_XDS_DIR)")


# --- warnings: the service starts ----------------------------------------------------------------


def test_an_unknown_authz_variable_is_a_warning_at_start_up(tmp_path: Path, policy: Path) -> None:
    service = start_service(tmp_path, policy, env={"AUTHZ_LOG_LEVLE": "debug"}, wait_ready=False)
    line = service.process.wait_until(lambda: _log_line(service.process, "authz-service started"), 60, "started")
    warning = _log_line(service.process, "unknown environment variable")
    assert warning is not None and warning["level"] == "warning", service.process.log_tail()
    assert (warning["variable"], warning["did_you_mean"]) == ("AUTHZ_LOG_LEVLE", "AUTHZ_LOG_LEVEL")
    assert warning["msg"] == "unknown environment variable: not a setting of authz-service, ignored"
    assert line["level"] == "info", "it starts all the same"


def test_each_start_up_line_names_only_the_listeners_its_process_serves(tmp_path: Path, policy: Path) -> None:
    """With --workers the parent serves the HTTP port and the workers the front doors: a worker's
    line must not name an HTTP address it does not serve (it once read "127.0.0.1:None")."""
    service = start_service(tmp_path, policy, "--workers", "2", wait_ready=False)

    def started() -> list[dict]:
        lines = [json.loads(t) for t in service.process.log_path.read_text().splitlines() if t.startswith("{")]
        found = [line for line in lines if line.get("msg") == "authz-service started"]
        return found if len(found) == 3 else []

    lines = service.process.wait_until(started, 60, "the parent's and both workers' start-up lines")
    parent = [line for line in lines if "worker" not in line]
    workers = [line for line in lines if "worker" in line]
    assert len(parent) == 1 and len(workers) == 2, lines
    assert parent[0]["http"] == f"127.0.0.1:{service.http_port}", parent
    for line in workers:
        assert "http" not in line, line
        assert line["grpc"] == parent[0]["grpc"], (line, parent)


def _log_line(process: ManagedProcess, msg: str) -> dict | None:
    """The first JSON log line of ``process`` whose msg starts with ``msg``."""
    for text in process.log_path.read_text().splitlines():
        if text.startswith("{"):
            entry = json.loads(text)
            if entry.get("msg", "").startswith(msg):
                return entry
    return None


# --- the policy file -----------------------------------------------------------------------------


def _missing(path: Path) -> None:
    pass


def _directory(path: Path) -> None:
    path.mkdir()


def _symlink_loop(path: Path) -> None:
    path.symlink_to(path)


def _unknown_version(path: Path) -> None:
    path.write_text("version: 2\n" + POLICY)


POLICY_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (_missing, "cannot read policy file: No such file or directory"),
    "a directory": (_directory, "not a regular file (a directory)"),
    "unreadable (a symlink loop)": (_symlink_loop, "cannot read policy file: Too many levels of symbolic links"),
    "an unknown format version": (_unknown_version, ":1:10: version: 2 is not a policy format"),
}


@WORKERS
@pytest.mark.parametrize("kind", POLICY_FILES)
def test_policy_file_that_cannot_be_used(tmp_path: Path, kind: str, workers: str) -> None:
    make, problem = POLICY_FILES[kind]
    path = tmp_path / "policy.yaml"
    make(path)
    line = assert_one_clean_line(cli(*serve(path, "--workers", workers)), str(path), problem)
    assert line.startswith(f"authz-service: error: {path}")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_policy_file_without_read_permission(policy: Path) -> None:
    policy.chmod(0)
    assert_one_clean_line(cli(*serve(policy)), str(policy), "cannot read policy file: Permission denied")


def test_policy_from_the_environment_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = cli("serve", "--grpc-port", str(free_port()), "--http-port", str(free_port()),
                 env={"AUTHZ_POLICY": str(missing)})
    assert_one_clean_line(result, str(missing), "No such file or directory")


def test_no_policy_named_at_all(tmp_path: Path) -> None:
    result = cli("serve")
    assert_one_clean_line(result, "--policy (or AUTHZ_POLICY) is required")


def test_a_bad_setting_names_its_flag(policy: Path) -> None:
    assert_one_clean_line(cli(*serve(policy, "--log-level", "verbose")), "--log-level='verbose' is invalid")


# --- the dev issuer ------------------------------------------------------------------------------


def test_dev_issuer_bad_config_names_file_line_and_column(tmp_path: Path) -> None:
    config = tmp_path / "issuer.yaml"
    config.write_text((EXAMPLES / "dev-issuer.yaml").read_text().replace("user_pool_id: us-east-1_Demo00001",
                                                                          "user_pool_id: Demo00001"))
    line_number = next(i for i, text in enumerate(config.read_text().splitlines(), 1) if text.startswith("user_pool_id:"))
    result = cli("dev-issuer", "--config", str(config), "--port", "0")
    line = assert_one_clean_line(result, f"{config}:{line_number}:15: user_pool_id: 'Demo00001' is not a Cognito "
                                         "user pool id", "fix:")
    assert line.startswith(f"authz-service dev-issuer: error: {config}:{line_number}:15:")


def test_dev_issuer_missing_config(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert_one_clean_line(cli("dev-issuer", "--config", str(missing), "--port", "0"), str(missing),
                          "check the --config path")


def test_dev_issuer_log_level_is_validated_like_serve() -> None:
    result = cli("dev-issuer", "--config", str(EXAMPLES / "dev-issuer.yaml"), "--port", "0",
                     "--log-level", "verbose")
    line = assert_one_clean_line(result, "--log-level='verbose' is invalid")
    assert line == ("authz-service dev-issuer: error: --log-level='verbose' is invalid: one of debug, info, "
                    "warning, error")


@pytest.mark.parametrize(("args", "message"), [
    (("--port", "99999"), "--port='99999' is invalid: a port is 0..65535"),
    (("--port", "0", "--public-url", "http://[::1"),
     "public URL 'http://[::1': '[' and ']' in the host do not pair (an IPv6 address is written as [2001:db8::1])"),
    (("--port", "0", "--public-url", "http://127.0.0.1:70000"), "public URL 'http://127.0.0.1:70000': port 70000 is not 1 to 65535"),
], ids=["port-99999", "public-url-ipv6", "public-url-port"])
def test_dev_issuer_port_and_public_url_are_validated(args: tuple[str, ...], message: str) -> None:
    """--port 99999 listened on 34463 (99999 - 65536) without a word; a public URL no client can
    reach gave tokens an iss no policy accepts."""
    result = cli("dev-issuer", "--config", str(EXAMPLES / "dev-issuer.yaml"), *args)
    line = assert_one_clean_line(result, message)
    assert line == f"authz-service dev-issuer: error: {message}"


def test_dev_issuer_port_in_use(held_port: int) -> None:
    result = cli("dev-issuer", "--config", str(EXAMPLES / "dev-issuer.yaml"), "--port", str(held_port))
    assert_one_clean_line(result, f"cannot bind the dev issuer port 127.0.0.1:{held_port} (Address already in use)",
                          "set --port")
