"""Keeps the serving policy in step with its file, without restarts, and never loads half a file.

A policy file rewritten in place can be caught half written, and a truncated policy may still
parse with its last routes missing, letting a broader, weaker route match. So a file is loaded only
when it is complete. How we know depends on the watch mode (``--policy-watch``):

* inotify (Linux; ``auto`` picks it when it works). A change loads when its writer closes the file
  (``IN_CLOSE_WRITE``) or when a finished file appears at the path (``IN_MOVED_TO``/``IN_CREATE``/
  ``IN_DELETE``/``IN_ATTRIB`` in the directory: a rename into place, and the kubelet's ``..data``
  symlink swap for ConfigMap volumes). While a writer has the file open (``IN_MODIFY`` seen, no close
  yet) nothing loads, not even on SIGHUP. We watch the path's directory and, when the path resolves
  elsewhere (symlinks), the target file and its directory. Every ``--policy-poll-interval`` the
  watches are re-armed and the path re-checked as a safety net for what inotify cannot report (an
  event queue overflow, a change made by another host of a network filesystem).
* polling (no inotify: not Linux, or the inotify limits are exhausted; or ``--policy-watch poll``).
  Every interval the path is stat-ed (``os.stat`` follows symlinks, so the ``..data`` swap shows as a
  new inode) and a change loads once it has held still for one whole interval. A writer that pauses
  longer than that mid-file can have its prefix loaded: the weaker mode, logged as such at start-up.

SIGHUP reloads at once. A file that fails to load is logged and counted, and the previous policy
keeps serving. While the file at the path is refused, ``authz_policy_file_refused`` says so (with the
refused content's sha256): the serving policy is fine, but a process started now would not start,
so the state, not the one failed load, is what needs fixing. It ends when a good file loads or the
file is put back to the policy in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .policy import Policy, PolicyError, deny_list_sizes, load_policy_file, read_policy_file
from .tracing import NO_TRACING, NoTracing, Recorder
from .waiting import set_within

log = logging.getLogger(__name__)

_UNSET = object()


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _content_sha256(path: Path) -> str | None:
    """sha256 of a refused file's content, read as a load reads it; None when it cannot be read."""
    try:
        return hashlib.sha256(read_policy_file(path)).hexdigest()
    except PolicyError:
        return None


class PolicyRecord(Protocol):
    """Where a reloader records its loads: metrics.Metrics for the policy, metrics.ShadowMetrics
    for a shadow policy."""

    def policy_loaded(self, routes: int, sha256: str, *, deny_client_ids: int = 0, deny_jtis: int = 0) -> None: ...

    def policy_load_failed(self, refused_sha256: str | None) -> None: ...

    def policy_file_accepted(self) -> None: ...


class InotifyUnavailable(OSError):
    """inotify cannot watch the policy here (not Linux, limits exhausted, ...); the text says why."""


