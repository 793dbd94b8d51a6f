"""policy.py: names normalised as istiod does, and istio.io/debug names checked as Go's net/url reads them."""

from __future__ import annotations

import pytest

from istioctl_proxy import gourl
from istioctl_proxy.auth import Caller, authorize
from istioctl_proxy.errors import InvalidRequest, PermissionDenied, UnsupportedType
from istioctl_proxy.policy import (
    CONFIG_DUMP,
    DEBUG,
    DEBUG_PATHS,
    MAX_RESOURCE_NAME,
    MAX_RESOURCE_NAMES,
    SYNCZ,
    Merge,
    parse_debug_name,
    plan_request,
)

# (name, what Go 1.26.8 says): None = url.Parse fails; else (Path, RawQuery, ParseQuery failed, Query().Get("proxyID")).
# Recorded from a Go program calling url.Parse / url.ParseQuery on each name (the same go1.26.8 istiod is built with).
GO_VERDICTS: list[tuple[bytes, tuple[bytes, bytes, bool, bytes] | None]] = [
    (b"config_dump?proxyID=x\t", None),
    (b"syncz\r", None),
    (b"syncz\n", None),
    (b"\x00", None),
    (b"syncz\x7f", None),
    (b":x", None),
    (b"1a:b", None),
    (b"config_dump:x", None),
    (b"syncz:x", (b"", b"", False, b"")),
    (b"//[x", None),
    (b"//h/syncz", (b"/syncz", b"", False, b"")),
    (b"config%5Fdump", (b"config_dump", b"", False, b"")),
    (b"config_dump%zz", None),
    (b"config_dump%", None),
    (b"/config_dump", (b"/config_dump", b"", False, b"")),
    (b"syncz#frag", (b"syncz", b"", False, b"")),
    (b"syncz#%zz", None),
    (b"config_dump?proxyID=%zz", (b"config_dump", b"proxyID=%zz", True, b"")),
    (b"config_dump?proxyID=a;b", (b"config_dump", b"proxyID=a;b", True, b"")),
    (b"config_dump?proxyID=%zz&proxyID=v", (b"config_dump", b"proxyID=%zz&proxyID=v", True, b"v")),
    (b"config_dump?proxyID=a+b", (b"config_dump", b"proxyID=a+b", False, b"a b")),
    (b"config_dump?proxyID=web%2D1.team", (b"config_dump", b"proxyID=web%2D1.team", False, b"web-1.team")),
    (b"config_dump?proxy%49D=x", (b"config_dump", b"proxy%49D=x", False, b"x")),
    (b"syncz?", (b"syncz", b"", False, b"")),
    (b"*", (b"*", b"", False, b"")),
    (b"", (b"", b"", False, b"")),
    (b"a b", (b"a b", b"", False, b"")),
    (b"http://x/y", (b"/y", b"", False, b"")),
    (b"syncz?a=%0A", (b"syncz", b"a=%0A", False, b"")),
]


@pytest.mark.parametrize(("name", "verdict"), GO_VERDICTS, ids=[repr(n) for n, _ in GO_VERDICTS])
def test_gourl_agrees_with_go(name: bytes, verdict: tuple[bytes, bytes, bool, bytes] | None) -> None:
    if verdict is None:
        with pytest.raises(gourl.GoURLError):
            gourl.parse(name)
        return
    url = gourl.parse(name)
    query = gourl.parse_query(url.raw_query)
    assert (url.path, url.raw_query, bool(query.error), query.get(b"proxyID")) == verdict


@pytest.mark.parametrize("name", [n.decode("latin-1") for n, v in GO_VERDICTS if v is None])
def test_every_name_go_cannot_parse_is_refused(name: str) -> None:
    # istiod dereferences a failed url.Parse: such a name must never leave the proxy.
    with pytest.raises(InvalidRequest):
        plan_request(DEBUG, [name])


