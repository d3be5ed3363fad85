"""Native mode's xDS form through real Envoys: the service (``serve --native-xds-dir``) writes the
listener compiled from the policy it serves into a directory Envoy (``compile envoy --xds-dir``'s
bootstrap) watches, so policy changes reach Envoy without a restart.

What is shown, and measured (``pytest -s`` prints the figures docs/native.md quotes):

* Envoy enforces the listener the service wrote, and both name the same policy sha256 (the
  service's /readyz and metrics, Envoy's ``listener_manager.lds.version_text``, also on its
  Prometheus endpoint);
* Envoy does not start before the file exists (hence the start order of the sidecars);
* a policy change (a ConfigMap swap) is enforced by Envoy within a fraction of a second, with no
  restart; a keep-alive connection gets at most one more answer under the old policy, with
  ``connection: close``;
* a refused policy file leaves the service and Envoy on the last good policy;
* the service down: Envoy keeps its listener and the keys it fetched; the service back with
  another policy: Envoy follows;
* key rotation and an issuer outage behave as in the bootstrap form (the keys come from the
  service's /jwks either way);
* native decisions are counted with the service's labels: the same requests counted through the
  ext_authz Envoy and through the native Envoy give the same ``authz_check_decisions_total``
  series, Envoy's ``envoy_authz_native_decisions`` holding the ones it decided;
* every Envoy series and stat docs/native.md names is exported, with the labels it states.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz_service.policy import parse_policy
from tests.test_alerts import ENVOY_HEAP_SERIES
from tests.test_cli import assert_one_clean_line, cli

from .fake_issuer import FakeIssuer, rsa_key
from .harness import (
    REPO_ROOT,
    EnvoyProcess,
    ManagedProcess,
    ProcessDied,
    UpstreamProcess,
    free_port,
    http_request,
    render_native_xds_config,
    sized_routes,
    start_envoy,
    wait_for,
    wait_for_http,
)
from .security_stack import (
    ROUTES,
    SecurityStack,
    native_decisions,
    envoy_fetches,
    listener_version,
    listeners_taken_up,
    natively_allowed,
    policy_text,
    serve,
    service_checks,
    serving,
    start_xds_security_stack,
    stop_security_stack,
    wait_for_listener,
)

pytestmark = pytest.mark.e2e
TIGHTER = ROUTES.replace("scopes: [transactions/post]", "scopes: [transactions/admin]")


@pytest.fixture
def stack(tmp_path: Path, upstream: UpstreamProcess, envoy_factory) -> Iterator[SecurityStack]:
    s = start_xds_security_stack(tmp_path, upstream, envoy_factory)
    yield s
    stop_security_stack(s)


def lds(envoy: EnvoyProcess, counter: str) -> int:
    return envoy.stats(f"^listener_manager.lds.{counter}$").get(f"listener_manager.lds.{counter}", 0)


def test_envoy_runs_the_listener_the_service_wrote(stack: SecurityStack) -> None:
    s = stack
    sha = serving(s)["sha256"]
    status, ready = s.service.readyz()
    assert status == 200 and ready["native"]["written_sha256"] == sha, ready
    assert {engine: sorted(names) for engine, names in ready["native"]["routes"].items()} == {
        "native": ["admin", "create-transaction", "get-transaction"], "ext_authz": [], "none": ["docs", "healthz"]}
    assert listener_version(s.envoy) == sha
    assert s.service.sample("authz_native_listener_info", sha256=sha) == 1
    # The same on Envoy's Prometheus endpoint (the envoy-health listener), for the skew alert.
    _, _, body = http_request("GET", s.envoy.health_url("/stats/prometheus"))
    assert f'envoy_listener_manager_lds_version_text{{text_value="{sha}"}}' in body.decode()
    assert "envoy_listener_manager_lds_update_rejected{} 0" in body.decode()  # the alerts' names (test_alerts.py)
    for name in ENVOY_HEAP_SERIES:  # Envoy's heap, for AuthzEnvoyHeapPressure and AuthzEnvoyHeapShedding
        assert f"\n{name}{{}} " in body.decode(), name
    # The expected heap of the listener it wrote, as /readyz reports it (AuthzNativeEnvoyHeapNearLimit).
    heap = ready["native"]["envoy_heap"]
    for field in ("expected", "needed", "limit", "cap"):
        assert s.service.sample(f"authz_native_envoy_heap_{field}_bytes", sha256=sha) == heap[f"{field}_bytes"] > 0
    assert natively_allowed(s, s.fake.token())
    assert s.send("POST", "/transactions").status == 401
    assert envoy_fetches(s.envoy) >= 1  # the keys came from the service's /jwks


# What docs/native.md writes in backticks that starts like an Envoy series but names none.
NOT_SERIES = {"envoy_heap"}  # a field of compile envoy's report and of /readyz


def test_every_envoy_series_docs_native_md_names_is_exported_with_its_labels(stack: SecurityStack) -> None:
    """Each Prometheus series docs/native.md names is on the envoy-health listener's
    /stats/prometheus (job authz-envoy) with the labels it states, and each of Envoy's own stat
    names it quotes is on the admin /stats: an operator copying one into a query finds it."""
    s = stack
    assert natively_allowed(s, s.fake.token())  # a native decision: its series exists from then on
    text = (REPO_ROOT / "docs" / "native.md").read_text()
    _, _, body = http_request("GET", s.envoy.health_url("/stats/prometheus"))
    exported: dict[str, list[dict[str, str]]] = {}
    for name, labels in re.findall(r"^(\w+)\{([^}]*)\} \S+$", body.decode(), re.MULTILINE):
        exported.setdefault(name, []).append(dict(re.findall(r'(\w+)="([^"]*)"', labels)))
    named, checked = None, []
    for name, labels in re.findall(r"`(envoy_\w+)?(?:\{([^`}]*)\})?`", text):
        named = name or named  # `{label="value"}` alone belongs to the series named before it
        if not named or named in NOT_SERIES or not (name or labels):
            continue
        assert named in exported, f"docs/native.md names {named}; Envoy exports no such series"
        if "=" in labels:
            wanted = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            assert any(all(k in got and (v.startswith("<") or got[k] == v) for k, v in wanted.items())
                       for got in exported[named]), f"{named}{{{labels}}}: {exported[named]}"
        elif labels:
            assert any(set(got) == {k.strip() for k in labels.split(",")} for got in exported[named]), \
                f"{named}{{{labels}}}: {exported[named]}"
        checked.append(named)
    assert {"envoy_authz_native_decisions", "envoy_http_rbac_denied",
            "envoy_listener_manager_lds_version_text"} <= set(checked)
    _, _, admin = http_request("GET", s.envoy.admin_url("/stats"))
    stat_names = set(re.findall(r"^([\w.]+): ", admin.decode(), re.MULTILINE))
    quoted = set(re.findall(r"`((?:http\.ingress_http|listener_manager)\.[\w.]+)`", text))
    assert len(quoted) >= 5 and not quoted - stat_names, f"not on Envoy's admin /stats: {quoted - stat_names}"


def test_envoy_does_not_start_before_the_listener_file_exists(tmp_path: Path, upstream: UpstreamProcess) -> None:
    """Why the service's sidecar starts first and writes the file before its health port opens."""
    config = render_native_xds_config(tmp_path, tmp_path / "empty", admin_port=free_port(), app_port=upstream.port,
                                      grpc_port=free_port(), http_port=free_port())
    (tmp_path / "empty").mkdir()
    with pytest.raises((ProcessDied, TimeoutError)) as failed:
        start_envoy(config, tmp_path, listener_port=free_port(), timeout=30)
    assert "listeners.json' does not exist" in str(failed.value)


