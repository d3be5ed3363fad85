"""settings_from: flags win over AUTHZ_* env vars, defaults otherwise, bad values name their source."""

from __future__ import annotations

from pathlib import Path

import pytest

from authz_service.config import OPTIONS, ConfigError, Settings, UnknownVariable, settings_from, unknown_variables


def test_defaults_with_only_the_policy():
    settings = settings_from({"policy": "/etc/authz/policy.yaml"}, {})
    assert settings == Settings(policy=Path("/etc/authz/policy.yaml"))
    assert settings.grpc_port == 9191 and settings.http_port == 8181
    assert settings.grpc_host == "127.0.0.1", "the ext_authz front doors are for the Pod's Envoy only"
    assert settings.http_host == "0.0.0.0", "the kubelet probes the Pod IP"
    assert settings.ext_authz_http_port == 0, "HTTP mode is off unless asked for"
    assert settings.metrics_min_interval == 1.0 and settings.max_request_bytes == 128 * 1024
    assert settings.leeway == 60.0 and settings.unknown_kid_cooldown == 10.0
    assert settings.realm == "authz-service" and settings.log_level == "INFO"
    assert settings.decision_log == "deny", "every denial is logged, allows only when asked for"
    assert settings.jwks.unknown_kid_cooldown == 10.0
    assert settings.jwks.refresh_interval == 900.0


def test_policy_from_environment():
    assert settings_from({}, {"AUTHZ_POLICY": "/p.yaml"}).policy == Path("/p.yaml")


def test_unset_flags_are_none_and_fall_back_to_env():
    cli = {option.name: None for option in OPTIONS}
    settings = settings_from(cli, {"AUTHZ_POLICY": "/p.yaml", "AUTHZ_GRPC_PORT": "7000"})
    assert settings.policy == Path("/p.yaml") and settings.grpc_port == 7000


def test_policy_is_required():
    with pytest.raises(ConfigError) as caught:
        settings_from({"grpc_port": "1"}, {"AUTHZ_GRPC_PORT": "2"})
    assert "--policy" in str(caught.value) and "AUTHZ_POLICY" in str(caught.value)


def test_flags_win_over_env():
    environ = {"AUTHZ_POLICY": "/env.yaml", "AUTHZ_GRPC_PORT": "1000", "AUTHZ_REALM": "env-realm",
               "AUTHZ_LEEWAY": "5", "AUTHZ_LOG_LEVEL": "error"}
    settings = settings_from({"policy": "/flag.yaml", "grpc_port": "2000", "realm": "flag-realm"}, environ)
    assert settings.policy == Path("/flag.yaml")
    assert settings.grpc_port == 2000
    assert settings.realm == "flag-realm"
    assert settings.leeway == 5.0  # no flag: the env var applies
    assert settings.log_level == "ERROR"


def test_a_bad_env_var_is_ignored_when_the_flag_is_given():
    settings = settings_from({"policy": "/p", "grpc_port": "1234"}, {"AUTHZ_GRPC_PORT": "not-a-port"})
    assert settings.grpc_port == 1234


def test_every_option_is_a_settings_field_with_the_same_default():
    fields = Settings.__dataclass_fields__
    for option in OPTIONS:
        assert option.name in fields
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "AUTHZ_" + option.name.upper()
        if option.default is not None:  # the documented default is the effective one, or parses to it
            assert fields[option.name].default in (option.default, option.parse(str(option.default)))


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("grpc_port", "0", 0), ("http_port", "65535", 65535), ("grpc_host", "127.0.0.1", "127.0.0.1"),
        ("leeway", "0", 0.0), ("leeway", "2.5", 2.5), ("jwks_refresh_interval", "60", 60.0),
        ("jwks_timeout", "0.5", 0.5), ("jwks_max_bytes", "1024", 1024), ("unknown_kid_cooldown", "10", 10.0),
        ("unknown_kid_cooldown", "30.5", 30.5), ("policy_poll_interval", "1", 1.0), ("realm", "api", "api"),
        ("shutdown_grace", "0", 0.0), ("log_level", "debug", "DEBUG"), ("log_level", "Warning", "WARNING"),
        ("token_cache_size", "0", 0), ("token_cache_size", "50000", 50000), ("token_cache_max_bytes", "0", 0),
        ("token_cache_max_bytes", "1048576", 1048576), ("workers", "1", 1), ("workers", "4", 4),
        ("event_loop", "auto", "auto"), ("event_loop", "UVLOOP", "uvloop"), ("event_loop", "asyncio", "asyncio"),
        ("ext_authz_http_port", "9192", 9192), ("ext_authz_http_port", "0", 0),
        ("ext_authz_http_path_prefix", "/authz", "/authz"), ("ext_authz_http_path_prefix", "", ""),
        ("ext_authz_http_path_prefix", "/a/b-c", "/a/b-c"), ("max_request_bytes", "65536", 65536),
        ("metrics_min_interval", "0", 0.0), ("metrics_min_interval", "15", 15.0),
        ("decision_log", "deny", "deny"), ("decision_log", "ALL", "all"), ("decision_log", "sampled", "sampled"),
        ("decision_log", "off", "off"), ("decision_log_sample_rate", "1", 1.0),
        ("decision_log_sample_rate", "0.001", 0.001),
    ],
)
def test_good_values_are_parsed(name, text, value):
    settings = settings_from({"policy": "/p", name: text}, {})
    assert getattr(settings, name) == value
    assert type(getattr(settings, name)) is type(value)
    from_env = settings_from({"policy": "/p"}, {"AUTHZ_" + name.upper(): text})
    assert getattr(from_env, name) == value


