"""robots.txt: parsing and matching as RFC 9309 says, and a per-host cache.

Rules are grouped by user-agent; our group is the one naming our product token (case
insensitive), else the `*` group. The longest matching path pattern wins, `allow` wins a tie;
`*` matches any run of characters and a final `$` anchors the end. A missing robots.txt (4xx)
allows everything; an unreachable one (5xx, timeouts, connection errors) disallows
everything for now, as the RFC requires, which the fetch stage records as
`robots_unavailable` so that a later run tries again. A `Crawl-delay` (not in the RFC, but
widely used) in our group is kept: the fetch takes it as a ceiling on the host's rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str

    def matches(self, path: str) -> bool:
        return pattern_matches(self.pattern, path)


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether a robots.txt path pattern matches `path` from its start: `*` is any run of
    characters, a final `$` anchors the end.

    Each piece between stars is found at its leftmost place after the previous one, which is
    right for star-only patterns and linear in the path: a regex would backtrack
    exponentially on a hostile pattern such as `/*a*a*a*a*a*b$`.
    """
    anchored = pattern.endswith("$")
    first, *pieces = (pattern[:-1] if anchored else pattern).split("*")
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
class RobotsTxt:
    """Parsed robots.txt: rules per lower-cased user-agent."""

    groups: dict[str, list[Rule]] = field(default_factory=dict)
    allow_all: bool = False
    disallow_all: bool = False
    delays: dict[str, float] = field(default_factory=dict)  # Crawl-delay seconds per agent

    @classmethod
    def parse(cls, text: str) -> RobotsTxt:
        groups: dict[str, list[Rule]] = {}
        delays: dict[str, float] = {}
        agents: list[str] = []
        in_rules = False
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if ":" not in line:
                continue
            name, value = (part.strip() for part in line.split(":", 1))
            name = name.lower()
            if name == "user-agent":
                if in_rules:  # a user-agent line after rules starts a new group
                    agents, in_rules = [], False
                agents.append(value.lower())
                for agent in agents:
                    groups.setdefault(agent, [])
            elif name in ("allow", "disallow"):
                in_rules = True
                if not value:
                    continue  # an empty disallow allows everything
                for agent in agents:
                    groups[agent].append(Rule(name == "allow", _normalise(value)))
            elif name == "crawl-delay":
                in_rules = True
                delay = _seconds(value)
                if delay is not None:
                    for agent in agents:
                        delays[agent] = delay
        return cls(groups, delays=delays)

    def crawl_delay(self, token: str) -> float | None:
        """Seconds our group asks between requests, if it asks."""
        group = token.lower() if token.lower() in self.groups else "*"
        return self.delays.get(group)

    def allows(self, token: str, path: str) -> bool:
        if self.disallow_all:
            return False
        if self.allow_all:
            return True
        rules = self.groups.get(token.lower(), self.groups.get("*", []))
        path = _normalise(path or "/")
        best: Rule | None = None
        for rule in rules:
            if rule.matches(path) and (
                best is None
                or len(rule.pattern) > len(best.pattern)
                or (len(rule.pattern) == len(best.pattern) and rule.allow)
            ):
                best = rule
        return best is None or best.allow


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
