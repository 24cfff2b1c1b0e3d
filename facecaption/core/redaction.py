"""Keeping credentials out of what we print and write: URL userinfo, passwords, API keys.

`redact_userinfo` masks the userinfo of every URL in a text (`user:***@` when there is a
password, `***@` when the user part alone may be a token) and changes nothing else, so a URL
without userinfo stays the same link (it errs on the safe side: up to the last `@` before a
`/`, `?`, `#` or space counts as userinfo, so `http://a.example,mailto:x@y.example` reads as
one URL with userinfo and is masked); `redact_text` does the same for every URL inside free text
(error messages), and masks the values of credential headers and fields quoted in it
(`Authorization: Bearer ...`, `api_key=...`, `password=...`, a bare `Bearer` token);
`redacted_settings` is the settings as `facecaption config` prints them.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# scheme://userinfo@host: the authority ends at the first '/', '?', '#' (RFC 3986) or
# whitespace, and its userinfo at the last '@' in it
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]+)@")
# a credential header or field quoted in text (`Authorization: Basic ...`, `?api_key=...`,
# `'password': '...'`): its value, with an auth scheme word before it, up to a delimiter
_SECRET_FIELD = re.compile(
    r"(?i)(?P<name>(?<![a-z0-9])(?:(?:proxy-)?authorization|x-api-key|api[-_]?key|access[-_]token"
    r"|secret[-_]?(?:access[-_]?)?key|client[-_]secret|password|passwd|secret|token))"
    r"(?P<sep>['\"]?\s*[:=]\s*['\"]?)(?P<value>(?:(?:bearer|basic|token)\s+)?[^\s'\",;&]+)"
)
_BEARER = re.compile(r"(?i)\b(?P<scheme>bearer)\s+[A-Za-z0-9._~+/=-]+")
# settings whose value is itself a secret (not the name of the variable holding one)
_SECRET_KEY = re.compile(r"(?:^|_)(?:password|passwd|secret|api_key|access_key|secret_key)$")


def _mask_userinfo(match: re.Match[str]) -> str:
    user, has_password, _ = match["userinfo"].partition(":")
    masked = f"{user}:{MASK}" if has_password else MASK
    return f"{match['scheme']}{masked}@"


def redact_text(text: str) -> str:
    """`text` with the userinfo of every URL in it, and every credential header or field
    value quoted in it, masked."""
    text = redact_userinfo(text)
    text = _SECRET_FIELD.sub(lambda m: f"{m['name']}{m['sep']}{MASK}", text)
    return _BEARER.sub(lambda m: f"{m['scheme']} {MASK}", text)


def redact_userinfo(text: str) -> str:
    """`text` with the userinfo of every URL in it masked, and nothing else changed."""
    return _URL_USERINFO.sub(_mask_userinfo, text)


def redact_url(url: str) -> str:
    return redact_text(url)


def redact_value(key: str, value: Any) -> Any:
    """A settings value fit to print: secrets by name masked, URLs' userinfo masked, nested
    sections and lists walked."""
    if isinstance(value, dict):
        return {k: redact_value(k, v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_value(key, v) for v in value]
    if isinstance(value, str):
        return MASK if value and _SECRET_KEY.search(key.lower()) else redact_text(value)
    return value


def redacted_settings(values: dict[str, Any]) -> dict[str, Any]:
    """A settings dump (`Settings.model_dump(mode="json")`) with every credential masked."""
    return {key: redact_value(key, value) for key, value in values.items()}
