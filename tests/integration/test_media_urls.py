"""Media a browser can load: signed output and catalog-image URLs that work in a
plain GET (no Authorization header) until they expire or the subject is erased,
byte ranges from either blob store (local files, S3 on a real SeaweedFS), and CORS."""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import format_datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from httpx import ASGITransport, AsyncClient, Response
from PIL import Image
from pydantic import SecretStr
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from core.accounts import create_account_with_key
from core.blobs.s3 import S3BlobStore
from core.blobs.signing import EXPIRY_BUCKET_S, UrlSigner, url_signer
from core.blobs.store import BlobStore
from core.catalog.images import ingest_image, set_product_images
from core.db.catalog_models import Product
from core.db.engine import session_scope
from core.db.models import Output, Secret, utcnow
from core.settings import Settings
from core.subjects import output_key
from tests.conftest import S3Server
from tests.integration.generated_rows import add_generated_output
from tests.integration.test_storage_s3 import BACKENDS, S3_KEY_FIELDS, s3_settings

Sessions = async_sessionmaker[AsyncSession]
BASE = "http://testserver"
SIGNING_KEY = "media-test-key"
SHOP = "https://shop.example"
# More than three stream chunks, so ranges start and stop inside and across chunks.
VIDEO_BYTES = 200_000


@dataclass(frozen=True)
class Media:
    client: AsyncClient
    store: BlobStore
    settings: Settings


@pytest.fixture(params=BACKENDS)
async def media(
    request: pytest.FixtureRequest, settings: Settings, sessions: Sessions
) -> AsyncIterator[Media]:
    """The app on each blob backend in turn, with a known signing key and one
    allowed browser origin."""
    from api.app import create_app

    update: dict[str, object] = {
        "url_signing_key": SecretStr(SIGNING_KEY),
        "cors_origins": [SHOP],
    }
    server: S3Server | None = None
    prefix = f"t-{uuid.uuid4().hex}"
    if request.param == "s3":
        server = request.getfixturevalue("seaweedfs")
        update |= s3_settings(server, prefix).model_dump(
            include={"blob_url", "s3_endpoint_url", "s3_region", *S3_KEY_FIELDS}
        )
    app_settings = settings.model_copy(update=update)
    app = create_app(app_settings)
    async with app.router.lifespan_context(app):
        transport = ASGITransport(app=app, raise_app_exceptions=False)
        async with AsyncClient(transport=transport, base_url=BASE) as http:
            yield Media(http, app.state.store, app_settings)
    if server is not None:
        await S3BlobStore.from_settings(s3_settings(server, "")).delete_prefix(prefix)


def _signer(media: Media) -> UrlSigner:
    return UrlSigner(SIGNING_KEY.encode(), BASE, media.settings.signed_url_ttl_s)


async def _output(
    sessions: Sessions, store: BlobStore, data: bytes, media_type: str = "image/png"
) -> tuple[Output, dict[str, str]]:
    """An output of a new account, its bytes stored under its subject (so erasing
    the subject deletes them), and that account's key."""
    async with session_scope(sessions) as session:
        new = await create_account_with_key(session, "viewer")
        output = await add_generated_output(session, new.account_id, "placeholder", 60, 90)
        output.blob_key = output_key(output.subject_id, output.job_id, 0)
        output.media_type = media_type
    await store.put(output.blob_key, data)
    return output, {"Authorization": f"Bearer {new.key}"}


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (60, 90), (os.urandom(1)[0], 40, 90)).save(buf, format="PNG")
    return buf.getvalue()


def _local(url: str) -> str:
    assert url.startswith(BASE), url
    return url.removeprefix(BASE)


def _with(url: str, **params: str) -> str:
    """``url`` with some query parameters replaced."""
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | params
    return f"{parts.path}?" + "&".join(f"{k}={v}" for k, v in query.items())


