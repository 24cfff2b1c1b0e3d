"""Per-host politeness that adapts: each host's request rate is learned from how it answers.

A host starts at `host_start_rate` requests per second and is probed upwards the way TCP
probes a path (slow start, then CUBIC-like growth), and is cut back the way TCP backs off:

- Slow start: every prompt answer raises the rate by `SLOW_START_STEP`, so the rate roughly
  doubles each second while the host keeps up. Only a rate in use grows: answers raise it
  only while the host's requests wait for it (`RATE_LIMITED_SLACK_S`).
- A push-back (429 or 503, a timeout, a refused or reset connection, or answers much slower
  than the host's best: the latency EWMA above `host_latency_rise` times the fastest answer
  seen and above `host_latency_floor_s`) multiplies the rate by `host_backoff_factor`, once
  per round: answers to requests sent before the last cut do not cut again.
- After a cut the rate climbs back along a cubic curve: fast at first, flat near the rate at
  which the host last pushed back (reached after `host_recover_s`), then probing beyond it,
  slowly at first.
- A `Retry-After` (429/503) pauses that host only, for as long as it asks (the downloader
  caps it); a robots.txt `Crawl-delay` caps the rate at one request per delay.
- The rate never goes above `per_host_rate` (0: no cap) nor below `host_min_rate`, and at
  most `per_host_concurrency` requests are in flight to one host.

`HostQueue` hands out waiting rows by host, only from hosts that may take a request now, so a
paused or slow host holds no worker and never delays the others (no head-of-line blocking).
What a host's rate settles at is kept (`learned`) so the next shard can start from it, and
a `RateBudget` (`facecaption.fetch.web.budget.RedisBudget`) lets several processes share one budget
per host. Hosts are told apart by host name (or address literal), not port: one server,
one budget.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from facecaption.settings import FetchSettings

# TCP's slow start adds one segment per ACK: here one request/s per prompt answer.
SLOW_START_STEP = 1.0
# A request that starts within this of the earliest time its host's rate allowed was held
# back by the rate: only then do answers raise the rate (a rate that is not used teaches
# nothing, as TCP grows only a window it fills).
RATE_LIMITED_SLACK_S = 0.05
# Weight of the newest answer in a host's latency average.
LATENCY_EWMA_WEIGHT = 0.2

T = TypeVar("T")
# What a shard's counts say of its hosts (`HostRates.counts`).
HOST_COUNTS = ("hosts", "host_requests", "host_throttled", "host_paused_ms")


class RateBudget(Protocol):
    """A budget of request starts per host shared by several processes (see `budget`)."""

    async def acquire(self, host: str, rate: float, burst: float) -> float:
        """Take one start from `host`'s budget refilled at `rate`; seconds to wait first."""
        ...


@dataclass
class HostFigures:
    """What happened with one host: for the shard's counts and the report."""

    requests: int = 0
    throttled: int = 0  # 429 and 503 answers
    timeouts: int = 0
    cuts: int = 0  # times the rate was cut
    paused_s: float = 0.0  # time the host asked us (Retry-After) not to send
    rate: float = 0.0  # the rate at the end: what was learned
    start_rate: float = 0.0  # the rate it started from (learned by an earlier shard, or not)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "start_rate": round(self.start_rate, 3),
            "requests": self.requests,
            "throttled": self.throttled,
            "timeouts": self.timeouts,
            "cuts": self.cuts,
            "paused_s": round(self.paused_s, 3),
            "rate": round(self.rate, 3),
        }


@dataclass
class _Host:
    rate: float
    ceiling: float
    slow_start: bool = True
    last_pushback_rate: float = 0.0
    epoch: float = 0.0  # when the rate was last cut
    last_cut: float = -math.inf
    next_start: float = 0.0
    paused_until: float = 0.0
    in_flight: int = 0
    limited: bool = True  # the last start waited for the rate (see RATE_LIMITED_SLACK_S)
    latency: float | None = None  # EWMA of time to the answer's headers
    best_latency: float = math.inf
    figures: HostFigures = field(default_factory=HostFigures)
    freed: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class HostRates:
    """What one fetch starts from (`start`: learned rates by host) and, once it is `done`,
    what it saw (`figures`) and learned (`learned`)."""

    start: dict[str, float] = field(default_factory=dict)
    figures: dict[str, HostFigures] = field(default_factory=dict)
    learned: dict[str, float] = field(default_factory=dict)

    def done(self, throttle: HostThrottle) -> None:
        self.figures = throttle.figures()
        self.learned = throttle.learned()

    def counts(self) -> dict[str, int]:
        """Totals over hosts, for a shard's counts."""
        figures = self.figures.values()
        return {
            "hosts": len(self.figures),
            "host_requests": sum(f.requests for f in figures),
            "host_throttled": sum(f.throttled for f in figures),
            "host_paused_ms": round(1000 * sum(f.paused_s for f in figures)),
        }

    def busiest(self, count: int) -> dict[str, dict[str, float | int]]:
        """The figures of the `count` hosts asked most (a shard may meet thousands)."""
        ranked = sorted(self.figures.items(), key=lambda item: (-item[1].requests, item[0]))
        return {host: figures.as_dict() for host, figures in ranked[:count]}