def test_a_policy_change_reaches_envoy_without_a_restart(stack: SecurityStack) -> None:
    s = stack
    token = s.fake.token(scope="transactions/post")
    assert natively_allowed(s, token)
    updates, pid = lds(s.envoy, "update_success"), s.envoy.pid
    text = policy_text(s.fake, s.dev, routes=TIGHTER)
    changed = time.monotonic()
    s.policy.write(text)  # the ConfigMap swap
    answer = wait_for(lambda: (a := s.send("POST", "/transactions", token)).status != 200 and a, 30,
                      "the tightened policy enforced")
    enforced = time.monotonic() - changed
    assert answer.status == 403 and answer.error == "insufficient_scope" and not answer.reached_upstream
    assert 'scope="transactions/admin"' in answer.headers["www-authenticate"]
    before = service_checks(s.envoy)
    assert s.send("POST", "/transactions", token).status == 403 and service_checks(s.envoy) == before  # natively
    assert s.envoy.pid == pid and s.envoy.alive()  # the same Envoy process
    assert lds(s.envoy, "update_success") == updates + 1 and lds(s.envoy, "update_rejected") == 0
    assert listener_version(s.envoy) == serving(s)["sha256"] == s.service.readyz()[1]["native"]["written_sha256"]
    print(f"\npolicy change: enforced by Envoy {enforced:.3f} s after the policy file was swapped "
          "(the service's reload, its compile, the listener written, Envoy's reload)")


