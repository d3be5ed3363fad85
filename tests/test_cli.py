"""The command line as users meet it, through the real CLI as a subprocess: one way to name the
policy in every command, `validate -`, `example`, completion, and help on every option."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from authz_service.cli import EXAMPLES, _all_actions, build_parser
from authz_service.policy import POLICY_MAX_BYTES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = ROOT / "authz_service" / "examples"
POLICY = EXAMPLE_DIR / "policy.yaml"
TESTS = EXAMPLE_DIR / "policy-tests.yaml"


def cli(*args: str, stdin: str | bytes | None = None, env: dict[str, str] | None = None
        ) -> subprocess.CompletedProcess[str]:
    """The real CLI in a subprocess; AUTHZ_POLICY only when ``env`` sets it."""
    environ = {k: v for k, v in os.environ.items() if k != "AUTHZ_POLICY"}
    return subprocess.run([sys.executable, "-m", "authz_service.cli", *args], capture_output=True, timeout=120,
                          input=stdin.decode() if isinstance(stdin, bytes) else stdin, text=True,
                          env={**environ, **(env or {})}, stdin=None if stdin is not None else subprocess.DEVNULL)


# What a failed command must never print, on stdout or stderr: it says what to fix in one line.
NOISE = ("Traceback", "Unclosed", "Event loop is closed", "Task was destroyed", "Warning:")
GRPC_CORE_LOG = re.compile(r"^[EWIF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)  # grpcio's own log lines on stderr


def assert_one_clean_line(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for noise in NOISE:
        assert noise not in output, (noise, output)
    assert not GRPC_CORE_LOG.search(result.stderr), result.stderr
    return lines[0]


# --- naming the policy: POLICY, --policy, else AUTHZ_POLICY; every command alike ---------------------

# What each command is given after the policy, and what its output says once it has read the file.
COMMANDS = {
    "validate": ((), "OK: 4 routes"),
    "test": ((str(TESTS),), "11 passed, 0 failed"),
    "explain": (("--method", "GET", "--path", "/healthz", "--scopes", ""), "decision:  ALLOW"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how", ["positional", "flag", "environment"])
def test_every_policy_tool_takes_the_policy_three_ways(command: str, how: str) -> None:
    rest, evidence = COMMANDS[command]
    if how == "positional":
        run = cli(command, str(POLICY), *rest)
    elif how == "flag":
        run = cli(command, *rest, "--policy", str(POLICY))
    else:
        run = cli(command, *rest, env={"AUTHZ_POLICY": str(POLICY)})
    assert run.returncode == 0, run.stdout + run.stderr
    assert evidence in run.stdout


@pytest.mark.parametrize("how", ["positional", "flag", "environment"])
def test_serve_takes_the_policy_three_ways(tmp_path: Path, how: str) -> None:
    """The named file is the one serve reads (a missing one: the refusal names it, nothing starts)."""
    missing = tmp_path / f"{how}.yaml"
    ports = ("--grpc-port", "0", "--http-port", "0")
    if how == "positional":
        run = cli("serve", str(missing), *ports)
    elif how == "flag":
        run = cli("serve", "--policy", str(missing), *ports)
    else:
        run = cli("serve", *ports, env={"AUTHZ_POLICY": str(missing)})
    assert_one_clean_line(run, f"authz-service: error: {missing}: cannot read policy file")


@pytest.mark.parametrize("command", [*COMMANDS, "serve"])
def test_naming_the_policy_twice_is_refused(command: str) -> None:
    rest = COMMANDS.get(command, ((), ""))[0]
    run = cli(command, str(POLICY), *rest, "--policy", str(POLICY))
    prefix = "authz-service: error:" if command == "serve" else f"authz-service {command}: error:"
    assert "name the policy once: as POLICY or with --policy, not both" in assert_one_clean_line(run, prefix)


@pytest.mark.parametrize("command", COMMANDS)
def test_naming_no_policy_is_refused(command: str) -> None:
    run = cli(command, *COMMANDS[command][0])
    line = assert_one_clean_line(run, f"authz-service {command}: error:")
    assert line.endswith("name the policy file: POLICY, --policy or AUTHZ_POLICY")


def test_serve_refuses_standard_input_as_its_policy() -> None:
    assert_one_clean_line(cli("serve", "-"), "authz-service: error: --policy='-' is invalid: the server reads a policy file")


def test_validate_takes_policy_flags_repeated() -> None:
    run = cli("validate", "--policy", str(POLICY), "--policy", str(POLICY))
    assert run.returncode == 0 and run.stdout.count("OK: 4 routes") == 2


# --- validate: several files, and standard input -------------------------------------------------


def test_validate_takes_several_files_and_reports_each(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("issuers: []\nroutes: []\n")
    run = cli("validate", str(POLICY), str(bad))
    assert run.returncode == 1
    assert f"{POLICY}: OK: 4 routes" in run.stdout
    assert f"{bad}:1:10: issuers: must be a non-empty list, got an empty list" in run.stdout
    assert f"{bad}: REFUSED" in run.stdout


def test_validate_dash_reads_the_policy_from_stdin() -> None:
    """As in `kubectl get cm authz-policy -o jsonpath='{.data.policy\\.yaml}' | authz-service validate -`."""
    run = cli("validate", "-", stdin=POLICY.read_text())
    assert run.returncode == 0 and run.stdout == "<stdin>: OK: 4 routes, 1 issuer, 0 warnings\n"
    bad = cli("validate", "--strict", "-", stdin="issuers:\n  - user_pool_id: us-east-1_A\nroutes:\n  - path: x\n")
    assert bad.returncode == 1
    assert bad.stdout.splitlines()[0] == "<stdin>:4:11: routes[0].path: 'x' must start with '/'"


def test_validate_dash_caps_what_it_reads() -> None:
    run = cli("validate", "-", stdin=b"#" * (POLICY_MAX_BYTES + 1))
    assert run.returncode == 1
    assert run.stdout.startswith("<stdin>: larger than a policy file may be (1048576 bytes, 1 MiB)")


def test_validate_reads_stdin_once() -> None:
    """'-' twice would judge standard input twice: the second time an empty policy it never got."""
    run = cli("validate", "-", "--policy", "-", stdin=POLICY.read_text())
    assert run.returncode == 2 and run.stdout == ""
    run = cli("validate", "-", "-", stdin=POLICY.read_text())
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == "authz-service validate: error: '-' (standard input) can be named once\n"


# --- AUTHZ_* variables that are no setting ----------------------------------------------------------


def test_validate_warns_about_an_unknown_authz_variable_on_stderr() -> None:
    """As a ConfigMap repo's CI runs it, with the Deployment's environment: the typo is named, with
    the setting it resembles; the verdict on the policy (stdout, exit code) is unchanged."""
    run = cli("validate", "--strict", str(POLICY), env={"AUTHZ_GRPC_PROT": "9000", "AUTHZ_FROBNICATE": "1"})
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout == f"{POLICY}: OK: 4 routes, 1 issuer, 0 warnings\n"
    assert run.stderr.splitlines() == [
        "authz-service validate: warning: AUTHZ_FROBNICATE is not a setting of authz-service; it is ignored",
        "authz-service validate: warning: AUTHZ_GRPC_PROT is not a setting of authz-service; it is ignored "
        "(did you mean AUTHZ_GRPC_PORT?)",
    ]


def test_compile_envoy_warns_about_an_unknown_authz_variable_it_would_otherwise_ignore() -> None:
    """compile envoy takes serve's AUTHZ_LEEWAY when --leeway is not given: a misspelt one is named,
    the bootstrap still written (the leeway its default, as serve's would be)."""
    run = cli("compile", "envoy", str(POLICY), "--report", "none", env={"AUTHZ_LEWAY": "5"})
    assert run.returncode == 0 and run.stdout.startswith("# Envoy bootstrap"), run.stderr
    assert run.stderr.splitlines() == [
        "authz-service compile envoy: warning: AUTHZ_LEWAY is not a setting of authz-service; it is ignored "
        "(did you mean AUTHZ_LEEWAY?)",
    ]


def test_validate_is_silent_about_settings_and_service_links() -> None:
    run = cli("validate", str(POLICY), env={"AUTHZ_GRPC_PORT": "9000", "AUTHZ_METRICS_SERVICE_HOST": "10.0.0.1"})
    assert run.returncode == 0 and run.stderr == ""


# --- example -------------------------------------------------------------------------------------


MODELINE = "# yaml-language-server: $schema="


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_prints_the_bundled_file(name: str) -> None:
    """As shipped, but for the editor's schema line: it names the schema beside the printed file."""
    run = cli("example", name)
    assert run.returncode == 0 and run.stderr == ""
    shipped = (ROOT / "authz_service" / EXAMPLES[name][0]).read_text().splitlines(keepends=True)
    printed = run.stdout.splitlines(keepends=True)
    assert len(printed) == len(shipped)
    assert [p for p, s in zip(printed, shipped) if p != s] == (
        [f"{MODELINE}policy.schema.json\n"] if shipped[0].startswith(MODELINE) else [])


def test_the_printed_policy_finds_its_schema_beside_it(tmp_path: Path) -> None:
    """`example policy` and `example policy-schema` into one folder: the policy's schema line
    resolves there, to the schema, and the policy is valid under it (outside the package too)."""
    import json

    import jsonschema
    import yaml

    (tmp_path / "policy.yaml").write_text(cli("example", "policy").stdout)
    (tmp_path / "policy.schema.json").write_text(cli("example", "policy-schema").stdout)
    first = (tmp_path / "policy.yaml").read_text().splitlines()[0]
    assert first.startswith(MODELINE)
    schema_file = tmp_path / first.removeprefix(MODELINE)
    schema = json.loads(schema_file.read_text())
    assert schema == json.loads((ROOT / "authz_service" / "policy.schema.json").read_text())
    jsonschema.validate(yaml.safe_load((tmp_path / "policy.yaml").read_text()), schema)


def test_the_printed_examples_work_together(tmp_path: Path) -> None:
    for name in ("policy", "policy-tests"):
        (tmp_path / f"{name}.yaml").write_text(cli("example", name).stdout)
    run = cli("test", str(tmp_path / "policy.yaml"), str(tmp_path / "policy-tests.yaml"))
    assert run.returncode == 0 and "0 failed" in run.stdout


def test_example_names_are_checked() -> None:
    run = cli("example", "policies")
    assert run.returncode == 2 and "invalid choice: 'policies'" in run.stderr


# --- help and completion -------------------------------------------------------------------------


def test_every_option_of_every_command_has_help() -> None:
    missing = []
    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{parser.prog} {'/'.join(action.option_strings) or action.metavar or action.dest}")
    assert missing == []


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_parsers(sub))
    return found


