"""Opt-out signals in `X-Robots-Tag` response headers, read before any body byte.

A header value is a comma-separated list of directives, optionally scoped to one crawler by a
`name:` prefix (`googlebot: noindex`); a directive applies to us when it is global or scoped
to our user-agent token. A few directives carry their own `name: value`
(`unavailable_after`, `max-image-preview`, ...): those are not crawler names.
"""

from __future__ import annotations

from collections.abc import Iterable

_VALUED_DIRECTIVES = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def opt_out_directive(
    header_values: Iterable[str], token: str, directives: Iterable[str]
) -> str | None:
    """The first opt-out directive among the headers that applies to `token`, if any."""
    wanted = {directive.lower() for directive in directives}
    token = token.lower()
    for value in header_values:
        scope: str | None = None
        for part in value.split(","):
            part = part.strip().lower()
            if ":" in part:
                name, rest = (piece.strip() for piece in part.split(":", 1))
                if name not in _VALUED_DIRECTIVES and " " not in name:
                    scope, part = name, rest
            if part in wanted and scope in (None, token):
                return part if scope is None else f"{scope}: {part}"
    return None
