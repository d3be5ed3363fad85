"""The floors: bare ext_authz servers that allow without looking at the request.

gRPC mode: a bare grpc.aio server answering OK. HTTP mode: aiohttp's low-level server (the library
the HTTP front door uses) answering 200. No Python ext_authz service on the same event loop and
library can be faster than these through the same Envoy, so the benchmark reports our service as
a ratio of them: on asyncio's default loop and on uvloop (the loop authz-service runs on by default).

``--allow-headers`` (HTTP): the 200 carries the very headers the front door's allow answer carries
for a bench token (identity and ``x-envoy-auth-headers-to-remove``), built by the service's own
Answers and HttpFrontDoor. Against the bare floor it measures what those headers cost Envoy and
aiohttp; against the service, what the decision itself costs.

    python bench/floor_server.py --port 9292 [--protocol grpc|http] [--event-loop asyncio|uvloop]
                                 [--allow-headers]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

import grpc  # noqa: E402

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc  # noqa: E402

OK = external_auth_pb2.CheckResponse()
OK.status.code = 0
OK.ok_response.SetInParent()


class Floor(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request: Any, context: Any) -> external_auth_pb2.CheckResponse:  # noqa: N802
        return OK


async def serve(args: argparse.Namespace) -> None:
    if args.protocol == "http":
        await serve_http(args)
        return
    if args.protocol == "http-uvicorn":
        await serve_uvicorn(args)
        return
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server)
    if server.add_insecure_port(f"{args.host}:{args.port}") == 0:
        raise SystemExit(f"cannot bind {args.host}:{args.port}")
    await server.start()
    print(f"floor listening on {args.host}:{args.port}", flush=True)
    await until_signalled()
    await server.stop(1)


async def until_signalled() -> None:
    """Return on SIGTERM or SIGINT (the bench stops its servers with SIGTERM)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve_http(args: argparse.Namespace) -> None:
    from aiohttp import web

    headers = allow_answer_headers() if args.allow_headers else None

    async def allow(request: web.BaseRequest) -> web.Response:
        return web.Response(status=200, headers=headers)

    runner = web.ServerRunner(web.Server(allow, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"HTTP floor listening on {args.host}:{args.port}", flush=True)
    await until_signalled()
    await runner.cleanup()


def allow_answer_headers() -> dict[str, str]:
    """The headers of the HTTP front door's allow answer for a bench token's identity."""
    from authz_service.claims import Claims
    from authz_service.decision import Decision, Reason
    from authz_service.doors.http import HttpFrontDoor
    from authz_service.response import Answers

    scopes = "transactions/get transactions/post"
    claims = Claims(issuer="bench", client_id="bench-client-0", sub="bench-client-0",
                    scopes=frozenset(scopes.split()), scope_text=scopes, exp=0, kid="bench")
    answer = Answers("authz-service").answer(Decision(True, Reason.ALLOWED, claims=claims), None)
    response = HttpFrontDoor.render(answer)
    assert response.status == 200
    return dict(response.headers)


async def serve_uvicorn(args: argparse.Namespace) -> None:
    """The other candidate for the HTTP front door, measured against aiohttp (`make bench`, row 3hv):
    uvicorn with its httptools parser and a bare ASGI callable (no framework)."""
    import uvicorn

    async def allow(scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(allow, host=args.host, port=args.port, loop="none", http="httptools", lifespan="off",
                            access_log=False, log_level="warning")
    print(f"HTTP floor (uvicorn) listening on {args.host}:{args.port}", flush=True)
    await uvicorn.Server(config).serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=["grpc", "http", "http-uvicorn"], default="grpc")
    parser.add_argument("--event-loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--allow-headers", action="store_true",
                        help="HTTP: answer with the headers of the front door's allow answer")
    args = parser.parse_args()
    if args.event_loop == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args))
    else:
        asyncio.run(serve(args))


if __name__ == "__main__":
    main()