def test_the_help_walk_sees_every_option() -> None:
    """Guards the test above: it walks every subcommand and every option the CLI has."""
    prog_names = {p.prog for p in _parsers(build_parser())}
    assert prog_names == {"authz-service", *(f"authz-service {c}" for c in (
        "serve", "dev-issuer", "validate", "explain", "test", "audit", "compile", "compile envoy", "example",
        "completion"))}
    flags = {s for a in _all_actions(build_parser()) for s in a.option_strings}
    assert {"--ext-authz-http-port", "--token-file", "--strict", "--public-url", "--version"} <= flags


def completion(shell: str) -> str:
    run = cli("completion", shell)
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
@pytest.mark.parametrize(("words", "expected"), [
    (["s"], {"serve"}),
    (["serve", "--ext"], {"--ext-authz-http-port", "--ext-authz-http-path-prefix"}),
    (["example", ""], {"policy", "policy-schema", "policy-tests", "dev-issuer"}),
    (["validate", "--st"], {"--strict"}),
])
def test_bash_completion_completes_commands_options_and_choices(tmp_path: Path, words: list[str],
                                                                expected: set[str]) -> None:
    script = tmp_path / "authz-service.bash"
    script.write_text(completion("bash"))
    words_text = " ".join(f"'{w}'" for w in words)
    probe = (f"source {script}; COMP_WORDS=(authz-service {words_text}); COMP_CWORD={len(words)}; "
             'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; _shtab_authz_service; '
             'printf "%s\\n" "${COMPREPLY[@]}"')
    run = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert set(run.stdout.split()) == expected


def test_zsh_completion_is_a_compdef_for_the_command() -> None:
    script = completion("zsh")
    assert script.startswith("#compdef authz-service")
    assert "--ext-authz-http-port" in script and "policy-tests" in script and "_files" in script


@pytest.mark.parametrize("command", [("validate",), ("explain", "--method", "GET", "--path", "/"), ("test", "t.yaml"),
                                     ("audit",), ("compile", "envoy"), ("dev-issuer", "--config", "c.yaml")])
def test_an_unknown_option_is_named_with_its_command(command):
    """The error line names the command whose options were mistyped, with that command's usage."""
    run = cli(*command, "--bogus")
    assert run.returncode == 2 and run.stdout == ""
    name = " ".join(command[:2]) if command[0] == "compile" else command[0]
    assert run.stderr.splitlines()[-1] == f"authz-service {name}: error: unrecognized arguments: --bogus"
    assert run.stderr.startswith(f"usage: authz-service {name} ")
