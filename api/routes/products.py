"""The catalog, read-only: product search, one product in full, its images.

Any account may read it (the catalog is shared); a key is still required.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import WithJsonSchema

from api.catalog_schemas import ImageVariant, ProductOut, ProductPageOut, ProductSummaryOut
from api.deps import AccountDep, MediaReader, SessionDep, SignerDep, StoreDep
from api.openapi import MONEY_QUERY_SCHEMA, NO_NUL
from api.routes.outputs import blob_response
from core.catalog import queries

router = APIRouter(tags=["catalog"])

# The schema says what Decimal(12, 2) takes (pydantic's says any string).
Money = Annotated[
    Decimal | None,
    WithJsonSchema(MONEY_QUERY_SCHEMA),
    Query(ge=0, max_digits=12, decimal_places=2),
]


@router.get("/v1/products", response_model=ProductPageOut)
async def list_products(
    _account: AccountDep,
    session: SessionDep,
    signer: SignerDep,
    designer: Annotated[str | None, Query(pattern=NO_NUL)] = None,
    category: Annotated[
        str | None, Query(pattern=NO_NUL, description="any level, e.g. 'Dresses'")
    ] = None,
    min_price: Money = None,
    max_price: Money = None,
    currency: Annotated[str | None, Query(min_length=3, max_length=3, pattern=NO_NUL)] = None,
    available: Annotated[bool | None, Query(description="default: both")] = None,
    site: Annotated[str | None, Query(pattern=NO_NUL)] = None,
    q: Annotated[
        str | None, Query(max_length=200, pattern=NO_NUL, description="in name or description")
    ] = None,
    cursor: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> ProductPageOut:
    search = queries.ProductFilter(
        designer=designer,
        category=category,
        min_price=min_price,
        max_price=max_price,
        currency=currency,
        available=available,
        site=site,
        q=q,
    )
    page = await queries.search_products(session, search, limit=limit, cursor=cursor)
    items = [ProductSummaryOut.of(p, page.first_images.get(p.id), signer) for p in page.products]
    return ProductPageOut(items=items, next_cursor=page.next_cursor)


@router.get("/v1/products/{product_id}", response_model=ProductOut)
async def get_product(
    product_id: uuid.UUID, _account: AccountDep, session: SessionDep, signer: SignerDep
) -> ProductOut:
    detail = await queries.get_product(session, product_id)
    return ProductOut.of_detail(detail, signer)


@router.get(
    "/v1/catalog-images/{sha256}",
    response_class=StreamingResponse,
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}},
)
async def get_catalog_image(
    sha256: Annotated[str, Path(pattern="^[0-9a-f]{64}$")],
    request: Request,
    _reader: MediaReader,  # any key, or the URL's signature: the catalog is shared
    session: SessionDep,
    store: StoreDep,
    variant: ImageVariant = ImageVariant.padded,
) -> Response:
    image = await queries.get_catalog_image(session, sha256)
    if variant is ImageVariant.padded:
        key, media_type = image.padded_blob_key, "image/png"
    else:
        key, media_type = image.blob_key, image.media_type
    return await blob_response(
        request,
        store,
        key,
        media_type=media_type,
        filename=key.rsplit("/", 1)[-1],
        # Content-addressed: the bytes under this URL never change.
        headers={"Cache-Control": "private, max-age=31536000, immutable"},
    )
