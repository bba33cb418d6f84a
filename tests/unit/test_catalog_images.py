"""core.catalog.images: padding onto a square, and refusing bad images."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageChops

from core.catalog.images import CatalogImageError, border_colour, decode_image, pad_to_square

GREY = (230, 230, 232)
GARMENT = (140, 20, 60)


def packshot(width: int, height: int, background: tuple[int, int, int] = GREY) -> Image.Image:
    """A garment on a plain backdrop, with a one-pixel frame in other colours so
    a crop of even one row or column shows."""
    img = Image.new("RGB", (width, height), background)
    img.paste(GARMENT, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return img


def encoded(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def content_box(side: int, width: int, height: int) -> tuple[int, int, int, int]:
    scale = side / max(width, height)
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (side - w) // 2, (side - h) // 2
    return left, top, left + w, top + h


@pytest.mark.parametrize(
    ("width", "height"),
    [(320, 480), (480, 320), (333, 517), (517, 333), (101, 99), (64, 64), (1000, 7), (8, 900)],
)
def test_padding_keeps_aspect_and_every_pixel(width: int, height: int) -> None:
    side = 128
    img = packshot(width, height)
    padded = pad_to_square(img, side)

    assert padded.size == (side, side) and padded.mode == "RGB"
    box = content_box(side, width, height)
    expected = img.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS)
    # The whole image is there, scaled, not one row cut...
    assert ImageChops.difference(padded.crop(box), expected).getbbox() is None
    # ...with its aspect ratio (to the rounding of one pixel)...
    w, h = box[2] - box[0], box[3] - box[1]
    assert abs(w / h - width / height) <= max(1 / h, w / h**2) + 1e-9 or min(w, h) == 1
    # ...and the margins are the backdrop's colour.
    margins = Image.new("RGB", (side, side), GREY)
    margins.paste(padded.crop(box), box)
    assert ImageChops.difference(padded, margins).getbbox() is None


def test_every_edge_of_the_garment_survives() -> None:
    """A frame of distinct colours on all four edges is still all there."""
    img = Image.new("RGB", (300, 500), GREY)
    for colour, rect in [
        ((255, 0, 0), (0, 0, 300, 10)),
        ((0, 255, 0), (0, 490, 300, 500)),
        ((0, 0, 255), (0, 0, 10, 500)),
        ((255, 255, 0), (290, 0, 300, 500)),
    ]:
        img.paste(colour, rect)
    padded = pad_to_square(img, 500)
    left, top, right, bottom = content_box(500, 300, 500)
    assert padded.getpixel((left + 150, top + 2)) == (255, 0, 0)
    assert padded.getpixel((left + 150, bottom - 3)) == (0, 255, 0)
    assert padded.getpixel((left + 2, top + 250)) == (0, 0, 255)
    assert padded.getpixel((right - 3, top + 250)) == (255, 255, 0)


def test_square_input_of_the_target_side_is_unchanged() -> None:
    img = packshot(256, 256)
    assert ImageChops.difference(pad_to_square(img, 256), img).getbbox() is None


def test_small_images_are_scaled_up_to_fill_the_square() -> None:
    padded = pad_to_square(packshot(40, 80), 512)
    assert content_box(512, 40, 80) == (128, 0, 384, 512)
    assert padded.getpixel((256, 256)) == GARMENT


def test_background_comes_from_the_border() -> None:
    beige = (241, 235, 220)
    padded = pad_to_square(packshot(200, 400, beige), 400)
    assert padded.getpixel((5, 200)) == beige
    assert padded.getpixel((395, 200)) == beige


def test_a_non_uniform_border_pads_with_white() -> None:
    img = Image.new("RGB", (200, 400))
    img.putdata(
        [((x * 37) % 256, (y * 11) % 256, (x * y) % 256) for y in range(400) for x in range(200)]
    )
    assert border_colour(img) == (255, 255, 255)
    assert pad_to_square(img, 400).getpixel((0, 0)) == (255, 255, 255)


def test_a_mostly_uniform_border_with_a_few_odd_pixels_is_still_uniform() -> None:
    img = packshot(100, 200)
    img.paste((0, 0, 0), (0, 0, 3, 3))  # a speck in the corner
    assert border_colour(img) == GREY


def test_rgba_transparency_is_flattened_onto_white() -> None:
    img = Image.new("RGBA", (100, 200), (0, 0, 0, 0))
    img.paste((*GARMENT, 255), (25, 50, 75, 150))
    padded = pad_to_square(img, 200)
    assert padded.mode == "RGB"
    assert padded.getpixel((2, 2)) == (255, 255, 255)
    assert padded.getpixel((100, 100)) == GARMENT


def test_palette_image() -> None:
    img = packshot(120, 60).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    padded = pad_to_square(img, 120)
    assert padded.mode == "RGB"
    assert padded.getpixel((60, 60)) == img.convert("RGB").getpixel((60, 30))
    assert padded.getpixel((60, 2)) == img.convert("RGB").getpixel((0, 0))


def test_palette_image_with_transparency() -> None:
    img = Image.new("P", (60, 120), 0)
    img.putpalette([0, 0, 0, *GARMENT])
    img.paste(1, (15, 30, 45, 90))
    img.info["transparency"] = 0
    padded = pad_to_square(img, 120)
    assert padded.getpixel((2, 60)) == (255, 255, 255)
    assert padded.getpixel((60, 60)) == GARMENT


def test_cmyk_jpeg_decodes_to_rgb() -> None:
    data = encoded(packshot(80, 160).convert("CMYK"), "JPEG", quality=95)
    decoded = decode_image(data, side=64, max_pixels=10**6)
    assert (decoded.width, decoded.height, decoded.media_type) == (80, 160, "image/jpeg")
    padded = Image.open(io.BytesIO(decoded.padded_png))
    assert padded.mode == "RGB" and padded.size == (64, 64)
    centre = padded.getpixel((32, 32))
    assert isinstance(centre, tuple)
    assert all(abs(a - b) < 12 for a, b in zip(centre, GARMENT, strict=True))


def test_greyscale_and_16_bit_images() -> None:
    assert pad_to_square(packshot(50, 100).convert("L"), 64).mode == "RGB"
    deep = Image.new("I;16", (50, 100), 65535)
    assert pad_to_square(deep, 64).getpixel((32, 32)) == (255, 255, 255)


@pytest.mark.parametrize(("fmt", "media_type", "ext"), [("JPEG", "image/jpeg", "jpg"),
                                                        ("PNG", "image/png", "png"),
                                                        ("WEBP", "image/webp", "webp"),
                                                        ("GIF", "image/gif", "gif")])  # fmt: skip
def test_supported_formats(fmt: str, media_type: str, ext: str) -> None:
    decoded = decode_image(encoded(packshot(90, 45), fmt), side=32, max_pixels=10**6)
    assert (decoded.media_type, decoded.extension) == (media_type, ext)
    assert (decoded.width, decoded.height) == (90, 45)
    assert Image.open(io.BytesIO(decoded.padded_png)).size == (32, 32)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encoded(packshot(200, 100), "JPEG", exif=exif.tobytes())
    decoded = decode_image(data, side=64, max_pixels=10**6)
    assert (decoded.width, decoded.height) == (100, 200)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image at all",
        b"\xff\xd8\xff\xe0" + b"\x00" * 100,  # a JPEG header and nothing else
        encoded(packshot(200, 200), "JPEG")[:400],  # truncated mid-scan
        encoded(packshot(50, 50), "BMP"),  # a real image, in a format we do not take
    ],
    ids=["empty", "text", "jpeg-header-only", "truncated-jpeg", "bmp"],
)
def test_corrupt_or_unsupported_bytes_raise(data: bytes) -> None:
    with pytest.raises(CatalogImageError):
        decode_image(data, side=64, max_pixels=10**6)


def test_png_with_a_bad_crc_is_refused() -> None:
    data = bytearray(encoded(packshot(64, 64), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(CatalogImageError):
        decode_image(bytes(data), side=64, max_pixels=10**6)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [12_000, 20_000], ids=["ours", "over-pillows-own-limit"])
def test_decompression_bomb_is_refused_on_its_header(side: int) -> None:
    # 1-bit pixels compress to nothing: a few KB that declare 144 / 400 megapixels.
    bomb = encoded(Image.new("1", (side, side)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(CatalogImageError, match="over the"):
        decode_image(bomb, side=64, max_pixels=40_000_000)


def test_pixel_limit_is_the_argument() -> None:
    data = encoded(packshot(300, 300), "PNG")
    decode_image(data, side=64, max_pixels=300 * 300)
    with pytest.raises(CatalogImageError, match="over the limit"):
        decode_image(data, side=64, max_pixels=300 * 299)
