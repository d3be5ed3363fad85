"""ports: one message for a port that cannot be bound, naming the setting to change."""

from __future__ import annotations

import socket

import pytest

from authz_service import ports


def test_a_taken_port_names_the_port_setting() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(OSError) as caught:
            ports.GRPC.reserve("127.0.0.1", port, share=False)
    assert str(caught.value) == (f"cannot bind the gRPC port 127.0.0.1:{port} (Address already in use): "
                                 "set --grpc-port / AUTHZ_GRPC_PORT")


@pytest.mark.parametrize(("host", "reason"), [("192.0.2.1", "Cannot assign requested address"),
                                              ("no-such-host.invalid", "")])
def test_an_address_not_of_this_host_names_the_host_setting(host: str, reason: str) -> None:
    with pytest.raises(OSError) as caught:
        ports.ADMIN.reserve(host, 0, share=False)
    message = str(caught.value)
    assert message.startswith(f"cannot bind the HTTP (health/metrics) port {host}:0 ({reason}")
    assert message.endswith("): set --http-host / AUTHZ_HTTP_HOST") and "Unknown error" not in message


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "[::1]"])
def test_names_and_both_address_families_are_reserved(host: str) -> None:
    try:
        sock = ports.GRPC.reserve(host, 0, share=True)
    except OSError as exc:
        if ":" in host:
            pytest.skip(f"no IPv6 loopback here: {exc}")
        raise
    with sock:
        assert sock.getsockname()[1] > 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1


def test_an_unknown_cause_names_both_settings() -> None:
    assert str(ports.EXT_AUTHZ_HTTP.error("127.0.0.1", 9192)) == (
        "cannot bind the HTTP ext_authz port 127.0.0.1:9192 (in use, or not an address of this host): "
        "set --ext-authz-http-port / AUTHZ_EXT_AUTHZ_HTTP_PORT (or --grpc-host / AUTHZ_GRPC_HOST)")


@pytest.mark.parametrize(("host", "shown"), [("127.0.0.1", "127.0.0.1:9191"), ("::1", "[::1]:9191"),
                                             ("::", "[::]:9191"), ("localhost", "localhost:9191")])
def test_an_address_is_shown_as_envoy_and_clients_write_it(host: str, shown: str) -> None:
    """The start-up line and the bind errors name host:port; ::1:9191 reads as another address."""
    assert ports.host_port(host, 9191) == shown
    assert f"port {shown} (" in str(ports.GRPC.error(host, 9191, OSError(98, "Address already in use")))
