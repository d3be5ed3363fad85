"""URLs as the service and its tools show them: in logs, /readyz, spans and command output.

A URL the operator configured may carry credentials: ``user:password@`` (HTTP Basic for a JWKS
behind a proxy or a private bucket) or a signed query (``?X-Amz-Signature=...``). Every place that
shows a URL, or an error message that may quote one (an HTTP client's), shows it through ``shown``.
"""

from __future__ import annotations

import re

# scheme://, then userinfo up to the last '@' before the path (a password may hold an '@'),
# then host[:port]/path, then the query and fragment.
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?:[^\s/?#]*@)?(?P<place>[^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def shown(text: str) -> str:
    """``text`` with every URL in it cut to ``scheme://host[:port]/path``: no userinfo, query or
    fragment. A URL alone, or a message that quotes one; other text is left as it is."""
    return _URL.sub(lambda m: m["scheme"] + m["place"], text)
