"""Validate and normalize uploaded subject photos.

Every photo is untrusted input. It is judged by its content (magic bytes), never
by its filename or declared content type, and its size is checked twice before
any pixel is decoded: the byte count first, then the pixel count declared in the
image header, so a decompression bomb is refused without being expanded.

What is stored is a fresh 8-bit RGB PNG with no metadata at all: EXIF (GPS
included), ICC profiles and text chunks never leave this module. A photo that
carried an ICC profile has its colours converted to sRGB before the profile goes.

Animated or multi-frame images (APNG, animated WebP, MPO) are accepted and only
their first frame is used: a phone's "live" or stereo photo is still a photo of
the subject, and rejecting it would only confuse the user.

Only a photo that passed every one of those checks is looked at for faces (see
``core.faces``): it must show exactly one face large enough to train on, and a
square crop around that face becomes the picture training uses. Refusals about
faces carry a ``reason`` in ``extra`` ("no-face", "several-faces",
"face-too-small") so a client can tell the user what to change.

Photos are checked against the model profile that will train on them (the
deployment's, ``ATELIER_PROFILE``): a crop smaller than the profile's
``min_crop_side`` would be upscaled past what training can use (SDXL trains at
1024 px; a 300 px crop is a 3.4x blur of the face). A photo whose shorter side is
under that is refused on its header ("photo-too-small"), one whose face is too
small in pixels for a crop that big after the face is found ("crop-too-small"),
both with the numbers. The crop is cut from the photo as uploaded, not from the
downscaled copy that is stored, so a large photo keeps its detail for training:
a 4000x3000 photo whose face is 15% of its height gives a 1350 px crop, where the
1024 px stored copy would give 460 px.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from core.errors import InvalidInput, PhotoRejected, PhotoTooLarge, PhotoUnsupported
from core.faces import FaceBox, crop_box, detect_faces, rescale
from core.ml.profiles import Profile, get_profile
from core.settings import Settings

ALLOWED_FORMATS: Final = frozenset({"JPEG", "PNG", "WEBP"})

# Signatures of the formats we take; anything else is never handed to the
# decoder of an allowed format.
_JPEG_MAGIC: Final = b"\xff\xd8\xff"
_PNG_MAGIC: Final = b"\x89PNG\r\n\x1a\n"
_RIFF_MAGIC: Final = b"RIFF"
_WEBP_MAGIC: Final = b"WEBP"
_WEBP_MAGIC_OFFSET: Final = 8
# iPhones shoot HEIC, which Pillow cannot even identify; it is recognized here
# by its ISO-BMFF "ftyp" box so the user is told the format, not "not an image".
_FTYP_BOX: Final = slice(4, 8)
_FTYP_BRAND: Final = slice(8, 12)
_HEIF_BRANDS: Final = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1"})

# Pillow opens a JPEG carrying a multi-picture index as "MPO"; it is a JPEG.
_PIL_FORMATS: Final = {"JPEG": {"JPEG", "MPO"}, "PNG": {"PNG"}, "WEBP": {"WEBP"}}

_WHITE: Final = (255, 255, 255, 255)
# 16-bit greyscale PNGs decode to "I;16" mode; this maps 0..65535 onto 0..255.
_SIXTEEN_TO_EIGHT_BITS: Final = 1 / 256
_SRGB: Final = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
# Faces down to this share of the minimum face size are still looked for, so a
# user whose face is a little too small is told so rather than "no face found".
# Smaller ones are not searched: that is where the cascade's false alarms are.
_SMALL_FACE_SEARCH: Final = 0.5


@dataclass(frozen=True)
class PhotoLimits:
    min_count: int
    max_count: int
    max_bytes: int
    max_pixels: int
    min_side: int
    stored_side: int
    min_face_fraction: float
    face_crop_scale: float
    # The profile the photos are for, what it trains at, the smallest crop it
    # takes (in the photo's own pixels), and the most a stored crop keeps.
    profile: str
    resolution: int
    min_crop_side: int
    stored_crop_side: int

    @classmethod
    def from_settings(cls, s: Settings, profile: Profile | None = None) -> PhotoLimits:
        """The deployment's limits for photos that ``profile`` (default: the
        deployment's, ``s.profile``) will train on."""
        trains = profile or get_profile(s.profile)
        # Training encodes each crop enlarged by its crop jitter too; keep that many pixels.
        largest_view = math.ceil(trains.resolution * (1 + trains.crop_jitter))
        return cls(
            min_count=s.min_photos,
            max_count=s.max_photos,
            max_bytes=s.max_photo_bytes,
            max_pixels=s.max_photo_pixels,
            min_side=s.min_photo_side,
            stored_side=s.stored_photo_side,
            min_face_fraction=s.min_face_fraction,
            face_crop_scale=s.face_crop_scale,
            profile=trains.name,
            resolution=trains.resolution,
            min_crop_side=trains.min_crop_side,
            stored_crop_side=max(s.stored_crop_side, largest_view),
        )

    @property
    def min_photo_side(self) -> int:
        """The shorter side a photo needs: a smaller one cannot give a big enough crop."""
        return max(self.min_side, self.min_crop_side)


