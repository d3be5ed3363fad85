"""`--workers 2`: Checks answered through a real Envoy, one aggregated metrics view, readiness of
every worker, a dead worker restarted, SIGTERM stopping all, a port held elsewhere refused, and who
can join the gRPC port's SO_REUSEPORT group (only the same UID) and what the service does about it."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import authz_service

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from .. import envoyconf
from .harness import REPO_ROOT, ManagedProcess, free_port, http_request, raw_http_request, wait_for
from .stack import DevIssuer, Service, cli, start_dev_issuer, start_service

pytestmark = pytest.mark.e2e

POOL = "us-east-1_Work00001"
POLICY = """
issuers:
  - user_pool_id: us-east-1_Work00001
    issuer: {issuer}
    client_ids: [payments-writer]
routes:
  - name: create-transaction
    methods: [POST]
    path: /transactions
    scopes: [transactions/post]
"""


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIssuer]:
    dev = start_dev_issuer(tmp_path_factory.mktemp("issuer"), POOL)
    yield dev
    dev.process.stop()


@pytest.fixture
def policy(tmp_path: Path, issuer: DevIssuer) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY.format(issuer=issuer.issuer))
    return path


def readyz(service: Service) -> tuple[int, dict]:
    status, _, body = http_request("GET", f"http://127.0.0.1:{service.http_port}/readyz")
    return status, json.loads(body)


def check(port: int, token: str) -> int:
    """One Check on a fresh TCP connection (a local subchannel pool: no connection reuse)."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "POST", "/transactions"
    http.headers["authorization"] = f"Bearer {token}"
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5).status.code


