"""Go's net/url, as istiod runs it on every istio.io/debug name: url.Parse and url.ParseQuery.

istiod parses a debug name with `url.Parse` and dereferences the result without checking the error
(debuggen.go parseAndValidateDebugRequest), then builds `/debug/<name>` with http.NewRequest, and its
handlers read `?proxyID=` with `URL.Query().Get`, which silently drops pairs ParseQuery cannot decode.
Python's urllib differs on exactly these inputs (it strips TAB/CR/LF, keeps bad %-escapes, reads ';'),
so the proxy decides with a port of Go's code (go1.26 src/net/url/url.go), byte for byte, instead.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from .errors import GoURLError

# Go's encoding modes (url.go), for unescape and shouldEscape.
_PATH, _HOST, _ZONE, _USER, _QUERY, _FRAGMENT = range(6)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_HOST_OK = frozenset(b"!$&'()*+,;=:[]<>\"")


def _should_escape(c: int, mode: int) -> bool:
    """gen_encoding_table.go shouldEscape, for the modes unescape consults (host and zone)."""
    if 0x61 <= c <= 0x7A or 0x41 <= c <= 0x5A or 0x30 <= c <= 0x39:
        return False
    if mode in (_HOST, _ZONE) and c in _HOST_OK:
        return False
    return c not in b"-_.~"


_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CTL = re.compile(rb"[\x00-\x1f\x7f]")


def unescape(s: bytes, mode: int) -> bytes:
    """url.go unescape: %XX must be well formed; '+' is a space only in query components."""
    if mode not in (_HOST, _ZONE):
        # The same result as the byte loop below, at C speed: names may be 4 KiB and come in bulk.
        bad = _BAD_ESCAPE.search(s)
        if bad is not None:
            raise GoURLError(f"invalid URL escape {s[bad.start():bad.start() + 3].decode('latin-1')!r}")
        if mode == _QUERY:
            s = s.replace(b"+", b" ")  # before decoding: "%2B" stays a '+'
        # Every '%' starts a valid escape now, which is all unquote_to_bytes needs to agree with Go.
        return unquote_to_bytes(s) if b"%" in s else s
    i = 0
    n = 0
    while i < len(s):
        c = s[i]
        if c == 0x25:  # %
            n += 1
            if i + 2 >= len(s) or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
                raise GoURLError(f"invalid URL escape {s[i:i + 3].decode('latin-1')!r}")
            v = int(s[i + 1:i + 3], 16)
            if mode == _HOST and v < 0x80 and s[i:i + 3] != b"%25":
                raise GoURLError(f"invalid URL escape {s[i:i + 3].decode('latin-1')!r}")
            if mode == _ZONE and s[i:i + 3] != b"%25" and v != 0x20 and _should_escape(v, _HOST):
                raise GoURLError(f"invalid URL escape {s[i:i + 3].decode('latin-1')!r}")
            i += 3
        else:
            if mode in (_HOST, _ZONE) and c < 0x80 and _should_escape(c, mode):
                raise GoURLError(f"invalid character {chr(c)!r} in host name")
            i += 1
    if n == 0 and not (mode == _QUERY and b"+" in s):
        return s
    out = bytearray()
    i = 0
    while i < len(s):
        c = s[i]
        if c == 0x25:
            out.append(int(s[i + 1:i + 3], 16))
            i += 3
            continue
        out.append(0x20 if c == 0x2B and mode == _QUERY else c)
        i += 1
    return bytes(out)


@dataclass(frozen=True)
class GoURL:
    """The fields of Go's url.URL that matter here; strings are raw bytes, as Go's are."""

    scheme: bytes = b""
    opaque: bytes = b""
    user: bytes | None = None
    host: bytes = b""
    path: bytes = b""
    raw_query: bytes = b""
    force_query: bool = False
    fragment: bytes = b""


def contains_ctl_byte(s: bytes) -> bool:
    """Does `s` hold an ASCII control byte (Go's stringContainsCTLByte)?"""
    return _CTL.search(s) is not None


def _get_scheme(raw: bytes) -> tuple[bytes, bytes]:
    for i, c in enumerate(raw):
        if 0x61 <= c <= 0x7A or 0x41 <= c <= 0x5A:
            continue
        if 0x30 <= c <= 0x39 or c in b"+-.":
            if i == 0:
                return b"", raw
            continue
        if c == 0x3A:  # :
            if i == 0:
                raise GoURLError("missing protocol scheme")
            return raw[:i], raw[i + 1:]
        return b"", raw
    return b"", raw


def _valid_optional_port(port: bytes) -> bool:
    if not port:
        return True
    return port[:1] == b":" and all(0x30 <= b <= 0x39 for b in port[1:])


def _valid_userinfo(s: bytes) -> bool:
    ok = b"-._:~!$&'()*+,;=%@"
    return all(0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A or 0x30 <= c <= 0x39 or c in ok for c in s)


def _parse_host(scheme: bytes, host: bytes) -> bytes:
    open_idx = host.rfind(b"[")
    if open_idx > 0:
        raise GoURLError("invalid IP-literal")
    if open_idx == 0:
        close_idx = host.rfind(b"]")
        if close_idx < 0:
            raise GoURLError("missing ']' in host")
        colon_port = host[close_idx + 1:]
        if not _valid_optional_port(colon_port):
            raise GoURLError(f"invalid port {colon_port.decode('latin-1')!r} after host")
        unescape(colon_port, _HOST)
        hostname = host[1:close_idx]
        zone = hostname.find(b"%25")
        if zone >= 0:
            plain = unescape(hostname[:zone], _HOST) + unescape(hostname[zone:], _ZONE)
        else:
            plain = unescape(hostname, _HOST)
        try:  # netip.ParseAddr; Python's ipaddress takes the same IPv6 forms (zones included)
            addr = ipaddress.ip_address(plain.decode())
        except (ValueError, UnicodeDecodeError):
            raise GoURLError("invalid host") from None
        if addr.version == 4:
            raise GoURLError("invalid IP-literal")
        return host
    i = host.find(b":")
    if i != -1:
        last = host.rfind(b":")
        if last != i and scheme not in (b"http", b"https"):
            i = last
        if not _valid_optional_port(host[i:]):
            raise GoURLError(f"invalid port {host[i:].decode('latin-1')!r} after host")
    return unescape(host, _HOST)


def _parse(raw: bytes) -> GoURL:
    """url.go parse(rawURL, viaRequest=false)."""
    if contains_ctl_byte(raw):
        raise GoURLError("net/url: invalid control character in URL")
    if raw == b"*":
        return GoURL(path=b"*")
    scheme, rest = _get_scheme(raw)
    scheme = scheme.lower()
    force_query = False
    raw_query = b""
    if rest.endswith(b"?") and rest.count(b"?") == 1:
        force_query, rest = True, rest[:-1]
    else:
        rest, _, raw_query = rest.partition(b"?")
    if not rest.startswith(b"/"):
        if scheme:
            return GoURL(scheme=scheme, opaque=rest, raw_query=raw_query, force_query=force_query)
        if b":" in rest.partition(b"/")[0]:
            raise GoURLError("first path segment in URL cannot contain colon")
    user: bytes | None = None
    host = b""
    if (scheme or not rest.startswith(b"///")) and rest.startswith(b"//"):
        authority, slash, tail = rest[2:].partition(b"/")
        rest = slash + tail
        at = authority.rfind(b"@")
        host = _parse_host(scheme, authority[at + 1:] if at >= 0 else authority)
        if at >= 0:
            userinfo = authority[:at]
            if not _valid_userinfo(userinfo):
                raise GoURLError("net/url: invalid userinfo")
            for part in userinfo.split(b":", 1):
                unescape(part, _USER)
            user = userinfo
    path = unescape(rest, _PATH)
    return GoURL(scheme, b"", user, host, path, raw_query, force_query)


def parse(raw: bytes) -> GoURL:
    """url.Parse: the fragment is cut first, then parsed and unescaped."""
    head, _, frag = raw.partition(b"#")
    url = _parse(head)
    if not frag:
        return url
    return GoURL(url.scheme, url.opaque, url.user, url.host, url.path, url.raw_query, url.force_query,
                 unescape(frag, _FRAGMENT))


@dataclass
class Query:
    """url.ParseQuery's result: the values it kept, in order, and the first error it met (if any)."""

    values: dict[bytes, list[bytes]] = field(default_factory=dict)
    error: str = ""

    def get(self, key: bytes) -> bytes:
        """Values.Get: the first value, or empty."""
        vals = self.values.get(key)
        return vals[0] if vals else b""


MAX_QUERY_PARAMS = 10_000  # url.go defaultMaxParams


def parse_query(query: bytes) -> Query:
    """url.ParseQuery: pairs with ';' or a bad escape are skipped (and reported), the rest kept."""
    out = Query()
    if query.count(b"&") + 1 > MAX_QUERY_PARAMS:
        out.error = "number of URL query parameters exceeded limit"
        return out
    for pair in query.split(b"&") if query else ():
        if b";" in pair:
            out.error = "invalid semicolon separator in query"  # Go overwrites the error here
            continue
        if not pair:
            continue
        key, _, value = pair.partition(b"=")
        try:
            k, v = unescape(key, _QUERY), unescape(value, _QUERY)
        except GoURLError as err:
            out.error = out.error or str(err)
            continue
        out.values.setdefault(k, []).append(v)
    return out


__all__ = ["MAX_QUERY_PARAMS", "GoURL", "GoURLError", "Query", "contains_ctl_byte", "parse", "parse_query", "unescape"]