@dataclass(frozen=True)
class CleanPhoto:
    """A photo that passed the format and size checks: upright, sRGB, bounded."""

    data: bytes  # PNG, RGB, no metadata chunks
    width: int
    height: int
    sha256: str  # hex digest of ``data``
    source_format: str  # one of ALLOWED_FORMATS
    image: Image.Image = field(repr=False, compare=False)  # the pixels of ``data``
    # The same picture before it was downscaled for storage (``image`` itself when
    # it was not): training crops are cut from it.
    original: Image.Image = field(repr=False, compare=False)


@dataclass(frozen=True)
class NormalizedPhoto:
    """What is stored of an accepted photo."""

    data: bytes  # PNG, RGB, no metadata chunks
    width: int
    height: int
    sha256: str  # hex digest of ``data``
    source_format: str  # one of ALLOWED_FORMATS
    face: FaceBox  # the one face, in the pixels of ``data``
    train_data: bytes  # PNG, RGB, no metadata: the square crop training uses
    crop_side: int  # that crop's side in the photo's own pixels, before bounding it


def check_photo_count(n: int, limits: PhotoLimits) -> None:
    if not limits.min_count <= n <= limits.max_count:
        raise InvalidInput(
            f"expected {limits.min_count}-{limits.max_count} photos, got {n}", count=n
        )


def normalize_photo(data: bytes, name: str, limits: PhotoLimits) -> NormalizedPhoto:
    """Check one uploaded photo and return it as a clean, bounded PNG with its
    face and training crop.

    Raises PhotoTooLarge, PhotoUnsupported or PhotoRejected (all PhotoRejected),
    each with ``photo=name`` in ``extra``. CPU-bound: call it off the event loop.
    """
    clean = clean_photo(data, name, limits)
    face = _the_face(clean.image, name, limits)
    crop, crop_side = _training_crop(clean, face, name, limits)
    return NormalizedPhoto(
        data=clean.data,
        width=clean.width,
        height=clean.height,
        sha256=clean.sha256,
        source_format=clean.source_format,
        face=face,
        train_data=_encode_png(crop),
        crop_side=crop_side,
    )


def clean_photo(data: bytes, name: str, limits: PhotoLimits) -> CleanPhoto:
    """The checks and normalization that come before looking for a face: every
    size limit is enforced here, before a pixel is decoded."""
    _check_byte_size(data, name, limits)
    source_format = _sniff_format(data, name)
    with _open(data, source_format, name) as img:
        _check_header(img, name, limits)
        _verify_checksums(data, source_format, name)
        _decode_fully(img, name, source_format)
        rgb = _to_rgb(_upright(img))
    out = _downscale(rgb, limits.stored_side)
    png = _encode_png(out)
    return CleanPhoto(
        data=png,
        width=out.width,
        height=out.height,
        sha256=hashlib.sha256(png).hexdigest(),
        source_format=source_format,
        image=out,
        original=rgb,
    )