def test_a_keep_alive_connection_gets_at_most_one_more_answer_under_the_old_policy(stack: SecurityStack) -> None:
    """Envoy drains the old listener's connections (--drain-strategy immediate): an open HTTP/1.1
    connection's next answer is still the old listener's, and closes the connection."""
    s = stack
    headers = {"Authorization": f"Bearer {s.fake.token(scope='transactions/post')}"}
    conn = http.client.HTTPConnection("127.0.0.1", s.envoy.listener_port, timeout=10)
    try:
        conn.request("POST", "/transactions", headers=headers)
        first = conn.getresponse()
        first.read()
        assert first.status == 200 and first.getheader("connection") is None
        tighter = policy_text(s.fake, s.dev, routes=TIGHTER)
        s.serve_policy(tighter, lambda: serving(s)["sha256"] == parse_policy(tighter).sha256)
        try:
            conn.request("POST", "/transactions", headers=headers)
            last = conn.getresponse()
            last.read()
        except (ConnectionError, http.client.HTTPException):
            last = None  # Envoy closed the idle connection first (its drain time passed): no old answer
        if last is not None:
            assert (last.status, last.getheader("connection")) == (200, "close")
            assert conn.sock is None  # http.client closed it as told; a next request opens a new one
    finally:
        conn.close()
    assert s.send("POST", "/transactions", s.fake.token(scope="transactions/post")).status == 403


def test_a_refused_policy_keeps_the_service_and_envoy_on_the_last_good_one(stack: SecurityStack) -> None:
    s = stack
    good = serving(s)["sha256"]
    attempts, errors = lds(s.envoy, "update_attempt"), s.service.sample("authz_policy_reloads_total", result="error")
    s.policy.write(policy_text(s.fake, s.dev) + "  - {name: broken, path: /x/{a}/{a}, scopes: [s]}\n")
    s.service.process.wait_until(
        lambda: s.service.sample("authz_policy_reloads_total", result="error") > errors, 30, "the policy refused")
    status, ready = s.service.readyz()
    assert ready["policy"]["sha256"] == good and ready["policy"]["last_reload_error"]
    assert s.service.total("authz_policy_file_refused") == 1
    assert ready["native"]["written_sha256"] == good and status == 200
    assert listener_version(s.envoy) == good and lds(s.envoy, "update_attempt") == attempts  # nothing new to load
    assert natively_allowed(s, s.fake.token())
    taken_up = listeners_taken_up(s.envoy)
    serve(s, policy_text(s.fake, s.dev, routes=TIGHTER))  # fixed: both follow again
    wait_for_listener(s.envoy, serving(s)["sha256"], taken_up)


