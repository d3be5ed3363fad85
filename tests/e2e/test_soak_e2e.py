"""Bounded soak through a real Envoy: thousands of distinct tokens and paths, a random mix of allowed
and denied requests, each checked against an oracle; every request the app received must carry the
identity of the token that was sent. Reports requests, distinct tokens/paths, RSS and metric series.

``make test`` runs it for 20 s; ``make soak`` (``SOAK_SECONDS``, default 300) runs it longer.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authz_service.decision import Reason

from .fake_issuer import rsa_key
from .harness import UpstreamProcess
from .security_stack import SecurityStack, start_security_stack, stop_security_stack

pytestmark = pytest.mark.e2e

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
COVERAGE = 200  # more requests, distinct tokens and distinct paths than this, however slow the machine
WORKERS = 4
ROUTE_NAMES = {"create-transaction", "get-transaction", "admin", "healthz", "docs", "no_route"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess,
          module_envoy_factory) -> Iterator[SecurityStack]:
    s = start_security_stack(tmp_path_factory.mktemp("soak"), upstream, module_envoy_factory)
    yield s
    stop_security_stack(s)


@dataclass(frozen=True)
class Cred:
    token: str | None
    valid: bool  # signature, issuer, times, token_use, client allow-list all fine
    client_id: str | None
    scopes: frozenset[str]


def expected_status(method: str, path: str, cred: Cred) -> int:
    """Oracle for the security-stack policy, written from the policy text, not from policy.py."""
    segs = path.split("?", 1)[0][1:].split("/")
    if method == "POST" and segs == ["transactions"]:
        need = "transactions/post"
    elif method == "GET" and len(segs) == 2 and segs[0] == "transactions" and segs[1]:
        need = "transactions/get"
    elif segs[0] == "admin":
        need = "admin/all"
    elif method == "GET" and (segs == ["healthz"] or segs[0] == "public"):
        return 200
    else:
        return 403
    if cred.token is None or not cred.valid:
        return 401
    return 200 if need in cred.scopes else 403


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def decision_series(stack: SecurityStack) -> set[tuple[tuple[str, str], ...]]:
    out = set()
    for family in text_string_to_metric_families(stack.service.metrics()):
        for sample in family.samples:
            if sample.name == "authz_check_decisions_total":
                out.add(tuple(sorted(sample.labels.items())))
    return out


def test_soak_zero_wrong_decisions_flat_memory_bounded_series(stack: SecurityStack) -> None:
    rng = random.Random(42)
    dev_clients = {"payments-writer": {"transactions/post"}, "payments-reader": {"transactions/get"},
                   "reporting": {"transactions/get", "transactions/post"}}
    # Real tokens from the dev issuer's /oauth2/token (distinct jti each), topped up by the workers
    # with tokens signed by the fake issuer's key (any scopes and clients, ~1 ms each).
    dev_tokens = [Cred(stack.dev.token(c), True, c, frozenset(dev_clients[c]))
                  for c in itertools.islice(itertools.cycle(dev_clients), 150)]
    forged_bad = stack.fake.token(key=rsa_key("attacker"))

    def fresh_cred(r: random.Random) -> Cred:
        roll = r.random()
        if roll < 0.55:
            client = r.choice(["payments-writer", "payments-reader", "payments-writer", "reporting"])
            scopes = frozenset(s for s in ("transactions/post", "transactions/get", "admin/all", "transactions/postx",
                                           "transactions") if r.random() < 0.4)
            return Cred(stack.fake.token(client, " ".join(sorted(scopes))), client != "reporting", client, scopes)
        if roll < 0.8:
            return r.choice(dev_tokens)
        if roll < 0.87:
            return Cred(stack.fake.token(exp=int(time.time()) - 600), False, None, frozenset())
        if roll < 0.92:
            return Cred(forged_bad, False, None, frozenset())
        if roll < 0.95:
            return Cred("x" + uuid.uuid4().hex, False, None, frozenset())
        return Cred(None, False, None, frozenset())

    def fresh_request(r: random.Random) -> tuple[str, str]:
        pick = r.random()
        ident = uuid.uuid4().hex[: r.randint(4, 24)]
        if pick < 0.35:
            return "POST", "/transactions"
        if pick < 0.6:
            return "GET", f"/transactions/{ident}"
        if pick < 0.7:
            return r.choice(["GET", "POST", "DELETE"]), f"/admin/{ident}"
        if pick < 0.8:
            return "GET", f"/public/{ident}/{ident[:3]}?q={ident}"
        if pick < 0.85:
            return "GET", "/healthz"
        return r.choice(["GET", "PUT", "POST"]), f"/{ident}/transactions"

    # Warm up (imports, caches, every decision kind), then measure.
    for _ in range(100):
        cred = fresh_cred(rng)
        method, path = fresh_request(rng)
        stack.send(method, path, cred.token, observe=False)
    pid = stack.service.process.pid
    rss_start = rss_kib(pid)
    series_start = decision_series(stack)

    records: list[tuple[str, str, str, Cred, int]] = []
    sent_tokens: set[str] = set()
    sent_paths: set[str] = set()
    failures: list[BaseException] = []
    lock = threading.Lock()
    run_id = uuid.uuid4().hex[:12]
    deadline = time.monotonic() + SOAK_SECONDS
    give_up = deadline + 600  # a bound for a machine too slow to reach the coverage below, never reached normally

    def covered() -> bool:
        """The soak runs for SOAK_SECONDS AND until it sent what it must cover, however busy the machine."""
        with lock:
            return len(records) > COVERAGE and len(sent_tokens) > COVERAGE and len(sent_paths) > COVERAGE

    def worker(seed: int) -> None:
        r = random.Random(seed)
        n = 0
        try:
            while (time.monotonic() < deadline or not covered()) and time.monotonic() < give_up:
                cred = fresh_cred(r)
                method, path = fresh_request(r)
                test_id = f"{run_id}-{seed}-{n}"
                n += 1
                answer = stack.send(method, path, cred.token, [("x-auth-client-id", "spoofed"), ("x-test-id", test_id)],
                                    observe=False)
                with lock:
                    records.append((test_id, method, path, cred, answer.status))
                    if cred.token:
                        sent_tokens.add(cred.token)
                    sent_paths.add(path)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(WORKERS)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(give_up + 60 - time.monotonic())
    elapsed = time.monotonic() - started
    assert not failures, failures
    stack.service.process.check_alive()
    rss_end = rss_kib(pid)
    series_end = decision_series(stack)

    # What reached the app, by test id (the echo upstream logs before it answers).
    reached: dict[str, list[dict]] = {}
    for line in stack.upstream.request_log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        for test_id in record["headers"].get("x-test-id", []):
            if test_id.startswith(run_id):
                reached.setdefault(test_id, []).append(record)

    wrong = []
    unauthorized_upstream = []
    statuses: Counter = Counter()
    for test_id, method, path, cred, status in records:
        statuses[status] += 1
        want = expected_status(method, path, cred)
        if status != want:
            wrong.append((method, path, cred.client_id, sorted(cred.scopes), cred.valid, status, want))
        got = reached.get(test_id, [])
        if len(got) != (1 if status == 200 else 0):
            unauthorized_upstream.append((test_id, status, len(got)))
        for seen in got:
            public = expected_status(method, path, Cred(None, False, None, frozenset())) == 200
            identity = seen["headers"].get("x-auth-client-id")
            if identity != (None if public else [cred.client_id]):
                unauthorized_upstream.append((test_id, "identity", identity))
    assert len(reached) == len({t for t, *_ in records if t in reached})  # nothing untracked reached the app

    tokens = {c.token for *_, c, _ in records if c.token}
    paths = {p for _, _, p, _, _ in records}
    labels = {name: {dict(s)[name] for s in series_end} for name in ("decision", "reason", "route", "status")}
    print(f"\nsoak {elapsed:.0f}s through Envoy: {len(records)} requests ({len(records) / elapsed:.0f}/s), "
          f"{len(tokens)} distinct tokens, {len(paths)} distinct paths, statuses {dict(sorted(statuses.items()))}; "
          f"wrong decisions {len(wrong)}, upstream requests without authorization {len(unauthorized_upstream)}; "
          f"service RSS {rss_start / 1024:.1f} MiB -> {rss_end / 1024:.1f} MiB; "
          f"authz_check_decisions_total series {len(series_start)} -> {len(series_end)}")
    assert wrong == [], wrong[:20]
    assert unauthorized_upstream == [], unauthorized_upstream[:20]
    assert len(records) > COVERAGE and len(tokens) > COVERAGE and len(paths) > COVERAGE
    assert {200, 401, 403} <= set(statuses)
    # Labels come from closed sets and the policy, never from the request, so the series count is
    # bounded by routes x reasons however many distinct paths and tokens were sent.
    assert labels["route"] <= ROUTE_NAMES
    assert labels["reason"] <= {r.value for r in Reason}
    assert labels["decision"] <= {"allow", "deny", "dry_run_deny"}
    assert labels["status"] <= {"200", "400", "401", "403", "500", "503"}
    assert len(series_end) <= len(ROUTE_NAMES) * len(Reason) < len(paths)
    assert rss_end - rss_start < 50 * 1024, (rss_start, rss_end)
