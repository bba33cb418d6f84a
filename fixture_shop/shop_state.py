"""What one running shop holds: its config, the current epoch's index, caches, stats."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from aiohttp import web

from fixture_shop.catalog_index import CatalogIndex
from fixture_shop.config import ShopConfig
from fixture_shop.responses import CachedBody
from fixture_shop.stats import ShopStats

# Rendered bodies kept before the cache starts over (a few tens of MB at most).
MAX_CACHED_BODIES: Final = 20_000


class ShopState:
    def __init__(self, config: ShopConfig) -> None:
        self.config = config
        self.index = CatalogIndex(config, config.epoch)
        self.stats = ShopStats()
        # Paths whose "first request" trouble has been served (500 / 429 once).
        self.answered_once: set[str] = set()
        self._bodies: dict[str, CachedBody] = {}

    @property
    def epoch(self) -> int:
        return self.index.epoch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.index.epoch:
            self.index = CatalogIndex(self.config, epoch)
            self._bodies.clear()

    def cached(self, key: str, render: Callable[[], CachedBody]) -> CachedBody:
        """The body stored under ``key``, rendering it on first use (per epoch)."""
        body = self._bodies.get(key)
        if body is None:
            if len(self._bodies) >= MAX_CACHED_BODIES:
                self._bodies.clear()
            body = self._bodies[key] = render()
        return body


SHOP_STATE: Final = web.AppKey("shop_state", ShopState)