class _Inotify:
    """The inotify side of the reloader: which inodes are watched and what their events mean.

    Watches (re-armed whenever the directory structure changes, since a swap changes the target):
    the directory of the path, and when the path resolves to a regular file elsewhere, that file
    and its directory. Only regular targets are watched: a path pointing at /dev would otherwise
    watch a directory every process writes to (/dev/null).
    """

    def __init__(self, path: Path) -> None:
        try:
            from inotify_simple import INotify, flags
        except ImportError as exc:  # not installed (the dependency is Linux-only)
            raise InotifyUnavailable(f"the inotify_simple package is not available ({exc})") from None
        self._flags = flags
        self._dir_mask = (
            flags.CREATE
            | flags.DELETE
            | flags.MOVED_TO
            | flags.MOVED_FROM
            | flags.ATTRIB
            | flags.MODIFY
            | flags.CLOSE_WRITE
            | flags.DELETE_SELF
            | flags.MOVE_SELF
        )
        self._file_mask = flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB | flags.DELETE_SELF | flags.MOVE_SELF
        self._structure = (
            flags.CREATE
            | flags.DELETE
            | flags.MOVED_TO
            | flags.MOVED_FROM
            | flags.DELETE_SELF
            | flags.MOVE_SELF
            | flags.IGNORED
            | flags.UNMOUNT
        )
        try:
            self._inotify = INotify(nonblocking=True)
        except (OSError, AttributeError) as exc:  # AttributeError: a libc without inotify_init1
            reason = (
                "the inotify instance limit (fs.inotify.max_user_instances) is reached"
                if getattr(exc, "errno", None) == errno.EMFILE
                else f"{type(exc).__name__}: {exc}"
            )
            raise InotifyUnavailable(reason) from None
        self.path = Path(os.path.abspath(path))
        self._names: dict[int, set[str]] = {}  # wd -> names of interest in it ("" = the watched file itself)
        self._target: tuple[int, int] | None = None  # (dev, ino) of the file the watches were armed for
        # (dev, ino) of the target while a writer has it open: IN_MODIFY seen, IN_CLOSE_WRITE not yet.
        self.writing: tuple[int, int] | None = None
        self.lost_events = False  # the kernel's queue overflowed: writer state unknown until re-checked
        try:
            self.arm()
        except OSError:
            self.close()
            raise

    def fileno(self) -> int:
        return self._inotify.fileno()

    def close(self) -> None:
        self._inotify.close()

    def arm(self) -> None:
        """(Re)place the watches for what the path resolves to now. InotifyUnavailable when the kernel
        refuses a watch for a reason other than a path that is gone (e.g. fs.inotify.max_user_watches)."""
        wanted: dict[int, set[str]] = {}

        def add(where: Path, mask: int, name: str) -> None:
            try:
                wd = self._inotify.add_watch(where, mask)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP):
                    return  # gone or unreachable: the directory watch sees it come back
                if exc.errno == errno.ENOSPC:
                    raise InotifyUnavailable(
                        "the inotify watch limit (fs.inotify.max_user_watches) is reached"
                    ) from None
                raise InotifyUnavailable(f"cannot watch {where}: {exc.strerror or exc}") from None
            wanted.setdefault(wd, set()).add(name)

        add(self.path.parent, self._dir_mask, self.path.name)
        target = Path(os.path.realpath(self.path))
        try:
            st = os.stat(target)
            identity = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None
        except OSError:
            identity = None
        if identity is not None:
            add(target.parent, self._dir_mask, target.name)
            add(target, self._file_mask, "")
        for wd in set(self._names) - set(wanted):
            with contextlib.suppress(OSError):  # already gone (its inode was deleted)
                self._inotify.rm_watch(wd)
        self._names = wanted
        if identity != self._target:
            self.writing = None  # another file now: what a writer does to the old one no longer matters
        self._target = identity

    def absorb(self) -> bool:
        """Read every queued event; True when the file may have new content that its signature
        (inode, size, mtime) might not show: a writer closed it, or its attributes changed.

        Updates ``writing``. Runs before any load decision (also SIGHUP's): events are queued by the
        kernel at write time, so a writer's IN_MODIFY is seen before a signal sent after it.
        A structural event re-arms at once, so the events after it are read against the new target
        (``rm f; cat > f`` is a new file being written, not the old one).
        """
        flags = self._flags
        content = False
        try:
            events = self._inotify.read(timeout=0)
        except OSError as exc:
            raise InotifyUnavailable(f"cannot read inotify events: {exc.strerror or exc}") from None
        for event in events:
            if event.mask & flags.Q_OVERFLOW:  # events were lost: a writer may have gone unseen
                self.writing = None
                self.lost_events = True
                self.arm()
                continue
            names = self._names.get(event.wd)
            if names is None:
                continue  # a watch already replaced: its inode is no longer what the path names
            if event.mask & self._structure:
                self.arm()
            elif event.name not in names:
                continue  # another file in a watched directory
            elif event.mask & flags.CLOSE_WRITE:
                self.writing = None
                content = True
            elif event.mask & flags.MODIFY:
                self.writing = self._target
            elif event.mask & flags.ATTRIB:
                content = True
        return content


