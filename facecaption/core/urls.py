"""URL normalisation for matching: two spellings of one image URL (`HTTP://Example.COM:80/a`
and `http://example.com/a`) are one URL to a takedown. Only what RFC 3986 says cannot change
the resource is normalised: scheme and host case, an IDNA host, the default port, the case
of percent-escapes, an empty path, the fragment. Path and query are kept as they are.
"""

from __future__ import annotations

import contextlib
import re
from urllib.parse import urlsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
_ESCAPE = re.compile(r"%[0-9a-fA-F]{2}")


def normalise_url(url: object) -> str | None:
    """The normalised form of an absolute URL, or None for anything that is not one (not a
    string, a NUL, no scheme or host, a bad port or host)."""
    if not isinstance(url, str) or "\x00" in url:
        return None
    try:
        parts = urlsplit(url.strip())
        port = parts.port
        host = parts.hostname
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if not scheme or not host:
        return None
    # a host the IDNA codec refuses (an IPv6 literal, an odd label) is compared as written
    with contextlib.suppress(UnicodeError):
        host = host.encode("idna").decode("ascii")
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    if "@" in parts.netloc:
        netloc = parts.netloc.rsplit("@", 1)[0] + "@" + netloc
    path = _ESCAPE.sub(lambda m: m.group(0).upper(), parts.path) or "/"
    query = _ESCAPE.sub(lambda m: m.group(0).upper(), parts.query)
    return f"{scheme}://{netloc}{path}" + (f"?{query}" if query else "")
