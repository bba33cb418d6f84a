"""Garment regions of a generated image, for matching products to each part of a look.

A fixed split, not a detector: a look's image is the subject standing or in a
portrait, garments stack top to bottom, and no garment-segmentation weights can
be had offline. The regions overlap (a coat crosses the waist, boots reach the
knee) so a garment cut by one boundary is whole in a neighbour. Each crop is
padded to a square the way catalog images are (``pad_to_square``), so a region
meets the catalog's own framing: a product on a plain ground, nothing cropped.
The whole image is matched too, for accessories and one-piece outfits.

Fractions of the image height, (top, bottom), full width:
- ``upper``: 0.10-0.58, below the face to the hips (tops, jackets, coats);
- ``lower``: 0.45-0.88, waist to below the knee (trousers, skirts, dresses' hems);
- ``feet``: 0.78-1.00 (shoes, boots).
"""

from __future__ import annotations

from typing import Final

from PIL import Image

from core.catalog.images import pad_to_square

WHOLE: Final = "whole"
REGION_BANDS: Final[dict[str, tuple[float, float]]] = {
    "upper": (0.10, 0.58),
    "lower": (0.45, 0.88),
    "feet": (0.78, 1.00),
}
REGIONS: Final = (WHOLE, *REGION_BANDS)


def region_box(name: str, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a region in an image of that size."""
    if name == WHOLE:
        return (0, 0, width, height)
    top, bottom = REGION_BANDS[name]
    return (0, round(top * height), width, max(round(bottom * height), round(top * height) + 1))


def region_crops(image: Image.Image, side: int) -> dict[str, Image.Image]:
    """Every region of ``image``, each padded onto a ``side`` square."""
    rgb = image.convert("RGB")
    return {name: pad_to_square(rgb.crop(region_box(name, *rgb.size)), side) for name in REGIONS}