BAD_VALUES = [
    ("grpc_port", "-1"), ("grpc_port", "65536"), ("grpc_port", "http"), ("grpc_port", "80.5"), ("http_port", ""),
    ("leeway", "-1"), ("leeway", "inf"), ("leeway", "nan"), ("leeway", "abc"),
    ("jwks_refresh_interval", "0"), ("jwks_refresh_interval", "-5"), ("jwks_refresh_interval", "nan"),
    ("jwks_refresh_interval", "inf"), ("jwks_timeout", "0"), ("jwks_max_bytes", "0"), ("jwks_max_bytes", "1.5"),
    ("jwks_max_bytes", "-1"), ("unknown_kid_cooldown", "9.99"), ("unknown_kid_cooldown", "0"),
    ("unknown_kid_cooldown", "-10"), ("unknown_kid_cooldown", "nan"), ("unknown_kid_cooldown", "inf"),
    ("policy_poll_interval", "0"), ("shutdown_grace", "-0.1"), ("realm", ""), ("realm", 'a"b'),
    ("realm", "a\\b"), ("realm", "a\nb"), ("log_level", "verbose"), ("log_level", "critical"),
    ("token_cache_size", "-1"), ("token_cache_size", "1e4"), ("token_cache_size", "ten"),
    ("token_cache_max_bytes", "-5"), ("token_cache_max_bytes", "16MB"), ("workers", "0"), ("workers", "65"),
    ("workers", "2.5"), ("workers", "auto"), ("event_loop", "trio"), ("event_loop", ""),
    ("ext_authz_http_port", "-1"), ("ext_authz_http_path_prefix", "authz"), ("ext_authz_http_path_prefix", "/authz/"),
    ("ext_authz_http_path_prefix", "/a?b"), ("ext_authz_http_path_prefix", "/a b"), ("ext_authz_http_path_prefix", "/é"),
    ("ext_authz_http_path_prefix", "/a%2F"), ("max_request_bytes", "1024"), ("max_request_bytes", "big"),
    ("metrics_min_interval", "-1"), ("metrics_min_interval", "inf"),
    ("decision_log", "allow"), ("decision_log", ""), ("decision_log_sample_rate", "0"),
    ("decision_log_sample_rate", "1.5"), ("decision_log_sample_rate", "nan"), ("decision_log_sample_rate", "1%"),
]


@pytest.mark.parametrize(("name", "text"), BAD_VALUES)
def test_bad_flag_values_name_the_flag(name, text):
    flag = "--" + name.replace("_", "-")
    with pytest.raises(ConfigError) as caught:
        settings_from({"policy": "/p", name: text}, {})
    message = str(caught.value)
    assert message.startswith(flag + "="), message
    assert repr(text) in message


@pytest.mark.parametrize(("name", "text"), BAD_VALUES)
def test_bad_env_values_name_the_env_var(name, text):
    env = "AUTHZ_" + name.upper()
    with pytest.raises(ConfigError) as caught:
        settings_from({"policy": "/p"}, {env: text})
    message = str(caught.value)
    assert message.startswith(env + "="), message
    assert "--" not in message.split("=")[0]


def test_cooldown_message_explains_the_minimum():
    with pytest.raises(ConfigError, match="10"):
        settings_from({"policy": "/p", "unknown_kid_cooldown": "5"}, {})


def test_unrelated_environment_is_ignored():
    settings = settings_from({"policy": "/p"}, {"GRPC_PORT": "1", "AUTHZ_UNKNOWN": "x", "authz_grpc_port": "2"})
    assert settings.grpc_port == 9191