def test_a_policy_over_envoys_heap_cap_is_refused_and_envoy_keeps_the_last_good_one(
        tmp_path: Path, upstream: UpstreamProcess, envoy_factory) -> None:
    """A policy whose compiled listener would take Envoy's heap to its overload actions is refused
    as a policy that cannot be compiled is (--native-heap-cap: the cap of the bootstrap Envoy runs,
    small here so that a thousand routes exceed it), instead of an Envoy that sheds every request."""
    s = start_xds_security_stack(tmp_path, upstream, envoy_factory, "--native-heap-cap", "64")
    try:
        good = serving(s)["sha256"]
        assert s.service.readyz()[1]["native"]["envoy_heap"]["fits"] is True
        errors = s.service.sample("authz_policy_reloads_total", result="error")
        many = "".join(f"  - {json.dumps(route)}\n" for route in sized_routes(1200)[1:])
        s.policy.write(policy_text(s.fake, s.dev, many))
        s.service.process.wait_until(
            lambda: s.service.sample("authz_policy_reloads_total", result="error") > errors, 60, "the policy refused")
        status, ready = s.service.readyz()
        assert ready["policy"]["sha256"] == good and "Envoy's heap" in ready["policy"]["last_reload_error"]
        assert "--native-heap-cap" in ready["policy"]["last_reload_error"]
        assert ready["native"]["written_sha256"] == good and status == 200
        assert listener_version(s.envoy) == good and natively_allowed(s, s.fake.token())
    finally:
        stop_security_stack(s)


def test_envoy_keeps_its_listener_while_the_service_is_down_and_follows_it_back(stack: SecurityStack) -> None:
    s = stack
    sha = serving(s)["sha256"]
    assert natively_allowed(s, s.fake.token())
    args = s.service.process.args
    s.service.process.stop()
    assert s.send("POST", "/transactions", s.fake.token(jti="fresh-while-down")).status == 200  # keys held by Envoy
    assert s.send("POST", "/transactions").status == 401  # decided natively
    unknown = s.fake.token(kid="kid-unknown", key=rsa_key("attacker"))
    assert s.send("POST", "/transactions", unknown).status == 503  # the service's to decide: fail closed
    assert listener_version(s.envoy) == sha
    # Back, with another policy (changed while it was down): it writes that one, Envoy follows.
    text = policy_text(s.fake, s.dev, routes=TIGHTER)
    s.policy.write(text)
    taken_up = listeners_taken_up(s.envoy)
    s.service.process = ManagedProcess(args, s.work, name="authz-service-again").start()
    wait_for_http(f"http://127.0.0.1:{s.service.http_port}/readyz", 60, expect_status=200, proc=s.service.process)
    assert serving(s)["sha256"] == parse_policy(text).sha256 != sha
    wait_for_listener(s.envoy, serving(s)["sha256"], taken_up)  # the restarted service's listener
    assert s.send("POST", "/transactions", s.fake.token(scope="transactions/post")).status == 403


def test_a_second_service_on_the_same_directory_is_refused_and_writes_nothing(stack: SecurityStack) -> None:
    """Two writers of one directory would each overwrite the other's listener, Envoy enforcing
    whichever wrote last while the first service reports its own policy as written."""
    s = stack
    xds = s.service.native_xds_dir
    assert xds is not None
    written = (xds / "listeners.json").read_bytes()
    sha = serving(s)["sha256"]
    other = s.work / "other.yaml"
    other.write_text(policy_text(s.fake, s.dev, routes=TIGHTER))
    attempts = lds(s.envoy, "update_attempt")
    second = cli("serve", "--policy", str(other), "--native-xds-dir", str(xds), "--native-listen",
                 f"127.0.0.1:{free_port()}", "--grpc-port", str(free_port()), "--http-port", str(free_port()))
    line = assert_one_clean_line(second, f"--native-xds-dir {xds} (AUTHZ_NATIVE_XDS_DIR): another authz-service "
                                         f"(pid {s.service.process.pid}) writes Envoy's listener there")
    assert "native listener written" not in second.stdout, line
    assert (xds / "listeners.json").read_bytes() == written
    status, ready = s.service.readyz()
    assert status == 200 and ready["native"]["written_sha256"] == sha == listener_version(s.envoy)
    assert lds(s.envoy, "update_attempt") == attempts
    assert natively_allowed(s, s.fake.token(scope="transactions/post"))  # the other policy would refuse it