@pytest.mark.parametrize("byte", [*range(0x20), 0x20, 0x7F])
@pytest.mark.parametrize("where", ["syncz{}", "config_dump?proxyID=x{}", "{}syncz", "config_dump?proxyID{}=x"])
def test_control_bytes_and_spaces_are_refused_anywhere(byte: int, where: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        plan_request(DEBUG, [where.format(chr(byte))])
    assert f"0x{byte:02x}" in err.value.message


@pytest.mark.parametrize("name", ["syncz\u00e9", "syncz?namespace=\u202e", "config_dump?proxyID=\ud800"])
def test_non_ascii_is_refused(name: str) -> None:
    with pytest.raises(InvalidRequest):
        plan_request(DEBUG, [name])


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("config_dump?proxyID=%zz&proxyID=v", "ParseQuery"),  # Go drops the first pair and reads "v"
        ("config_dump?proxyID=a;proxyID=b", "semicolon"),
        ("config_dump?proxyID=a&proxyID=b", "2 times"),
        ("config_dump?proxyID=a&proxy%49D=b", "2 times"),  # the same key once decoded
        ("config_dump?proxyID=%0a", "control character"),
        ("config_dump?proxyID=%09x", "control character"),
        ("config_dump?proxyID=%ff", "UTF-8"),
        ("adsz?push=true", "no parameter 'push'"),
        ("cachez?clear=true", "no parameter 'clear'"),
        ("syncz?proxyID=x", "no parameter 'proxyID'"),
        ("/config_dump?proxyID=x", "not one istioctl-proxy serves"),
        ("config%5Fdump?proxyID=x", "not one istioctl-proxy serves"),
        ("pprof/profile", "not one istioctl-proxy serves"),
        ("syncz#x", "fragment"),
        ("//host/syncz", "not a URL"),
        ("syncz:x", "not a URL"),
        ("1a:b", "not a valid path (Go's net/url"),
        ("config_dump%zz", "invalid URL escape"),
    ],
)
def test_debug_names_istiod_would_misread_are_refused(name: str, why: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        plan_request(DEBUG, [name])
    assert why in err.value.message


def test_error_messages_escape_the_callers_text() -> None:
    with pytest.raises(InvalidRequest) as err:
        plan_request(DEBUG, ["config_dump?proxyID=x\t\n" + "y" * 500])
    assert "\n" not in err.value.message and "\t" not in err.value.message and len(err.value.message) < 400


@pytest.mark.parametrize(
    ("name", "merge", "proxy_id", "names_proxy"),
    [
        ("syncz", Merge.JSON_ARRAY, "", False),
        ("syncz?namespace=ns-1&pretty", Merge.JSON_ARRAY, "", False),
        ("adsz", Merge.JSON_CLIENTS, "", False),
        ("adsz?proxyID=web-1.team", Merge.DEBUG_PROXY, "web-1.team", True),
        ("adsz?proxyID=", Merge.JSON_CLIENTS, "", True),
        ("telemetryz?proxyID=web-1.team", Merge.DEBUG_PROXY, "web-1.team", True),
        ("config_dump", Merge.DEBUG_PROXY, "", True),
        ("config_dump?proxyID=", Merge.DEBUG_PROXY, "", True),
        ("config_dump?proxyID=web%2D1.team", Merge.DEBUG_PROXY, "web-1.team", True),  # decoded as Go decodes
        ("config_dump?proxyID=a+b", Merge.DEBUG_PROXY, "a b", True),
        ("edsz?proxyID=web-1.team", Merge.DEBUG_PROXY, "web-1.team", True),
        ("list", Merge.ANY_ONE, "", False),
        ("cachez?sizes=true", Merge.ANY_ONE, "", False),
    ],
)
def test_valid_debug_names(name: str, merge: Merge, proxy_id: str, names_proxy: bool) -> None:
    plan = plan_request(DEBUG, [name])
    assert (plan.merge, plan.proxy_id, plan.names_proxy) == (merge, proxy_id, names_proxy)
    assert plan.resource_names == (name,)  # forwarded as given: Go reads it as we did


def test_every_served_path_is_accepted_plainly() -> None:
    for path in DEBUG_PATHS:
        assert parse_debug_name(path).path == path


def test_resource_names_are_a_set_as_in_istiod() -> None:
    assert plan_request(CONFIG_DUMP, ["web.ns-2", "web.ns-2"]).proxy_id == "web.ns-2"
    assert plan_request(CONFIG_DUMP, ["a", "b"]).proxy_id == ""
    empty = plan_request(CONFIG_DUMP, [""])
    assert empty.proxy_id == "" and empty.names_proxy and empty.resource_names == ("",)
    assert plan_request(DEBUG, ["syncz", "syncz"]).resource_names == ("syncz",)
    with pytest.raises(InvalidRequest):
        plan_request(DEBUG, ["syncz", "list"])
    assert plan_request(SYNCZ, ["b", "a", "b"]).resource_names == ("b", "a")


def test_many_and_long_names_are_bounded() -> None:
    assert len(plan_request(SYNCZ, ["x"] * 10_000).resource_names) == 1
    with pytest.raises(InvalidRequest, match="distinct resource names"):
        plan_request(SYNCZ, [str(i) for i in range(MAX_RESOURCE_NAMES + 1)])
    with pytest.raises(InvalidRequest, match="longer than"):
        plan_request(CONFIG_DUMP, ["n" * (MAX_RESOURCE_NAME + 1)])


def test_unknown_and_missing_types() -> None:
    with pytest.raises(UnsupportedType):
        plan_request("type.googleapis.com/envoy.config.cluster.v3.Cluster", [])
    with pytest.raises(InvalidRequest, match="no type_url"):
        plan_request("", [])


def test_scoped_callers_get_only_the_namespace_debug_paths() -> None:
    scoped = Caller("spiffe://cluster.local/ns/ns-1/sa/default", "ns-1", scope="ns-1")
    for name in ("config_dump?proxyID=a.ns-1", "ndsz?proxyID=a.ns-1", "edsz?proxyID=a.ns-1"):
        authorize(plan_request(DEBUG, [name]), scoped)
    for name in ("syncz", "adsz?proxyID=a.ns-1", "sidecarz?proxyID=a.ns-1", "list"):
        with pytest.raises(PermissionDenied):
            authorize(plan_request(DEBUG, [name]), scoped)


@pytest.mark.parametrize("name", ["nonexistent", "force_disconnect", "no-such-path?x=%zz&y", "pprof"])
def test_an_unknown_plain_path_is_answered_here_like_istiods_mux(name: str) -> None:
    plan = plan_request(DEBUG, [name])
    assert plan.merge is Merge.NOT_FOUND and not plan.fan_out and plan.debug_path == name.partition("?")[0]


def test_an_unknown_path_that_is_not_plain_is_still_refused() -> None:
    # '/', '.' and '%' would make istiod's mux clean, redirect or unescape the path: not a plain 404.
    for name in ("pprof/profile", "no.such", "no%2Dsuch", "../x"):
        with pytest.raises(InvalidRequest):
            plan_request(DEBUG, [name])
