"""Policy files that must never serve, through the real CLI and a real Envoy: a file caught while its
writer pauses mid-way (a valid, more open prefix), a FIFO (blocked the reload thread, and with it
SIGTERM), /dev/zero and a 20 MB file (memory, minutes of parsing); at start-up and on reload. Also
the two watch modes: inotify loads in-place edits of the ConfigMap's target at once, and polling
announces itself as the weaker mode."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import UpstreamProcess, free_port
from .security_stack import SecurityStack, policy_text, serving, start_security_stack, stop_security_stack
from .stack import TRANSACTION_ROUTES, PolicyDir, cli, start_service

pytestmark = pytest.mark.e2e

# A policy whose last route protects /admin: cut before it, it is a valid policy that opens /admin
# (and everything else) to anyone.
OPEN_HEAD = TRANSACTION_ROUTES + """\
  - name: everything-else
    path: /**
    public: true
"""
ADMIN_TAIL = """\
  - name: admin
    path: /admin/**
    scopes: [admin/all]
"""
HUGE = 20_000_000

SPECIAL_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "fifo": (os.mkfifo, "not a regular file (a FIFO); point the policy path at a regular file"),
    "dev-zero": (lambda file: file.symlink_to("/dev/zero"), "not a regular file (a character device)"),
    "20MB": (lambda file: file.write_bytes(b"#" * HUGE),
             f"{HUGE} bytes is larger than a policy file may be (1048576 bytes, 1 MiB)"),
}


# Runs the CLI in a new user namespace whose inotify instance limit is 0 (the limits are per user
# namespace since Linux 5.11): inotify really is exhausted for the service, and only for it.
NO_INOTIFY = ("unshare", "--user", "--map-root-user", "sh", "-c",
              'echo 0 > /proc/sys/user/max_inotify_instances && exec "$@"', "sh")


def inotify_exhaustible() -> bool:
    try:
        probe = subprocess.run([*NO_INOTIFY, sys.executable, "-c", "import inotify_simple; inotify_simple.INotify()"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Too many open files" in probe.stderr


@pytest.fixture
def stack(request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamProcess,
          envoy_factory, mode: str) -> Iterator[SecurityStack]:
    args = getattr(request, "param", ())
    wrapper = ()
    if args and args[0] == "no-inotify":
        if not inotify_exhaustible():
            pytest.skip("cannot start a process in a user namespace with its own inotify limit (unshare)")
        args, wrapper = args[1:], NO_INOTIFY
    s = start_security_stack(tmp_path, upstream, envoy_factory, *args, wrapper=wrapper, mode=mode)
    try:
        yield s
    finally:
        stop_security_stack(s)


def assert_old_policy_serves(stack: SecurityStack) -> None:
    """The stack's own policy, seen through Envoy: /admin needs a scope, /reports has no route."""
    admin = stack.send("GET", "/admin/users")
    assert admin.status == 401 and not admin.reached_upstream, admin.body
    assert stack.send("GET", "/reports/daily").status != 200
    assert stack.send("POST", "/transactions", stack.dev.token("payments-writer")).status == 200


def test_a_writer_paused_mid_file_is_not_loaded_until_it_closes(stack: SecurityStack) -> None:
    """The writer rewrites the file in place (through the ConfigMap symlinks), flushes a valid, more
    open prefix and pauses until the service has demonstrably handled a later event: a SIGHUP, whose
    handling reads every inotify event queued before it. Nothing may load until the writer closes."""
    before = serving(stack)
    assert_old_policy_serves(stack)
    head = policy_text(stack.fake, stack.dev, routes=OPEN_HEAD)
    log = stack.service.process

    def sighups() -> int:
        return log.log_text().count('"reason":"SIGHUP"')

    handled = sighups()
    with open(stack.policy.path, "w") as writer:
        writer.write(head)
        writer.flush()
        os.kill(log.pid, signal.SIGHUP)
        log.wait_until(lambda: sighups() > handled or serving(stack)["sha256"] != before["sha256"], 15,
                       "the SIGHUP handled (or the prefix loaded)")
        assert serving(stack)["sha256"] == before["sha256"], "the half-written file was loaded"
        assert_old_policy_serves(stack)
        assert "policy reload deferred: the file is open for writing" in log.log_text()
        writer.write(ADMIN_TAIL)
    after = log.wait_until(lambda: (p := serving(stack))["sha256"] != before["sha256"] and p, 15,
                           "the complete file loaded after its writer closed it")
    assert after["routes"] == 4 and after["last_reload_error"] is None
    assert stack.send("GET", "/admin/users").status == 401  # the complete policy: /admin protected ...
    opened = stack.send("GET", "/reports/daily")  # ... and everything else public
    assert opened.status == 200 and len(opened.reached_upstream) == 1
    assert stack.service.sample("authz_policy_reloads_total", result="error") == 0


def refused_series(stack: SecurityStack) -> dict[str, float]:
    """sha256 label -> value of every ``authz_policy_file_refused`` sample the service exports."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["sha256"]: s.value for family in text_string_to_metric_families(stack.service.metrics())
            for s in family.samples if s.name == "authz_policy_file_refused"}


def test_a_refused_file_stays_visible_until_it_is_fixed(stack: SecurityStack) -> None:
    """A bad ConfigMap edit: the old policy keeps serving through Envoy, and the refused file is a
    state (gauge 1, its sha256) for as long as it stays on disk (a Pod starting now would not
    start), not one error; the fixed file clears it."""
    before = serving(stack)
    assert refused_series(stack) == {"": 0}
    bad = policy_text(stack.fake, stack.dev, "  - name: reports\n    path: /reports/**\n")  # no scopes
    errors = stack.service.sample("authz_policy_reloads_total", result="error")
    stack.policy.write(bad)
    bad_sha = hashlib.sha256(bad.encode()).hexdigest()
    stack.service.process.wait_until(lambda: refused_series(stack) == {bad_sha: 1}, 15, "the file refused")
    assert serving(stack) == {**before, "last_reload_error": serving(stack)["last_reload_error"],
                              "refused_sha256": bad_sha}
    assert "routes[" in serving(stack)["last_reload_error"]
    assert stack.service.sample("authz_policy_reloads_total", result="error") == errors + 1
    assert_old_policy_serves(stack)
    fixed = policy_text(stack.fake, stack.dev, ADMIN_TAIL.replace("admin", "reports"))
    stack.policy.write(fixed)
    stack.service.process.wait_until(lambda: refused_series(stack) == {"": 0}, 15, "the refusal cleared")
    after = serving(stack)
    assert after["sha256"] == hashlib.sha256(fixed.encode()).hexdigest()
    assert after["last_reload_error"] is None and after["refused_sha256"] is None
    assert stack.send("GET", "/reports/daily").status == 401  # the fixed policy serves


@pytest.mark.parametrize("stack", [("--policy-poll-interval", "3600")], indirect=True)
def test_an_in_place_edit_of_the_configmap_target_loads_on_close(stack: SecurityStack) -> None:
    """The path is a symlink into ..data/: the edited inode lives in another directory, which inotify
    watches too. The safety re-check is an hour away here, so only the close event can load it."""
    before = serving(stack)
    with open(stack.policy.path, "a") as writer:
        writer.write("  - name: reports\n    methods: [GET]\n    path: /reports/**\n    public: true\n")
    stack.service.process.wait_until(lambda: serving(stack)["sha256"] != before["sha256"], 15, "edit loaded")
    assert stack.send("GET", "/reports/daily").status == 200
    assert stack.send("GET", "/admin/users").status == 401


@pytest.mark.parametrize("stack", [("--policy-watch", "poll")], indirect=True)
def test_polling_is_announced_as_the_weaker_mode_and_still_reloads(stack: SecurityStack) -> None:
    log = stack.service.process.log_text()
    assert "policy file watched by polling, the weaker mode" in log and '"reason":"--policy-watch poll"' in log
    stack.policy.write(policy_text(stack.fake, stack.dev, ADMIN_TAIL.replace("admin", "reports")))
    stack.service.process.wait_until(lambda: stack.send("GET", "/reports/daily").status == 401, 15,
                                     "the swapped-in policy serving")


@pytest.mark.parametrize("stack", [("no-inotify",)], indirect=True)
def test_exhausted_inotify_limits_fall_back_to_polling_announced_as_weaker(stack: SecurityStack) -> None:
    log = stack.service.process.log_text()
    assert "policy file watched by polling, the weaker mode" in log
    assert "the inotify instance limit (fs.inotify.max_user_instances) is reached" in log
    stack.policy.write(policy_text(stack.fake, stack.dev, ADMIN_TAIL.replace("admin", "reports")))
    stack.service.process.wait_until(lambda: stack.send("GET", "/reports/daily").status == 401, 15,
                                     "the swapped-in policy serving")


def test_requiring_inotify_where_it_is_exhausted_refuses_to_start(tmp_path: Path) -> None:
    if not inotify_exhaustible():
        pytest.skip("cannot start a process in a user namespace with its own inotify limit (unshare)")
    path = tmp_path / "policy.yaml"
    path.write_text("issuers:\n  - user_pool_id: us-east-1_Abc123\nroutes:\n  - path: /a\n    public: true\n")
    result = subprocess.run(
        [*NO_INOTIFY, *cli("serve", "--policy", str(path), "--grpc-host", "127.0.0.1", "--grpc-port",
                           str(free_port()), "--http-host", "127.0.0.1", "--http-port", str(free_port()),
                           "--policy-watch", "inotify")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"authz-service: error: --policy-watch inotify: cannot watch {path}: the inotify instance limit "
        "(fs.inotify.max_user_instances) is reached; fix that, or use --policy-watch auto to fall back to polling"]


def test_inotify_mode_is_announced(stack: SecurityStack) -> None:
    assert "policy file watched with inotify" in stack.service.process.log_text()


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_a_special_or_huge_file_swapped_in_is_refused_and_the_old_policy_serves(
        stack: SecurityStack, kind: str) -> None:
    make, problem = SPECIAL_FILES[kind]
    errors = stack.service.sample("authz_policy_reloads_total", result="error")
    stack.policy.replace(make)
    stack.service.process.wait_until(
        lambda: stack.service.sample("authz_policy_reloads_total", result="error") > errors, 15, "reload refused")
    status, body = stack.service.readyz()
    assert status == 200 and body["policy"]["last_reload_error"].startswith(f"{stack.policy.path}: {problem}")
    assert_old_policy_serves(stack)
    # The reload thread is free: SIGTERM still ends the process (before the fix a FIFO blocked it).
    assert stack.service.process.exit_code_after(signal.SIGTERM) == 0


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_a_special_or_huge_file_at_start_up_exits_2_with_one_line(tmp_path: Path, kind: str, workers: str) -> None:
    make, problem = SPECIAL_FILES[kind]
    path = tmp_path / "policy.yaml"
    make(path)
    try:
        result = subprocess.run(
            cli("serve", "--policy", str(path), "--grpc-host", "127.0.0.1", "--grpc-port", str(free_port()),
                "--http-host", "127.0.0.1", "--http-port", str(free_port()), "--workers", workers),
            capture_output=True, text=True, timeout=60, preexec_fn=limit_memory,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"start-up with a {kind} at the policy path did not end")
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"authz-service: error: {path}: {problem}"), result.stderr


def limit_memory() -> None:
    """A regression that reads /dev/zero fails this one process, not the machine."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@contextlib.contextmanager
def writing_beside_the_policy(policy_dir: PolicyDir) -> Iterator[None]:
    """Append to a file next to the policy as fast as one thread can (Envoy's log in the Pod, say),
    until the block ends, also when it fails: every append is an inotify event in the watched folder."""
    stop = threading.Event()

    def append() -> None:
        while not stop.is_set():
            with open(policy_dir.root / "junk", "a") as junk:
                junk.write("x\n")

    writer = threading.Thread(target=append, name="junk-writer", daemon=True)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_exits_while_files_beside_the_policy_keep_changing(tmp_path: Path, workers: str) -> None:
    """The watcher wakes on every event in the policy's folder; a shutdown that cancels it in the same
    loop iteration as such a wake-up must still end it (it was lost: the process never exited and
    Kubernetes SIGKILLed it after the grace period; with --workers, the supervisor killed each worker
    once the grace had passed). The race is per SIGTERM, so several rounds."""
    policy_dir = PolicyDir(tmp_path / "policy")
    policy_dir.write("issuers:\n  - user_pool_id: us-east-1_Demo00001\n"
                     "    issuer: http://127.0.0.1:9/us-east-1_Demo00001\n"
                     "routes:\n  - path: /a\n    public: true\n")
    with writing_beside_the_policy(policy_dir):
        for _ in range(3):  # each round a new race
            service = start_service(tmp_path, policy_dir.path, "--workers", workers, wait_ready=False)
            assert service.process.exit_code_after(signal.SIGTERM) == 0, service.process.log_tail()
            assert "did not stop in time" not in service.process.log_text(), service.process.log_tail()