def another_program_writes(s: SecurityStack, text: str) -> str:
    """Replace the listener file as another program would (a service of before the directory's lock,
    a hand edit): the listener of the policy ``text``, for this stack's addresses; its sha256."""
    from authz_service.config import settings_from
    from authz_service.native.bootstrap import compile_policy
    from authz_service.native.control import options_for
    from authz_service.native.xds import LISTENERS_FILE, listener_text, write_atomically

    xds = s.service.native_xds_dir
    assert xds is not None
    settings = settings_from({"policy": "/p", "native_xds_dir": str(xds), "grpc_port": str(s.service.grpc_port),
                              "http_port": str(s.service.http_port),
                              "native_listen": f"127.0.0.1:{s.service.native_listen_port}"}, {})
    policy = parse_policy(text)
    write_atomically(xds / LISTENERS_FILE, listener_text(compile_policy(policy, options_for(settings))))
    return policy.sha256


def test_a_listener_file_changed_by_another_program_is_written_again(stack: SecurityStack) -> None:
    """The service checks the file at every policy poll (a stat): Envoy goes back to the serving policy."""
    s = stack
    sha = serving(s)["sha256"]
    writes = s.service.sample("authz_native_listener_writes_total", result="ok")
    foreign = another_program_writes(s, policy_text(s.fake, s.dev, routes=TIGHTER))
    assert foreign != sha
    s.service.process.wait_until(
        lambda: s.service.sample("authz_native_listener_writes_total", result="ok") > writes, 30, "written again")
    s.envoy.wait_until(lambda: listener_version(s.envoy) == sha, 30, "Envoy back on the serving policy")
    assert s.service.readyz()[1]["native"]["written_sha256"] == sha
    assert natively_allowed(s, s.fake.token(scope="transactions/post"))  # the foreign policy would refuse it


def test_sighup_writes_a_changed_listener_file_again(tmp_path: Path, upstream: UpstreamProcess,
                                                     envoy_factory) -> None:
    """Polls an hour apart: only SIGHUP makes the service look at the file before then."""
    s = start_xds_security_stack(tmp_path, upstream, envoy_factory, "--policy-watch", "poll", "--policy-poll-interval", "3600")
    try:
        sha = serving(s)["sha256"]
        taken_up = listeners_taken_up(s.envoy)
        foreign = another_program_writes(s, policy_text(s.fake, s.dev, routes=TIGHTER))
        wait_for_listener(s.envoy, foreign, taken_up)  # Envoy follows the directory, whoever wrote it
        assert s.send("POST", "/transactions", s.fake.token(scope="transactions/post")).status == 403
        taken_up = listeners_taken_up(s.envoy)
        assert s.service.process.proc is not None
        s.service.process.proc.send_signal(signal.SIGHUP)
        wait_for_listener(s.envoy, sha, taken_up)
        assert s.service.readyz()[1]["native"]["written_sha256"] == sha
        assert natively_allowed(s, s.fake.token(scope="transactions/post"))
    finally:
        stop_security_stack(s)


def test_a_new_key_is_accepted_after_the_service_refetches_then_natively(tmp_path: Path, upstream: UpstreamProcess,
                                                                         envoy_factory) -> None:
    """The issuer rotates: a token of its new key is accepted once the service re-fetched the keys
    for the unknown kid (its cool-down since the start-up fetch), and decided natively once Envoy
    fetched the service's keys again (every --native-jwks-cache seconds: 5, as shipped). The
    figures over several rounds: bench/native_rotation.py."""
    s = start_xds_security_stack(tmp_path, upstream, envoy_factory, fake=FakeIssuer("us-east-1_Keys00001").start())
    try:
        assert natively_allowed(s, s.fake.token())
        refetched = {"issuer": s.fake.pool, "trigger": "unknown_kid", "result": "ok"}
        refetches = s.service.total("authz_jwks_refreshes_total", **refetched)
        checks = service_checks(s.envoy)
        s.fake.keys["kid-2"] = rsa_key("kid-2")  # the issuer publishes a new key and signs with it
        rotated = time.monotonic()
        token = s.fake.token(kid="kid-2")
        first = wait_for(lambda: (a := s.send("POST", "/transactions", token)).status != 401 and a, 30,
                         "the new key accepted")
        accepted = time.monotonic() - rotated
        assert first.status == 200 and first.reached_upstream
        # Accepted by the service, after its one re-fetch of the issuer's keys for the unknown kid.
        assert service_checks(s.envoy) > checks
        assert s.service.total("authz_jwks_refreshes_total", **refetched) == refetches + 1
        fetched = envoy_fetches(s.envoy)
        s.envoy.wait_until(lambda: envoy_fetches(s.envoy) > fetched, 30, "Envoy's next fetch of the service's keys")
        s.envoy.wait_until(lambda: natively_allowed(s, token), 30, "the new key accepted natively")
        native = time.monotonic() - rotated
        print(f"\nkey rotation (xDS form): a token of the new key accepted {accepted:.2f} s after the issuer "
              f"published it, natively after {native:.2f} s")
    finally:
        stop_security_stack(s)