def _problem(response: Response, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["type"] == type_


# --- signed URLs ------------------------------------------------------------------


async def test_signed_output_url_works_without_a_key_until_the_subject_is_erased(
    media: Media, sessions: Sessions
) -> None:
    png = _png()
    output, auth = await _output(sessions, media.store, png)
    job = (await media.client.get(f"/v1/jobs/{output.job_id}", headers=auth)).json()
    url = job["outputs"][0]["url"]
    query = parse_qs(urlsplit(url).query)
    assert urlsplit(url).path == f"/v1/outputs/{output.id}"
    assert int(query["expires"][0]) >= time.time() + media.settings.signed_url_ttl_s - 1

    plain = await media.client.get(_local(url))  # what an <img> tag sends: no header
    assert plain.status_code == 200 and plain.content == png
    assert plain.headers["content-type"] == "image/png"
    unsigned = await media.client.get(f"/v1/outputs/{output.id}")
    _problem(unsigned, 401, "/problems/unauthorized")

    erased = await media.client.delete(f"/v1/subjects/{output.subject_id}", headers=auth)
    assert erased.status_code == 204, erased.text
    _problem(await media.client.get(_local(url)), 404, "/problems/not-found")


async def test_expired_and_forged_signatures_are_403(media: Media, sessions: Sessions) -> None:
    output, auth = await _output(sessions, media.store, _png())
    signer = _signer(media)
    path = f"/v1/outputs/{output.id}"
    long_ago = time.time() - media.settings.signed_url_ttl_s - 2 * EXPIRY_BUCKET_S
    expired = _local(signer.url(path, now=long_ago))
    _problem(await media.client.get(expired), 403, "/problems/url-expired")
    # A key does not rescue a bad signature: the signed URL is what is checked.
    _problem(await media.client.get(expired, headers=auth), 403, "/problems/url-expired")

    good = _local(signer.url(path))
    assert (await media.client.get(good)).status_code == 200
    expires = int(parse_qs(urlsplit(good).query)["expires"][0])
    forged = [
        _with(good, expires=str(expires + EXPIRY_BUCKET_S)),  # a longer life
        _with(good, signature="A" * 43),
        _with(good, signature="%C3%A9t%C3%A9"),  # not even ASCII
        _local(UrlSigner(b"another key", BASE, 3600).url(path)),
        f"{path}?signature={parse_qs(urlsplit(good).query)['signature'][0]}",  # no expiry
    ]
    for url in forged:
        _problem(await media.client.get(url), 403, "/problems/invalid-signature")


async def test_a_signed_url_names_one_output(media: Media, sessions: Sessions) -> None:
    first, _ = await _output(sessions, media.store, _png())
    second, _ = await _output(sessions, media.store, _png())
    url = _local(_signer(media).url(f"/v1/outputs/{first.id}"))
    moved = url.replace(str(first.id), str(second.id))
    _problem(await media.client.get(moved), 403, "/problems/invalid-signature")


async def test_catalog_image_urls_are_signed(media: Media, sessions: Sessions) -> None:
    png = _png()
    async with session_scope(sessions) as session:
        product = Product(site="fixture", external_id="P1", url=f"{SHOP}/p/1", currency="EUR",
                          content_hash="1", designer="Erdem", name="Dress", description="",
                          category_path=["Dresses"], first_seen=utcnow())  # fmt: skip
        session.add(product)
        await session.flush()
        image = await ingest_image(session, media.store, png, side=64, max_pixels=10**6)
        await set_product_images(session, product.id, [(f"{SHOP}/i/0.png", image.sha256)])
        auth = {"Authorization": f"Bearer {(await create_account_with_key(session, 'x')).key}"}

    detail = (await media.client.get(f"/v1/products/{product.id}", headers=auth)).json()
    listed = (await media.client.get("/v1/products", headers=auth)).json()["items"][0]
    assert listed["image_url"] == detail["image_url"] == detail["images"][0]["padded_url"]
    original = await media.client.get(_local(detail["images"][0]["original_url"]))
    assert original.status_code == 200 and original.content == png
    padded = await media.client.get(_local(detail["image_url"]))
    assert padded.status_code == 200 and padded.headers["content-type"] == "image/png"
    # The variant is signed: a padded URL does not open the original.
    swapped = _local(detail["image_url"]).replace("variant=padded", "variant=original")
    _problem(await media.client.get(swapped), 403, "/problems/invalid-signature")


async def test_generated_key_is_made_once_and_shared(
    settings: Settings, sessions: Sessions
) -> None:
    # Unset ATELIER_URL_SIGNING_KEY: processes starting together agree on one key.
    assert settings.url_signing_key is None
    signers = await asyncio.gather(*(url_signer(settings, sessions) for _ in range(4)))
    assert len({s.key for s in signers}) == 1 and len(signers[0].key) == 32
    async with sessions() as session:
        assert (await session.execute(select(func.count()).select_from(Secret))).scalar() == 1
    path = "/v1/outputs/x"
    url = signers[0].url(path)
    query = parse_qs(urlsplit(url).query)
    signers[3].verify(path, int(query["expires"][0]), query["signature"][0], time.time())


# --- byte ranges ------------------------------------------------------------------


async def _video(media: Media, sessions: Sessions) -> tuple[bytes, str]:
    data = os.urandom(VIDEO_BYTES)
    output, _ = await _output(sessions, media.store, data, media_type="video/mp4")
    return data, _local(_signer(media).url(f"/v1/outputs/{output.id}"))


@pytest.mark.parametrize(
    ("header", "start", "stop"),
    [
        ("bytes=0-99", 0, 100),
        ("bytes=65000-140000", 65000, 140001),  # across stream chunks
        ("bytes=150000-", 150000, VIDEO_BYTES),
        ("bytes=-500", VIDEO_BYTES - 500, VIDEO_BYTES),
        ("bytes=199990-999999999", 199990, VIDEO_BYTES),  # cut short at the end
        ("bytes=-999999999", 0, VIDEO_BYTES),
        ("BYTES=7-7", 7, 8),
    ],
)
async def test_a_range_gets_206_and_only_its_bytes(
    media: Media, sessions: Sessions, header: str, start: int, stop: int
) -> None:
    data, url = await _video(media, sessions)
    response = await media.client.get(url, headers={"Range": header})
    assert response.status_code == 206, response.text
    assert response.content == data[start:stop]
    assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{VIDEO_BYTES}"
    assert response.headers["content-length"] == str(stop - start)
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-type"] == "video/mp4"
    assert response.headers["content-disposition"].endswith('.mp4"')


async def test_whole_body_without_a_usable_range(media: Media, sessions: Sessions) -> None:
    data, url = await _video(media, sessions)
    whole = await media.client.get(url)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["accept-ranges"] == "bytes"
    etag = whole.headers["etag"]
    # Several ranges, another unit, an invalid range: ignored, as RFC 9110 allows.
    for header in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3", "bytes=-", "bytes=a-b"):
        response = await media.client.get(url, headers={"Range": header})
        assert response.status_code == 200 and response.content == data, header
    # If-Range: the range only of the version the client has.
    same = await media.client.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert same.status_code == 206 and same.content == data[:10]
    for stale in ('"another-version"', format_datetime(utcnow(), usegmt=True)):
        changed = await media.client.get(url, headers={"Range": "bytes=0-9", "If-Range": stale})
        assert changed.status_code == 200 and changed.content == data, stale


@pytest.mark.parametrize(
    "header", [f"bytes={VIDEO_BYTES}-", f"bytes={VIDEO_BYTES + 5}-9999999", "bytes=-0"]
)
async def test_unsatisfiable_range_is_416(media: Media, sessions: Sessions, header: str) -> None:
    _, url = await _video(media, sessions)
    response = await media.client.get(url, headers={"Range": header})
    _problem(response, 416, "/problems/range-not-satisfiable")
    assert response.headers["content-range"] == f"bytes */{VIDEO_BYTES}"


async def test_ranges_with_a_key_too(media: Media, sessions: Sessions) -> None:
    data = os.urandom(1000)
    output, auth = await _output(sessions, media.store, data)
    response = await media.client.get(
        f"/v1/outputs/{output.id}", headers={**auth, "Range": "bytes=10-19"}
    )
    assert response.status_code == 206 and response.content == data[10:20]


# --- CORS -------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin_and_a_refused_one(media: Media) -> None:
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
    }
    allowed = await media.client.options("/v1/looks", headers={"Origin": SHOP, **ask})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == SHOP
    assert "POST" in allowed.headers["access-control-allow-methods"]
    granted = allowed.headers["access-control-allow-headers"].lower()
    assert {"authorization", "idempotency-key", "content-type"} <= {
        h.strip() for h in granted.split(",")
    }
    refused = await media.client.options(
        "/v1/looks", headers={"Origin": "https://evil.example", **ask}
    )
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers


async def test_simple_request_exposes_the_headers_a_player_reads(
    media: Media, sessions: Sessions
) -> None:
    _, url = await _video(media, sessions)
    allowed = await media.client.get(url, headers={"Origin": SHOP, "Range": "bytes=0-9"})
    assert allowed.status_code == 206
    assert allowed.headers["access-control-allow-origin"] == SHOP
    exposed = {
        h.strip().lower() for h in allowed.headers["access-control-expose-headers"].split(",")
    }
    assert {"content-range", "accept-ranges", "etag", "x-request-id", "retry-after"} <= exposed
    refused = await media.client.get(url, headers={"Origin": "https://evil.example"})
    assert refused.status_code == 200  # served; the browser keeps it from the page's script
    assert "access-control-allow-origin" not in refused.headers
