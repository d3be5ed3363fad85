"""Keeps the serving policy in step with its file, without restarts.

Kubernetes updates a mounted ConfigMap by swapping the ``..data`` symlink, so the file's inode
changes while its path stays. We therefore poll the *path* (``os.stat`` follows symlinks) and
compare identity, size, mtime and finally content hash; SIGHUP forces a reload. A file that fails
to load is logged and counted, and the previous policy keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .metrics import Metrics
from .policy import Policy, PolicyError, load_policy_file

log = logging.getLogger(__name__)


_UNSET = object()


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class PolicyReloader:
    """Owns the current Policy; readers take ``reloader.policy`` once per request (atomic swap)."""

    def __init__(
        self,
        path: Path,
        policy: Policy,
        metrics: Metrics,
        on_change: Callable[[Policy], None] = lambda policy: None,
    ) -> None:
        self.path = path
        self.policy = policy
        self._metrics = metrics
        self._on_change = on_change
        self._seen = _signature(path)
        self._pending: object = _UNSET  # a changed signature waiting to prove it is stable
        self._lock = asyncio.Lock()
        self.last_error: str | None = None

    async def reload(self, reason: str) -> bool:
        """Load the file now; True when a new policy started serving."""
        async with self._lock:
            self._seen = _signature(self.path)
            try:
                policy = await asyncio.to_thread(load_policy_file, self.path)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old policy serving
                if not isinstance(exc, PolicyError):
                    exc = PolicyError(f"{self.path}: cannot load policy: {type(exc).__name__}")
                self.last_error = str(exc)
                self._metrics.policy_reloads.labels("error").inc()
                log.error("policy reload failed; previous policy keeps serving",
                          extra={"reason": reason, "error": str(exc), "serving_sha256": self.policy.sha256})
                return False
            self.last_error = None
            if policy.sha256 == self.policy.sha256:
                return False
            self.policy = policy  # one reference swap: a Check sees the old or the new policy whole
            self._metrics.policy_loaded(len(policy.routes), policy.sha256)
            self._on_change(policy)
            log.info("policy reloaded", extra={"reason": reason, "routes": len(policy.routes),
                                               "issuers": len(policy.issuers), "sha256": policy.sha256})
            return True

    async def watch(self, interval: float) -> None:
        """Poll the path forever (cancel to stop)."""
        while True:
            await asyncio.sleep(interval)
            await self.poll()

    async def poll(self) -> bool:
        """One poll: reload once a change has stayed put for a whole poll interval.

        Why wait: a file rewritten in place (an editor, ``cp``, a shell redirect) can be caught half
        written, and a truncated policy may still parse with its last routes missing, letting a
        broader, weaker route match. A ConfigMap swap is atomic, so this only costs one interval.
        """
        current = _signature(self.path)
        if current == self._seen:
            self._pending = _UNSET
            return False
        if current != self._pending:
            self._pending = current
            return False
        self._pending = _UNSET
        return await self.reload("file changed")
