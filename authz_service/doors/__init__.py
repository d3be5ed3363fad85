"""The front doors: how Envoy's authorization requests reach the one ``check.Checker``.

One module per protocol (``grpc``: Envoy's ext_authz gRPC ``Authorization/Check``; ``http``: its
HTTP ext_authz mode), each implementing ``base.FrontDoor``, so the service starts, drains and
guards every door with the same code.
"""
