"""One epoch's catalog, indexed the ways the pages need it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final

from fixture_shop.catalog import ShopProduct, catalog_at, product_index
from fixture_shop.config import ShopConfig
from fixture_shop.fashion_data import CATEGORIES, DESIGNERS, CategorySpec

# Epoch 0 is this moment; every epoch is one day later than the one before.
EPOCH_ZERO: Final = datetime(2024, 3, 1, tzinfo=UTC)
SITEMAP_CHUNK: Final = 1000


def moment_of(epoch: int) -> datetime:
    """The Last-Modified time of whatever last changed in ``epoch``."""
    return EPOCH_ZERO + timedelta(days=epoch)


@dataclass(frozen=True, slots=True)
class ListingPage:
    products: Sequence[ShopProduct]
    number: int  # from 1
    count: int  # how many pages the listing has (at least 1)


class CatalogIndex:
    """The products of ``catalog_at(config, epoch)`` by id, category and designer."""

    def __init__(self, config: ShopConfig, epoch: int) -> None:
        self.config = config
        self.epoch = epoch
        self.products = catalog_at(config, epoch)
        self.live = [product for product in self.products if product.is_live]
        self.categories: dict[str, CategorySpec] = {c.slug: c for c in CATEGORIES}
        self.designers = {designer.slug: designer.name for designer in DESIGNERS}
        self.by_category: dict[str, list[ShopProduct]] = {slug: [] for slug in self.categories}
        self.by_designer: dict[str, list[ShopProduct]] = {slug: [] for slug in self.designers}
        # A listing shows prices and stock, and shifts when a product comes or goes:
        # it changed when the last of its products (gone ones included) changed.
        self.category_changed: dict[str, int] = defaultdict(int)
        self.designer_changed: dict[str, int] = defaultdict(int)
        for product in self.products:
            category_slug = product.category.slug
            designer_slug = product.designer_slug
            if product.is_live:
                self.by_category[category_slug].append(product)
                self.by_designer[designer_slug].append(product)
            self.category_changed[category_slug] = max(
                self.category_changed[category_slug], product.changed_epoch
            )
            self.designer_changed[designer_slug] = max(
                self.designer_changed[designer_slug], product.changed_epoch
            )
        self.latest_change = max(product.changed_epoch for product in self.products)

    def product(self, product_id: str) -> ShopProduct | None:
        index = product_index(product_id)
        if index is None or index >= len(self.products):
            return None
        return self.products[index]

    def page_count(self, products: Sequence[ShopProduct]) -> int:
        """How many pages a listing of ``products`` has (an empty one has one)."""
        return max(1, math.ceil(len(products) / self.config.page_size))

    def page_of(self, products: Sequence[ShopProduct], number: int) -> ListingPage | None:
        """Page ``number`` (from 1) of a listing, or None past its end."""
        size, count = self.config.page_size, self.page_count(products)
        if not 1 <= number <= count:
            return None
        return ListingPage(products[(number - 1) * size : number * size], number, count)

    def sitemap_chunks(self) -> list[list[ShopProduct]]:
        """The live products, ``SITEMAP_CHUNK`` to a sitemap file (at least one file)."""
        chunks = [self.live[i : i + SITEMAP_CHUNK] for i in range(0, len(self.live), SITEMAP_CHUNK)]
        return chunks or [[]]

    def category_listing_pages(self) -> list[tuple[str, int]]:
        """(path, last change epoch) of every category listing page: ``/c/<slug>``,
        then ``/c/<slug>?page=N``."""
        return [
            (listing_path("c", slug, number), self.category_changed[slug])
            for slug, products in self.by_category.items()
            for number in range(1, self.page_count(products) + 1)
        ]


def listing_path(prefix: str, slug: str, number: int) -> str:
    """``/c/<slug>`` for page 1, ``/c/<slug>?page=N`` after it (``prefix`` c or d)."""
    return f"/{prefix}/{slug}" if number == 1 else f"/{prefix}/{slug}?page={number}"