def test_the_issuer_down_changes_nothing_for_envoy(tmp_path: Path, upstream: UpstreamProcess,
                                                   envoy_factory) -> None:
    """The issuer down: the service keeps its last good keys and goes on serving them to Envoy,
    which goes on deciding natively; a token of a key nobody holds is refused (401, not 503)."""
    s = start_xds_security_stack(tmp_path, upstream, envoy_factory, "--jwks-refresh-interval", "0.5", "--native-jwks-cache", "2")
    try:
        s.fake.stop()
        failures = s.service.total("authz_jwks_refreshes_total", result="error")
        wait_for(lambda: s.service.total("authz_jwks_refreshes_total", result="error") > failures, 30,
                 "the service's refresh failing")
        fetched = envoy_fetches(s.envoy)
        wait_for(lambda: envoy_fetches(s.envoy) > fetched, 30, "Envoy fetching the service's keys since")
        assert natively_allowed(s, s.fake.token(jti="never-seen"))  # verified with the keys the service kept
        unknown = s.send("POST", "/transactions", s.fake.token(kid="kid-unknown", key=rsa_key("attacker")))
        assert (unknown.status, unknown.error) == (401, "invalid_token") and not unknown.reached_upstream
        assert s.service.readyz()[0] == 200
    finally:
        stop_security_stack(s)


# --- metrics: native decisions with the service's labels --------------------------------------------


def decision_requests(s: SecurityStack) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """One request of each kind of decision, native or the service's, as (method, path, headers)."""
    fake = s.fake

    def bearer(token: str) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {token}")]

    writer, reader = fake.token(scope="transactions/post"), fake.token("payments-reader", "transactions/get")
    return [
        ("POST", "/transactions", bearer(writer)),  # allowed
        ("GET", "/transactions/7", bearer(reader)),  # allowed
        ("GET", "/transactions/8", bearer(reader)),  # allowed, again
        ("POST", "/transactions", []),  # missing_token
        ("POST", "/transactions", bearer(reader)),  # insufficient_scope
        ("GET", "/admin/report", bearer(writer)),  # insufficient_scope, another route
        ("POST", "/transactions", bearer(fake.token("outsider", "transactions/post"))),  # client_not_allowed
        ("POST", "/transactions", bearer(fake.token(scope="transactions/post", token_use="id"))),  # wrong_token_use
        ("GET", "/healthz", []),  # public
        ("GET", "/unknown", bearer(writer)),  # no_route
        ("POST", "/transactions", [("x-http-method-override", "GET"), *bearer(writer)]),  # bad_request
        ("POST", "/transactions", bearer(fake.token(key=rsa_key("attacker")))),  # bad_signature: the service's
        ("POST", "/transactions", bearer(fake.token(exp=int(time.time()) - 3600))),  # expired: the service's
    ]


def service_decisions(s: SecurityStack) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(s.service.metrics()):
        for sample in family.samples:
            if sample.name == "authz_check_decisions_total":
                labels = sample.labels
                counts[(labels["decision"], labels["reason"], labels["route"], labels["status"])] += int(sample.value)
    return counts