# --- AUTHZ_* variables that are no setting ---------------------------------------------------------


@pytest.mark.parametrize(("name", "closest"), [
    ("AUTHZ_GRPC_PROT", "AUTHZ_GRPC_PORT"),
    ("AUTHZ_POLCY", "AUTHZ_POLICY"),
    ("AUTHZ_LOGLEVEL", "AUTHZ_LOG_LEVEL"),
    ("AUTHZ_EXT_AUTHZ_PORT", "AUTHZ_EXT_AUTHZ_HTTP_PORT"),
    ("AUTHZ_WORKER", "AUTHZ_WORKERS"),
    ("AUTHZ_FROBNICATE", None),
])
def test_an_unknown_authz_variable_is_named_with_the_closest_setting(name, closest):
    assert unknown_variables({name: "1", "AUTHZ_GRPC_PORT": "1", "PATH": "/bin"}) == [UnknownVariable(name, closest)]


def test_every_setting_and_other_programs_variables_are_known():
    environ = {option.env: "x" for option in OPTIONS} | {"GRPC_PORT": "1", "authz_grpc_prot": "1", "HOME": "/"}
    assert unknown_variables(environ) == []


@pytest.mark.parametrize("name, value", [
    # What Kubernetes injects for a Service named authz or authz-<something> in the namespace
    # (enableServiceLinks, on by default), which a Pod spec cannot keep out without that setting.
    ("AUTHZ_SERVICE_HOST", "10.0.0.11"),
    ("AUTHZ_SERVICE_PORT", "9191"),
    ("AUTHZ_METRICS_SERVICE_PORT_HTTP", "8181"),
    ("AUTHZ_PORT", "tcp://10.0.0.11:9191"),
    ("AUTHZ_GRPC_PORT_9191_TCP", "tcp://10.0.0.11:9191"),
    ("AUTHZ_METRICS_PORT_8181_TCP_PROTO", "tcp"),
    ("AUTHZ_METRICS_PORT_8181_TCP_ADDR", "10.0.0.11"),
    ("AUTHZ_METRICS_PORT", "tcp://10.0.0.12:8181"),
])
def test_kubernetes_service_link_variables_are_not_reported(name, value):
    assert unknown_variables({name: value}) == []


def test_a_misspelt_port_setting_is_reported_although_it_ends_in_port():
    """Only a value shaped like a service link's (tcp://host:port) makes ``AUTHZ_..._PORT`` one."""
    assert unknown_variables({"AUTHZ_GRCP_PORT": "9191"}) == [UnknownVariable("AUTHZ_GRCP_PORT", "AUTHZ_GRPC_PORT")]


# --- listeners on one port ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cli", "environ", "message"), [
    ({"grpc_port": "9000", "http_port": "9000"}, {},
     "--grpc-port=9000 and --http-port=9000 are the same port on 127.0.0.1 and 0.0.0.0"),
    ({"grpc_port": "8181"}, {},
     "--grpc-port=8181 and --http-port (default 8181) are the same port on 127.0.0.1 and 0.0.0.0"),
    ({"ext_authz_http_port": "9191"}, {},
     "--grpc-port (default 9191) and --ext-authz-http-port=9191 are the same port on 127.0.0.1"),
    ({}, {"AUTHZ_EXT_AUTHZ_HTTP_PORT": "8181", "AUTHZ_HTTP_HOST": "127.0.0.1"},
     "AUTHZ_EXT_AUTHZ_HTTP_PORT=8181 and --http-port (default 8181) are the same port on 127.0.0.1"),
    ({"grpc_host": "localhost", "grpc_port": "9000", "http_host": "127.0.0.1", "http_port": "9000"}, {},
     "--grpc-port=9000 and --http-port=9000 are the same port on localhost and 127.0.0.1"),
    ({"grpc_host": "::", "grpc_port": "9000", "http_host": "127.0.0.1", "http_port": "9000"}, {},
     "--grpc-port=9000 and --http-port=9000 are the same port on :: and 127.0.0.1"),
    # native mode: Envoy's listener, which the service writes, may not take one of the service's ports
    ({"native_xds_dir": "/x", "http_port": "9411", "native_listen": "127.0.0.1:9411"}, {},
     "--http-port=9411 and --native-listen=127.0.0.1:9411 are the same port on 0.0.0.0 and 127.0.0.1"),
    ({"native_xds_dir": "/x", "native_listen": "0.0.0.0:9191"}, {},
     "--grpc-port (default 9191) and --native-listen=0.0.0.0:9191 are the same port on 127.0.0.1 and 0.0.0.0"),
    ({"native_xds_dir": "/x", "ext_authz_http_port": "9300"}, {"AUTHZ_NATIVE_LISTEN": "127.0.0.1:9300"},
     "--ext-authz-http-port=9300 and AUTHZ_NATIVE_LISTEN=127.0.0.1:9300 are the same port on 127.0.0.1"),
    ({"native_xds_dir": "/x", "http_port": "8080"}, {},
     "--http-port=8080 and --native-listen (default 0.0.0.0:8080) are the same port on 0.0.0.0"),
])
def test_two_listeners_on_one_port_are_refused_naming_both_settings(cli, environ, message):
    with pytest.raises(ConfigError) as caught:
        settings_from({"policy": "/p", **cli}, environ)
    assert str(caught.value) == message + ": give each listener a port of its own"


