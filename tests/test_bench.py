"""The benchmark never runs in `make test`, but it must not rot: its scripts import, its Envoy
configurations (generated from envoy/envoy.yaml) pass `envoy --mode validate`, its wrk script
parses, and the floor server answers a real Check."""

from __future__ import annotations

import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

from . import envoyconf
from .e2e.harness import ManagedProcess, envoy_binary, free_port, wait_for_port
from .test_ext_authz_http import door, send  # noqa: F401 - door is a fixture

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return load("run")


def jwks() -> str:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from authz_service.jwks import parse_jwks

    run = load("run")
    doc = run.jwks_document(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    assert list(parse_jwks(doc.encode()).keys) == [run.KID]  # the service would accept this JWKS
    return doc


def assert_envoy_validates(cfg: dict, path: Path) -> None:
    """Envoy's own validation accepts ``cfg`` (skipped where no Envoy binary is installed)."""
    binary = envoy_binary()
    if not binary:
        pytest.skip("no envoy binary")
    path.write_text(yaml.safe_dump(cfg))
    result = subprocess.run([binary, "--mode", "validate", "-c", str(path), "--log-level", "warn"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"{path.name}\n{result.stdout}{result.stderr}"


def compiled_bench_policy(run, tmp_path: Path) -> dict:
    """The bootstrap the native rows run: the bench's shape of what compile envoy makes of a policy."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({
        "issuers": [{"user_pool_id": run.POOL, "issuer": run.ISSUER, "jwks_uri": "http://127.0.0.1:1/jwks.json"}],
        "routes": [{"name": "get", "methods": ["GET"], "path": "/transactions/{id}", "scopes": ["transactions/get"]},
                   {"name": "health", "path": "/healthz", "public": True}]}))
    return run.render_native(policy, listener_port=18080, admin_port=18081, grpc_port=19191, http_port=18181)


@pytest.mark.parametrize("kind", ["none", "jwt_authn", "jwt_authn_cached", "ext_authz", "ext_authz_http"])
def test_generated_envoy_configs_validate(run, kind: str, tmp_path: Path) -> None:
    if not envoy_binary():
        pytest.skip("no envoy binary")
    cfg = run.render_envoy(kind, listener_port=18080, admin_port=18081, authz_port=19191, jwks=jwks())
    names = [f["name"] for f in envoyconf.http_filters(cfg)]
    jwt_authn = ["envoy.filters.http.jwt_authn"]
    expected = {"none": [], "jwt_authn": jwt_authn, "jwt_authn_cached": jwt_authn,
                "ext_authz": ["envoy.filters.http.ext_authz"], "ext_authz_http": ["envoy.filters.http.ext_authz"]}
    if kind.startswith("jwt_authn"):  # row 2c is row 2 with the verified-token cache, nothing else
        provider = envoyconf.http_filter(cfg, "envoy.filters.http.jwt_authn")["providers"]["cognito"]
        assert ("jwt_cache_config" in provider) == (kind == "jwt_authn_cached")
    # The same admission filters in front of every row, so the rows stay comparable.
    admission = ["envoy.filters.http.local_ratelimit"]
    assert names == admission + expected[kind] + [envoyconf.PER_CLIENT_FILTER, "envoy.filters.http.router"]
    assert [l["name"] for l in cfg["static_resources"]["listeners"]] == ["ingress"]
    assert_envoy_validates(cfg, tmp_path / f"{kind}.yaml")


def test_native_rows_run_the_compiled_policy_in_the_measured_shape(run, tmp_path: Path) -> None:
    """Rows 4n and 5n: the bootstrap compile envoy makes of the bench's policy, shaped as every row
    (routes to the app answer directly, no access log but its decision stats, no health listener),
    with the same verified-token cache as row 2c; Envoy accepts it."""
    from authz_service.native.options import Options

    cfg = compiled_bench_policy(run, tmp_path)
    assert [l["name"] for l in cfg["static_resources"]["listeners"]] == ["ingress"]
    hcm = envoyconf.hcm(cfg, "ingress")
    from authz_service.native.decisions import STATS_LOGGER

    assert [log["typed_config"]["@type"] for log in hcm["access_log"]] == [STATS_LOGGER] * 5
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert not [r["name"] for r in routes if "route" in r]  # nothing reaches an app
    assert next(r for r in routes if r["name"] == "no route")["direct_response"]["status"] == 403  # its own answer
    assert "envoy.filters.http.local_ratelimit" in [f["name"] for f in envoyconf.http_filters(cfg)]
    provider = next(iter(envoyconf.http_filter(cfg, "authz.jwt")["providers"].values()))
    assert provider["jwt_cache_config"]["jwt_cache_size"] == run.JWT_CACHE_SIZE == Options().jwt_cache_size
    assert_envoy_validates(cfg, tmp_path / "native.yaml")


@pytest.mark.parametrize("index", range(6))
def test_native_costs_alternatives_change_the_policy_and_validate(run, index: int, tmp_path: Path) -> None:
    """bench/native_costs.py --alternatives: each other way of writing a part changes the compiled
    policy, and Envoy accepts the result (else its count would be of a configuration Envoy refuses)."""
    import copy

    costs = load("native_costs")
    assert len(costs.ALTERNATIVES) == 6
    label, change = costs.ALTERNATIVES[index]
    compiled = compiled_bench_policy(run, tmp_path)
    cfg = copy.deepcopy(compiled)
    change(cfg)
    assert cfg != compiled, label
    assert_envoy_validates(cfg, tmp_path / f"alternative-{index}.yaml")


@pytest.mark.parametrize("index", range(5))
def test_native_costs_memory_pieces_each_take_a_piece_away_and_validate(run, index: int, tmp_path: Path) -> None:
    """bench/native_costs.py --memory-pieces: each piece taken away changes the compiled policy of
    the measured shape (memory_policy), and Envoy accepts the result."""
    import copy

    costs = load("native_costs")
    assert len(costs.MEMORY_PIECES) == 5
    label, drop = costs.MEMORY_PIECES[index]
    issuer = tmp_path / "issuer.yaml"
    issuer.write_text(yaml.safe_dump({"issuers": [{"user_pool_id": run.POOL, "issuer": run.ISSUER,
                                                   "jwks_uri": "http://127.0.0.1:1/jwks.json"}], "routes": []}))
    policy = costs.memory_policy(issuer, 10)
    compiled = run.render_native(policy, listener_port=18080, admin_port=18081, grpc_port=19191, http_port=18181)
    cfg = copy.deepcopy(compiled)
    drop(cfg)
    assert cfg != compiled, label
    assert_envoy_validates(cfg, tmp_path / f"piece-{index}.yaml")


@pytest.mark.parametrize("variant", ["per-connection", "per-source", "timers-1s", "timers-1s-from-25%"])
def test_abuse_envoy_variants_validate(run, variant: str, tmp_path: Path) -> None:
    """bench/abuse.py's Envoy variants (the per-source one is the one docs/security.md shows)."""
    abuse = load("abuse")
    cfg = run.render_envoy("ext_authz", listener_port=18080, admin_port=18081, authz_port=19191)
    cfg = {"per-connection": lambda: abuse.bearer_bucket(cfg, "per-connection"),
           "per-source": lambda: abuse.bearer_bucket(cfg, "per-source"),
           "timers-1s": lambda: abuse.tightened_timers(cfg, "1s"),
           "timers-1s-from-25%": lambda: abuse.tightened_timers(cfg, "1s", 0.25, 0.5)}[variant]()
    assert abuse.connection_limit(cfg) == 2048
    assert_envoy_validates(cfg, tmp_path / "variant.yaml")


def test_grpc_frame_is_a_check_request_the_service_parses(run) -> None:
    from authz_service.doors.grpc import parse_check_request

    frame = run.grpc_frame("abc.def.ghi")
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(frame) - 5
    http = parse_check_request(external_auth_pb2.CheckRequest.FromString(frame[5:]))
    assert http.method == "GET" and http.path == run.PATH and http.authorization == ("Bearer abc.def.ghi",)


def test_wrk_script_loads_and_reports(tmp_path: Path) -> None:
    """wrk runs the script (init reads the token file, done prints the figures run.py parses)."""
    if not shutil.which("wrk"):
        pytest.skip("wrk not installed (make bench installs it)")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a.b.c\nd.e.f\n")
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.headers.get("Authorization", ""))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = subprocess.run(["wrk", "-t1", "-c1", "-d1s", "-s", str(BENCH / "rotate.lua"),
                                 f"http://127.0.0.1:{server.server_address[1]}", "--", str(tokens), "0"],
                                capture_output=True, text=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    line = next((l for l in result.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    assert line is not None, result.stdout + result.stderr
    figures = json.loads(line[8:])
    assert figures["requests"] > 0 and figures["status_errors"] == 0 and figures["p99_us"] >= figures["p50_us"]
    assert {"Bearer a.b.c", "Bearer d.e.f"} <= set(seen)  # the tokens rotate


def start_script(name: str, tmp_path: Path, *args: str) -> tuple[ManagedProcess, int]:
    """A bench server script on a free port, once it accepts connections: (process, port)."""
    port = free_port()
    server = ManagedProcess([sys.executable, str(BENCH / name), "--port", str(port), *args], tmp_path,
                            name.removesuffix(".py")).start()
    wait_for_port(port, 60, proc=server)
    return server, port


@pytest.mark.parametrize(("event_loop", "protocol"), [("asyncio", "grpc"), ("uvloop", "grpc"), ("uvloop", "http")])
def test_floor_server_answers_ok(tmp_path: Path, event_loop: str, protocol: str) -> None:
    server, port = start_script("floor_server.py", tmp_path, "--event-loop", event_loop, "--protocol", protocol)
    with server:
        if protocol == "http":
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("DELETE", "/anything", headers={"Authorization": "Bearer x"})
            assert conn.getresponse().status == 200
            conn.close()
            return
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(external_auth_pb2.CheckRequest(), timeout=5)
        assert reply.status.code == 0 and reply.HasField("ok_response")


async def test_allow_headers_floor_answers_what_the_front_door_answers(tmp_path: Path, door, key_a) -> None:
    """Row 3ha isolates what the allow answer's headers cost Envoy only if the floor sends exactly
    the headers the HTTP front door sends for an allowed bench token."""
    base, _ = door
    scopes = "transactions/get transactions/post"
    token = key_a.token(client_id="bench-client-0", sub="bench-client-0", scope=scopes)
    status, real, _ = await send(base, "POST", "/transactions", [("authorization", f"Bearer {token}")])
    assert status == 200
    server, port = start_script("floor_server.py", tmp_path, "--event-loop", "uvloop", "--protocol", "http",
                                "--allow-headers")
    with server:
        status, floor, _ = await send(f"http://127.0.0.1:{port}", "POST", "/transactions")
    assert status == 200
    ours = {name: value for name, value in real.items() if name.startswith("x-")}
    assert ours and {name: value for name, value in floor.items() if name.startswith("x-")} == ours


def test_micro_and_memory_benchmarks_import() -> None:
    assert callable(load("micro_verify").main) and callable(load("memory").main)
    assert callable(load("handler_phases").main)


def test_reload_latency_policies_load_and_differ(tmp_path: Path) -> None:
    """The two policies the reload benchmark alternates are valid, as large as asked, and distinct
    (each write is a real reload); its latency arithmetic counts only Checks in flight during one."""
    from authz_service.policy import parse_policy
    from authz_service.yamlfile import LOADERS

    bench = load("reload_latency")
    base = {"issuers": [{"user_pool_id": "us-east-1_Bench0001"}],
            "routes": [{"name": "healthz", "path": "/healthz", "public": True}]}
    first, second = (parse_policy(text, "bench.yaml") for text in bench.policy_texts(base, 50))
    assert len(first.routes) == len(second.routes) == 51 and first.sha256 != second.sha256
    phase = bench.Phase(checks=[(0.0, 0.002), (1.0, 0.5), (3.0, 0.001)], reloads=[(1.2, 1.4)])
    assert phase.latencies(during_reload=True) == [500.0]
    assert phase.latencies(during_reload=False) == [1.0, 2.0]
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0 and bench.percentile([1.0, 2.0], 0.99) == 2.0
    times = bench.parse_times(bench.policy_texts(base, 5)[0], 2)
    assert set(times) == set(LOADERS)  # every parser this PyYAML has, timed each round
    assert all(len(values) == 2 and min(values) >= 0 for values in times.values())


def test_otlp_sink_counts_what_an_exporter_sends(tmp_path: Path) -> None:
    """Row 4t's receiver speaks OTLP/gRPC to the SDK's own exporter and reports the spans it got."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    sink, port = start_script("otlp_sink.py", tmp_path)
    with sink:
        provider = TracerProvider(shutdown_on_exit=False)
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{port}")))
        for name in ("a", "b", "c"):
            provider.get_tracer("bench-test").start_span(name).end()
        provider.shutdown()
    assert "OTLP sink received 3 spans" in sink.log_text()


def test_trace_headers_benchmark_runs_every_case() -> None:
    bench = load("trace_headers")
    run = subprocess.run([sys.executable, str(BENCH / "trace_headers.py"), "--n", "3", "--rounds", "1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rows = [line for line in run.stdout.splitlines() if line.startswith(("| gRPC |", "| HTTP |"))]
    assert [row.split(" | ")[1] for row in rows] == [*bench.GRPC_CASES, *bench.HTTP_CASES]
