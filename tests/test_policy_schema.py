"""authz_service/policy.schema.json agrees with the loader wherever a JSON Schema can express the rule."""

from __future__ import annotations

import json
import textwrap
from importlib import resources
from pathlib import Path

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from authz_service.policy import PolicyError, parse_policy
from tests.test_policy import BAD_PATTERNS, GOOD_ROUTE, ISSUERS, MISTAKES

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "authz_service" / "policy.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def schema_ok(doc: object) -> bool:
    return VALIDATOR.is_valid(doc)


def loader_ok(doc: object) -> bool:
    try:
        parse_policy(yaml.safe_dump(doc), "gen.yaml")
    except PolicyError:
        return False
    return True


def test_schema_is_a_valid_draft_2020_12_schema_and_ships_as_package_data():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    shipped = resources.files("authz_service").joinpath("policy.schema.json").read_text()
    assert json.loads(shipped) == SCHEMA


def test_schema_knows_exactly_the_lint_codes_the_loader_accepts():
    from authz_service.policy import LINT_CODES

    assert set(SCHEMA["$defs"]["route"]["properties"]["acknowledge"]["items"]["enum"]) == set(LINT_CODES)


def test_schema_knows_exactly_the_path_cases_the_loader_reads():
    from authz_service.policy import PathCase

    assert set(SCHEMA["properties"]["path_case"]["enum"]) == {case.value for case in PathCase}


def test_schema_knows_exactly_the_format_versions_the_loader_reads():
    from authz_service.policy import POLICY_VERSIONS

    assert POLICY_VERSIONS == (SCHEMA["properties"]["version"]["const"],)


def test_example_policy_points_editors_at_the_schema():
    first = (ROOT / "authz_service" / "examples" / "policy.yaml").read_text().splitlines()[0]
    assert first == "# yaml-language-server: $schema=../policy.schema.json"


E2E_POLICY = textwrap.dedent("""\
    issuers:
      - user_pool_id: us-east-1_Demo00001
        issuer: http://127.0.0.1:9000/us-east-1_Demo00001
        client_ids: [payments-writer, payments-reader]
    mode: enforce
    path_case: insensitive
    forward_token: true
    routes:
      - {name: a, methods: [POST], path: /transactions, scopes: [transactions/post], mode: dry-run}
      - {path: /exchange, scopes: [transactions/post], forward_token: false}
      - {name: 'GET /x/{id}/**', methods: [GET, HEAD], path: '/x/{id}/**', scopes: [x/y]}
      - {path: /, public: true}
      - {path: /**, public: false, scopes: [https://api.example.com/read]}
      - {path: '/v1:batch/@me', scopes: [r]}
    """)


@pytest.mark.parametrize("path", ["authz_service/examples/policy.yaml", "deploy/k8s/policy.yaml",
                                  "authz_service/examples/policy-custom-claims.yaml", None])
def test_every_policy_the_loader_accepts_is_schema_valid(path):
    text = (ROOT / path).read_text() if path else E2E_POLICY
    parse_policy(text, "p.yaml")
    errors = [e.message for e in VALIDATOR.iter_errors(yaml.safe_load(text))]
    assert errors == []


# Mistakes a schema cannot express: cross-field or cross-item rules, YAML-level problems.
NOT_EXPRESSIBLE = {"region mismatch", "duplicate issuer", "conflicting routes", "duplicate yaml key",
                   "duplicate top key", "not yaml", "python tag", "empty file",
                   # Python's re (used by jsonschema) lets '$' match before a final newline:
                   "client id with newline", "pool id with newline", "issuer with newline", "name with newline",
                   "duplicate route name", "replica is the primary"}


@pytest.mark.parametrize(("name", "text"), [(m[0], m[1]) for m in MISTAKES if m[0] not in NOT_EXPRESSIBLE],
                         ids=[m[0] for m in MISTAKES if m[0] not in NOT_EXPRESSIBLE])
def test_mistakes_the_loader_refuses_are_refused_by_the_schema(name, text):
    with pytest.raises(PolicyError):
        parse_policy(text, "p.yaml")
    assert not schema_ok(yaml.safe_load(text)), name


@pytest.mark.parametrize("pattern", [p for p in BAD_PATTERNS if p != "/{id}/{id}"])  # repeated param: loader only
def test_bad_path_patterns_are_refused_by_the_schema(pattern):
    doc = yaml.safe_load(ISSUERS + "routes:\n" + GOOD_ROUTE)
    doc["routes"].append({"path": pattern, "scopes": ["r"]})
    assert not schema_ok(doc)


