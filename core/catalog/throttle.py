"""Per-host politeness: a concurrency cap and an adaptive delay between requests.

The delay follows the idea of Scrapy's AutoThrottle: if a server needs
``latency`` seconds per response, one request every ``latency / N`` seconds
keeps about N in flight. Each response moves the delay halfway towards that
target (at once when the target is higher: back off fast, recover slowly),
within the min/max bounds. Only a 2xx or a 304 may lower it: error pages and
redirects are fast and small, and learning from them would speed us up exactly
when a server struggles (a refresh of an unchanged shop is all 304s, which are
real answers). A 429/503 with Retry-After pauses the whole host until then and
doubles its delay; the delay then decays back as healthy responses come in.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class ThrottlePolicy:
    concurrency: int  # requests in flight per host, at most
    target_concurrency: float  # what the adaptive delay aims for
    min_delay_s: float
    max_delay_s: float


class HostThrottle:
    def __init__(
        self,
        policy: ThrottlePolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy
        self.delay = policy.min_delay_s
        # robots.txt's Crawl-delay raises the floor for its host.
        self.floor = policy.min_delay_s
        self.in_flight = 0
        self.peak_in_flight = 0
        self._clock, self._sleep = clock, sleep
        self._semaphore = asyncio.Semaphore(policy.concurrency)
        self._next_start = 0.0
        self._paused_until = 0.0

    def set_floor(self, seconds: float) -> None:
        self.floor = min(max(self.policy.min_delay_s, seconds), self.policy.max_delay_s)
        self.delay = max(self.delay, self.floor)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold this around one request: waits for its start time, then a free slot.

        Start times are handed out ``delay`` apart, each counted from the one
        before (not from when a sleep happened to return: timer lateness would
        add to every gap) or from now after an idle spell. The wait for the start
        time holds no slot, so the cap counts requests in flight only, as
        Scrapy's does: the delay and the cap each bound the rate on their own."""
        now = self._clock()
        start = max(self._next_start, now)
        self._next_start = start + self.delay
        while (wait_s := max(start, self._paused_until) - self._clock()) > 0:
            await self._sleep(wait_s)
        async with self._semaphore:
            while (paused_s := self._paused_until - self._clock()) > 0:  # paused meanwhile
                await self._sleep(paused_s)
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                yield
            finally:
                self.in_flight -= 1

    def observe(self, latency_s: float, status: int | None) -> None:
        """Learn from one response (``status`` None: no response, e.g. a timeout)."""
        new = next_delay(self.delay, latency_s, self.policy, floor=self.floor)
        healthy = status is not None and (200 <= status < 300 or status == 304)
        if not healthy and new <= self.delay:
            return
        self.delay = new

    def back_off(self, wait_s: float) -> None:
        """The host asked us to slow down (429/503): pause it and raise its delay."""
        wait_s = min(max(wait_s, 0.0), self.policy.max_delay_s)
        self._paused_until = max(self._paused_until, self._clock() + wait_s)
        raised = max(self.delay * 2, wait_s / self.policy.target_concurrency)
        self.delay = min(max(raised, self.floor), self.policy.max_delay_s)


def next_delay(delay: float, latency_s: float, policy: ThrottlePolicy, *, floor: float) -> float:
    target = latency_s / policy.target_concurrency
    smoothed = max(target, (delay + target) / 2)
    return min(max(smoothed, floor, policy.min_delay_s), policy.max_delay_s)


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent
    or unreadable. A date in the past is 0."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def backoff_s(
    attempt: int, base_s: float, cap_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^attempt)]
    (attempt 0 is the first retry). Jitter spreads retries of many workers apart."""
    return rand() * min(cap_s, base_s * 2**attempt)