def counted_both_ways(s: SecurityStack, envoy_factory, requests: list[tuple[str, str, list[tuple[str, str]]]],
                      native_count: int) -> tuple[Counter, Counter]:
    """``requests`` through an ext_authz Envoy (the service decides all) and through the native one
    (Envoy decides what it can): the service's counts of the first are the sum of the service's and
    Envoy's counts of the second, label for label. Returns (Envoy's, the service's in native mode)."""
    reference = envoy_factory(s.service.grpc_port)

    def through(envoy: EnvoyProcess) -> list[int]:
        return [http_request(method, envoy.url(path), headers)[0] for method, path, headers in requests]

    before = service_decisions(s)
    statuses = through(reference)
    by_service = service_decisions(s) - before
    before, native_before = service_decisions(s), native_decisions(s.envoy)
    assert through(s.envoy) == statuses
    native = wait_for(lambda: (n := native_decisions(s.envoy) - native_before) and sum(n.values()) >= native_count
                      and n, 10, "Envoy's native decision stats")
    in_native_mode = service_decisions(s) - before
    assert in_native_mode + native == by_service, (in_native_mode, native, by_service)
    return native, in_native_mode


def test_native_decisions_are_counted_as_the_service_counts_them(stack: SecurityStack, envoy_factory) -> None:
    """One request of each kind of decision, counted alike in both modes (counted_both_ways)."""
    s = stack
    native, in_native_mode = counted_both_ways(s, envoy_factory, decision_requests(s), 11)
    assert native == Counter({
        ("allow", "allowed", "create-transaction", "200"): 1, ("allow", "allowed", "get-transaction", "200"): 2,
        ("deny", "missing_token", "create-transaction", "401"): 1,
        ("deny", "insufficient_scope", "create-transaction", "403"): 1,
        ("deny", "insufficient_scope", "admin", "403"): 1,
        ("deny", "client_not_allowed", "create-transaction", "401"): 1,
        ("deny", "wrong_token_use", "create-transaction", "401"): 1,
        ("allow", "public", "healthz", "200"): 1, ("deny", "no_route", "no_route", "403"): 1,
        ("deny", "bad_request", "no_route", "400"): 1})
    assert set(in_native_mode) == {("deny", "bad_signature", "create-transaction", "401"),
                                   ("deny", "expired", "create-transaction", "401")}


ADMIN_ITEM = """\
  - name: admin-item
    methods: [GET]
    path: /admin/report/{id}
    scopes: [transactions/get]
"""


def test_a_trailing_slash_under_two_protected_routes_is_counted_with_the_route_that_denied(
        stack: SecurityStack, envoy_factory) -> None:
    """/admin/report/7/ must meet /admin/** as written, then /admin/report/{id} without the '/':
    Envoy decides it and labels the decision as the service does: allowed as the first route, a
    denial with the route that denied (its checks come second: their own stats logger)."""
    s = stack
    taken_up = listeners_taken_up(s.envoy)
    serve(s, policy_text(s.fake, s.dev, ADMIN_ITEM))
    wait_for_listener(s.envoy, serving(s)["sha256"], taken_up)
    fake = s.fake

    def bearer(scope: str) -> list[tuple[str, str]]:
        return [("Authorization", f"Bearer {fake.token(scope=scope)}")]

    requests = [("GET", "/admin/report/7/", bearer("admin/all transactions/get")),  # allowed
                ("GET", "/admin/report/7/", bearer("admin/all")),  # insufficient_scope: admin-item's
                ("GET", "/admin/report/7/", bearer("transactions/get")),  # insufficient_scope: admin's
                ("GET", "/admin/report/7/", []),  # missing_token: admin's, the first route
                ("GET", "/transactions/7/", bearer("transactions/get"))]  # no /** route takes it: no_route
    native, in_native_mode = counted_both_ways(s, envoy_factory, requests, len(requests))
    assert native == Counter({
        ("allow", "allowed", "admin", "200"): 1, ("deny", "insufficient_scope", "admin-item", "403"): 1,
        ("deny", "insufficient_scope", "admin", "403"): 1, ("deny", "missing_token", "admin", "401"): 1,
        ("deny", "no_route", "no_route", "403"): 1})
    assert not in_native_mode