def _the_face(img: Image.Image, name: str, limits: PhotoLimits) -> FaceBox:
    """The one face large enough to train on, or PhotoRejected with a ``reason``.

    Faces under the minimum are searched down to half of it; next to one large
    enough they are ignored (a stranger far behind, or a false alarm on a
    pattern) since the training crop frames the large one. Two or more faces
    over the minimum mean a photo of several people.
    """
    min_face = math.ceil(limits.min_face_fraction * min(img.size))
    faces = detect_faces(img, min_side=math.floor(min_face * _SMALL_FACE_SEARCH))
    large = [f for f in faces if f.side >= min_face]
    if not faces:
        raise PhotoRejected(
            f"no face found in {name}; upload photos where your face is clearly visible",
            photo=name,
            reason="no-face",
        )
    if len(large) > 1:
        raise PhotoRejected(
            f"{len(large)} faces in {name}; upload photos of one person",
            photo=name,
            reason="several-faces",
            faces=len(large),
        )
    if not large:
        biggest = faces[0].side
        raise PhotoRejected(
            f"the face in {name} is too small ({biggest} pixels wide in a "
            f"{img.width}x{img.height} photo; at least {min_face} needed): "
            "upload a closer photo",
            photo=name,
            reason="face-too-small",
            face_side=biggest,
            min_face_side=min_face,
        )
    return large[0]


def _training_crop(
    clean: CleanPhoto, face: FaceBox, name: str, limits: PhotoLimits
) -> tuple[Image.Image, int]:
    """The square around the face (``core.faces.crop_box``), cut from the photo as
    uploaded and bounded by ``stored_crop_side``, and its side before bounding;
    PhotoRejected ("crop-too-small") when that side is under the profile's minimum."""
    original = clean.original
    box = crop_box(
        original.size, rescale(face, clean.image.size, original.size), limits.face_crop_scale
    )
    side = box[2] - box[0]
    if side < limits.min_crop_side:
        face_side = round(face.side * original.width / clean.width)
        min_face = math.ceil(limits.min_crop_side / limits.face_crop_scale)
        raise PhotoRejected(
            f"the face crop in {name} is {side} px (its face {face_side} px wide); the "
            f"{limits.profile} profile trains at {limits.resolution} px and needs at least "
            f"{limits.min_crop_side} px (a face of {min_face} px): upload a larger or "
            "closer photo",
            photo=name,
            reason="crop-too-small",
            crop_side=side,
            min_crop_side=limits.min_crop_side,
            face_side=face_side,
            min_face_side=min_face,
            profile=limits.profile,
            resolution=limits.resolution,
        )
    return _downscale(original.crop(box), limits.stored_crop_side), side


# --- checks before decoding ----------------------------------------------------


def _check_byte_size(data: bytes, name: str, limits: PhotoLimits) -> None:
    if not data:
        raise PhotoRejected(f"{name}: the file is empty", photo=name)
    if len(data) > limits.max_bytes:
        raise PhotoTooLarge(
            f"{name}: {len(data)} bytes is over the limit of {limits.max_bytes}",
            photo=name,
        )


def _sniff_format(data: bytes, name: str) -> str:
    """Return the allowed format ``data`` starts like, or raise."""
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    riff_type = data[_WEBP_MAGIC_OFFSET : _WEBP_MAGIC_OFFSET + len(_WEBP_MAGIC)]
    if data.startswith(_RIFF_MAGIC) and riff_type == _WEBP_MAGIC:
        return "WEBP"
    other = _identify_other_format(data, name)
    if other is None:
        raise PhotoRejected(f"{name}: not an image", photo=name)
    raise PhotoUnsupported(
        f"{name}: {other} images are not supported (use JPEG, PNG or WebP)",
        photo=name,
        format=other,
    )


def _identify_other_format(data: bytes, name: str) -> str | None:
    """Name the image format of ``data`` if Pillow recognizes it by signature.

    Only plugins with a signature check are asked: the few without one (TGA...)
    would claim random bytes, and "not an image" is the truer answer there.
    """
    Image.init()
    signed = [fmt for fmt, (_, accept) in Image.OPEN.items() if accept is not None]
    try:
        with _bomb_is_too_large(name), Image.open(io.BytesIO(data), formats=signed) as img:
            return str(img.format)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass
    if data[_FTYP_BOX] == b"ftyp" and data[_FTYP_BRAND] in _HEIF_BRANDS:
        return "HEIC"
    return None


@contextmanager
def _bomb_is_too_large(name: str) -> Iterator[None]:
    """Turn Pillow's decompression-bomb error (or its warning, where warnings are
    errors) into PhotoTooLarge. Our pixel limit is below Pillow's, so this only
    fires for images far over it; it is here so that never becomes a 500."""
    try:
        yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PhotoTooLarge(
            f"{name}: image dimensions are far over the pixel limit", photo=name
        ) from exc


