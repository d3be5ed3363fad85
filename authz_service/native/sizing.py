"""Native mode's Envoy heap: what a compiled policy is expected to hold, against the bootstrap's cap.

Envoy keeps every route of the compiled listener, with its matchers, RBAC checks (their regexes and
CEL compiled) and metadata, in its heap for as long as the listener serves. The shipped bootstrap
caps that heap (``overload_manager``, ``fixed_heap``): past its first overload action Envoy sheds
load, and at 95% it answers every request 503. A policy whose routes alone would take Envoy there
is refused when it is compiled (by ``compile envoy``, and by ``serve --native-xds-dir`` at start and
at each reload: the previous policy keeps serving), with the fix, instead of an Envoy that answers
503 to every request, or one the kubelet kills for its memory. In the xDS form a policy change
holds the old listener beside the new one while the old one's connections drain (seconds), so
there the policy's part of the heap must fit twice.

The expectation is a model measured on a real Envoy (docs/performance.md, "Native mode's memory"):
a fixed part, and a part proportional to the size of the compiled listener (its JSON), which grows
with every route, check, regex and answer alike. Its constants were fitted, with a margin above
every measurement, to

    .venv/bin/python bench/native_costs.py --memory-pieces 10,100,300,1000

and tests/e2e/test_native_memory_e2e.py checks that it stays above a real Envoy's heap.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from ..policy import PolicyError

# The model (bench/native_costs.py --memory-pieces, see the module doc): Envoy's heap just started
# on a compiled policy, in bytes, is at most BASE_BYTES + BYTES_PER_LISTENER_BYTE x the ingress
# listener's size as compact JSON.
BASE_BYTES = 10_000_000
BYTES_PER_LISTENER_BYTE = 11.0
HEAP_MONITOR = "envoy.resource_monitors.fixed_heap"
HEAP_OVER_CAP = "envoy-heap-over-cap"  # the error's code
MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class HeapBudget:
    """A compiled policy's expected Envoy heap, and the bootstrap's cap on it."""

    expected_bytes: int  # Envoy's heap once started on this policy (the model above)
    cap_bytes: int  # overload_manager's fixed_heap max_heap_size_bytes
    first_action: float  # the lowest fraction of the cap at which an overload action starts
    # The xDS form: a policy change holds the old listener (draining, seconds) beside the new one.
    changing: bool = False

    @property
    def needed_bytes(self) -> int:
        """The most Envoy is expected to hold: the policy's listener twice while it changes."""
        return self.expected_bytes + (self.expected_bytes - BASE_BYTES if self.changing else 0)

    @property
    def limit_bytes(self) -> int:
        """What the policy may take: Envoy must not be shedding load, at rest or while it changes."""
        return int(self.cap_bytes * self.first_action)

    @property
    def cap_needed_mib(self) -> int:
        """The least cap, in MiB, under whose first overload action this policy fits."""
        return math.ceil(self.needed_bytes / self.first_action / MIB)

    @property
    def fits(self) -> bool:
        return self.needed_bytes <= self.limit_bytes

    def summary(self) -> str:
        return (
            f"~{self.expected_bytes / MIB:.0f} MiB expected at start, {self.expected_bytes / self.cap_bytes:.0%} "
            f"of the {self.cap_bytes / MIB:.0f} MiB heap cap (overload actions from {self.first_action:.0%})"
        )

    def report(self) -> dict[str, Any]:
        return {
            "expected_bytes": self.expected_bytes,
            "needed_bytes": self.needed_bytes,
            "cap_bytes": self.cap_bytes,
            "limit_bytes": self.limit_bytes,
            "fits": self.fits,
        }


def heap_budget(ingress: dict[str, Any], static: dict[str, Any]) -> HeapBudget:
    """The expected heap of Envoy serving the ``ingress`` listener, against the cap in ``static``
    (the bootstrap's overload_manager)."""
    size = len(json.dumps(ingress, separators=(",", ":")))
    cap, first_action = heap_cap(static)
    return HeapBudget(int(BASE_BYTES + BYTES_PER_LISTENER_BYTE * size), cap, first_action)


def heap_cap(static: dict[str, Any]) -> tuple[int, float]:
    """The fixed_heap monitor's cap, and the lowest fraction of it that starts an overload action."""
    manager = static["overload_manager"]
    (monitor,) = [m for m in manager["resource_monitors"] if m["name"] == HEAP_MONITOR]
    fractions = [
        trigger["threshold"]["value"] if "threshold" in trigger else trigger["scaled"]["scaling_threshold"]
        for action in manager.get("actions", [])
        for trigger in action["triggers"]
        if trigger["name"] == HEAP_MONITOR
    ]
    return int(monitor["typed_config"]["max_heap_size_bytes"]), min(fractions, default=1.0)


def set_heap_cap(static: dict[str, Any], mib: int) -> None:
    """Cap Envoy's heap at ``mib`` MiB (the overload actions keep their fractions of it)."""
    manager = static["overload_manager"]
    (monitor,) = [m for m in manager["resource_monitors"] if m["name"] == HEAP_MONITOR]
    monitor["typed_config"]["max_heap_size_bytes"] = mib * MIB


def check_fits(budget: HeapBudget, source: str, native_routes: int) -> None:
    """PolicyError (code ``envoy-heap-over-cap``) saying what to do when the policy does not fit."""
    if budget.fits:
        return
    when = "while a policy change holds the old listener and the new one" if budget.changing else "from the start"
    raise PolicyError(
        f"{source}: native mode would need ~{budget.needed_bytes / MIB:.0f} MiB of Envoy's heap for its "
        f"{native_routes} native routes, over the {budget.limit_bytes / MIB:.0f} MiB where Envoy's overload "
        f"actions start ({budget.first_action:.0%} of its {budget.cap_bytes / MIB:.0f} MiB heap cap): Envoy would "
        f"shed load or answer 503 {when}. Split the policy between services (each sidecar with the "
        f"routes of its own app), or raise the cap (compile envoy --heap-cap MIB, and serve's --native-heap-cap "
        f"MIB alike with --native-xds-dir: at least {budget.cap_needed_mib} here) "
        "together with the Envoy container's memory limit (the cap + 96 MiB; docs/native.md, 'Memory'), or serve "
        "in gRPC or HTTP mode, where Envoy's memory does not grow with the policy",
        code=HEAP_OVER_CAP,
    )
