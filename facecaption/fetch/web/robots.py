"""robots.txt: parsing and matching as RFC 9309 says, and a per-host cache.

Rules are grouped by user-agent; our group is the one naming our product token (case
insensitive), else the `*` group. The longest matching path pattern wins, `allow` wins a tie;
`*` matches any run of characters and a final `$` anchors the end. A missing robots.txt (4xx)
allows everything; an unreachable one (5xx, timeouts, connection errors) disallows
everything for now, as the RFC requires, which the fetch stage records as
`robots_unavailable` so that a later run tries again.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from urllib.parse import unquote


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str

    def matches(self, path: str) -> bool:
        return _compile(self.pattern).match(path) is not None


@functools.lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str]:
    anchored = pattern.endswith("$")
    body = pattern[:-1] if anchored else pattern
    regex = ".*".join(re.escape(part) for part in body.split("*"))
    return re.compile(regex + ("$" if anchored else ""))


@dataclass
class RobotsTxt:
    """Parsed robots.txt: rules per lower-cased user-agent."""

    groups: dict[str, list[Rule]] = field(default_factory=dict)
    allow_all: bool = False
    disallow_all: bool = False

    @classmethod
    def parse(cls, text: str) -> RobotsTxt:
        groups: dict[str, list[Rule]] = {}
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
        return cls(groups)

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


def _normalise(path: str) -> str:
    """Compare paths decoded, so `/a%20b` and `/a b` are the same path."""
    return unquote(path)
