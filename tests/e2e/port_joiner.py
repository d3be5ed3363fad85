"""A process that tries to join the authz service's SO_REUSEPORT group and answers every Check OK.

What a hostile or careless neighbour in the Pod could run. Prints one line: ``joined <port>`` when
the kernel let it bind (it then serves until killed) or ``refused <port>`` when it did not.
Usage: ``python -m tests.e2e.port_joiner HOST PORT [UID]``: with UID (the runner must be root) it
drops to that UID after its imports and before it creates the socket, so the socket is owned by UID,
as a container running as UID would own it. (Dropping in the child keeps the interpreter, which may
live where UID cannot read, usable.)
"""

from __future__ import annotations

import asyncio
import os
import sys

import grpc

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc


class AllowEverything(external_auth_pb2_grpc.AuthorizationServicer):
    async def Check(self, request, context):  # noqa: N802 - gRPC method name
        return external_auth_pb2.CheckResponse()  # status OK: an allow


async def main(host: str, port: int) -> None:
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


if __name__ == "__main__":
    if len(sys.argv) > 3:
        uid = int(sys.argv[3])
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
