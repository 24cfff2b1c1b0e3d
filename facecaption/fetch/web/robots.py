"""robots.txt: parsing and matching as RFC 9309 says, and a per-host cache.

Rules are grouped by user-agent; our group is the one naming our product token (case
insensitive), else the `*` group. The longest matching path pattern wins, `allow` wins a tie;
`*` matches any run of characters and a final `$` anchors the end. A missing robots.txt (4xx)
allows everything; an unreachable one (5xx, timeouts, connection errors) disallows
everything for now, as the RFC requires, which the fetch stage records as
`robots_unavailable` so that a later run tries again. A `Crawl-delay` (not in the RFC, but
widely used) in our group is kept: the fetch takes it as a ceiling on the host's rate.

What a hostile robots.txt can cost is bounded: the download stops at `robots_max_bytes`
(500 KiB, the RFC's minimum and Google's limit: rules past it are not seen), parsing is linear
in the text (the agents of a group share its rules), and a file with more than `MAX_RECORDS`
rules and user-agent lines is read as disallowing everything (`refusal` says so), which keeps
every origin's parsed file small and checking a path against it quick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

# The most rules and user-agent lines kept from one robots.txt (all groups): a few hundred is
# usual, a few thousand rare; more is read as disallowing everything.
MAX_RECORDS = 10_000


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str

    def __post_init__(self) -> None:
        # split once: a path is checked against every rule of our group
        anchored = self.pattern.endswith("$")
        first, *pieces = (self.pattern[:-1] if anchored else self.pattern).split("*")
        object.__setattr__(self, "_split", (first, pieces, anchored))

    def matches(self, path: str) -> bool:
        first, pieces, anchored = self._split  # type: ignore[attr-defined]
        return _matches(first, pieces, anchored, path)


def _matches(first: str, pieces: list[str], anchored: bool, path: str) -> bool:
    """Whether a path pattern (split at its stars, a final `$` taken off as `anchored`)
    matches `path` from its start: `*` is any run of characters, `$` anchors the end.

    Each piece between stars is found at its leftmost place after the previous one, which is
    right for star-only patterns and linear in the path: a regex would backtrack
    exponentially on a hostile pattern such as `/*a*a*a*a*a*b$`."""
    if not path.startswith(first):
        return False
    if not pieces:
        return not anchored or path == first
    position = len(first)
    *middle, last = pieces
    for piece in middle:
        found = path.find(piece, position)
        if found < 0:
            return False
        position = found + len(piece)
    if anchored:
        return path.endswith(last) and len(path) - len(last) >= position
    return path.find(last, position) >= 0


@dataclass
class Group:
    """One group of a robots.txt: its rules and Crawl-delay, shared by the agents it names."""

    rules: list[Rule] = field(default_factory=list)
    delay: float | None = None


@dataclass
class RobotsTxt:
    """Parsed robots.txt: the groups naming each lower-cased user-agent (an agent named by
    several groups gets all their rules, as the RFC says)."""

    groups: dict[str, list[Group]] = field(default_factory=dict)
    allow_all: bool = False
    disallow_all: bool = False
    refusal: str | None = None  # why everything is disallowed, when the file did not say so
    _ranked: dict[str, list[Rule]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> RobotsTxt:
        groups: dict[str, list[Group]] = {}
        group = Group()
        named = False  # the current group has named an agent
        in_rules = False
        records = 0
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if ":" not in line:
                continue
            name, value = (part.strip() for part in line.split(":", 1))
            name = name.lower()
            if name == "user-agent":
                if in_rules:  # a user-agent line after rules starts a new group
                    group, named, in_rules = Group(), False, False
                agent_groups = groups.setdefault(value.lower(), [])
                if not agent_groups or agent_groups[-1] is not group:
                    agent_groups.append(group)
                named = True
                records += 1
            elif name in ("allow", "disallow"):
                in_rules = True
                if value and named:  # an empty disallow allows everything
                    group.rules.append(Rule(name == "allow", _normalise(value)))
                    records += 1
            elif name == "crawl-delay":
                in_rules = True
                delay = _seconds(value)
                if delay is not None:
                    group.delay = delay
            if records > MAX_RECORDS:
                return cls(
                    disallow_all=True,
                    refusal=f"robots.txt has over {MAX_RECORDS} rules and user-agent lines:"
                    " read as disallowing everything",
                )
        return cls(groups)

    def crawl_delay(self, token: str) -> float | None:
        """Seconds our group asks between requests, if it asks (the last one it names)."""
        group = token.lower() if token.lower() in self.groups else "*"
        delays = [g.delay for g in self.groups.get(group, []) if g.delay is not None]
        return delays[-1] if delays else None

    def allows(self, token: str, path: str) -> bool:
        if self.disallow_all:
            return False
        if self.allow_all:
            return True
        path = _normalise(path or "/")
        # longest first, allow before disallow of the same length: the first match decides
        for rule in self._ranked_rules(token):
            if rule.matches(path):
                return rule.allow
        return True

    def _ranked_rules(self, token: str) -> list[Rule]:
        group = token.lower() if token.lower() in self.groups else "*"
        if group not in self._ranked:
            rules = [rule for g in self.groups.get(group, []) for rule in g.rules]
            self._ranked[group] = sorted(rules, key=lambda r: (-len(r.pattern), not r.allow))
        return self._ranked[group]


def _seconds(value: str) -> float | None:
    """A Crawl-delay value: a positive, finite number of seconds, else None."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if 0 < seconds < float("inf") else None


def _normalise(path: str) -> str:
    """Compare paths decoded, so `/a%20b` and `/a b` are the same path."""
    return unquote(path)