class PolicyReloader:
    """Owns the current Policy; readers take ``reloader.policy`` once per request (atomic swap).

    ``what`` names the file in its log lines and trace spans: "policy", or "shadow policy" for the
    candidate of ``serve --shadow-policy`` (shadow.py), which may start with none (``current`` None:
    its file did not load) and records its loads in its own series."""

    def __init__(
        self,
        path: Path,
        policy: Policy | None,
        metrics: PolicyRecord,
        on_change: Callable[[Policy], None] = lambda policy: None,
        tracing: NoTracing = NO_TRACING,
        loader: Callable[[Path], Policy] | None = None,
        what: str = "policy",
    ) -> None:
        self.path = path
        self.what = what
        # Runs in a worker thread; PolicyError refuses the file. Native mode's also compiles it
        # for Envoy (native/control.py), so a policy Envoy cannot be given is refused too.
        # None: load_policy_file.
        self._loader = loader
        self._tracing = tracing
        self.current = policy
        self._metrics = metrics
        self._on_change = on_change
        self._seen = _signature(path)
        self._pending: object = _UNSET  # a changed signature waiting to prove it is stable
        self._lock = asyncio.Lock()
        self._inotify: _Inotify | None = None
        self._fallback_reason = "--policy-watch poll"
        self._told_writer: tuple[int, int] | None = None
        self.last_error: str | None = None
        self.refused_sha256: str | None = None  # of the refused file at the path (None: none, or unreadable)

    @property
    def policy(self) -> Policy:
        """The policy in force (the service's always has one: it does not start without)."""
        current = self.current
        if current is None:
            raise LookupError(f"no {self.what} loaded from {self.path}")
        return current

    @property
    def serving_sha256(self) -> str | None:
        return self.current.sha256 if self.current is not None else None

    @property
    def mode(self) -> str:
        return "inotify" if self._inotify is not None else "poll"

    def open_watch(self, mode: str = "auto") -> None:
        """Set up inotify for ``auto``/``inotify``; ``inotify`` raises InotifyUnavailable rather than
        fall back to polling (for operators who require complete-file loads)."""
        if mode == "poll":
            return
        try:
            self._inotify = _Inotify(self.path)
        except InotifyUnavailable as exc:
            if mode == "inotify":
                raise InotifyUnavailable(
                    f"--policy-watch inotify: cannot watch {self.path}: {exc}; fix that, or "
                    "use --policy-watch auto to fall back to polling"
                ) from None
            self._fallback_reason = f"inotify unavailable: {exc}"

    async def reload(self, reason: str) -> bool:
        """Load the file now (SIGHUP), unless its writer still has it open; True when a new policy serves."""
        self._absorb()
        if self._inotify is not None and self._inotify.writing is not None:
            log.warning(
                f"{self.what} reload deferred: the file is open for writing (modified, not closed yet); "
                "it loads when the writer closes it",
                extra={"reason": reason, "path": str(self.path), "serving_sha256": self.serving_sha256},
            )
            return False
        return await self._load(reason)

    async def _load(self, reason: str) -> bool:
        """One load, traced as a root span: trigger, result (ok, unchanged, error, or reread: the
        file changed while it was read) and the sha256 of the policy serving afterwards."""
        with self._tracing.root(f"{self.what} reload", **{"authz.policy.trigger": reason}) as recorder:
            loaded = await self._load_file(reason, recorder)
            if self.current is not None:
                recorder.set("authz.policy.sha256", self.current.sha256)
            return loaded

    async def _load_file(self, reason: str, recorder: Recorder) -> bool:
        async with self._lock:
            before = self._seen = _signature(self.path)
            self._pending = _UNSET
            try:
                policy = await asyncio.to_thread(self._loader or load_policy_file, self.path)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old policy serving
                if self._written_while_read(before):
                    recorder.set("authz.policy.result", "reread")
                    return False
                if not isinstance(exc, PolicyError):
                    exc = PolicyError(f"{self.path}: cannot load policy: {type(exc).__name__}")
                refused = await asyncio.to_thread(_content_sha256, self.path)
                if self._written_while_read(before):  # what was hashed may not be what was refused
                    recorder.set("authz.policy.result", "reread")
                    return False
                recorder.set("authz.policy.result", "error")
                recorder.error(f"{self.what} refused; the previous {self.what} keeps serving")
                self.last_error = str(exc)
                self.refused_sha256 = refused
                self._metrics.policy_load_failed(refused)
                log.error(
                    f"{self.what} reload failed; previous {self.what} keeps serving",
                    extra={
                        "reason": reason,
                        "error": str(exc),
                        "serving_sha256": self.serving_sha256,
                        "refused_sha256": refused,
                    },
                )
                return False
            if self._written_while_read(before):
                recorder.set("authz.policy.result", "reread")
                return False
            self.last_error = self.refused_sha256 = None
            self._metrics.policy_file_accepted()
            if policy.sha256 == self.serving_sha256:
                recorder.set("authz.policy.result", "unchanged")
                if reason == "SIGHUP":  # asked for by an operator, who should learn it arrived
                    log.info(
                        f"{self.what} unchanged: the file is the {self.what} in force",
                        extra={"reason": reason, "sha256": policy.sha256},
                    )
                return False
            recorder.set("authz.policy.result", "ok")
            recorder.set("authz.policy.routes", len(policy.routes))
            self.current = policy  # one reference swap: a Check sees the old or the new policy whole
            deny = deny_list_sizes(policy)
            self._metrics.policy_loaded(len(policy.routes), policy.sha256, **deny)
            self._on_change(policy)
            log.info(
                f"{self.what} reloaded",
                extra={
                    "reason": reason,
                    "routes": len(policy.routes),
                    "issuers": len(policy.issuers),
                    "sha256": policy.sha256,
                    **deny,  # an incident's deny list change is confirmed in the log too
                },
            )
            return True

    def _written_while_read(self, before: tuple[int, int, int, int] | None) -> bool:
        """True when a writer started on the file between the decision to load and the end of the
        read: what was read may be a prefix. It is dropped; the writer's close (or the next poll,
        which sees the new signature) loads the file again."""
        self._absorb()
        if _signature(self.path) == before and (self._inotify is None or self._inotify.writing is None):
            return False
        log.info(
            f"{self.what} file changed while it was read; it loads again once complete", extra={"path": str(self.path)}
        )
        return True

    async def watch(self, interval: float) -> None:
        """Follow the file forever (cancel to stop); ``interval`` is the poll or safety re-check period."""
        if self._inotify is not None:
            log.info(
                f"{self.what} file watched with inotify: a change loads once its writer has closed the file",
                extra={"path": str(self.path), "safety_recheck_seconds": interval},
            )
            await self._follow_events(interval)
        log.warning(
            f"{self.what} file watched by polling, the weaker mode: a writer that pauses mid-file for longer "
            "than the interval can have its partial file loaded; replace the file by a rename (as "
            "Kubernetes does) instead of rewriting it in place",
            extra={"path": str(self.path), "reason": self._fallback_reason, "interval_seconds": interval},
        )
        while True:
            await asyncio.sleep(interval)
            await self.poll()

    async def _follow_events(self, interval: float) -> None:
        """Until inotify fails (then the caller polls): load on events, re-check every interval."""
        assert self._inotify is not None
        wake = asyncio.Event()
        asyncio.get_running_loop().add_reader(self._inotify.fileno(), wake.set)
        try:
            while self._inotify is not None:
                woke = await set_within(wake, interval)
                wake.clear()
                if self._inotify is None:  # failed meanwhile (a SIGHUP's read of the events)
                    break
                await (self.handle_events() if woke else self._recheck())
        finally:
            self._stop_inotify()

    def _fall_back(self, exc: InotifyUnavailable) -> None:
        """inotify failed while serving: say why, and poll from now on (``watch`` logs the switch)."""
        self._fallback_reason = str(exc)
        self._stop_inotify()

    def _stop_inotify(self) -> None:
        if self._inotify is not None:
            asyncio.get_running_loop().remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None

    def _absorb(self) -> bool:
        """Events so far (see ``_Inotify.absorb``); when inotify fails, polling takes over."""
        if self._inotify is None:
            return False
        try:
            content = self._inotify.absorb()
        except InotifyUnavailable as exc:
            self._fall_back(exc)
            return False
        writing = self._inotify.writing
        if writing is not None and writing != self._told_writer:
            log.info(
                f"{self.what} file is open for writing; it loads when the writer closes it",
                extra={"path": str(self.path)},
            )
        self._told_writer = writing
        return content

    async def handle_events(self) -> None:
        """Read the queued inotify events and load the file if it changed and no writer has it open."""
        content = self._absorb()
        if self._inotify is None or self._inotify.writing is not None:
            return
        if self._inotify.lost_events:  # a writer may be unseen: a change must hold still, as when polling
            self._inotify.lost_events = False
            await self.poll()
        elif content or _signature(self.path) != self._seen:
            await self._load("file changed")

    async def _recheck(self) -> None:
        """The safety net: re-arm, and treat a change no event explained as a poll would."""
        if self._inotify is None:
            return
        try:
            self._inotify.arm()
        except InotifyUnavailable as exc:
            self._fall_back(exc)
            return
        await self.poll()

    async def poll(self) -> bool:
        """One poll: reload once a change has stayed put for a whole poll interval.

        Why wait: a file rewritten in place (an editor, ``cp``, a shell redirect) can be caught half
        written. A ConfigMap swap is atomic, so this only costs one interval. Used when inotify is
        unavailable, and as inotify's safety net.
        """
        self._absorb()
        if self._inotify is not None and self._inotify.writing is not None:
            return False  # a writer has the file open: its close will load it
        current = _signature(self.path)
        if current == self._seen:
            self._pending = _UNSET
            return False
        if current != self._pending:
            self._pending = current
            return False
        self._pending = _UNSET
        return await self._load("file changed")
