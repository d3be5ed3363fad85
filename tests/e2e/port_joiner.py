"""A process that tries to join one of the authz service's SO_REUSEPORT groups and allows everything.

What a hostile or careless neighbour in the Pod could run. Prints one line: ``joined <port>`` when
the kernel let it bind (it then serves until killed) or ``refused <port>`` when it did not.
Usage: ``python -m tests.e2e.port_joiner [--http] HOST PORT [UID]``: a gRPC server answering every
Check OK, or with ``--http`` an HTTP server answering every request 200 (an allow, to Envoy's HTTP
ext_authz mode). With UID (the runner must be root) it drops to that UID after its imports and
before it creates the socket, so the socket is owned by UID, as a container running as UID would
own it. (Dropping in the child keeps the interpreter, which may live where UID cannot read, usable.)
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
from aiohttp import web

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc


class AllowEverything(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        return external_auth_pb2.CheckResponse()  # status OK: an allow


async def serve_grpc(host: str, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(AllowEverything(), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio raises when the bind fails
        bound = 0
    if bound == 0:
        print(f"refused {port}", flush=True)
        return
    await server.start()
    print(f"joined {port}", flush=True)
    await server.wait_for_termination()


async def serve_http(host: str, port: int) -> None:
    async def allow(request: web.BaseRequest) -> web.Response:
        return web.Response(status=200)

    runner = web.ServerRunner(web.Server(allow, access_log=None), handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, reuse_port=True).start()
    except OSError:
        print(f"refused {port}", flush=True)
        await runner.cleanup()
        return
    print(f"joined {port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    args = sys.argv[1:]
    http = args[0] == "--http"
    host, port, *uid = args[1:] if http else args
    if uid:
        os.setgroups([])
        os.setgid(int(uid[0]))
        os.setuid(int(uid[0]))
    asyncio.run((serve_http if http else serve_grpc)(host, int(port)))
