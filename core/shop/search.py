"""Product search by meaning: a text query or an image, ranked by the fashion CLIP.

The query is embedded by whoever holds an encoder (the API through onnxruntime,
a worker through torch) and searched in the catalog index: available products
only, the same filters as ``GET /v1/products``, re-checked for stock in
Postgres. Pages are slices of one ranking; the cursor carries the offset (and
the version it was ranked with, so a page after a version switch says so
instead of silently mixing two rankings).
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass

import numpy as np
from sqlmodel.ext.asyncio.session import AsyncSession

from core.errors import InvalidInput
from core.jobs.specs import ProductFilters
from core.shop.catalog_index import CatalogIndex, Hit, in_stock_hits

# How deep a client may page into one ranking: past this, refine the query.
MAX_RESULTS = 500


@dataclass(frozen=True)
class SearchPage:
    hits: list[Hit]
    next_cursor: str | None
    model_id: uuid.UUID


def _encode_cursor(offset: int, model_id: uuid.UUID) -> str:
    raw = json.dumps({"o": offset, "m": str(model_id)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, model_id: uuid.UUID) -> int:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded))
        offset, cursor_model = int(data["o"]), uuid.UUID(data["m"])
    except (binascii.Error, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput("cursor is not one this API gave out", field="cursor") from exc
    if cursor_model != model_id:
        raise InvalidInput(
            "the catalog index changed since this cursor was given out; search again",
            field="cursor",
        )
    if not 0 <= offset <= MAX_RESULTS:
        raise InvalidInput("cursor is not one this API gave out", field="cursor")
    return offset


async def ranked_page(
    session: AsyncSession,
    index: CatalogIndex,
    query: np.ndarray,
    filters: ProductFilters,
    *,
    limit: int,
    cursor: str | None,
) -> SearchPage:
    offset = _decode_cursor(cursor, index.model_id) if cursor else 0
    want = min(offset + limit + 1, MAX_RESULTS)
    hits = await in_stock_hits(session, index.search(query, filters, want), want)
    page = hits[offset : offset + limit]
    more = len(hits) > offset + limit and offset + limit < MAX_RESULTS
    next_cursor = _encode_cursor(offset + limit, index.model_id) if more else None
    return SearchPage(page, next_cursor, index.model_id)