class HostThrottle:
    """Per-host rates, pauses and in-flight counts for one event loop (one shard's fetch)."""

    def __init__(
        self,
        limits: FetchSettings,
        start_rates: dict[str, float] | None = None,
        budget: RateBudget | None = None,
    ) -> None:
        self.limits = limits
        # per_host_rate 0: no rate at all (only the in-flight cap and Retry-After pauses)
        self.adaptive = limits.per_host_rate > 0
        self.max_rate = limits.per_host_rate if self.adaptive else math.inf
        self.start_rates = start_rates or {}
        self.budget = budget
        self.on_release: Callable[[str], None] = lambda host: None
        self._hosts: dict[str, _Host] = {}

    def _host(self, host: str) -> _Host:
        state = self._hosts.get(host)
        if state is None:
            learned = self.start_rates.get(host)
            rate = learned if learned else self.limits.host_start_rate
            if not self.adaptive:
                rate = math.inf
            state = _Host(rate=self._bounded(rate, self.max_rate), ceiling=self.max_rate)
            # a learned rate was found by pushing back: grow from it as after a cut
            state.slow_start = learned is None
            state.last_pushback_rate = state.rate
            state.figures.start_rate = state.rate if self.adaptive else 0.0
            self._hosts[host] = state
        return state

    def _bounded(self, rate: float, ceiling: float) -> float:
        return max(self.limits.host_min_rate, min(rate, ceiling))

    # -- when a host may take a request --------------------------------------------------

    def ready_at(self, host: str) -> float:
        """Loop time at which `host` may start its next request (inf: none in flight may)."""
        state = self._host(host)
        if state.in_flight >= self.limits.per_host_concurrency:
            return math.inf
        return max(state.next_start, state.paused_until)

    def reserve(self, host: str) -> None:
        """Take a slot for a request that starts now (`HostQueue` checked `ready_at`)."""
        state = self._host(host)
        now = asyncio.get_running_loop().time()
        state.in_flight += 1
        state.limited = now - state.next_start <= max(1.0 / state.rate, RATE_LIMITED_SLACK_S)
        state.next_start = max(now, state.next_start) + 1.0 / state.rate

    def release(self, host: str) -> None:
        state = self._host(host)
        state.in_flight -= 1
        state.freed.set()
        self.on_release(host)

    @asynccontextmanager
    async def slot(self, host: str, reserved: bool = False) -> AsyncIterator[float]:
        """Hold one of `host`'s slots for a request; yields its start (loop time).

        With `reserved`, the slot was taken by `reserve` already; otherwise this waits for a
        free slot, the host's next start and the end of its pause."""
        state = self._host(host)
        loop = asyncio.get_running_loop()
        if not reserved:
            while state.in_flight >= self.limits.per_host_concurrency:
                state.freed.clear()
                await state.freed.wait()
            now = loop.time()
            start = max(now, state.next_start, state.paused_until)
            state.limited = start - state.next_start <= max(1.0 / state.rate, RATE_LIMITED_SLACK_S)
            state.in_flight += 1
            state.next_start = start + 1.0 / state.rate
            if start > now:
                await _sleep_holding(start - now, self, host)
        try:
            if self.budget is not None:
                wait = await self.budget.acquire(host, state.rate, max(1.0, state.rate))
                if wait > 0:
                    # the shared budget is behind this process's rate: hand out no more of
                    # this host's rows until then (a worker waiting here serves no other host)
                    state.next_start = max(state.next_start, loop.time() + wait)
                    await asyncio.sleep(wait)
            state.figures.requests += 1
            yield loop.time()
        finally:
            self.release(host)

    @asynccontextmanager
    async def unlimited(self) -> AsyncIterator[float]:
        """No slot: for the one robots.txt request per origin. Yields its start."""
        yield asyncio.get_running_loop().time()

    # -- what the answers say ------------------------------------------------------------

    def answered(self, host: str, started: float, latency: float) -> None:
        """A prompt-or-not answer that is not a push-back (any status but 429/503)."""
        state = self._host(host)
        if not self.adaptive:
            return
        state.best_latency = min(state.best_latency, latency)
        state.latency = (
            latency
            if state.latency is None
            else state.latency + LATENCY_EWMA_WEIGHT * (latency - state.latency)
        )
        slow = state.latency > max(
            self.limits.host_latency_rise * state.best_latency, self.limits.host_latency_floor_s
        )
        if slow:
            self._cut(state, started)
            return
        if not state.limited:
            return  # the host was asked less than its rate allows: nothing learned
        if state.slow_start:
            state.rate = self._bounded(state.rate + SLOW_START_STEP, state.ceiling)
            return
        now = asyncio.get_running_loop().time()
        state.rate = self._bounded(max(state.rate, self._cubic(state, now)), state.ceiling)

    def pushed_back(self, host: str, started: float, status: str | int) -> None:
        """A 429/503 (`status` the code), a timeout or a failed connection."""
        state = self._host(host)
        if status in (429, 503):
            state.figures.throttled += 1
        elif status == "timeout":
            state.figures.timeouts += 1
        if self.adaptive:
            self._cut(state, started)

    def pause(self, host: str, seconds: float) -> None:
        """No new request to `host` for `seconds` (a 429/503 with Retry-After)."""
        state = self._host(host)
        now = asyncio.get_running_loop().time()
        until = now + seconds
        if until > state.paused_until:
            state.figures.paused_s += until - max(now, state.paused_until)
            state.paused_until = until

    def limit_rate(self, host: str, ceiling: float) -> None:
        """Never above `ceiling` requests/s for `host` (robots.txt Crawl-delay)."""
        state = self._host(host)
        if not self.adaptive:
            return
        state.ceiling = min(state.ceiling, ceiling)
        state.rate = self._bounded(state.rate, state.ceiling)

    def _cut(self, state: _Host, started: float) -> None:
        if started < state.last_cut:
            return  # sent before the last cut: that cut already answered this round
        now = asyncio.get_running_loop().time()
        state.figures.cuts += 1
        state.slow_start = False
        state.last_pushback_rate = state.rate
        state.rate = self._bounded(state.rate * self.limits.host_backoff_factor, state.ceiling)
        state.last_cut = state.epoch = now
        # spacing reserved at the old rate is re-spaced at the new one
        state.next_start = max(state.next_start, now + 1.0 / state.rate)

    def _cubic(self, state: _Host, now: float) -> float:
        """The rate `now - epoch` after a cut: from the cut rate back to the rate that was
        pushed back at `host_recover_s`, flat there, then growing again."""
        recover = self.limits.host_recover_s
        beta = self.limits.host_backoff_factor
        elapsed = (now - state.epoch) / recover - 1.0
        return state.last_pushback_rate * (1.0 + (1.0 - beta) * elapsed**3)

    # -- what was learned ----------------------------------------------------------------

    def figures(self) -> dict[str, HostFigures]:
        """Per-host figures so far, each with its current rate."""
        for state in self._hosts.values():
            state.figures.rate = state.rate if self.adaptive else 0.0
        return {host: state.figures for host, state in self._hosts.items()}

    def learned(self) -> dict[str, float]:
        """The rate of every host that pushed back at least once: one to start from next
        time. A host that never pushed back taught nothing about its limit."""
        return {
            host: state.rate
            for host, state in self._hosts.items()
            if self.adaptive and not state.slow_start and state.figures.requests
        }


