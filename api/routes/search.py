"""Product search by meaning (a text query, or an image), and the products of a look."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, File, Query, Request, UploadFile
from pydantic import WithJsonSchema

from api.deps import AccountDep, SessionDep, SettingsDep, SignerDep
from api.openapi import MONEY_QUERY_SCHEMA, NO_NUL
from api.shop_schemas import LookItemOut, OutputProductsOut, ScoredProductOut, SearchPageOut
from core.blobs.signing import UrlSigner
from core.db.models import JobKind
from core.errors import SearchImageTooLarge
from core.generations import get_output, job_of_output
from core.jobs.specs import ProductFilters, generation_spec_of
from core.shop.look_items import linked_products, look_item_views
from core.shop.search import SearchPage
from core.shop.searcher import CatalogSearcher

router = APIRouter(tags=["shop the look"])

# The schema says what Decimal(12, 2) takes (pydantic's says any string).
Money = Annotated[
    Decimal | None,
    WithJsonSchema(MONEY_QUERY_SCHEMA),
    Query(ge=0, max_digits=12, decimal_places=2),
]


def _searcher(request: Request) -> CatalogSearcher:
    searcher: CatalogSearcher = request.app.state.searcher
    return searcher


SearcherDep = Annotated[CatalogSearcher, Depends(_searcher)]


def _filters(
    designer: Annotated[str | None, Query(max_length=100, pattern=NO_NUL)] = None,
    category: Annotated[
        str | None, Query(max_length=100, pattern=NO_NUL, description="any level")
    ] = None,
    min_price: Money = None,
    max_price: Money = None,
    currency: Annotated[str | None, Query(min_length=3, max_length=3, pattern=NO_NUL)] = None,
) -> ProductFilters:
    return ProductFilters(
        designer=designer,
        category=category,
        min_price=min_price,
        max_price=max_price,
        currency=currency,
    )


FiltersDep = Annotated[ProductFilters, Depends(_filters)]
Limit = Annotated[int, Query(ge=1, le=100)]


async def _page_out(session: SessionDep, page: SearchPage, signer: UrlSigner) -> SearchPageOut:
    linked = await linked_products(session, [(h.product_id, h.score) for h in page.hits])
    return SearchPageOut(
        items=[ScoredProductOut.of_linked(lp, signer) for lp in linked],
        next_cursor=page.next_cursor,
        model_id=page.model_id,
    )


@router.get("/v1/products/search", response_model=SearchPageOut)
async def search_by_text(
    q: Annotated[str, Query(min_length=1, max_length=1000, description="what to find")],
    _account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    signer: SignerDep,
    searcher: SearcherDep,
    filters: FiltersDep,
    cursor: str | None = None,
    limit: Limit = 20,
) -> SearchPageOut:
    """Available products ranked by how well they match the text (fashion CLIP).

    Same filters and cursor shape as `GET /v1/products`; 503 `index-not-ready`
    until the catalog has been embedded once."""
    page = await searcher.by_text(session, q, filters, limit, cursor)
    return await _page_out(session, page, signer)


@router.post(
    "/v1/products/search",
    response_model=SearchPageOut,
    responses={413: {"description": "The image is over ATELIER_MAX_SEARCH_IMAGE_BYTES"}},
)
async def search_by_image(
    image: Annotated[UploadFile, File(description="JPEG, PNG or WebP")],
    _account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    signer: SignerDep,
    searcher: SearcherDep,
    filters: FiltersDep,
    cursor: str | None = None,
    limit: Limit = 20,
) -> SearchPageOut:
    """Available products ranked by how much they look like the uploaded image."""
    data = await image.read(settings.max_search_image_bytes + 1)
    if len(data) > settings.max_search_image_bytes:
        raise SearchImageTooLarge(
            f"the image is over the limit of {settings.max_search_image_bytes} bytes"
        )
    page = await searcher.by_image(session, data, filters, limit, cursor)
    return await _page_out(session, page, signer)


@router.get("/v1/outputs/{output_id}/products", response_model=OutputProductsOut)
async def output_products(
    output_id: uuid.UUID,
    account: AccountDep,
    session: SessionDep,
    settings: SettingsDep,
    signer: SignerDep,
    searcher: SearcherDep,
) -> OutputProductsOut:
    """The products matched to one image, per region, best first; a product sold out
    since is flagged `sold_out` with up to k in-stock alternatives."""
    output = await get_output(session, account, output_id)
    job = await job_of_output(session, output)
    spec = generation_spec_of(job) if job.kind == JobKind.generate else None
    filters = spec.filters if spec else ProductFilters()
    k = (spec.products_per_image if spec else None) or settings.products_per_image
    index = await searcher.holder.current(session)
    views = await look_item_views(session, output.id, index, filters, k)
    items = [LookItemOut.of(v, signer) for v in views]
    return OutputProductsOut(output_id=output.id, items=items)
