"""The image as it ships: what it contains, and the product's core cases with the service inside it.

The service runs in the container the way deploy/k8s/deployment.yaml runs it (read-only root
filesystem, UID 10001, every capability dropped, no privilege escalation, the policy from a
read-only directory mount), on the host's network, behind a real Envoy of each ext_authz mode on the
host, with tokens from the dev issuer over HTTP. ``make image-test`` (and ``make test``) builds the
image and names it in ``AUTHZTEST_IMAGE``; without it these tests are skipped.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from .container import IMAGE_ENV, POLICY_MOUNT, ContainerProcess, dockerfile_base, in_image, inspect, \
    leftover_containers, podman
from .harness import REPO_ROOT, UpstreamProcess, http_request, wait_for
from .security_stack import SecurityStack, policy_text, start_security_stack, stop_security_stack
from .stack import start_service

pytestmark = pytest.mark.image

LOCK = REPO_ROOT / "requirements" / "image.txt"
IMAGE_DOC = REPO_ROOT / "docs" / "image.md"
EXPECTED_PORTS = {"9191/tcp", "8181/tcp", "9192/tcp"}  # ext_authz gRPC, health/metrics, the HTTP door
REPORTS_ROUTE = """\
  - name: reports
    methods: [GET]
    path: /reports/**
    scopes: [transactions/get]
"""


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    """The image under test; every container these tests start is gone when the module ends."""
    name = os.environ.get(IMAGE_ENV)
    if not name:
        pytest.skip(f"{IMAGE_ENV} is not set: `make image-test` builds the image and runs these tests")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: `make image-deps` installs it")
    assert podman("image", "exists", name).returncode == 0, f"no image {name}: `make image` builds it"
    yield name
    left = leftover_containers()
    for container in left:
        podman("rm", "--force", "--time", "0", container)
    assert not left, f"containers outlived their tests (removed now): {left}"


def run_python(image: str, script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """``python -c script`` inside the image, read-only as the manifest runs it; its stdout."""
    env_flags = [flag for name, value in (env or {}).items() for flag in ("--env", f"{name}={value}")]
    result = podman("run", "--rm", "--pull=never", "--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
                    "--network", "none", *env_flags, "--entrypoint", "python", image, "-c", script, *args)
    assert result.returncode == 0, f"python in the image failed:\n{result.stdout}{result.stderr}"
    return result.stdout


# --- contents -------------------------------------------------------------------------------------

CONTENTS = """
import ensurepip, importlib.metadata, importlib.util, json, pathlib, shutil, subprocess, sys, sysconfig
wheel_dirs = [pathlib.Path(ensurepip.__file__).parent / "_bundled", sysconfig.get_config_var("WHEEL_PKG_DIR")]
print(json.dumps({
    "distributions": sorted(d.metadata["Name"] for d in importlib.metadata.distributions()),
    "importable": [m for m in ("pip", "setuptools", "wheel") if importlib.util.find_spec(m)],
    "executables": [x for x in ("pip", "pip3", "cc", "gcc", "c++", "g++", "clang", "ld", "as", "make")
                    if shutil.which(x)],
    "ensurepip_wheels": [str(p) for d in wheel_dirs if d for p in pathlib.Path(d).glob("*.whl")],
    "ensurepip": subprocess.run([sys.executable, "-m", "ensurepip", "--root", "/tmp/pip"],
                                capture_output=True).returncode,
}))
"""


def locked_names() -> set[str]:
    return {line.split("==")[0] for line in LOCK.read_text().splitlines() if re.match(r"[a-z0-9]", line)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_image_holds_exactly_the_lock_and_nothing_that_installs_or_builds(image: str) -> None:
    found = json.loads(run_python(image, CONTENTS))
    installed = {canonical(name) for name in found["distributions"]}
    assert installed == locked_names() | {"authz-service"}, (
        f"not in requirements/image.txt: {sorted(installed - locked_names() - {'authz-service'})}; "
        f"locked but missing: {sorted(locked_names() - installed)}")
    assert found["importable"] == [], "pip or a build backend is importable"
    assert found["executables"] == [], "pip or a compiler toolchain is on PATH"
    assert found["ensurepip_wheels"] == [], "ensurepip could bring pip or setuptools back"
    assert found["ensurepip"] != 0, "python -m ensurepip installed pip"


def test_the_image_reads_policies_with_libyaml(image: str) -> None:
    """PyYAML's wheel brings libyaml; its own pure-Python parser costs ~5x the CPU per reload."""
    script = "from authz_service import yamlfile; print(yamlfile.Loader.__mro__[1].__name__)"
    assert run_python(image, script).strip() == "CSafeLoader"


def test_the_image_runs_as_uid_10001_and_exposes_the_three_ports(image: str) -> None:
    config = inspect("image", image)["Config"]
    assert config["User"] == "10001:10001"
    assert set(config["ExposedPorts"]) == EXPECTED_PORTS
    assert config["Entrypoint"] == ["authz-service"] and config["Cmd"] == ["serve"]


def test_the_image_stays_within_the_size_budget_docs_state(image: str) -> None:
    """docs/image.md states the budget for what the image adds to its base (the base is not ours)."""
    budget = re.search(r"size budget: \*\*(\d+) MB\*\*", IMAGE_DOC.read_text())
    assert budget, "docs/image.md states no `size budget: **N MB**`"
    added = inspect("image", image)["Size"] - inspect("image", dockerfile_base())["Size"]
    assert added <= int(budget[1]) * 10**6, f"the image adds {added / 1e6:.0f} MB to its base; budget {budget[1]} MB"


SCAN = """
import os, sys
needles = [bytes.fromhex(n) for n in sys.argv[1:]]
found = []
for top in ("/usr", "/etc", "/opt", "/root", "/home", "/var", "/srv", "/run"):
    for folder, _, files in os.walk(top):
        for name in files:
            path = os.path.join(folder, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > 64 << 20:
                    continue
                with open(path, "rb") as fh:
                    data = fh.read()
            except OSError:
                continue
            found += [path for needle in needles if needle in data]
print("\\n".join(sorted(set(found))))
"""


MARKER = REPO_ROOT / "tests" / "data" / "build-ca-marker.pem"


def test_the_build_ca_bundle_stays_out_of_the_image(image: str) -> None:
    """`make image` gives the build its CA bundle as a secret (here: the TLS-intercepting proxy's)
    with a marker certificate appended, made for this check (its key was discarded): no file of the
    image may hold the marker, as PEM or as DER."""
    bundle = os.environ.get("AUTHZTEST_BUILD_CA")
    if not bundle:
        pytest.skip("AUTHZTEST_BUILD_CA is not set: the image was built without a CA bundle")
    marker = MARKER.read_text()
    assert marker in Path(bundle).read_text(), f"{bundle} lacks the marker certificate: `make image` appends it"
    pem_body = "".join(marker.splitlines(keepends=True)[1:-1])
    needles = [ssl.PEM_cert_to_DER_cert(marker).hex(), pem_body.encode().hex()]
    found = run_python(image, SCAN, *needles).split()
    assert found == [], f"the build's CA bundle ended up in the image: {found}"


# --- the service inside the image, behind Envoy -----------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess, module_envoy_factory, mode: str,
          image: str) -> Iterator[SecurityStack]:
    work = tmp_path_factory.mktemp("image-stack")
    stack = start_security_stack(work, upstream, module_envoy_factory, mode=mode, launch=in_image(image, work))
    yield stack
    stop_security_stack(stack)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


@pytest.mark.e2e
def test_the_service_runs_as_the_manifest_runs_it(stack: SecurityStack) -> None:
    process = stack.service.process
    assert isinstance(process, ContainerProcess)
    pid = process.host_pid()
    status = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    assert status["Uid"].split()[:2] == ["10001", "10001"] and status["Gid"].split()[:2] == ["10001", "10001"]
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0 and int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    mounts = {fields[4]: fields[5].split(",") for fields in
              (line.split() for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines())}
    assert "ro" in mounts["/"], "the root filesystem is writable"
    assert "ro" in mounts[POLICY_MOUNT], "the policy mount is writable"


@pytest.mark.e2e
def test_allowed_request_reaches_the_app_with_the_identity(stack: SecurityStack) -> None:
    answer = stack.send("POST", "/transactions", stack.dev.token("payments-writer"))
    assert answer.status == 200
    [seen] = answer.reached_upstream
    assert seen["headers"]["x-auth-client-id"] == ["payments-writer"]
    assert seen["headers"]["x-auth-scopes"] == ["transactions/post"]
    assert seen["headers"]["x-auth-sub"] == ["payments-writer"]


@pytest.mark.e2e
def test_missing_token_is_401_with_a_bearer_challenge(stack: SecurityStack) -> None:
    answer = stack.send("POST", "/transactions")
    assert answer.status == 401 and answer.reached_upstream == []
    assert answer.headers["www-authenticate"] == 'Bearer realm="authz-service"'


@pytest.mark.e2e
def test_invalid_token_is_401_invalid_token(stack: SecurityStack) -> None:
    token = stack.dev.token("payments-writer")
    header, payload, signature = token.split(".")
    forged = base64.urlsafe_b64encode(b'{"scope":"admin/all"}').rstrip(b"=").decode()
    answer = stack.send("POST", "/transactions", f"{header}.{forged}.{signature}")
    assert answer.status == 401 and answer.reached_upstream == []
    assert answer.error == "invalid_token"


@pytest.mark.e2e
def test_valid_token_without_the_scope_is_403_insufficient_scope(stack: SecurityStack) -> None:
    answer = stack.send("POST", "/transactions", stack.dev.token("payments-reader"))
    assert answer.status == 403 and answer.reached_upstream == []
    assert answer.error == "insufficient_scope"
    assert 'scope="transactions/post"' in answer.headers["www-authenticate"]


@pytest.mark.e2e
def test_public_route_needs_no_token(stack: SecurityStack) -> None:
    answer = stack.send("GET", "/healthz")
    assert answer.status == 200 and len(answer.reached_upstream) == 1


@pytest.mark.e2e
def test_readiness_reports_the_policy_and_the_keys(stack: SecurityStack) -> None:
    status, body = stack.service.readyz()
    assert status == 200 and body["ready"] is True
    assert body["policy"]["sha256"]
    assert {i["issuer"] for i in body["issuers"]} == {stack.fake.issuer, stack.dev.issuer}
    assert all(issuer["keys"] > 0 for issuer in body["issuers"]), body["issuers"]


@pytest.mark.e2e
def test_a_policy_change_in_the_mounted_directory_is_reloaded(stack: SecurityStack) -> None:
    token = stack.dev.token("payments-reader")
    assert stack.send("GET", "/reports/2026", token).status == 403  # no route yet
    before = stack.service.readyz()[1]["policy"]["sha256"]
    try:
        stack.policy.write(policy_text(stack.fake, stack.dev, REPORTS_ROUTE))
        stack.service.process.wait_until(lambda: stack.service.readyz()[1]["policy"]["sha256"] != before, 30,
                                         "the changed policy loaded")
        answer = stack.send("GET", "/reports/2026", token)
        assert answer.status == 200 and len(answer.reached_upstream) == 1
    finally:
        stack.policy.write(policy_text(stack.fake, stack.dev))
        stack.service.process.wait_until(lambda: stack.service.readyz()[1]["policy"]["sha256"] == before, 30,
                                         "the original policy loaded again")


@pytest.mark.e2e
def test_sigterm_drains_and_exits_0_and_envoy_then_fails_closed(
        tmp_path: Path, image: str, stack: SecurityStack, envoy_factory, mode: str) -> None:
    """Its own container (the stack's keeps serving the other tests), behind its own Envoy."""
    service = start_service(tmp_path, stack.policy.path, launch=in_image(image, tmp_path))
    envoy = envoy_factory.for_service(service, mode)
    token = stack.dev.token("payments-writer")
    assert http_request("POST", envoy.url("/transactions"), bearer(token))[0] == 200

    process = service.process
    assert isinstance(process, ContainerProcess)
    assert process.proc is not None
    process.proc.send_signal(signal.SIGTERM)  # to the podman client, which forwards it to the service
    assert process.proc.wait(60) == 0
    assert '"msg":"shutting down"' in process.log_text()
    wait_for(lambda: not process.exists(), 30, "the container removed")
    assert http_request("POST", envoy.url("/transactions"), bearer(token))[0] == 503

