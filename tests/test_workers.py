"""Which policy `--workers`' workers serve, as the parent tells it (workers.policies_served,
policy_in_force, PolicyWorkers); the processes themselves run in tests/e2e/test_workers_e2e.py."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, generate_latest

from authz_service.workers import PolicyWorkers, _Worker, policies_served, policy_in_force

A, B = "a" * 64, "b" * 64


def exposed(served: dict[str, int]) -> str:
    registry = CollectorRegistry()
    registry.register(PolicyWorkers(lambda: served))
    return generate_latest(registry).decode()


def test_a_policy_is_in_force_once_every_live_worker_serves_it() -> None:
    served = policies_served([(A, True), (A, True)])
    assert (served, policy_in_force(served, 2)) == ({A: 2}, A)
    assert f'authz_policy_workers{{sha256="{A}"}} 2.0' in exposed(served)


def test_a_change_that_has_not_reached_every_worker_is_not_in_force() -> None:
    served = policies_served([(A, True), (B, True)])
    assert (served, policy_in_force(served, 2)) == ({A: 1, B: 1}, None)
    body = exposed(served)
    assert f'authz_policy_workers{{sha256="{A}"}} 1.0' in body and f'authz_policy_workers{{sha256="{B}"}} 1.0' in body


def test_a_worker_that_serves_none_yet_or_is_dead_keeps_a_policy_from_being_in_force() -> None:
    for other in (("", True), (B, False)):  # starting (no policy yet), or dead with the old one
        served = policies_served([(A, True), other])
        assert (served, policy_in_force(served, 2)) == ({A: 1}, None)
    assert exposed({}).count("authz_policy_workers{") == 0


def test_the_parent_never_waits_on_a_policy_array_a_killed_worker_left_locked() -> None:
    """A worker killed while it wrote its policy's sha256 holds that array's lock forever: the
    parent reads no policy for it (none in force) instead of blocking its event loop, and the next
    life of the worker gets an array of its own. (A fork context: its locks need no tracker process.)"""
    worker = _Worker(0, multiprocessing.get_context("fork"))
    worker.policy.value = A.encode()
    assert worker.served_policy() == A
    worker.policy.get_lock().acquire()  # as the killed worker left it
    with ThreadPoolExecutor(1) as pool:
        read = pool.submit(worker.served_policy)
        assert read.result(timeout=60) == ""  # a bound on the event, not a measurement
    worker.new_life()
    assert worker.served_policy() == ""
    worker.policy.value = B.encode()
    assert worker.served_policy() == B
