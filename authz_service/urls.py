"""URLs as the service and its tools show them: in logs, /readyz, spans and command output.

A URL the operator configured may carry credentials: ``user:password@`` (HTTP Basic for a JWKS
behind a proxy or a private bucket) or a signed query (``?X-Amz-Signature=...``). Every place that
shows a URL, or an error message that may quote one (an HTTP client's), shows it through ``shown``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

# scheme://, then userinfo up to the last '@' before the path (a password may hold an '@'),
# then host[:port]/path, then the query and fragment.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s/?#]*@)?(?P<place>[^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def shown(text: str) -> str:
    """``text`` with every URL in it cut to ``scheme://host[:port]/path``: no userinfo, query or
    fragment. A URL alone, or a message that quotes one; other text is left as it is."""
    return _URL.sub(lambda m: m["scheme"] + m["place"], text)


def authority_problem(url: str) -> str | None:
    """Why the host and port of an http(s) URL cannot be connected to, or None. An HTTP client
    refuses such a URL at every request with the URL as its only message; the policy loader names
    the problem instead."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:  # urllib's only complaint about the host part: unpaired brackets
        return "'[' and ']' in the host do not pair (an IPv6 address is written as [2001:db8::1])"
    if not host:
        return "no host"
    authority = parts.netloc.rpartition("@")[2]
    port = authority.rpartition(":")[2] if ":" in authority and not authority.endswith("]") else ""
    if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port if port.isdigit() else repr(port)} is not 1 to 65535"
    return None