# --- property: on generated documents the schema and the loader agree ------------------------------

PATHS = ["/", "/**", "/a", "/a/{id}", "/a/{id}/**", "/v1:batch", "a", "/a/", "/a//b", "/a/**/b", "/a*", "/{1d}",
         "/.", "/a/..", "/a b", "/é", "/{id}x", 3, None]
METHODS = [["GET"], ["GET", "POST"], ["get"], ["G ET"], [], ["GET", "GET"], "GET", [1], None]
SCOPES = [["a/b"], ["a/b", "c"], [], "a/b", ["a b"], ['a"b'], [""], [7], None]
POOLS = ["us-east-1_Abc123", "eu-central-1_X9", "Abc123", "us-east-1", "", 5]
REPLICAS = [["eu-west-1"], ["eu-west-1", "eu-west-1"], [], "eu-west-1", ["europe"], [3]]
CLIENT_IDS = [["app-1"], [], "app-1", ["a b"], None]
CLAIMS = [{"tenant": "acme"}, {"custom:tier": {"any_of": ["gold", 1, True]}}, {"envs": {"contains": "prod"}},
          {"t": {"equals": 2.5}}, {}, [], {"t": ["a"]}, {"t": None}, {"t": {"any_of": []}}, {"t": {"any_of": [1, 1.0]}},
          {"t": {"contains": 1}}, {"t": {"equals": "a", "contains": "b"}}, {"t": {"in": ["a"]}},
          {"client_id": "x"}, {"cognito:groups": {"contains": "a"}}, {"a b": "x"}, {"t": {"any_of": [True, 1]}},
          None]


@st.composite
def documents(draw: st.DrawFn) -> dict[str, object]:
    issuer: dict[str, object] = {"user_pool_id": draw(st.sampled_from(POOLS))}
    if draw(st.booleans()):
        issuer["client_ids"] = draw(st.sampled_from([["abc"], [], "abc", ["a b"], ["x" * 129]]))
    if draw(st.booleans()):
        issuer["issuer"] = draw(st.sampled_from(["https://idp.example/p", "http://127.0.0.1:9000/p", "idp", "",
                                                 "https://user:pw@idp.example/p"]))
    if draw(st.booleans()):
        issuer["issuer_format"] = draw(st.sampled_from(["original", "updated", "new", 1]))
    if draw(st.booleans()):
        issuer["replica_regions"] = draw(st.sampled_from(REPLICAS))
    route: dict[str, object] = {}
    for key, values in (("path", PATHS), ("methods", METHODS), ("scopes", SCOPES), ("all_scopes", SCOPES),
                        ("client_ids", CLIENT_IDS), ("claims", CLAIMS)):
        value = draw(st.sampled_from(values))
        if value is not None and (key in ("path", "scopes") or draw(st.booleans())):
            route[key] = value
    public = draw(st.sampled_from([None, True, False, "yes"]))
    if public is not None:
        route["public"] = public
    mode = draw(st.sampled_from([None, "enforce", "dry-run", "audit"]))
    if mode is not None:
        route["mode"] = mode
    if draw(st.booleans()):
        route[draw(st.sampled_from(["name", "scope", "desc"]))] = draw(st.sampled_from(["ok-name", "#x", 1]))
    doc: dict[str, object] = {"issuers": [issuer], "routes": [route]}
    if draw(st.booleans()):
        doc[draw(st.sampled_from(["mode", "version"]))] = draw(st.sampled_from(["enforce", "dry-run", "x"]))
    if draw(st.booleans()):
        doc["version"] = draw(st.sampled_from([1, 1.0, 2, 0, "1", True, None, [1]]))
    if draw(st.booleans()):
        doc["path_case"] = draw(st.sampled_from(["sensitive", "insensitive", "Insensitive", True, None, 1]))
    return doc


@settings(max_examples=400, deadline=None)
@given(documents())
def test_schema_and_loader_agree_on_generated_documents(doc):
    assert schema_ok(doc) == loader_ok(doc), doc


@pytest.mark.parametrize("issuer", [None, "http://127.0.0.1:9229/local_5oDD2Qxe"])
def test_emulator_pool_id_needs_an_issuer_in_schema_and_loader(issuer):
    entry = {"user_pool_id": "local_5oDD2Qxe", **({"issuer": issuer} if issuer else {})}
    doc = {"issuers": [entry], "routes": [{"path": "/ok", "scopes": ["r/s"]}]}
    assert schema_ok(doc) is loader_ok(doc) is (issuer is not None)
