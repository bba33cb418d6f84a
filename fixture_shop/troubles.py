"""Deterministic misbehaviour: which URLs misbehave, and how.

Every rule is a function of ``config.seed`` and the URL path alone (no query
string), so a test can ask in advance which pages will fail. With
``config.trouble`` False nothing here applies: every page answers 200 at once
with valid HTML and JSON-LD, every image decodes, no two images share bytes, and
no listing links to ``/private/``.

Product pages (``/p/...``) draw ``u = unit_draw(seed, "page", path)`` in [0, 1):

==================  =============  =================================================
u in                kind           behaviour
==================  =============  =================================================
[0.000, 0.010)      error_once     500 on the first request (per app instance), then 200
[0.010, 0.020)      throttle_once  429 with ``Retry-After: 1`` on the first request, then 200
[0.020, 0.040)      slow           every answer comes 300 ms later than the others
[0.040, 0.045)      malformed_html unclosed ``<div>``/``<p>`` tags and the document cut off
                                   in the footer (no ``</body></html>``); head (OpenGraph,
                                   JSON-LD) and the product's visible fields are intact
[0.045, 0.050)      broken_json_ld the JSON-LD script holds invalid JSON (cut off mid-way);
                                   OpenGraph and visible fields are intact
[0.050, 0.150)      no_json_ld     no JSON-LD script at all (OpenGraph and visible fields)
[0.150, 1.000)      none           a clean page
==================  =============  =================================================

Images: ``/images/<name>.jpg`` with ``unit_draw(seed, "image", path) < 0.01`` is
``corrupt_image``: the first half of the JPEG's bytes (PIL cannot load it).

Duplicates: the third image of product ``P<i>`` (i >= 1) with
``unit_draw(seed, "duplicate", id) < 0.05`` has exactly the bytes of the first
image of an earlier product, ``duplicate_image_source`` says which.

``/private/``: category listings at position ``k`` in ``CATEGORIES`` with
``(k + seed) % 5 == 0`` link, on their first page, to ``/private/preview/<slug>``
(robots.txt disallows ``/private/``; the page answers 200 if fetched anyway).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from enum import StrEnum
from functools import lru_cache
from typing import Final

from fixture_shop.catalog import image_name, product_id, product_index
from fixture_shop.config import ShopConfig


class Trouble(StrEnum):
    NONE = "none"
    ERROR_ONCE = "error_once"
    THROTTLE_ONCE = "throttle_once"
    SLOW = "slow"
    MALFORMED_HTML = "malformed_html"
    BROKEN_JSON_LD = "broken_json_ld"
    NO_JSON_LD = "no_json_ld"
    CORRUPT_IMAGE = "corrupt_image"


# Upper bounds of u, in order; the first band that u falls under wins.
PRODUCT_PAGE_BANDS: Final = (
    (0.010, Trouble.ERROR_ONCE),
    (0.020, Trouble.THROTTLE_ONCE),
    (0.040, Trouble.SLOW),
    (0.045, Trouble.MALFORMED_HTML),
    (0.050, Trouble.BROKEN_JSON_LD),
    (0.150, Trouble.NO_JSON_LD),
)
CORRUPT_IMAGE_FRACTION: Final = 0.01
DUPLICATE_IMAGE_FRACTION: Final = 0.05
DUPLICATED_VIEW: Final = 3  # every product has at least three images
SLOW_EXTRA_MS: Final = 300.0
RETRY_AFTER_SECONDS: Final = 1
PRIVATE_LINK_PERIOD: Final = 5
# Answered once per app instance, then the page behaves.
FIRST_REQUEST_STATUS: Final = {Trouble.ERROR_ONCE: 500, Trouble.THROTTLE_ONCE: 429}


def unit_draw(seed: int, purpose: str, key: str) -> float:
    """A stable number in [0, 1) for ``(seed, purpose, key)``, the same on every run."""
    digest = hashlib.blake2b(f"{seed}:{purpose}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@lru_cache(maxsize=65536)
def kind_for(config: ShopConfig, path: str) -> Trouble:
    """How the URL path ``path`` misbehaves under ``config``."""
    if not config.trouble:
        return Trouble.NONE
    if path.startswith("/p/"):
        draw = unit_draw(config.seed, "page", path)
        for upper, kind in PRODUCT_PAGE_BANDS:
            if draw < upper:
                return kind
    elif path.startswith("/images/"):
        if unit_draw(config.seed, "image", path) < CORRUPT_IMAGE_FRACTION:
            return Trouble.CORRUPT_IMAGE
    return Trouble.NONE


def troubled_paths(config: ShopConfig, paths: Iterable[str]) -> dict[str, Trouble]:
    """The paths among ``paths`` that misbehave, with how."""
    kinds = {path: kind_for(config, path) for path in paths}
    return {path: kind for path, kind in kinds.items() if kind is not Trouble.NONE}


def duplicate_image_source(config: ShopConfig, name: str) -> str | None:
    """For an image stem (``p000123-3``) that copies another's bytes, that other's stem."""
    if not config.trouble:
        return None
    stem, _, view = name.rpartition("-")
    index = product_index(stem.upper())
    if index is None or index == 0 or view != str(DUPLICATED_VIEW):
        return None
    id_ = product_id(index)
    if unit_draw(config.seed, "duplicate", id_) >= DUPLICATE_IMAGE_FRACTION:
        return None
    source = int(unit_draw(config.seed, "duplicate-source", id_) * index)
    return image_name(product_id(source), 1)


def private_link(config: ShopConfig, category_position: int, category_slug: str) -> str | None:
    """The ``/private/`` URL that the category's first listing page links to, if any."""
    if config.trouble and (category_position + config.seed) % PRIVATE_LINK_PERIOD == 0:
        return f"/private/preview/{category_slug}"
    return None
