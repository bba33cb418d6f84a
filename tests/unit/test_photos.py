"""core.photos: what an uploaded photo must be, and what is stored of it."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import random
import struct
import uuid
import warnings
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import ExifTags, Image, ImageCms, ImageFile, ImageOps, PngImagePlugin

from core.db.models import Subject
from core.errors import InvalidInput, PhotoRejected, PhotoTooLarge, PhotoUnsupported
from core.faces import detect_faces
from core.ml.profiles import get_profile
from core.photos import (
    ALLOWED_FORMATS,
    CleanPhoto,
    NormalizedPhoto,
    PhotoLimits,
    check_photo_count,
    clean_photo,
    normalize_photo,
)
from core.settings import Settings
from core.subjects import check_training_photos

DEMO_DIR = Path(__file__).resolve().parents[2] / "demo" / "sample_subject"
LIMITS = PhotoLimits.from_settings(Settings())
SMALL_SIDE = 256  # stored_side for tests that check downscaling cheaply
# What a refusal found by looking at the face says; checks before it say none of these.
FACE_REASONS = frozenset({"no-face", "several-faces", "face-too-small", "crop-too-small"})
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def picture(size: tuple[int, int] = (320, 240), mode: str = "RGB") -> Image.Image:
    """A smooth gradient, so lossy codecs behave as on a photo."""
    w, h = size
    ramp = Image.linear_gradient("L").resize((w, h))
    img = Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90).resize((w, h)), ramp))
    return img.convert(mode)


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **params)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny, hand-built PNG whose IHDR claims ``width`` x ``height`` RGB pixels
    but whose image data is empty: decoding it would fail, so rejecting it as too
    large proves the header alone decided."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )


def png_chunk_types(data: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


def reopen(photo: CleanPhoto | NormalizedPhoto) -> Image.Image:
    img = Image.open(io.BytesIO(photo.data))
    img.load()
    return img


def rejected(
    exc_type: type[PhotoRejected], data: bytes, name: str, limits: PhotoLimits = LIMITS
) -> PhotoRejected:
    """normalize_photo must raise exactly ``exc_type``, naming the photo.

    The whole pipeline runs, so each of these checks is shown to come before
    the face check (the synthetic pictures here have no face)."""
    with pytest.raises(PhotoRejected) as info:
        normalize_photo(data, name, limits)
    assert type(info.value) is exc_type, info.value.detail
    assert name in info.value.detail
    assert info.value.extra["photo"] == name
    return info.value


# --- accepted photos --------------------------------------------------------------


@pytest.mark.parametrize("fmt", sorted(ALLOWED_FORMATS))
def test_allowed_formats_become_clean_png(fmt: str) -> None:
    photo = clean_photo(encode(picture(), fmt), f"me.{fmt.lower()}", LIMITS)

    assert photo.source_format == fmt
    assert (photo.width, photo.height) == (320, 240)
    img = reopen(photo)
    assert (img.format, img.mode, img.size) == ("PNG", "RGB", (320, 240))
    assert png_chunk_types(photo.data) == [b"IHDR", b"IDAT", b"IEND"]


def test_format_is_decided_by_content_not_name() -> None:
    photo = clean_photo(encode(picture(), "PNG"), "holiday.gif", LIMITS)
    assert photo.source_format == "PNG"


def test_sha256_is_of_the_output_and_deterministic() -> None:
    data = encode(picture(), "JPEG", quality=90)
    first = clean_photo(data, "a.jpg", LIMITS)
    second = clean_photo(data, "b.jpg", LIMITS)

    assert first.data == second.data
    assert first.sha256 == second.sha256
    assert first.sha256 == hashlib.sha256(first.data).hexdigest()


def test_gps_exif_icc_and_text_are_stripped() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCo"
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 26.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (0.0, 7.0, 39.0)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(picture(), "JPEG", exif=exif, icc_profile=icc, comment=b"secret")
    assert Image.open(io.BytesIO(data)).getexif().get_ifd(ExifTags.IFD.GPSInfo)  # sanity

    img = reopen(clean_photo(data, "gps.jpg", LIMITS))

    assert not img.getexif()
    assert not {"exif", "icc_profile", "comment"} & img.info.keys()


def test_png_text_chunks_are_stripped() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "someone@example.com")
    info.add_itxt("Description", "home address", zip=True)
    photo = clean_photo(encode(picture(), "PNG", pnginfo=info), "t.png", LIMITS)

    assert png_chunk_types(photo.data) == [b"IHDR", b"IDAT", b"IEND"]


def test_exif_orientation_is_applied() -> None:
    # Stored sideways (wide) with a red top-left corner; orientation 6 means
    # "rotate 90 degrees clockwise to display", which moves that corner top-right.
    stored = Image.new("RGB", (200, 100), BLUE)
    stored.paste(RED, (0, 0, 20, 20))
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    data = encode(stored, "PNG", exif=exif)

    photo = clean_photo(data, "phone.png", LIMITS)
    img = reopen(photo)

    assert (photo.width, photo.height) == (100, 200)
    assert img.getpixel((95, 5)) == RED
    assert img.getpixel((5, 5)) == BLUE


def test_downscale_keeps_aspect_and_respects_stored_side() -> None:
    limits = dataclasses.replace(LIMITS, stored_side=SMALL_SIDE)
    photo = clean_photo(encode(picture((1000, 500)), "PNG"), "big.png", limits)
    assert (photo.width, photo.height) == (SMALL_SIDE, SMALL_SIDE // 2)

    portrait = clean_photo(encode(picture((300, 900)), "PNG"), "tall.png", limits)
    assert (portrait.width, portrait.height) == (SMALL_SIDE // 3, SMALL_SIDE)


def test_small_photo_is_not_upscaled() -> None:
    photo = clean_photo(encode(picture((100, 80)), "PNG"), "s.png", LIMITS)
    assert (photo.width, photo.height) == (100, 80)


def test_alpha_is_flattened_on_white() -> None:
    img = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    img.paste((255, 0, 0, 255), (0, 0, 50, 100))
    out = reopen(clean_photo(encode(img, "PNG"), "cutout.png", LIMITS))

    assert out.mode == "RGB"
    assert out.getpixel((75, 50)) == (255, 255, 255)
    assert out.getpixel((25, 50)) == RED


def test_palette_with_transparency_is_flattened_on_white() -> None:
    img = Image.new("P", (100, 100), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (0, 0, 50, 100))
    out = reopen(clean_photo(encode(img, "PNG", transparency=0), "p.png", LIMITS))

    assert out.getpixel((75, 50)) == (255, 255, 255)
    assert out.getpixel((25, 50)) == RED


def test_sixteen_bit_greyscale_keeps_its_tones() -> None:
    mid_grey = 0x8000
    img = Image.new("I;16", (100, 100), mid_grey)
    out = reopen(clean_photo(encode(img, "PNG"), "deep.png", LIMITS))

    grey = mid_grey >> 8  # not clipped to white, as a naive conversion would
    assert out.getpixel((50, 50)) == (grey, grey, grey)


def test_animated_image_keeps_its_first_frame() -> None:
    frames = [Image.new("RGB", (100, 100), RED), Image.new("RGB", (100, 100), BLUE)]
    for fmt in ("PNG", "WEBP"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], lossless=True)
        assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2  # sanity

        out = reopen(clean_photo(data, f"anim.{fmt.lower()}", LIMITS))

        assert out.getpixel((50, 50)) == RED


def test_demo_photos_pass_with_default_settings() -> None:
    paths = sorted(DEMO_DIR.glob("*.jpg"))
    assert len(paths) == 4
    check_photo_count(len(paths), LIMITS)
    shapes = set()
    for path in paths:
        photo = normalize_photo(path.read_bytes(), path.name, LIMITS)
        assert photo.source_format == "JPEG"
        assert photo.face.side >= LIMITS.min_face_fraction * min(photo.width, photo.height)
        assert set(png_chunk_types(photo.train_data)) == {b"IHDR", b"IDAT", b"IEND"}
        shapes.add((photo.width, photo.height))
    # The EXIF-rotated one is stored landscape but comes out portrait.
    assert (448, 560) in shapes


def test_normalized_photo_is_the_clean_photo_plus_its_face() -> None:
    data = (DEMO_DIR / "01_portrait.jpg").read_bytes()
    clean = clean_photo(data, "me.jpg", LIMITS)
    photo = normalize_photo(data, "me.jpg", LIMITS)

    assert (photo.data, photo.sha256, photo.width, photo.height) == (
        clean.data,
        clean.sha256,
        clean.width,
        clean.height,
    )
    crop = Image.open(io.BytesIO(photo.train_data))
    assert crop.width == crop.height < photo.width


def test_a_clean_photo_without_a_face_is_refused() -> None:
    err = rejected(PhotoRejected, encode(picture(), "PNG"), "landscape.png")
    assert err.extra["reason"] == "no-face"


# --- rejected photos --------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "exc_type"),
    [
        (png_declaring(50_000, 50_000), PhotoTooLarge),
        (png_declaring(7000, 7000), PhotoTooLarge),
        (b"\0" * (LIMITS.max_bytes + 1), PhotoTooLarge),
        (b"%PDF-1.7\n", PhotoRejected),
        (encode(picture(), "GIF"), PhotoUnsupported),
        (encode(picture((640, 480)), "JPEG")[:2000], PhotoRejected),
        (encode(picture((LIMITS.min_side - 1, 200)), "PNG"), PhotoRejected),
    ],
    ids=["bomb", "over-pixels", "over-bytes", "not-image", "gif", "truncated", "tiny"],
)
def test_file_checks_come_before_looking_for_a_face(
    data: bytes, exc_type: type[PhotoRejected], monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("face detection ran on a photo that should have been refused")

    monkeypatch.setattr("core.photos.detect_faces", must_not_run)
    err = rejected(exc_type, data, "upload.png")
    assert err.extra.get("reason") not in FACE_REASONS


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file, not a photo\n" * 20,
        b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
        random.Random(7).randbytes(4096),
    ],
    ids=["text", "pdf", "random"],
)
def test_non_images_are_rejected_whatever_the_name(data: bytes) -> None:
    err = rejected(PhotoRejected, data, "selfie.jpg")
    assert "not an image" in err.detail


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_image_formats_are_unsupported(fmt: str) -> None:
    err = rejected(PhotoUnsupported, encode(picture(), fmt), "photo.jpg")
    assert fmt in err.detail
    assert err.extra["format"] == fmt


def test_heic_is_named_as_unsupported() -> None:
    # Just the ISO-BMFF "ftyp" box an iPhone's HEIC starts with, then junk.
    data = struct.pack(">I", 24) + b"ftypheic" + bytes(4) + b"mif1heic" + bytes(500)
    err = rejected(PhotoUnsupported, data, "IMG_0001.HEIC")
    assert err.extra["format"] == "HEIC"


def test_truncated_jpeg_is_rejected() -> None:
    data = encode(picture((640, 480)), "JPEG", quality=90)
    err = rejected(PhotoRejected, data[: len(data) // 2], "cut.jpg")
    assert "truncated or corrupt" in err.detail


def test_corrupt_png_is_rejected() -> None:
    data = bytearray(encode(picture(), "PNG"))
    data[-40:-20] = bytes(20)  # inside the image data, so its CRC fails
    err = rejected(PhotoRejected, bytes(data), "bad.png")
    assert "truncated or corrupt" in err.detail


def test_truncated_images_flag_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        normalize_photo(encode(picture(), "PNG"), "a.png", LIMITS)


def test_pixel_limit_is_checked_on_the_header() -> None:
    # 7000 x 7000 = 49 Mpx: over our 40 Mpx limit, under Pillow's own bomb limit.
    data = png_declaring(7000, 7000)
    assert len(data) < 100
    err = rejected(PhotoTooLarge, data, "huge.png")
    assert "7000x7000" in err.detail


def test_pixel_limit_holds_without_pillows_bomb_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    rejected(PhotoTooLarge, png_declaring(50_000, 50_000), "bomb.png")


def test_decompression_bomb_is_too_large_not_a_crash() -> None:
    # Pillow itself raises DecompressionBombError at this size, in Image.open.
    rejected(PhotoTooLarge, png_declaring(50_000, 50_000), "bomb.png")


def test_decompression_bomb_warning_as_error_is_too_large() -> None:
    # 10000 x 10000 is between Pillow's warning and error thresholds; where
    # warnings are errors, the warning is raised from Image.open.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        rejected(PhotoTooLarge, png_declaring(10_000, 10_000), "bomb.png")


def test_unsupported_decompression_bomb_is_too_large() -> None:
    gif = bytearray(encode(Image.new("P", (10, 10)), "GIF"))
    gif[6:10] = struct.pack("<HH", 65_535, 65_535)  # logical screen size
    rejected(PhotoTooLarge, bytes(gif), "bomb.gif")


def test_over_max_bytes_is_too_large() -> None:
    data = encode(picture(), "PNG")
    limits = dataclasses.replace(LIMITS, max_bytes=len(data) - 1)
    err = rejected(PhotoTooLarge, data, "heavy.png", limits)
    assert str(limits.max_bytes) in err.detail
    clean_photo(data, "heavy.png", dataclasses.replace(limits, max_bytes=len(data)))


def test_empty_file_is_rejected() -> None:
    err = rejected(PhotoRejected, b"", "empty.jpg")
    assert "empty" in err.detail


def test_tiny_photo_is_rejected() -> None:
    side = LIMITS.min_side
    err = rejected(PhotoRejected, encode(picture((side * 4, side - 1)), "PNG"), "tiny.png")
    assert "too small" in err.detail
    clean_photo(encode(picture((side, side)), "PNG"), "ok.png", LIMITS)


# --- photo count --------------------------------------------------------------------


def test_photo_count_bounds() -> None:
    limits = dataclasses.replace(LIMITS, min_count=3, max_count=8)
    check_photo_count(3, limits)
    check_photo_count(8, limits)
    for n in (0, 2, 9):
        with pytest.raises(InvalidInput) as info:
            check_photo_count(n, limits)
        assert info.value.detail == f"expected 3-8 photos, got {n}"


def test_limits_come_from_settings() -> None:
    s = Settings(
        min_photos=2, max_photos=5, stored_photo_side=512, min_face_fraction=0.2, face_crop_scale=2
    )
    limits = PhotoLimits.from_settings(s)
    assert (limits.min_count, limits.max_count, limits.stored_side) == (2, 5, 512)
    assert limits.max_pixels == s.max_photo_pixels
    assert (limits.min_face_fraction, limits.face_crop_scale) == (0.2, 2.0)


# --- photos against the profile that trains on them ----------------------------------


def limits_for(profile: str) -> PhotoLimits:
    return PhotoLimits.from_settings(Settings(profile=profile))


def demo_scaled(name: str, side: int) -> bytes:
    """A demo portrait (512 px, face about 100-170 px) resized to ``side``, as PNG."""
    with Image.open(DEMO_DIR / name) as img:
        upright = ImageOps.exif_transpose(img).convert("RGB")
    return encode(upright.resize((side, side), Image.Resampling.LANCZOS), "PNG")


def test_limits_follow_the_profile() -> None:
    sdxl = limits_for("sdxl")
    assert (sdxl.profile, sdxl.resolution, sdxl.min_crop_side) == ("sdxl", 1024, 768)
    assert sdxl.min_photo_side == 768  # over the deployment's floor of 64
    # Training's largest view of a crop (sdxl's 1024 px enlarged by its 0.1 jitter) fits.
    assert sdxl.stored_crop_side >= 1024 * 1.1
    assert limits_for("tiny").min_photo_side == Settings().min_photo_side
    named = PhotoLimits.from_settings(Settings(profile="tiny"), get_profile("sd15"))
    assert (named.profile, named.min_crop_side) == ("sd15", 384)


def test_photo_too_small_for_the_profile_is_refused_on_its_header() -> None:
    data = (DEMO_DIR / "01_portrait.jpg").read_bytes()  # 512x512
    assert normalize_photo(data, "me.jpg", limits_for("tiny")).crop_side > 64

    with pytest.raises(PhotoRejected) as info:
        clean_photo(data, "me.jpg", limits_for("sdxl"))  # before any face is looked for
    err = info.value

    assert err.extra["reason"] == "photo-too-small"
    assert (err.extra["min_photo_side"], err.extra["profile"]) == (768, "sdxl")
    assert "512x512 is too small for the sdxl profile, which trains at 1024 px" in err.detail
    assert "at least 768 pixels" in err.detail


@pytest.mark.parametrize(("profile", "accepted"), [("tiny", True), ("sd15", True), ("sdxl", False)])
def test_face_crop_too_small_for_the_profile_is_refused_with_the_numbers(
    profile: str, accepted: bool
) -> None:
    # 1000 px, over sdxl's 768 px floor; its face (~190 px) gives a ~580 px crop.
    data = demo_scaled("01_portrait.jpg", 1000)
    limits = limits_for(profile)
    if accepted:
        photo = normalize_photo(data, "far.png", limits)
        assert limits.min_crop_side <= photo.crop_side < 768
        return
    with pytest.raises(PhotoRejected) as info:
        normalize_photo(data, "far.png", limits)
    err = info.value

    assert err.extra["reason"] == "crop-too-small"
    side = err.extra["crop_side"]
    assert 3 * 150 <= side < 768 and err.extra["min_crop_side"] == 768
    assert err.extra["min_face_side"] == 256  # 768 / face_crop_scale 3
    assert f"the face crop in far.png is {side} px" in err.detail
    assert "the sdxl profile trains at 1024 px and needs at least 768 px" in err.detail
    assert "upload a larger or closer photo" in err.detail


def test_training_crop_is_cut_from_the_photo_as_uploaded() -> None:
    # A 2048 px close-up: the stored copy is 1024 px, but the crop around its
    # ~680 px face is cut from the 2048 px pixels and only bounded to stored_crop_side.
    limits = limits_for("sdxl")
    photo = normalize_photo(demo_scaled("02_closeup.jpg", 2048), "big.png", limits)

    assert (photo.width, photo.height) == (limits.stored_side, limits.stored_side)
    assert photo.crop_side >= 2 * min(3 * photo.face.side, photo.width)
    with Image.open(io.BytesIO(photo.train_data)) as crop:
        assert crop.size == (limits.stored_crop_side, limits.stored_crop_side)
        # The face is there, at the scale of the 2048 px pixels (a third of the crop).
        (face,) = detect_faces(crop.convert("RGB"), min_side=crop.width // 10)
        assert face.side > crop.width // 4


def test_a_small_stored_crop_is_refused_at_training_time() -> None:
    subject = Subject(account_id=uuid.uuid4(), name="Eileen", class_noun="woman", token="pgh")
    photos = [Image.new("RGB", (side, side)) for side in (900, 297, 1024)]
    check_training_photos([(subject, photos)], get_profile("tiny"))

    with pytest.raises(PhotoRejected) as info:
        check_training_photos([(subject, photos)], get_profile("sdxl"))
    err = info.value

    assert err.extra["reason"] == "crop-too-small"
    assert (err.extra["crop_sides"], err.extra["profile"]) == ([297], "sdxl")
    assert f"subject {subject.id} (Eileen)" in err.detail
    assert "the sdxl profile, which trains at 1024 px and needs at least 768 px" in err.detail
    assert "photo 2 is 297 px" in err.detail
