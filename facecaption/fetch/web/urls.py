"""Outside URL text (a source cell, a `Location` header) to a URL we may request, or the
reason it is not one.

`parse_url` takes any object and either returns a yarl `URL` that every later step can use
without raising (the takedown lookup in Postgres, DNS, aiohttp), or raises `UnusableURL` with
the reason. It refuses what yarl, the IDNA codec or getaddrinfo would choke on later, and what
they would silently change: values that are not text, NUL and other control characters, lone
surrogates (invalid UTF-8 read from a source, or raw bytes in a header: yarl drops them
without a word), host names that are not DNS names (empty or over-long labels, bytes outside
letters, digits, `-` and `_`, punycode the codec cannot decode), numeric hosts that are not
a dotted-quad IPv4 (`2130706433`, `0x7f.1`: getaddrinfo would read them as addresses),
ports outside 1-65535, and credentials (`user:password@`, or a user alone, which may be a
token): a password found in a URL list is not ours to use, so it is never sent, and the
reason names the URL with its userinfo masked, so it is never stored either.
`resolve_location` does the same for a redirect target, relative to the URL that answered,
and also refuses a `Location` over `MAX_LOCATION_CHARS`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection

from yarl import URL

from facecaption.core.redaction import redact_userinfo

# DNS limits (RFC 1035): a name of at most 253 characters in labels of 1 to 63.
MAX_HOST_LENGTH = 253
MAX_LABEL_LENGTH = 63
# The longest redirect target followed: the request line following a longer one would be
# over what servers read (8 KiB in aiohttp, nginx and Apache).
MAX_LOCATION_CHARS = 8190
# How much of a hostile value an error message quotes.
QUOTE_CHARS = 120

_LABEL = re.compile(r"[a-z0-9_-]+")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")


class UnusableURL(ValueError):
    """Outside text that is not a URL we may request; the message says why."""


def quote(value: object) -> str:
    """`value` for an error message: its repr (escapes NUL, surrogates and bytes), cut short."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} chars)"


def parse_url(raw: object, allowed_schemes: Collection[str]) -> URL:
    """The absolute URL in `raw`; `UnusableURL` when it is not one we may request."""
    if raw is None:
        raise UnusableURL("empty url")
    if not isinstance(raw, str):
        raise UnusableURL(f"url cell is {type(raw).__name__}, not text: {quote(raw)}")
    text = raw.strip()
    if not text:
        raise UnusableURL("empty url")
    _check_text(text)
    try:
        url = URL(text)
        url.port, url.raw_path_qs  # noqa: B018 (yarl checks these lazily: ask now)
    except ValueError as error:  # UnicodeError included (the IDNA codec)
        raise UnusableURL(f"unparseable url {quote(text)}: {error}") from error
    if url.scheme not in allowed_schemes:
        raise UnusableURL(f"scheme {url.scheme!r} not allowed")
    if not url.raw_host:
        raise UnusableURL(f"url has no host: {quote(text)}")
    if url.explicit_port == 0:
        raise UnusableURL("port 0")
    _check_host(url)
    if url.raw_user or url.password is not None:
        raise UnusableURL(f"url carries credentials: {quote(redact_userinfo(text))}")
    return url


def resolve_location(base: URL, location: str | None, allowed_schemes: Collection[str]) -> URL:
    """The URL a redirect's `Location` names, relative to `base`; `UnusableURL` when there
    is none we may request."""
    if location is None or not location.strip():
        raise UnusableURL("redirect without a Location")
    text = location.strip()
    if len(text) > MAX_LOCATION_CHARS:
        raise UnusableURL(f"Location of {len(text)} characters, over {MAX_LOCATION_CHARS}")
    _check_text(text)  # before yarl, which would drop surrogates silently
    try:
        target = str(base.join(URL(text)))
    except ValueError as error:
        raise UnusableURL(f"unparseable Location {quote(text)}: {error}") from error
    return parse_url(target, allowed_schemes)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UnusableURL(f"not valid UTF-8 text: {quote(text)}") from error
    control = next((c for c in text if ord(c) < 0x20 or ord(c) == 0x7F), None)
    if control is not None:
        raise UnusableURL(f"control character {control!r} in {quote(text)}")


def _check_host(url: URL) -> None:
    """Refuse a host that is neither an IP literal nor a name DNS and the IDNA codec accept."""
    raw_host = url.raw_host or ""
    try:
        ipaddress.ip_address(raw_host)
        return
    except ValueError:
        pass
    name = raw_host.lower().removesuffix(".")
    if len(name) > MAX_HOST_LENGTH:
        raise UnusableURL(f"host name over {MAX_HOST_LENGTH} characters: {quote(raw_host)}")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise UnusableURL(f"empty label in host {quote(raw_host)}")
        if len(label) > MAX_LABEL_LENGTH:
            raise UnusableURL(f"host label over {MAX_LABEL_LENGTH} characters: {quote(label)}")
        if not _LABEL.fullmatch(label):
            raise UnusableURL(f"host {quote(raw_host)} is not a DNS name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise UnusableURL(f"numeric host {quote(raw_host)} is not a dotted-quad IPv4 address")
    if any(label.startswith("xn--") for label in labels):
        # Plain labels were checked above (all the IDNA codec checks in what getaddrinfo
        # does); punycode must also decode, for the codec and for yarl's `host`.
        try:
            name.encode("idna").decode("idna")
            url.host  # noqa: B018
        except UnicodeError as error:
            raise UnusableURL(f"host {quote(raw_host)}: {error}") from error
