"""Regenerate the four demo photos from scikit-image's ``astronaut.png``.

Usage (the PNG comes out of the scikit-image wheel; see README.md)::

    python demo/sample_subject/make_photos.py /tmp/skimg/astronaut.png

Deterministic: the same source gives byte-identical JPEGs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

HERE = Path(__file__).resolve().parent
JPEG_QUALITY = 88
EXIF_ORIENTATION_TAG = 0x0112
# Orientation 6: the viewer must rotate the stored pixels 90 degrees clockwise.
ROTATE_CW_ON_DISPLAY = 6


@dataclass(frozen=True)
class Shot:
    name: str
    box: tuple[int, int, int, int]  # crop in the 512x512 source (left, top, right, bottom)
    size: tuple[int, int]  # output size as displayed (width, height)
    mirror: bool = False
    brightness: float = 1.0
    exif_rotated: bool = False


SHOTS = (
    Shot("01_portrait.jpg", (0, 0, 512, 512), (512, 512)),
    Shot("02_closeup.jpg", (70, 0, 380, 310), (512, 512), brightness=1.06),
    Shot("03_mirrored.jpg", (20, 0, 440, 420), (512, 512), mirror=True, brightness=0.93),
    # Portrait-shaped and stored sideways with an EXIF tag, like a phone photo.
    Shot("04_rotated_exif.jpg", (90, 0, 362, 340), (448, 560), exif_rotated=True),
)


def render(source: Image.Image, shot: Shot) -> Image.Image:
    img = source.crop(shot.box).resize(shot.size, Image.Resampling.LANCZOS)
    if shot.mirror:
        img = ImageOps.mirror(img)
    if shot.brightness != 1.0:
        img = ImageEnhance.Brightness(img).enhance(shot.brightness)
    return img


def save(img: Image.Image, shot: Shot) -> None:
    path = HERE / shot.name
    if not shot.exif_rotated:
        img.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
        return
    # Store the pixels rotated 90 degrees counter-clockwise; orientation 6 tells
    # the viewer to undo that, so the photo still displays upright.
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = ROTATE_CW_ON_DISPLAY
    stored.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True, exif=exif)


def main(source_path: str) -> None:
    with Image.open(source_path) as src:
        source = src.convert("RGB")
    for shot in SHOTS:
        save(render(source, shot), shot)
        print(f"wrote {shot.name} ({(HERE / shot.name).stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
