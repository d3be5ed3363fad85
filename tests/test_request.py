"""parse_check_request: the HTTP facts of a CheckRequest, refusing any path not in normal form."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz_service._proto.envoy.service.auth.v3 import external_auth_pb2
from authz_service.doors.grpc import parse_check_request
from authz_service.request import (IDENTITY_HEADERS, SPECIAL_NAMES, BadRequest, HeaderFacts, HttpRequest,
                                    http_request, identity_spellings, other_separator_spellings_pattern,
                                    override_spellings, special_names as parse_special_names)


def check(
    method: str = "GET",
    path: str = "/",
    headers: dict[str, str] | None = None,
    header_map: list[tuple[str, bytes]] | None = None,
) -> external_auth_pb2.CheckRequest:
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method = method
    http.path = path
    for name, value in (headers or {}).items():
        http.headers[name] = value
    for name, raw in header_map or []:
        entry = http.header_map.headers.add()
        entry.key = name
        entry.raw_value = raw
    return request


def parse(**kwargs) -> HttpRequest:
    return parse_check_request(check(**kwargs))


# --- paths ---------------------------------------------------------------------------------------

ACCEPTED = [
    ("/", "/", ()),
    ("/a/b", "/a/b", ("a", "b")),
    ("/a/", "/a/", ("a", "")),
    ("/a%20b", "/a%20b", ("a%20b",)),
    ("/a%C3%A9", "/a%C3%A9", ("a%C3%A9",)),
    ("/a?x=../..", "/a", ("a",)),
    ("/a?x=//%2F", "/a", ("a",)),
    ("/a#frag", "/a", ("a",)),
    ("/a#f?x", "/a", ("a",)),
    ("/a?", "/a", ("a",)),
    ("/transactions/42", "/transactions/42", ("transactions", "42")),
    ("/v1:batch/@me/a-b_c.d~e", "/v1:batch/@me/a-b_c.d~e", ("v1:batch", "@me", "a-b_c.d~e")),
    ("/...", "/...", ("...",)),
    ("/a.b/.c/..d", "/a.b/.c/..d", ("a.b", ".c", "..d")),
]


@pytest.mark.parametrize(("target", "path", "segments"), ACCEPTED)
def test_normal_paths_are_accepted(target, path, segments):
    request = parse(path=target)
    assert request.path == path
    assert request.segments == segments
    assert request.method == "GET"


REFUSED = [
    "", "a", "a/b", "*", "?x", "//", "//a", "/a//b", "/./", "/a/./b", "/a/../b", "/../a", "/a/.", "/a/..",
    "/.", "/..", "/a\\b", "/a;b", "/a;jsessionid=1", "/a\x00", "/a\x01b", "/a\x7f", "/a\tb", "/a b", "/café",
    "/a\u2028", "/%", "/a%", "/a%2", "/a%zz", "/a%2g", "/%%41", "/a%41", "/a%2e", "/a%2E", "/a%7e", "/a%7E",
    "/a%5f", "/a%2d", "/a%30", "/a%61", "/a%2F", "/a%2f", "/a%5C", "/a%5c", "/a%25", "/a%252F", "/a%00", "/a%0a",
    "/a%7F", "/a%3B", "/a%3bb", "/a/..%3B/b", "/%2e%2e/a", "/a/%2e%2e", '/a"b', "/a<b", "/a{b}", "/a|b", "/a^b", "/a`b", "/a[b]",
    "/" + "a" * 9000,
    # escaped bytes that are not UTF-8: overlong '.' (%c0%ae) and '/' (%c0%af), lone bytes, surrogates
    "/a/%c0%ae%c0%ae/b", "/a%c0%af", "/a%C0%AE", "/a%ff", "/a%80", "/a%ed%a0%80",
]


@pytest.mark.parametrize("target", REFUSED)
def test_paths_not_in_normal_form_are_bad_requests(target):
    with pytest.raises(BadRequest):
        parse(path=target)


@pytest.mark.parametrize("target", ["/a\n", "/a/..\n", "/\n?x"])
def test_path_ending_in_newline_is_a_bad_request(target):
    with pytest.raises(BadRequest):
        parse(path=target)


# --- method and attributes -----------------------------------------------------------------------


def test_missing_attributes_are_bad_requests():
    with pytest.raises(BadRequest):
        parse_check_request(external_auth_pb2.CheckRequest())
    no_http = external_auth_pb2.CheckRequest()
    no_http.attributes.request.SetInParent()
    with pytest.raises(BadRequest):
        parse_check_request(no_http)
    no_request = external_auth_pb2.CheckRequest()
    no_request.attributes.SetInParent()
    with pytest.raises(BadRequest):
        parse_check_request(no_request)


@pytest.mark.parametrize("method", ["", "GE T", "GET/", "G(ET", "GÉT", "GET\r", "\x00", "A" * 33,
                                    "get", "Get", "gET", "delete", "m-search"])
def test_missing_or_invalid_method_is_a_bad_request(method):
    with pytest.raises(BadRequest):
        parse(method=method)


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE", "PROPFIND", "M-SEARCH"])
def test_token_methods_are_kept_verbatim(method):
    assert parse(method=method).method == method


@pytest.mark.parametrize("query", ["_method=DELETE", "a=1&_method=PUT", "_METHOD=x", "%5Fmethod=DELETE",
                                   "%5fMETHOD=1", "_method[]=DELETE", "_method[x]=1", "a;_method=1", "_method",
                                   "_method=", "+_method=1".replace("+", "&"), "_%6Dethod=PUT",
                                   # PHP's reading of a name (Laravel, Symfony): leading spaces dropped,
                                   # '.' and ' ' read as '_', a NUL ends it.
                                   "+_method=DELETE", "%20%20_method=1", ".method=DELETE", "%2EMethod=1",
                                   "a=1&+.method=1", "_method%00=1", "_method%00x[]=1"])
def test_a_method_override_in_the_query_is_a_bad_request(query):
    with pytest.raises(BadRequest, match="_method"):
        parse(path=f"/a?{query}")


@pytest.mark.parametrize("query", ["method=DELETE", "x_method=1", "_methods=1", "q=_method", "a=%5Fmethod",
                                   "_meth%6Fd_x=1", "", "%2B_method=1", "_method.=1", "_method+=1", "+method=1",
                                   "x.method=1", "%00_method=1"])
def test_other_queries_pass(query):
    assert parse(path=f"/a?{query}").path == "/a"


def test_method_with_trailing_newline_is_a_bad_request():
    with pytest.raises(BadRequest):
        parse(method="GET\n")


# --- headers -------------------------------------------------------------------------------------


def test_headers_map_authorization_request_id_and_no_spoofing():
    request = parse(path="/a", headers={"authorization": "Bearer abc", "x-request-id": "rid-1", "accept": "*/*"})
    assert request.authorization == ("Bearer abc",)
    assert request.request_id == "rid-1"
    assert request.spoofed_identity_headers == ()


def test_no_authorization_header_gives_an_empty_tuple():
    request = parse(headers={"accept": "*/*"})
    assert request.authorization == ()
    assert request.request_id == ""


def test_request_id_is_truncated():
    assert parse(headers={"x-request-id": "r" * 500}).request_id == "r" * 128


def test_header_map_keeps_every_authorization_value():
    request = parse(header_map=[("Authorization", b"Bearer one"), ("authorization", b"Bearer two"),
                                ("x-request-id", b"rid")])
    assert request.authorization == ("Bearer one", "Bearer two")
    assert request.request_id == "rid"


def test_header_map_value_field_is_used_without_raw_value():
    request = check()
    entry = request.attributes.request.http.header_map.headers.add()
    entry.key = "authorization"
    entry.value = "Bearer v"
    assert parse_check_request(request).authorization == ("Bearer v",)


def test_header_map_non_utf8_value_is_a_bad_request():
    with pytest.raises(BadRequest):
        parse(header_map=[("authorization", b"Bearer \xff\xfe")])


@pytest.mark.parametrize(
    ("name", "spoofed"),
    [
        ("x-auth-client-id", True), ("x_auth_client_id", True), ("X-Auth-Scopes", True), ("x_auth-scopes", True),
        ("X_AUTH_SUB", True), ("x-auth-sub", True), ("x-auth-subject", False), ("x-auth", False),
        ("x--auth-sub", False), ("xauth-sub", False), ("x-auth-client_id", True),
        # '.' too: PHP and Apache's CGI environment read x.auth.sub as HTTP_X_AUTH_SUB
        ("x.auth.client.id", True), ("X.Auth.Scopes", True), ("x-auth.sub", True), ("x_auth.client-id", True),
        ("x..auth.sub", False), ("x.auth.subject", False), ("x.other", False),
    ],
)
def test_spoofed_identity_header_spellings(name, spoofed):
    via_map = parse(header_map=[(name, b"evil"), ("accept", b"*/*")])
    assert (name.lower() in via_map.spoofed_identity_headers) is spoofed
    assert len(via_map.spoofed_identity_headers) == int(spoofed)
    via_headers = parse(headers={name.lower(): "evil"})
    assert via_headers.spoofed_identity_headers == ((name.lower(),) if spoofed else ())


@pytest.mark.parametrize("name", ["x.http.method.override", "X.HTTP.Method", "x.method_override", "x.original.url",
                                  "x_rewrite.url"])
def test_override_header_spellings_with_dots_are_refused(name):
    with pytest.raises(BadRequest, match=r"\(method or URL override\) is not accepted"):
        parse(header_map=[(name, b"DELETE")])


def test_every_separator_spelling_is_a_special_name():
    """Three separators in every position: x-auth-client-id has 3 ** 3 spellings."""
    assert len([n for n in SPECIAL_NAMES if n.translate(str.maketrans("_.", "--")) == "x-auth-client-id"]) == 27
    assert len(SPECIAL_NAMES) == 27 + 9 + 9 + 9 + 27 + 9 + 9 + 9


def test_all_spoofed_spellings_are_listed():
    request = parse(header_map=[("x-auth-sub", b"1"), ("x_auth_sub", b"2"), ("X_Auth_Client_Id", b"3"),
                                ("x-auth-scopes", b"4")])
    assert set(request.spoofed_identity_headers) == {"x-auth-sub", "x_auth_sub", "x_auth_client_id", "x-auth-scopes"}


def test_identity_and_override_spellings_split_the_special_names_as_the_parser_does():
    """What the native compiler strips and refuses is what the parser strips and refuses."""
    stripped = identity_spellings()
    assert parse_special_names(stripped) == stripped and len(stripped) == 27 + 9 + 9
    refused = override_spellings()
    assert list(refused) == sorted(refused) and len(refused) == 5
    for header, spellings in refused.items():
        assert header in spellings and list(spellings) == sorted(spellings)
        for name in spellings:
            with pytest.raises(BadRequest, match=f"^{header} "):
                parse_special_names([name])
    assert sorted([*stripped, *(n for s in refused.values() for n in s)]) == sorted(SPECIAL_NAMES)


# --- properties ----------------------------------------------------------------------------------

safe_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
path_alphabet = st.sampled_from(list("/.%2eEfF5cC0aA?#;\\ b") + ["%2e", "%2E", "%2f", "%2F", "..", "/..", "%", "é",
                                                                   "%3B", "%3b"])
tricky_paths = st.lists(path_alphabet, max_size=14).map("".join)
paths = st.one_of(safe_text, tricky_paths, tricky_paths.map(lambda p: "/" + p))
methods = st.one_of(safe_text, st.sampled_from(["GET", "POST", "get", "PATCH"]))
header_names = st.one_of(safe_text, st.sampled_from(["authorization", "x-request-id", "x_auth_sub", "X-Auth-Scopes"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=methods,
    path=paths,
    headers=st.dictionaries(header_names, safe_text, max_size=4),
    header_map=st.one_of(st.none(), st.lists(st.tuples(header_names, st.binary(max_size=12)), max_size=4)),
)
def test_parse_only_raises_bad_request_and_accepted_paths_are_normal(method, path, headers, header_map):
    try:
        request = parse(method=method, path=path, headers=headers, header_map=header_map)
    except BadRequest:
        return
    assert request.path.startswith("/")
    assert path.startswith(request.path)
    assert "?" not in request.path and "#" not in request.path
    assert ".." not in request.path.split("/") and "." not in request.path.split("/")
    assert "//" not in request.path
    lowered = request.path.lower()
    assert "%2f" not in lowered and "%2e" not in lowered and "%5c" not in lowered and "%25" not in lowered
    assert "\\" not in request.path and ";" not in request.path and "%3b" not in lowered
    assert request.segments == (tuple(request.path[1:].split("/")) if request.path != "/" else ())
    assert request.method == method


@settings(max_examples=150, deadline=None)
@given(segments=st.lists(st.text("abc.-_~:@%20", min_size=1, max_size=5), min_size=1, max_size=4),
       query=st.text(max_size=10))
def test_path_segments_round_trip(segments, query):
    path = "/" + "/".join(segments)
    try:
        request = parse(path=path + "?" + query)
    except BadRequest:
        assert any(s in (".", "..") for s in segments) or "%" in path
        return
    assert request.path == path
    assert request.segments == tuple(segments)


@pytest.mark.parametrize("name", ["x-http-method-override", "x-http-method", "x-method-override",
                                  "x_http_method_override", "x-http_method", "x-original-url", "x-rewrite-url",
                                  "x_original_url"])
def test_method_and_url_override_headers_are_bad_requests(name):
    with pytest.raises(BadRequest, match="override"):
        parse(headers={name: "DELETE"})


# The reference for which names are identity spellings or overrides: what the API promises is
# "any spelling with another separator in place of a '-'" (lighttpd turns every character of a
# name but letters and digits into '_'), written the slow, obvious way.
def reference_kind(name: str) -> str | None:
    dashed = re.sub("[^0-9a-z]", "-", name.lower())
    if dashed in ("x-auth-client-id", "x-auth-scopes", "x-auth-sub"):
        return "identity"
    if dashed in ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"):
        return "override"
    return None


special_parts = st.sampled_from(["x", "auth", "client", "id", "scopes", "sub", "http", "method", "override",
                                 "original", "url", "rewrite", "X", "Auth"])
special_names = st.lists(special_parts, min_size=1, max_size=4).flatmap(
    lambda parts: st.tuples(*[st.sampled_from(["-", "_", "--", "", ".", "~", "+", "|"]) for _ in parts[1:]]).map(
        lambda seps: parts[0] + "".join(s + p for s, p in zip(seps, parts[1:]))))


@settings(max_examples=400, deadline=None)
@given(names=st.lists(st.one_of(special_names, st.sampled_from(["authorization", "accept", "x-request-id"])),
                      max_size=5, unique_by=str.lower))
def test_headers_map_and_header_map_agree_with_the_reference(names):
    """Both encodings Envoy can send give the same facts, and they match the reference rules."""
    lowered = [n.lower() for n in names]  # the `headers` map's keys are lower-case (API contract)
    results = []
    for kwargs in ({"headers": {n: "v" for n in lowered}}, {"header_map": [(n, b"v") for n in names]}):
        try:
            results.append(parse(**kwargs))
        except BadRequest as exc:
            results.append(str(exc))
    via_headers, via_map = results
    kinds = [reference_kind(n) for n in lowered]
    if "override" in kinds:
        assert isinstance(via_headers, str) and "override" in via_headers
        assert isinstance(via_map, str) and "override" in via_map
        return
    assert via_headers == via_map
    assert via_headers.spoofed_identity_headers == tuple(sorted(n for n, k in zip(lowered, kinds) if k == "identity"))
    assert via_headers.authorization == (("v",) if "authorization" in lowered else ())


def test_other_separator_spellings_are_exactly_the_spellings_the_front_doors_do_not_handle():
    """Every spelling of an identity or override header with RFC 9110 tchar separators (lighttpd
    reads each as '_'): the pattern takes exactly those with a separator other than '-', '_' or '.',
    which the shipped Envoy configs remove early; the front doors handle the rest."""
    pattern = re.compile(other_separator_spellings_pattern())
    separators = "-_.!#$%&'*+^`|~"
    for name in (*IDENTITY_HEADERS, "x-http-method-override", "x-http-method", "x-method-override",
                 "x-original-url", "x-rewrite-url"):
        first, *words = name.split("-")
        for chosen in itertools.product(separators, repeat=len(words)):
            spelled = first + "".join(s + w for s, w in zip(chosen, words))
            assert bool(pattern.fullmatch(spelled)) == any(s not in "-_." for s in chosen), spelled
            assert (spelled in SPECIAL_NAMES) == all(s in "-_." for s in chosen), spelled
    for name in ("x-auth-client-id", "x_auth.sub", "x~auth", "xx~auth~sub", "authorization", "x-request-id",
                 "x-authz-original-path", "x-envoy-auth-headers-to-remove", "x~forwarded~for"):
        assert not pattern.fullmatch(name), name


def every_spelling(name: str) -> list[str]:
    """``name`` with each '-' replaced by any RFC 9110 tchar that is not a letter or digit."""
    first, *words = name.split("-")
    return [first + "".join(s + w for s, w in zip(chosen, words))
            for chosen in itertools.product("-_.!#$%&'*+^`|~", repeat=len(words))]


@pytest.mark.parametrize("fold_names", [False, True], ids=["lower-case names", "names as sent"])
def test_every_spelling_of_an_identity_header_is_stripped_and_of_an_override_refused(fold_names):
    """Where no early header mutation removed them (Istio's sidecar, an Envoy config of one's own),
    the front doors see the other separators' spellings too: each identity one is reported for
    stripping, each override one refused, whatever the case the client sent it in."""
    def facts(headers: dict[str, str]) -> HeaderFacts:
        return (), "", tuple(headers)

    def screened(name: str) -> HttpRequest:
        sent = name.upper() if fold_names else name
        return http_request({sent: "v", "accept": "*/*"}, "GET", lambda _: "/", facts, fold_names=fold_names)

    for header in IDENTITY_HEADERS:
        for spelled in every_spelling(header):
            assert screened(spelled).spoofed_identity_headers == (spelled,), spelled
    for header in ("x-http-method-override", "x-http-method", "x-method-override", "x-original-url", "x-rewrite-url"):
        for spelled in every_spelling(header):
            with pytest.raises(BadRequest, match=f"^{header} \\(method or URL override\\)"):
                screened(spelled)
    for name in ("x-auth-token", "x-authorization", "x--auth-sub", "x-auth-sub-", "xx-auth-sub", "x-auth~sub~",
                 "x~forwarded~for", "x-request-id", "x-auth-client-ids"):
        assert screened(name).spoofed_identity_headers == (), name


def test_spoofed_spellings_are_reported_sorted_once_whatever_the_order_sent():
    """They key the cached allow answers: the same spellings in another order are the same key."""
    names = ["x~auth~sub", "x-auth-sub", "accept", "x_auth_client_id"]
    expected = ("x-auth-sub", "x_auth_client_id", "x~auth~sub")
    assert parse(headers=dict.fromkeys(names, "v")).spoofed_identity_headers == expected
    assert parse(headers=dict.fromkeys(reversed(names), "v")).spoofed_identity_headers == expected
    repeated = [(name, b"v") for name in names + names]
    assert parse(header_map=repeated).spoofed_identity_headers == expected


@pytest.mark.parametrize("config", ["envoy/envoy.yaml", "envoy/envoy-http.yaml", "deploy/k8s/tracing/envoy.yaml",
                                    "deploy/components/authz-sidecar/envoy-grpc.yaml",
                                    "deploy/components/authz-sidecar/envoy-http.yaml",
                                    # HTTP mode without the mutation: allowed_headers forward the shape instead.
                                    "docs/deploy.md", "tests/data/envoy-user-http.yaml"])
def test_the_shipped_envoy_configs_remove_the_other_separator_spellings_first(config):
    text = (Path(__file__).resolve().parents[1] / config).read_text()
    assert f'regex: "{other_separator_spellings_pattern()}"' in text, (
        f"{config}: the early header mutation (or HTTP mode's allowed_headers) must carry "
        "request.other_separator_spellings_pattern()")
