"""Product images: checked, stored once per content, padded onto a square.

Shops photograph garments on every aspect ratio; models downstream (CLIP,
training) want squares. Cropping would cut sleeves and hems off, so the image is
scaled to fit and padded with its own background colour, taken from its border:
a packshot on light grey stays on light grey, not inside a white frame.

Every image is untrusted bytes from the internet. It is opened by Pillow's
signature check, refused on its header when it declares more pixels than
allowed (a decompression bomb is never expanded), verified, then fully decoded;
any failure is a ``CatalogImageError`` the crawler counts and moves past.

Identity is the sha256 of the downloaded bytes: the same picture used by ten
products (or crawled ten times) is one ``catalog_image`` row and one pair of
blobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Final

from PIL import Image, ImageChops, ImageFile, ImageOps, ImageStat, UnidentifiedImageError
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import col
from sqlmodel.ext.asyncio.session import AsyncSession

from core.blobs.store import BlobStore
from core.catalog import store
from core.db.catalog_models import CatalogImage, ProductImage

log = logging.getLogger("atelier.catalog")

# Formats a shop's product image may come in, with the extension its original
# is stored under. Pillow opens a JPEG with a multi-picture index as "MPO".
_EXTENSIONS: Final = {
    "JPEG": "jpg",
    "MPO": "jpg",  # never asked for: the JPEG opener returns it
    "PNG": "png",
    "WEBP": "webp",
    "GIF": "gif",
    "AVIF": "avif",
}
Image.init()
_OPENERS: Final = [fmt for fmt in _EXTENSIONS if fmt in Image.OPEN]
_MEDIA_TYPES: Final = {"MPO": "image/jpeg", "AVIF": "image/avif"}
_WHITE: Final = (255, 255, 255)
# The border is "uniform" when this share of its pixels lies within
# _BORDER_TOLERANCE (per channel) of its median colour. Below that (a photo
# bleeding to the edge, a busy backdrop) no colour is a fair guess: use white.
_BORDER_UNIFORM_SHARE: Final = 0.9
_BORDER_TOLERANCE: Final = 24


class CatalogImageError(Exception):
    """An image that cannot be used: undecodable, unsupported, too large, a bomb."""


@dataclass(frozen=True)
class _Decoded:
    media_type: str
    extension: str
    width: int
    height: int
    padded_png: bytes


def original_key(sha256: str, extension: str) -> str:
    return f"catalog/images/{sha256[:2]}/{sha256}.{extension}"


def padded_key(sha256: str) -> str:
    return f"catalog/padded/{sha256[:2]}/{sha256}.png"


def pad_to_square(image: Image.Image, side: int) -> Image.Image:
    """``image`` scaled to fit a ``side`` x ``side`` square and centred on it.

    The aspect ratio is kept and no pixel of the image is cropped; the margins
    take the border's colour (see ``border_colour``). RGB out, whatever came in.
    """
    if side < 1:
        raise ValueError(f"side must be positive, got {side}")
    rgb = _to_rgb(image)
    scale = side / max(rgb.size)
    size = (max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale)))
    fitted = rgb if size == rgb.size else rgb.resize(size, Image.Resampling.LANCZOS)
    square = Image.new("RGB", (side, side), border_colour(rgb))
    square.paste(fitted, ((side - fitted.width) // 2, (side - fitted.height) // 2))
    return square


def border_colour(rgb: Image.Image) -> tuple[int, int, int]:
    """The median colour of the outermost pixels, or white if they disagree."""
    border = _border_strip(rgb)
    r, g, b = (int(v) for v in ImageStat.Stat(border).median)
    off = ImageChops.difference(border, Image.new("RGB", border.size, (r, g, b)))
    # A pixel is "off" when any channel is further than the tolerance away.
    far = [channel.point(lambda v: 255 if v > _BORDER_TOLERANCE else 0) for channel in off.split()]
    off_count = ImageChops.lighter(ImageChops.lighter(far[0], far[1]), far[2]).histogram()[255]
    if off_count > (1 - _BORDER_UNIFORM_SHARE) * border.width:
        return _WHITE
    return (r, g, b)


def _border_strip(rgb: Image.Image) -> Image.Image:
    """The four outermost rows and columns side by side, as one row of pixels."""
    width, height = rgb.size
    pieces = [
        rgb.crop((0, 0, width, 1)),
        rgb.crop((0, height - 1, width, height)),
        rgb.crop((0, 0, 1, height)).transpose(Image.Transpose.TRANSPOSE),
        rgb.crop((width - 1, 0, width, height)).transpose(Image.Transpose.TRANSPOSE),
    ]
    strip = Image.new("RGB", (2 * (width + height), 1))
    x = 0
    for piece in pieces:
        strip.paste(piece, (x, 0))
        x += piece.width
    return strip


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB; transparency flattened onto white (what a shop page shows)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit greyscale: map 0..65535 onto 0..255 rather than clipping.
        image = image.convert("I").point(lambda v: v / 256).convert("L")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def checked_padded(
    data: bytes, *, side: int, max_pixels: int
) -> tuple[str, Image.Image, Image.Image]:
    """Check ``data``: its format, the upright image and that image padded to a
    ``side`` square (RGB). CPU-bound, run it off the event loop."""
    if not data:
        raise CatalogImageError("empty image")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide Pillow flag some ML code sets; with it a cut-off
        # download decodes "fine" with grey padding. Fail loudly instead.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode")
    image = _open_checked(data, max_pixels)
    with image:
        _verify(data, image.format or "")
        try:
            image.load()
            upright = ImageOps.exif_transpose(image)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise CatalogImageError("image dimensions are far over the pixel limit") from exc
        except MemoryError:
            raise
        except Exception as exc:
            # Pillow signals bad data with OSError, SyntaxError, ValueError, EOFError...
            raise CatalogImageError(f"truncated or corrupt {image.format}: {exc}") from exc
        return str(image.format), upright, pad_to_square(upright, side)


def decode_image(data: bytes, *, side: int, max_pixels: int) -> _Decoded:
    """``checked_padded``, with the padded copy as PNG bytes to store."""
    fmt, upright, padded = checked_padded(data, side=side, max_pixels=max_pixels)
    buf = io.BytesIO()
    # zlib level 1: the padded copy is derived data, and level 6 (the default)
    # costs twice the time for files ~20% smaller.
    padded.save(buf, format="PNG", compress_level=1)
    return _Decoded(
        media_type=_MEDIA_TYPES.get(fmt) or Image.MIME.get(fmt, "application/octet-stream"),
        extension=_EXTENSIONS[fmt],
        width=upright.width,
        height=upright.height,
        padded_png=buf.getvalue(),
    )


def _open_checked(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Parse the header only, and refuse on what it declares."""
    try:
        image = Image.open(io.BytesIO(data), formats=_OPENERS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CatalogImageError("image dimensions are far over the pixel limit") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CatalogImageError("not an image in a supported format") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise CatalogImageError(f"{width}x{height} is over the limit of {max_pixels} pixels")
    if width < 1 or height < 1:
        image.close()
        raise CatalogImageError(f"{width}x{height} has no pixels")
    return image


def _verify(data: bytes, fmt: str) -> None:
    """Pillow's structural check (PNG chunk CRCs...); it needs a fresh image."""
    try:
        with Image.open(io.BytesIO(data), formats=[fmt]) as image:
            image.verify()
    except MemoryError:
        raise
    except Exception as exc:
        raise CatalogImageError(f"corrupt {fmt}: {exc}") from exc


async def ingest_image(
    session: AsyncSession, blobs: BlobStore, data: bytes, *, side: int, max_pixels: int
) -> CatalogImage:
    """The ``catalog_image`` row for ``data``, stored on first sight (through
    ``ingest_image_bytes``, the crawler's path). Raises CatalogImageError."""
    engine = session.bind
    if not isinstance(engine, AsyncEngine):
        raise TypeError("ingest_image needs a session bound to an AsyncEngine")
    sha256, _ = await ingest_image_bytes(engine, blobs, data, side=side, max_pixels=max_pixels)
    row = await session.get(CatalogImage, sha256)
    assert row is not None
    return row


async def ingest_image_bytes(
    engine: AsyncEngine, blobs: BlobStore, data: bytes, *, side: int, max_pixels: int
) -> tuple[str, bool]:
    """(sha256, stored now) for ``data``: a known image costs one lookup and a
    stat, a new one is checked, padded, stored and given its row. Raises
    CatalogImageError.

    A known image whose padded blob is missing (a blob store restored from an
    older backup, or wiped) has its blobs written again from these bytes.
    Safe to call concurrently with the same bytes: blobs are content-addressed
    (the same key gets the same bytes) and the row insert does nothing on a
    duplicate. Plain asyncpg: the crawler calls this for every new image."""
    sha256 = hashlib.sha256(data).hexdigest()
    async with store.driver_connection(engine) as conn:
        if await store.image_known(conn, sha256):
            if not await blobs.exists(padded_key(sha256)):
                log.warning("catalog image %s had lost its blobs: stored again", sha256)
                await store_image_blobs(blobs, data, sha256, side=side, max_pixels=max_pixels)
            return sha256, False
    values = await store_image_blobs(blobs, data, sha256, side=side, max_pixels=max_pixels)
    async with store.driver_connection(engine) as conn:
        return sha256, await store.insert_image(conn, values)


async def store_image_blobs(
    blobs: BlobStore, data: bytes, sha256: str, *, side: int, max_pixels: int
) -> dict[str, Any]:
    """Check and pad ``data`` (in a thread), store the original and the padded
    copy; the ``catalog_image`` row's values. Raises CatalogImageError."""
    decoded = await asyncio.to_thread(decode_image, data, side=side, max_pixels=max_pixels)
    key = original_key(sha256, decoded.extension)
    await blobs.put(key, data)
    await blobs.put(padded_key(sha256), decoded.padded_png)
    return dict(
        sha256=sha256,
        blob_key=key,
        padded_blob_key=padded_key(sha256),
        media_type=decoded.media_type,
        width=decoded.width,
        height=decoded.height,
        bytes=len(data),
    )


async def set_product_images(
    session: AsyncSession, product_id: uuid.UUID, images: list[tuple[str, str]]
) -> None:
    """Make ``images`` ((source_url, image_sha256) in page order) the product's images."""
    await session.execute(delete(ProductImage).where(col(ProductImage.product_id) == product_id))
    if images:
        rows = [
            dict(
                id=uuid.uuid4(), product_id=product_id, position=i, source_url=url, image_sha256=sha
            )
            for i, (url, sha) in enumerate(images)
        ]
        await session.execute(insert(ProductImage).values(rows))
