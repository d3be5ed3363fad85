"""Native mode's Envoy heap against the cap (native/sizing.py): the cap read from the shipped
bootstrap, a policy that would not fit refused with a code and the fix, ``--heap-cap`` raising
the cap in the compiled bootstrap, and the expectation in compile envoy's report. (That the
expectation stays above a real Envoy's heap: tests/e2e/test_native_memory_e2e.py.)"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from authz_service.config import option
from authz_service.native.bootstrap import compile_policy
from authz_service.native.options import Options
from authz_service.native.sizing import HEAP_OVER_CAP, MIB, check_fits, heap_cap
from authz_service.policy import PolicyError, parse_policy

from . import envoyconf
from .e2e.harness import REPO_ROOT, sized_routes
from .test_native import cli

ISSUER = {"user_pool_id": "us-east-1_Test00001"}


def policy_text(routes: int) -> str:
    return yaml.safe_dump({"issuers": [ISSUER], "routes": sized_routes(routes)}, sort_keys=False)


def test_the_cap_is_the_shipped_bootstraps_and_serves_default() -> None:
    shipped = yaml.safe_load((REPO_ROOT / "envoy" / "envoy.yaml").read_text())
    assert heap_cap(shipped) == (160 * MIB, 0.80)  # reduce_timeouts starts scaling at 80%
    assert option("native_heap_cap").default * MIB == heap_cap(shipped)[0]


def test_a_policy_over_the_cap_is_refused_with_its_code_and_the_cap_it_needs() -> None:
    big = parse_policy(policy_text(1200))
    needed = compile_policy(big, Options(heap_cap_mib=1024)).heap.cap_needed_mib
    assert needed > 64
    with pytest.raises(PolicyError) as refused:
        compile_policy(big, Options(heap_cap_mib=64))
    assert refused.value.code == HEAP_OVER_CAP
    text = str(refused.value)
    assert f"at least {needed} here" in text and "Split the policy" in text
    assert "container's memory limit" in text and "gRPC or HTTP mode" in text
    with pytest.raises(PolicyError):
        compile_policy(big, Options(heap_cap_mib=needed - 1))
    compiled = compile_policy(big, Options(heap_cap_mib=needed))  # the cap it names is enough
    assert compiled.heap.fits and compiled.heap.cap_bytes == needed * MIB
    bootstrap = compiled.bootstrap()
    assert heap_cap(bootstrap)[0] == needed * MIB
    assert envoyconf.listener(bootstrap, "ingress")  # the rest compiled as ever


def test_the_expectation_grows_with_the_policy_and_fits_the_shipped_cap_for_hundreds_of_routes() -> None:
    small, large = (compile_policy(parse_policy(policy_text(n))).heap for n in (10, 600))
    assert small.expected_bytes < large.expected_bytes
    assert large.fits and large.cap_bytes == 160 * MIB


def test_compile_envoy_reports_the_heap_and_refuses_with_the_code(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_text(10))
    run = cli("compile", "envoy", str(policy), "-o", str(tmp_path / "envoy.yaml"))
    assert run.returncode == 0, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("  Envoy heap ")]
    assert "MiB expected at start" in line and "of the 160 MiB heap cap" in line
    report = json.loads(cli("compile", "envoy", str(policy), "--report", "json").stderr)["envoy_heap"]
    assert report["cap_bytes"] == 160 * MIB and report["fits"] is True
    assert 0 < report["expected_bytes"] < report["limit_bytes"]
    policy.write_text(policy_text(1200))
    run = cli("compile", "envoy", str(policy), "--heap-cap", "64")
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.rstrip().endswith(f"[{HEAP_OVER_CAP}]") and str(policy) in run.stderr
    run = cli("compile", "envoy", str(policy), "--heap-cap", "32")
    assert run.returncode == 2 and "--heap-cap 32: at least 64 MiB" in run.stderr


def test_the_xds_form_needs_room_for_the_old_listener_beside_the_new_one() -> None:
    """serve --native-xds-dir checks the policy's listener twice over (Envoy drains the old one
    while the new one serves), so a policy can fit a static bootstrap and not the xDS form."""
    at_rest = compile_policy(parse_policy(policy_text(900)), Options(heap_cap_mib=64)).heap
    assert at_rest.fits
    changing = replace(at_rest, changing=True)
    assert changing.needed_bytes > at_rest.needed_bytes == at_rest.expected_bytes and not changing.fits
    with pytest.raises(PolicyError) as refused:
        check_fits(changing, "policy.yaml", 600)
    assert refused.value.code == HEAP_OVER_CAP and "while a policy change holds" in str(refused.value)
    check_fits(replace(changing, cap_bytes=changing.cap_needed_mib * MIB), "policy.yaml", 600)


def test_serve_exports_the_heap_of_the_listener_it_wrote_and_the_alert_s_ratio_is_the_refusal_s(
        tmp_path: Path) -> None:
    """authz_native_envoy_heap_*_bytes are the written listener's HeapBudget (what /readyz reports),
    one sha256 at a time; needed / limit, what AuthzNativeEnvoyHeapNearLimit compares, passes 1
    exactly where a reload is refused."""
    from prometheus_client import CollectorRegistry

    from authz_service.policy import load_policy_file

    from .test_native import control_plane

    registry = CollectorRegistry()
    plane = control_plane(tmp_path, registry)

    def heap_series() -> dict[tuple[str, str], float]:
        return {(s.name, s.labels["sha256"]): s.value for family in registry.collect()
                for s in family.samples if s.name.startswith("authz_native_envoy_heap_")}

    assert heap_series() == {}  # none before a listener is written
    written = []
    for routes in (10, 300):
        path = tmp_path / f"policy-{routes}.yaml"
        path.write_text(policy_text(routes))
        listener = plane._compile(plane.load(path))
        plane._write(listener)
        written.append(listener)
        report = listener.heap.report()
        sha = load_policy_file(path).sha256
        assert heap_series() == {(f"authz_native_envoy_heap_{f}_bytes", sha): report[f"{f}_bytes"]
                                 for f in ("expected", "needed", "limit", "cap")}
    small, large = (listener.heap for listener in written)
    assert small.expected_bytes < large.expected_bytes and small.cap_bytes == large.cap_bytes == 160 * MIB
    assert large.changing and large.needed_bytes > large.expected_bytes  # serve checks the xDS form
    over = replace(large, cap_bytes=int(large.needed_bytes / large.first_action) - 1)
    assert over.needed_bytes / over.limit_bytes > 1 and not over.fits
    fitting = replace(large, cap_bytes=int(large.needed_bytes / large.first_action) + 1)
    assert fitting.needed_bytes / fitting.limit_bytes <= 1 and fitting.fits