def _open(data: bytes, source_format: str, name: str) -> ImageFile.ImageFile:
    """Open (parse the header of) ``data`` with the decoder its magic selects."""
    try:
        with _bomb_is_too_large(name):
            img = Image.open(io.BytesIO(data), formats=[source_format])
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise _corrupt(name, source_format) from exc
    if img.format not in _PIL_FORMATS[source_format]:
        img.close()
        raise _corrupt(name, source_format)
    return img


def _check_header(img: Image.Image, name: str, limits: PhotoLimits) -> None:
    """Refuse on the declared dimensions, before a single pixel is decoded."""
    width, height = img.size
    if width * height > limits.max_pixels:
        raise PhotoTooLarge(
            f"{name}: {width}x{height} is over the limit of {limits.max_pixels} pixels",
            photo=name,
        )
    if min(width, height) < limits.min_photo_side:
        raise _too_small(name, width, height, limits)


def _too_small(name: str, width: int, height: int, limits: PhotoLimits) -> PhotoRejected:
    """The refusal of a photo too small to give a crop the profile trains on."""
    needed = limits.min_photo_side
    for_profile = (
        f" for the {limits.profile} profile, which trains at {limits.resolution} px"
        if needed > limits.min_side
        else ""
    )
    return PhotoRejected(
        f"{name}: {width}x{height} is too small{for_profile}: the shorter side must be at "
        f"least {needed} pixels; upload a larger photo",
        photo=name,
        reason="photo-too-small",
        width=width,
        height=height,
        min_photo_side=needed,
        profile=limits.profile,
    )


# --- decoding and normalizing ----------------------------------------------------


def _verify_checksums(data: bytes, source_format: str, name: str) -> None:
    """Check what the format can check without decoding (PNG chunk CRCs).

    Pillow's decoder skips the CRC of image-data chunks, so a PNG damaged in
    transit would otherwise decode "fine" into garbage pixels.
    """
    try:
        with Image.open(io.BytesIO(data), formats=[source_format]) as img:
            img.verify()
    except MemoryError:
        raise
    except Exception as exc:
        raise _corrupt(name, source_format) from exc


def _decode_fully(img: ImageFile.ImageFile, name: str, source_format: str) -> None:
    """Decode every pixel of the first frame, so truncation is caught here."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # A process-wide Pillow flag some ML code sets; with it, a cut-off upload
        # decodes "fine" with grey padding. Fail loudly rather than store that.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode")
    try:
        with _bomb_is_too_large(name):
            img.load()
    except (PhotoRejected, MemoryError):
        raise
    except Exception as exc:
        # Pillow's decoders signal bad data with OSError, SyntaxError, ValueError,
        # EOFError, struct.error...; for an upload they all mean the same thing.
        raise _corrupt(name, source_format) from exc


def _corrupt(name: str, source_format: str) -> PhotoRejected:
    return PhotoRejected(f"{name}: truncated or corrupt {source_format}", photo=name)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation, so the stored pixels are the way up people saw."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:
        # Malformed EXIF is common in the wild and says nothing about the pixels.
        return img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB image: alpha flattened on white, colours in sRGB."""
    icc = img.info.get("icc_profile")
    if img.mode.startswith("I"):
        img = img.convert("I").point(lambda v: v * _SIXTEEN_TO_EIGHT_BITS).convert("L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba)
    if img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    return _to_srgb(img, icc)


def _to_srgb(img: Image.Image, icc: bytes | None) -> Image.Image:
    """The ICC profile is dropped on output, so its colours are converted first
    (phones shoot Display P3); without a usable profile, assume sRGB."""
    if icc:
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(img, source, _SRGB, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
            pass  # broken, or for another colour space than the pixels: ignore it
    return img.convert("RGB")


def _downscale(img: Image.Image, stored_side: int) -> Image.Image:
    longer = max(img.size)
    if longer <= stored_side:
        return img
    scale = stored_side / longer
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.LANCZOS)


def _encode_png(img: Image.Image) -> bytes:
    # Pillow's PNG writer copies icc_profile and transparency from ``info``; the
    # image is our own copy, so emptying it guarantees nothing rides along.
    img.info.clear()
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
