"""The service inside the image, run the way deploy/k8s/deployment.yaml runs it, for the image tests.

``podman run`` stays in the foreground: its client forwards SIGTERM to the service, so
``ManagedProcess.stop`` drains the service as the kubelet would. The container shares the host's
network, as the containers of one Pod share theirs: Envoy and the issuers on 127.0.0.1 reach it,
and it reaches them. Killing the podman client does not stop a container, so
``ContainerProcess.stop`` also removes the container, whatever happened before.

``make image`` builds the image and ``make image-test`` (or ``make test``) names it in
``AUTHZTEST_IMAGE``. The podman settings the CI machine needs (docs/image.md): the runc runtime
with cgroupfs, and no default ulimits (``containers.conf`` next to this file).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .harness import REPO_ROOT, RUN_MARKER, ManagedProcess

IMAGE_ENV = "AUTHZTEST_IMAGE"
PODMAN = ("podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs")
PODMAN_ENV = {"CONTAINERS_CONF": str(Path(__file__).with_name("containers.conf"))}
POLICY_MOUNT = "/etc/authz"  # where deploy/k8s mounts the policy ConfigMap (a directory, read-only)
RUN_LABEL = "authz-service.test-run"  # the run's marker: a container that outlived its test is found by it
# authz-service's securityContext in deploy/k8s/deployment.yaml, as podman flags: read-only root
# filesystem (with the manifest's emptyDir at /tmp, and none of podman's own tmpfs mounts), UID and
# GID 10001, every capability dropped, no privilege escalation; the Pod's network.
MANIFEST_FLAGS = ("--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp", "--user", "10001:10001",
                  "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--network", "host")

_names = itertools.count()


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One podman command, its output captured (the caller checks the return code)."""
    return subprocess.run([*PODMAN, *args], env={**os.environ, **PODMAN_ENV}, capture_output=True, text=True,
                          timeout=timeout)


def inspect(kind: str, name: str) -> dict[str, Any]:
    """``podman <kind> inspect`` of one image or container, as JSON."""
    result = podman(kind, "inspect", name)
    assert result.returncode == 0, f"podman {kind} inspect {name}: {result.stderr}"
    return json.loads(result.stdout)[0]


def run_labels() -> tuple[str, ...]:
    return ("--label", f"{RUN_LABEL}={os.environ.get(RUN_MARKER, 'none')}")


def leftover_containers() -> list[str]:
    """Containers of this test run that still exist."""
    result = podman("ps", "--all", "--filter", f"label={RUN_LABEL}={os.environ.get(RUN_MARKER, 'none')}",
                    "--format", "{{.Names}}")
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


class ContainerProcess(ManagedProcess):
    """``podman run --rm`` of ``image`` with ``args``, in the foreground, as the manifest runs it."""

    def __init__(self, image: str, args: Sequence[str], log_dir: str | os.PathLike[str], *,
                 mounts: Sequence[tuple[Path, str]] = (), name: str = "authz-service") -> None:
        self.container = f"authz-test-{os.getpid()}-{next(_names)}"
        volumes = [f"--volume={host}:{target}:ro" for host, target in mounts]
        super().__init__([*PODMAN, "run", "--rm", "--pull=never", "--name", self.container, *run_labels(),
                          *MANIFEST_FLAGS, *volumes, image, *args],
                         log_dir, name, env={**os.environ, **PODMAN_ENV})

    def host_pid(self) -> int:
        """The service's pid as the host sees it (the container's pid 1)."""
        return int(inspect("container", self.container)["State"]["Pid"])

    def exists(self) -> bool:
        return podman("container", "exists", self.container).returncode == 0

    def stop(self) -> int | None:
        try:
            return super().stop()
        finally:
            podman("rm", "--force", "--ignore", "--time", "0", self.container)


def in_image(image: str, log_dir: Path) -> Callable[[list[str]], ContainerProcess]:
    """A ``start_service`` launcher: the CLI's arguments run in ``image``, the ``--policy`` file's
    directory mounted read-only where deploy/k8s mounts the policy ConfigMap."""

    def launch(args: list[str]) -> ContainerProcess:
        args = list(args)
        at = args.index("--policy") + 1
        policy = Path(args[at])
        args[at] = f"{POLICY_MOUNT}/{policy.name}"
        return ContainerProcess(image, args, log_dir, mounts=[(policy.parent, POLICY_MOUNT)])

    return launch


def dockerfile_base() -> str:
    """The Dockerfile's base image, as podman names it (Docker Hub's library/ namespace)."""
    for line in (REPO_ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM ") and line.endswith(" AS builder"):
            name = line.split()[1]
            return name if "/" in name else f"docker.io/library/{name}"
    raise AssertionError("Dockerfile: no `FROM <base> AS builder` line")