@pytest.mark.parametrize("cli", [
    {"grpc_host": "127.0.0.1", "http_host": "127.0.0.2", "grpc_port": "9000", "http_port": "9000"},
    {"grpc_host": "::1", "http_host": "0.0.0.0", "grpc_port": "9000", "http_port": "9000"},  # two families
    {"grpc_port": "0", "http_port": "0"},  # each its own port, chosen by the kernel
    {"ext_authz_http_port": "0", "http_port": "9191", "http_host": "127.0.0.2"},  # the HTTP door is off
    {"native_xds_dir": "/x", "http_host": "127.0.0.1", "http_port": "9411", "native_listen": "127.0.0.2:9411"},
])
def test_the_same_number_on_distinct_addresses_or_port_0_is_no_conflict(cli):
    settings_from({"policy": "/p", **cli}, {})


@pytest.mark.parametrize(("cli", "environ", "source"), [({"policy": ""}, {}, "--policy"),
                                                         ({}, {"AUTHZ_POLICY": ""}, "AUTHZ_POLICY")])
def test_empty_policy_path_is_refused(cli, environ, source):
    with pytest.raises(ConfigError, match=source):
        settings_from(cli, environ)


def test_uvloop_requested_but_missing_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvloop" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--event-loop='uvloop' is invalid: uvloop is not installed"):
        settings_from({"policy": "/p", "event_loop": "uvloop"}, {})
    assert settings_from({"policy": "/p", "event_loop": "auto"}, {}).event_loop == "auto"


@pytest.mark.parametrize(("setting", "expected"), [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")])
def test_run_uses_the_configured_event_loop(setting, expected):
    from authz_service.server import loop_name, run

    async def which() -> str:
        return loop_name()

    assert run(which(), setting) == expected


@pytest.mark.parametrize(("cli", "environ", "source"), [
    ({"native_listen": "127.0.0.1:9405"}, {}, "--native-listen=127.0.0.1:9405"),
    ({}, {"AUTHZ_NATIVE_LISTEN": "127.0.0.1:9405", "AUTHZ_NATIVE_XDS_DIR": ""}, "AUTHZ_NATIVE_LISTEN=127.0.0.1:9405"),
])
def test_native_listen_without_the_xds_dir_is_refused(cli, environ, source):
    """Without --native-xds-dir nothing writes Envoy's listener: the address would be ignored."""
    with pytest.raises(ConfigError) as caught:
        settings_from({"policy": "/p", **cli}, environ)
    assert str(caught.value).startswith(f"{source} without --native-xds-dir (AUTHZ_NATIVE_XDS_DIR): ")


@pytest.mark.parametrize("name", ["grpc_host", "http_host"])
def test_a_bracketed_ipv6_host_is_the_address_inside_for_every_listener(name: str):
    """[::1] is how addresses with a port are written (--native-listen, compile envoy); as a host
    setting it must mean ::1 for every listener, not only for the gRPC door that accepts brackets."""
    env = "AUTHZ_" + name.upper()
    settings = settings_from({"policy": "/p"}, {env: "[::1]"})
    assert getattr(settings, name) == "::1"
    assert getattr(settings_from({"policy": "/p"}, {env: "::"}), name) == "::"


@pytest.mark.parametrize("name", ["grpc_host", "http_host"])
@pytest.mark.parametrize("value", ["", " ", "[]", "[localhost]", "[::1", "127.0.0.1:9191"])
def test_a_host_setting_that_names_no_host_is_refused_naming_its_variable(name: str, value: str):
    env = "AUTHZ_" + name.upper()
    with pytest.raises(ConfigError) as caught:
        settings_from({"policy": "/p"}, {env: value})
    assert str(caught.value).startswith(f"{env}={value!r} is invalid: "), caught.value