async def _sleep_holding(seconds: float, throttle: HostThrottle, host: str) -> None:
    """Sleep until a reserved start; the slot is given back if the sleep is cancelled."""
    try:
        await asyncio.sleep(seconds)
    except BaseException:
        throttle.release(host)
        raise


class HostQueue(Generic[T]):
    """Items to fetch, queued by host: `take` hands out the next one whose host may take a
    request now (a slot reserved for it), and waits only when no host may.

    Only one `take` looks at the hosts at a time (the others queue behind it), so waiting
    workers cost nothing while nothing is ready. Hosts are kept in a heap by the time they
    may next start; a host whose in-flight slots are all taken leaves the heap until one is
    released.
    """

    def __init__(self, throttle: HostThrottle, items: Iterable[tuple[str, T]]) -> None:
        self.throttle = throttle
        self._pending: dict[str, deque[T]] = {}
        for host, item in items:
            self._pending.setdefault(host, deque()).append(item)
        self._heap = [(0.0, index, host) for index, host in enumerate(self._pending)]
        self._count = len(self._heap)
        self._full: set[str] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        throttle.on_release = self._released

    def _push(self, host: str) -> None:
        ready = self.throttle.ready_at(host)
        if ready == math.inf:
            self._full.add(host)
        else:
            self._count += 1
            heapq.heappush(self._heap, (ready, self._count, host))

    def _released(self, host: str) -> None:
        if host in self._full:
            self._full.discard(host)
            self._push(host)
        self._wake.set()

    async def take(self) -> tuple[str, T] | None:
        """The next `(host, item)` with a slot reserved for it; None when none are left."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            while True:
                if not self._pending:
                    return None
                while self._heap:
                    ready, _, host = self._heap[0]
                    actual = self.throttle.ready_at(host)
                    if actual == ready:
                        break
                    heapq.heappop(self._heap)  # its time moved (a pause, a cut, full)
                    self._push(host)
                now = loop.time()
                if self._heap and self._heap[0][0] <= now:
                    _, _, host = heapq.heappop(self._heap)
                    waiting = self._pending[host]
                    item = waiting.popleft()
                    self.throttle.reserve(host)
                    if waiting:
                        self._push(host)
                    else:
                        del self._pending[host]
                    return host, item
                self._wake.clear()
                timeout = self._heap[0][0] - now if self._heap else None
                try:
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
                except TimeoutError:
                    pass


def host_key(host: str | None) -> str:
    """The name a host's budget goes by (lower case, as DNS)."""
    return (host or "").lower()
