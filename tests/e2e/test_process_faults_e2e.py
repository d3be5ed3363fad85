"""Process faults under concurrent traffic through a real Envoy: the authz service killed (-9) and
restarted, a graceful restart, the policy file replaced by garbage, and the policy alternated
between two versions. Every request carries a spoofed ``x-auth-client-id: spoofed``; the upstream's
log proves that nothing reached the app without the service's decision (the service replaces that
header only on an allow)."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .harness import ManagedProcess, UpstreamProcess, wait_for, wait_for_http
from .security_stack import Answer, SecurityStack, policy_text, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e

SPOOF = [("x-auth-client-id", "spoofed")]


Kind = tuple[str, str, "str | None"]  # method, path, token


@dataclass
class Traffic:
    """Worker threads sending requests from ``kinds`` until stopped; every answer is recorded. Each
    request carries a unique ``x-test-id``; ``reached()`` maps ids to what the upstream received."""

    stack: SecurityStack
    kinds: dict[str, Kind]
    workers: int = 4
    results: list[tuple[float, str, Answer]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._run_id = uuid.uuid4().hex[:12]
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.workers)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        names = sorted(self.kinds)
        while not self._stop.is_set():
            kind = rng.choice(names)
            method, path, token = self.kinds[kind]
            test_id = f"{self._run_id}-{seed}-{next(self._ids)}"
            started = time.monotonic()
            try:
                answer = self.stack.send(method, path, token, [*SPOOF, ("x-test-id", test_id)], observe=False)
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                self.errors.append(exc)
                return
            answer.headers["x-test-id"] = test_id
            answer.headers["x-test-started"] = repr(started)
            with self._lock:
                self.results.append((time.monotonic(), kind, answer))

    def __enter__(self) -> "Traffic":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_more(self, n: int, timeout: float = 60) -> None:
        target = self.count() + n

        def reached() -> bool:
            assert not self.errors, self.errors
            return self.count() >= target

        wait_for(reached, timeout, f"{n} more answers (traffic stalled)", poll=0.02)

    def reached(self) -> dict[str, list[dict]]:
        """What the upstream received, by x-test-id (call after the traffic stopped)."""
        out: dict[str, list[dict]] = {}
        for line in self.stack.upstream.request_log.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            for test_id in record["headers"].get("x-test-id", []):
                if test_id.startswith(self._run_id):
                    out.setdefault(test_id, []).append(record)
        return out

    def since(self, t: float) -> list[tuple[str, Answer]]:
        with self._lock:
            return [(k, a) for ts, k, a in self.results if ts >= t]


def assert_no_upstream_request_without_decision(stack: SecurityStack, traffic: Traffic) -> None:
    """Every tagged request the app received was answered 200 to its client and carries the identity
    the service set; nothing reached the app that the client did not get a 200 for."""
    reached = traffic.reached()
    answered = {a.headers["x-test-id"]: a for _, _, a in traffic.results}
    assert set(reached) <= set(answered), "the app received requests no client got an answer for"
    for test_id, answer in answered.items():
        assert (answer.status == 200) == (test_id in reached), (answer.status, test_id)
        assert len(reached.get(test_id, [])) <= 1
    for records in reached.values():
        for seen in records:
            headers = seen["headers"]
            assert headers.get("x-auth-client-id") in (None, ["payments-writer"]), headers.get("x-auth-client-id")
            if seen["path"] == "/transactions":
                # Only the writer's token can reach the protected route, and only with the identity the
                # service set (a request without a decision would still carry "spoofed"). The token
                # itself stays behind: the service removes Authorization from what it allows.
                assert "authorization" not in headers
                assert headers["x-auth-client-id"] == ["payments-writer"]


@pytest.fixture
def stack(tmp_path: Path, upstream: UpstreamProcess, envoy_factory, mode: str) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path, upstream, envoy_factory, mode=mode)
    yield s
    stop_security_stack(s)


def restart_service(stack: SecurityStack) -> None:
    """Stop the service (SIGTERM, unless it is dead already) and start it again with the same CLI on
    the same ports."""
    process = stack.service.process
    process.stop()
    fresh = ManagedProcess(process.args, stack.work, name="authz-service-restarted", env=dict(os.environ)).start()
    stack.service.process = fresh
    wait_for_http(f"http://127.0.0.1:{stack.service.http_port}/readyz", 60, expect_status=200, proc=fresh)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
def test_service_killed_or_restarted_under_traffic_fails_closed_and_resumes(stack: SecurityStack, how: int) -> None:
    writer = stack.dev.token("payments-writer")
    reader = stack.dev.token("payments-reader")
    kinds = {
        "writer": ("POST", "/transactions", writer),
        "reader": ("POST", "/transactions", reader),
        "anonymous": ("POST", "/transactions", None),
        "admin": ("GET", "/admin/x", writer),
    }
    # Anonymous requests beyond Envoy's anonymous token bucket get its 429 (never reaching the service).
    allowed = {"writer": {200, 503}, "reader": {403, 503}, "anonymous": {401, 429, 503}, "admin": {403, 503}}
    with Traffic(stack, kinds) as traffic:
        traffic.wait_more(40)
        down_at = time.monotonic()
        if how == signal.SIGKILL:
            os.kill(stack.service.process.pid, signal.SIGKILL)  # the process we started, by its pid
            stack.service.process.proc.wait(60)
            killed_at = time.monotonic()
            traffic.wait_more(40)  # traffic while nothing listens on the authz port
            with traffic._lock:  # requests that started after the service was gone
                down_answers = [a for _, _, a in traffic.results if float(a.headers["x-test-started"]) > killed_at]
            assert down_answers and all(a.status == 503 for a in down_answers), Counter(a.status for a in down_answers)
        restart_service(stack)
        up_at = time.monotonic()
        wait_for(lambda: any(k == "writer" and a.status == 200 for k, a in traffic.since(up_at)), 60,
                 "service resumed after the restart")
        traffic.wait_more(40)
    assert not traffic.errors, traffic.errors
    by_kind: dict[str, Counter] = {}
    for _, kind, answer in traffic.results:
        by_kind.setdefault(kind, Counter())[answer.status] += 1
        assert answer.status in allowed[kind], (kind, answer.status, answer.body)
    assert_no_upstream_request_without_decision(stack, traffic)
    assert by_kind["writer"][200] > 0
    if how == signal.SIGKILL:
        assert sum(c[503] for c in by_kind.values()) > 0
    print(f"\n{signal.Signals(how).name} restart under traffic: {dict(by_kind)} (down {up_at - down_at:.1f}s)")


GARBAGE: list[tuple[str, bytes | None]] = [
    ("not-yaml", b"routes: [this is: not a policy"),
    ("binary", bytes(range(256)) * 4),
    ("empty", b""),
    ("wrong-schema", b"issuers: []\nroutes: []\n"),
    ("deep", b"[" * 5000 + b"]" * 5000),
    ("dangling-symlink", None),
]


def test_policy_replaced_by_garbage_while_serving_keeps_the_old_policy(stack: SecurityStack) -> None:
    writer = stack.dev.token("payments-writer")
    reader = stack.dev.token("payments-reader")
    kinds = {
        "writer": ("POST", "/transactions", writer),
        "reader": ("POST", "/transactions", reader),
        "public": ("GET", "/healthz", None),
    }
    expected = {"writer": 200, "reader": 403, "public": 200}
    with Traffic(stack, kinds) as traffic:
        for name, text in GARBAGE:
            errors = stack.service.sample("authz_policy_reloads_total", result="error")
            if text is None:
                target = os.readlink(stack.policy.root / "..data")
                os.rename(stack.policy.root / target, stack.policy.root / (target + ".gone"))
            else:
                stack.policy.write(text.decode("latin-1") if name == "binary" else text.decode())
            wait_for(lambda: stack.service.sample("authz_policy_reloads_total", result="error") > errors, 60,
                     f"{name}: garbage noticed")
            traffic.wait_more(20)
            if text is None:
                os.rename(stack.policy.root / (target + ".gone"), stack.policy.root / target)
        stack.service.process.check_alive()
    assert not traffic.errors, traffic.errors
    for _, kind, answer in traffic.results:
        if kind == "public" and (answer.status, answer.error) == (429, "rate_limited"):
            continue  # Envoy's anonymous token bucket answered: no policy was consulted
        assert answer.status == expected[kind], (kind, answer.status, answer.body)
    assert_no_upstream_request_without_decision(stack, traffic)


VERSION_B_ROUTES = """\
  - name: create-transaction-b
    methods: [POST]
    path: /transactions
    scopes: [transactions/get]
  - name: reports-b
    methods: [GET]
    path: /reports/**
    public: true
  - name: healthz
    methods: [GET]
    path: /healthz
    public: true
"""


def test_policy_alternated_under_load_each_answer_matches_exactly_one_version(stack: SecurityStack) -> None:
    a = policy_text(stack.fake, stack.dev, """  - name: reports-a
    methods: [GET]
    path: /reports/**
    scopes: [transactions/get]
""")
    b = policy_text(stack.fake, stack.dev, routes=VERSION_B_ROUTES)
    writer = stack.dev.token("payments-writer")
    reader = stack.dev.token("payments-reader")
    kinds = {
        "writer-post": ("POST", "/transactions", writer),
        "reader-post": ("POST", "/transactions", reader),
        "anon-reports": ("GET", "/reports/daily", None),
        "anon-admin": ("GET", "/admin/x", None),
    }
    # (status, body error) under version A and under version B.
    outcome = {
        "writer-post": {"A": (200, None), "B": (403, "insufficient_scope")},
        "reader-post": {"A": (403, "insufficient_scope"), "B": (200, None)},
        "anon-reports": {"A": (401, "unauthorized"), "B": (200, None)},
        "anon-admin": {"A": (401, "unauthorized"), "B": (403, "access_denied")},
    }
    stack.policy.write(a)
    wait_for(lambda: stack.send("GET", "/reports/daily").status == 401, 60, "version A serving")
    reloads = stack.service.sample("authz_policy_reloads_total", result="ok")
    with Traffic(stack, kinds) as traffic:
        for i in range(16):
            stack.policy.write(b if i % 2 == 0 else a)
            # Next version as soon as this one serves (the reloader waits for a file to hold still
            # for one poll interval, so a fixed pause could skip versions on a busy machine).
            wait_for(lambda: stack.service.sample("authz_policy_reloads_total", result="ok") >= reloads + i + 1,
                     60, f"version {'B' if i % 2 == 0 else 'A'} #{i} loaded")
            traffic.wait_more(2)
        traffic.wait_more(20)
    assert not traffic.errors, traffic.errors
    seen = Counter()
    for _, kind, answer in traffic.results:
        got = (answer.status, answer.error if answer.status != 200 else None)
        if kind.startswith("anon-") and got == (429, "rate_limited"):
            continue  # Envoy's anonymous token bucket answered: no policy version was consulted
        versions = [v for v, expected in outcome[kind].items() if expected == got]
        assert len(versions) == 1, (kind, got, answer.body)
        seen[versions[0]] += 1
    reached = traffic.reached()
    for _, kind, answer in traffic.results:
        got = reached.get(answer.headers["x-test-id"], [])
        assert len(got) == (1 if answer.status == 200 else 0), (kind, answer.status)
        for record in got:
            who = record["headers"].get("x-auth-client-id")
            assert who == {"writer-post": ["payments-writer"], "reader-post": ["payments-reader"]}.get(kind), who
    assert seen["A"] > 0 and seen["B"] > 0, seen
    assert stack.service.sample("authz_policy_reloads_total", result="ok") >= reloads + 8
    assert stack.service.sample("authz_policy_reloads_total", result="error") == 0
    print(f"\npolicy alternated 16 times under load: {sum(seen.values())} answers, {dict(seen)}")