def worker_pids(service: Service) -> list[int]:
    return [w["pid"] for w in readyz(service)[1]["workers"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_checks_answered_and_metrics_aggregated_across_workers(tmp_path, policy, issuer, envoy_factory) -> None:
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        status, body = readyz(service)
        assert status == 200 and body["ready"] is True
        assert len({w["pid"] for w in body["workers"]}) == 2 and all(w["state"] == "ready" for w in body["workers"])
        envoy = envoy_factory(service.grpc_port)
        token = issuer.token("payments-writer")
        for _ in range(5):
            assert http_request("POST", envoy.url("/transactions"), [("Authorization", f"Bearer {token}")])[0] == 200
        assert http_request("POST", envoy.url("/transactions"))[0] == 401
        for _ in range(30):  # new connections: the kernel spreads them over both workers
            assert check(service.grpc_port, token) == 0
        # Workers apply their per-Check counts to the shared files every second (metrics.PerCheck).
        wait_for(lambda: service.sample("authz_check_decisions_total", decision="allow", reason="allowed") == 35,
                 60, "35 allows in the aggregated metrics")
        wait_for(lambda: service.sample("authz_check_duration_seconds_count") == 36, 60, "36 Check durations")
        assert service.sample("authz_check_decisions_total", decision="deny", reason="missing_token") == 1
        # Each worker verified the token once (its own cache), every other use was a hit: two
        # misses prove both workers answered and that /metrics adds their samples up.
        assert service.sample("authz_token_cache_lookups_total", result="miss") == 2
        assert service.sample("authz_token_cache_lookups_total", result="hit") == 33
        assert service.sample("authz_token_cache_entries") == 2  # livesum over the workers
        assert service.sample("authz_ready") == 1
        # One build-info series for all workers (livemax), and no *_created series.
        body = service.metrics()
        assert [l for l in body.splitlines() if l.startswith("authz_build_info")] == [
            f'authz_build_info{{grpc="{grpc.__version__}",python="{platform.python_version()}",'
            f'version="{authz_service.__version__}"}} 1.0']
        assert "_created" not in body
    finally:
        service.process.stop()


def test_sigterm_to_the_parent_stops_every_worker(tmp_path, policy) -> None:
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        pids = worker_pids(service)
        assert all(alive(p) for p in pids)
        environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
        metrics_dir = Path(next(e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1]
                           .decode())
        assert metrics_dir.is_dir()
        os.kill(service.process.pid, signal.SIGTERM)  # the parent only: it must forward
        assert service.process.proc.wait(timeout=60) == 0
        wait_for(lambda: not any(alive(p) for p in pids), 60, "every worker gone")
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", service.grpc_port)) != 0
        assert not metrics_dir.exists()  # the parent removed the metrics directory
    finally:
        service.process.stop()


def test_a_killed_worker_is_restarted_and_readiness_waits_for_it(tmp_path, policy, issuer) -> None:
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        before = worker_pids(service)
        os.kill(before[0], signal.SIGKILL)
        seen: list[dict] = []

        def restarted() -> bool:
            status, body = readyz(service)
            seen.append(body["workers"][0])
            return status == 200 and body["workers"][0]["pid"] not in (None, before[0])

        service.process.wait_until(restarted, 60, "worker 0 restarted and ready")
        # Until its restart, the dead worker serves no policy (not its last one).
        assert all(w["policy_sha256"] is None for w in seen if not w["alive"]), seen
        status, body = readyz(service)
        assert body["workers"][0]["restarts"] == 1 and body["workers"][1]["pid"] == before[1]
        token = issuer.token("payments-writer")
        assert all(check(service.grpc_port, token) == 0 for _ in range(10))
    finally:
        service.process.stop()


def test_port_held_by_another_program_fails_start(tmp_path, policy) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = subprocess.run(
            cli("serve", "--policy", str(policy), "--grpc-host", "127.0.0.1", "--grpc-port", str(port),
                "--http-host", "127.0.0.1", "--http-port", str(free_port()), "--workers", "2"),
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot bind the gRPC port 127.0.0.1:{port}" in result.stderr


def test_bad_policy_exits_2_before_starting_workers(tmp_path) -> None:
    bad = tmp_path / "policy.yaml"
    bad.write_text("issuers: []\n")
    result = subprocess.run(
        cli("serve", "--policy", str(bad), "--grpc-port", str(free_port()), "--http-port", str(free_port()),
            "--workers", "2"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "issuers" in result.stderr


def test_workers_exit_when_the_parent_is_killed(tmp_path, policy) -> None:
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        pids = worker_pids(service)
        environ = Path(f"/proc/{pids[0]}/environ").read_bytes().split(b"\0")
        metrics_dir = next(e for e in environ if e.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1]
        os.kill(service.process.pid, signal.SIGKILL)  # no chance to forward anything
        service.process.proc.wait(timeout=60)
        wait_for(lambda: not any(alive(p) for p in pids), 60, "orphaned workers gone")
    finally:
        service.process.stop()
        for pid in worker_pids_safe(pids):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(metrics_dir.decode(), ignore_errors=True)  # a killed parent cannot remove it


ORPHAN = """
import os, signal, subprocess, sys, time
if sys.argv[1] == "parent":
    with open(sys.argv[2], "w") as log:
        child = subprocess.Popen([sys.executable, __file__, "child"], stdout=subprocess.PIPE, stderr=log)
    child.stdout.readline()  # the child watches its parent now
    print(child.pid, flush=True)
    os._exit(0)
from authz_service import workers
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a drain that never ends
workers._exit_with_parent(os.getppid(), 0.5)
print("watching", flush=True)
while True:
    time.sleep(3600)
"""


def test_an_orphaned_worker_whose_drain_never_ends_still_exits(tmp_path) -> None:
    """The last resort behind the test above: with the parent gone, nothing would kill a worker
    whose SIGTERM drain hangs, so the worker ends itself once the stop deadline has passed."""
    script, log = tmp_path / "orphan.py", tmp_path / "orphan.log"
    script.write_text(ORPHAN)
    result = subprocess.run([sys.executable, str(script), "parent", str(log)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout)
    try:
        wait_for(lambda: not alive(pid), 60, "orphan gone")
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert "did not stop in time after its parent was gone; exiting" in log.read_text()


def worker_pids_safe(pids: list[int]) -> list[int]:
    return [p for p in pids if alive(p)]


# --- SO_REUSEPORT: the kernel admits only sockets of the same effective UID to the group -------------

OTHER_UID = 65534  # "nobody": any UID but the service's


def start_joiner(tmp_path: Path, host: str, port: int, uid: int | None, *,
                 http: bool = False) -> tuple[ManagedProcess, str]:
    """tests/e2e/port_joiner.py: a gRPC server that answers every Check OK (``http``: an HTTP server
    that answers every authorization request 200), trying to bind the service's port with
    SO_REUSEPORT as ``uid`` (None: as the test runner). Returns it and its verdict."""
    name = f"joiner-{'http' if http else 'grpc'}-{host}-{'same' if uid is None else uid}"
    joiner = ManagedProcess([sys.executable, "-m", "tests.e2e.port_joiner", *(["--http"] if http else []), host,
                             str(port), *([] if uid is None else [str(uid)])], tmp_path, name, cwd=REPO_ROOT).start()
    found = wait_for(lambda: re.search(r"^(joined|refused) ", joiner.log_text(), re.M)
                     or (not joiner.alive() and "exited"), 30, f"{name}'s verdict")
    return joiner, found if isinstance(found, str) else found.group(1)


def joiner_sockets(pid: int) -> set[int]:
    from authz_service.workers import socket_inodes

    return socket_inodes(pid)


def anonymous_check(port: int) -> int:
    """A Check with no token on a fresh connection: the service denies it (16), a joiner allows it (0)."""
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.method, request.attributes.request.http.path = "POST", "/transactions"
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return external_auth_pb2_grpc.AuthorizationStub(channel).Check(request, timeout=5).status.code


def test_single_process_mode_never_shares_its_port(tmp_path, policy, envoy_factory) -> None:
    service = start_service(tmp_path, policy)
    joiner = None
    try:
        joiner, verdict = start_joiner(tmp_path, "127.0.0.1", service.grpc_port, None)
        assert verdict == "refused", "one process must not set SO_REUSEPORT: a same-UID process joined"
        envoy = envoy_factory(service.grpc_port)
        assert http_request("POST", envoy.url("/transactions"))[0] == 401
    finally:
        if joiner is not None:
            joiner.stop()
        service.process.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a socket as another UID (CI runs as root)")
def test_only_a_process_of_the_same_uid_can_join_the_workers_port_and_it_is_detected(
        tmp_path, policy, envoy_factory) -> None:
    """Another UID cannot bind the port (neither the same nor a wildcard address): the Pod rule of
    one UID per container closes the hole. The same UID can, and then answers some Checks OK; the
    parent finds its socket in /proc/net/tcp and turns not ready until it is gone."""
    service = start_service(tmp_path, policy, "--workers", "2")
    joiners: list[ManagedProcess] = []
    try:
        for host in ("127.0.0.1", "0.0.0.0"):
            joiner, verdict = start_joiner(tmp_path, host, service.grpc_port, OTHER_UID)
            joiners.append(joiner)
            assert verdict == "refused", f"a process of UID {OTHER_UID} joined the group on {host}"
        envoy = envoy_factory(service.grpc_port)
        assert http_request("POST", envoy.url("/transactions"))[0] == 401
        assert readyz(service)[0] == 200 and not readyz(service)[1].get("foreign_listeners")

        same, verdict = start_joiner(tmp_path, "127.0.0.1", service.grpc_port, None)
        joiners.append(same)
        assert verdict == "joined"
        # The hole, shown: fresh connections are spread over the group, and the joiner allows.
        wait_for(lambda: anonymous_check(service.grpc_port) == 0, 60, "a Check answered by the joiner")
        status, body = service.process.wait_until(
            lambda: (r := readyz(service))[0] == 503 and r, 15, "not ready while a foreign listener exists")
        [foreign] = body["foreign_listeners"]
        assert foreign["uid"] == os.geteuid() and foreign["socket_inode"] in joiner_sockets(same.pid)
        assert foreign["port"] == service.grpc_port
        assert "another process listens on the gRPC port" in service.process.log_text()
        same.stop()
        service.process.wait_until(lambda: readyz(service)[0] == 200, 15, "ready again once the joiner is gone")
        assert readyz(service)[1]["foreign_listeners"] == []
        assert "running as root with --workers" in service.process.log_text()  # the start-up warning
    finally:
        for joiner in joiners:
            joiner.stop()
        service.process.stop()


def one_check_per_connection(config: dict) -> None:
    """Envoy opens a new connection to the authz cluster for every authorization request, as it
    does over time anyway (pool growth under load, idle timeouts): each one lands on whichever
    socket of the SO_REUSEPORT group the kernel picks."""
    cluster = envoyconf.cluster(config, "authz_service")
    cluster["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "common_http_protocol_options": {"max_requests_per_connection": 1},
        "explicit_http_config": {"http_protocol_options": {}}}}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a socket as another UID (CI runs as root)")
def test_a_process_that_joins_the_http_front_doors_port_is_detected(tmp_path, policy, envoy_factory) -> None:
    """The workers share the HTTP front door's port as they share the gRPC one. Another UID cannot
    join it; a process of the same UID can, and then allows some of Envoy's HTTP-mode authorization
    requests (shown through Envoy). The parent watches that port too: not ready, and an error
    logged, until the joiner is gone."""
    service = start_service(tmp_path, policy, "--workers", "2")
    door = service.authz_port("http")
    joiners: list[ManagedProcess] = []
    try:
        for host in ("127.0.0.1", "0.0.0.0"):
            joiner, verdict = start_joiner(tmp_path, host, door, OTHER_UID, http=True)
            joiners.append(joiner)
            assert verdict == "refused", f"a process of UID {OTHER_UID} joined the HTTP door's group on {host}"
        envoy = envoy_factory.for_service(service, "http", edit=one_check_per_connection)
        assert http_request("POST", envoy.url("/transactions"))[0] == 401
        assert readyz(service)[0] == 200 and not readyz(service)[1].get("foreign_listeners")

        same, verdict = start_joiner(tmp_path, "127.0.0.1", door, None, http=True)
        joiners.append(same)
        assert verdict == "joined"
        # The hole, through Envoy: a request without a token, allowed by the joiner.
        wait_for(lambda: http_request("POST", envoy.url("/transactions"))[0] == 200, 60,
                 "a request without a token allowed through Envoy by the joiner")
        status, body = service.process.wait_until(
            lambda: (r := readyz(service))[0] == 503 and r, 15, "not ready while a foreign listener exists")
        [foreign] = body["foreign_listeners"]
        assert foreign["port"] == door and foreign["uid"] == os.geteuid()
        assert foreign["socket_inode"] in joiner_sockets(same.pid)
        assert "another process listens on the HTTP ext_authz port" in service.process.log_text()
        same.stop()
        service.process.wait_until(lambda: readyz(service)[0] == 200, 15, "ready again once the joiner is gone")
        assert readyz(service)[1]["foreign_listeners"] == []
        assert http_request("POST", envoy.url("/transactions"))[0] == 401
    finally:
        for joiner in joiners:
            joiner.stop()
        service.process.stop()


def test_http_door_mismatches_are_counted_across_workers(tmp_path, policy) -> None:
    """Requests whose path Envoy did not send as the HTTP front door expects, refused by whichever
    worker gets them, add up in /readyz and in the metrics."""
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        door = service.authz_port("http")
        for _ in range(6):  # new connections: spread over both workers
            assert raw_http_request(door, "POST", "/ext-authz/transactions")[0] == 400
        status, body = readyz(service)
        assert status == 200, "a mismatch is not a readiness condition"
        assert body["ext_authz_http"] == {"path_prefix": "", "original_path_header": "x-authz-original-path",
                                          "config_mismatches": 6}
        wait_for(lambda: service.sample("authz_ext_authz_http_config_mismatches_total",
                                        problem="original_path_missing") == 6, 60, "6 mismatches in the metrics")
    finally:
        service.process.stop()


def test_a_refused_policy_file_shows_in_the_parents_metrics_until_fixed(tmp_path, policy, issuer) -> None:
    """Each worker follows the file and sets authz_policy_file_refused itself; the parent's /metrics
    shows 1 for the refused content while any worker refuses it, and 0 once every worker has the
    fixed file (the refused hash stays as a 0 series: multiprocess files cannot drop a series)."""
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        def refused() -> dict[str, float]:
            from prometheus_client.parser import text_string_to_metric_families

            return {s.labels["sha256"]: s.value for f in text_string_to_metric_families(service.metrics())
                    for s in f.samples if s.name == "authz_policy_file_refused"}

        assert refused() == {"": 0}
        good = policy.read_text()
        bad = good.replace("scopes: [transactions/post]", "scope: [transactions/post]")
        policy.write_text(bad)
        bad_sha = hashlib.sha256(bad.encode()).hexdigest()
        wait_for(lambda: refused() == {"": 0, bad_sha: 1}, 60, "the refused file in the parent's metrics")
        status, body = readyz(service)
        assert status == 200 and body["ready"] is True, "the previous policy keeps serving"
        assert check(service.grpc_port, issuer.token("payments-writer")) == 0
        policy.write_text(good)  # put back: the policy in force
        wait_for(lambda: refused() == {"": 0, bad_sha: 0}, 60, "every worker back on the policy in force")
    finally:
        service.process.stop()


def policy_workers(service: Service) -> dict[str, float]:
    """authz_policy_workers in the parent's /metrics: sha256 -> the workers serving that policy."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["sha256"]: s.value for f in text_string_to_metric_families(service.metrics())
            for s in f.samples if s.name == "authz_policy_workers"}


def test_which_policy_each_worker_serves_shows_until_every_worker_serves_the_new_one(tmp_path, policy, issuer) -> None:
    """Each worker loads the file on its own, so a reload reaches them one after the other. The
    parent's /readyz names each worker's policy and ``policy.sha256`` only once they all serve one;
    ``authz_policy_workers{sha256}`` counts them. A worker held back (SIGSTOP) shows the skew, and the
    policy in force is confirmed only once it has loaded the new file too."""
    service = start_service(tmp_path, policy, "--workers", "2")
    try:
        old_text = policy.read_text()
        old = hashlib.sha256(old_text.encode()).hexdigest()
        body = readyz(service)[1]
        assert body["policy"] == {"sha256": old, "workers": {old: 2}}
        assert [w["policy_sha256"] for w in body["workers"]] == [old, old]
        assert policy_workers(service) == {old: 2}
        behind, ahead = worker_pids(service)
        new_text = old_text + "deny:\n  client_ids: [payments-writer]\n"
        new = hashlib.sha256(new_text.encode()).hexdigest()
        os.kill(behind, signal.SIGSTOP)
        try:
            policy.write_text(new_text)
            wait_for(lambda: policy_workers(service) == {old: 1, new: 1}, 60, "one worker on the new policy")
            status, body = readyz(service)
            assert status == 200 and body["policy"] == {"sha256": None, "workers": {old: 1, new: 1}}
            assert {w["pid"]: w["policy_sha256"] for w in body["workers"]} == {behind: old, ahead: new}
        finally:
            os.kill(behind, signal.SIGCONT)
        wait_for(lambda: readyz(service)[1]["policy"] == {"sha256": new, "workers": {new: 2}}, 60,
                 "every worker on the new policy")
        wait_for(lambda: policy_workers(service) == {new: 2}, 60, "the count of the new policy's workers")
        for _ in range(10):  # new connections: the kernel spreads them over both workers
            assert check(service.grpc_port, issuer.token("payments-writer")) == 16  # UNAUTHENTICATED: revoked
    finally:
        service.process.stop()
