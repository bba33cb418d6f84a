"""robots.txt: fetched once per host per crawl, obeyed for every request.

Follows RFC 9309: a robots.txt that is missing (any 4xx) allows everything; one
that cannot be read (5xx, network errors, after the fetcher's retries) forbids
everything on that host for this crawl, since the server may be telling us to
stay away. Crawl-delay, where a file gives one, becomes the host's minimum delay.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from protego import Protego

log = logging.getLogger("atelier.catalog")


@dataclass(frozen=True)
class RobotsAnswer:
    """What fetching /robots.txt gave: the HTTP status (None: no answer) and the text."""

    status: int | None
    text: str = ""


@dataclass(frozen=True)
class HostRules:
    parser: Protego | None  # None: no usable rules, see allow_all
    allow_all: bool

    def allows(self, url: str, user_agent: str) -> bool:
        if self.parser is None:
            return self.allow_all
        return bool(self.parser.can_fetch(url, user_agent))


RobotsFetch = Callable[[str], Awaitable[RobotsAnswer]]


class RobotsRules:
    def __init__(self, fetch: RobotsFetch, user_agent: str) -> None:
        self._fetch = fetch
        self.user_agent = user_agent
        self._hosts: dict[str, HostRules] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def allowed(self, url: str) -> bool:
        return (await self.rules_for(url)).allows(url, self.user_agent)

    async def sitemaps(self, url: str) -> list[str]:
        """The Sitemap: lines of the robots.txt of ``url``'s host."""
        rules = await self.rules_for(url)
        return list(rules.parser.sitemaps) if rules.parser is not None else []

    async def crawl_delay(self, url: str) -> float | None:
        rules = await self.rules_for(url)
        if rules.parser is None:
            return None
        delay = rules.parser.crawl_delay(self.user_agent)
        return float(delay) if delay is not None else None

    async def rules_for(self, url: str) -> HostRules:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin in self._hosts:
            return self._hosts[origin]
        # One fetch per host, however many workers ask at once.
        async with self._locks.setdefault(origin, asyncio.Lock()):
            if origin not in self._hosts:
                answer = await self._fetch(f"{origin}/robots.txt")
                self._hosts[origin] = _rules(origin, answer)
        return self._hosts[origin]


def _rules(origin: str, answer: RobotsAnswer) -> HostRules:
    status = answer.status
    if status is not None and 200 <= status < 300:
        try:
            return HostRules(Protego.parse(answer.text), allow_all=True)
        except Exception as exc:  # protego is lenient; a crash here must not stop a crawl
            log.warning("%s/robots.txt unreadable (%r): allowing all", origin, exc)
            return HostRules(None, allow_all=True)
    if status is not None and 400 <= status < 500 and status != 429:
        return HostRules(None, allow_all=True)
    log.warning("%s/robots.txt unavailable (status %s): nothing on this host is fetched",
                origin, status)  # fmt: skip
    return HostRules(None, allow_all=False)
