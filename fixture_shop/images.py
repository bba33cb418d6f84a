"""Product images: a garment silhouette in the product's colour on a light ground.

An image is named ``<product id, lower case>-<view>`` (``p000123-2``). Its content
is a pure function of the product's category, colour and id and of the view
(1 = front, 2 = close crop, 3 = back, 4 = small with a shadow, 5 = lower crop),
so it never changes with the epoch. Clothing, scarves and boots are portrait;
bags, shoes, belts and sunglasses landscape; the long side is ``image_side``.
Rendered JPEG bytes are cached, so serving an image twice costs a dict look-up.
"""

from __future__ import annotations

import io
import random
from functools import lru_cache
from typing import Final, NamedTuple

from PIL import Image, ImageDraw

from fixture_shop.catalog import ShopProduct
from fixture_shop.fashion_data import COLOURS

Point = tuple[float, float]
RGB = tuple[int, int, int]

LANDSCAPE_SHAPES: Final = frozenset({"bag", "shoe", "belt", "sunglasses"})
BACKGROUNDS: Final = ((244, 242, 238), (238, 238, 241), (246, 240, 233), (236, 240, 236))
# (scale, x shift, y shift) of the silhouette, per view.
VIEW_FRAMING: Final = {
    1: (0.9, 0.0, 0.0),
    2: (1.3, 0.0, 0.12),
    3: (0.9, 0.0, 0.0),
    4: (0.7, 0.06, 0.05),
    5: (1.2, -0.04, -0.15),
}
JPEG_QUALITY: Final = 82


class ImageSpec(NamedTuple):
    """Everything an image's pixels depend on."""

    shape: str
    colour: RGB
    view: int
    variant: int  # seeds the small geometric differences between products


def spec_for(product: ShopProduct, view: int) -> ImageSpec:
    variant = random.Random(f"image:{product.id}").randrange(1 << 30)
    return ImageSpec(product.category.shape, COLOURS[product.colour], view, variant)


def image_size(shape: str, side: int) -> tuple[int, int]:
    """(width, height): never square, ``side`` on the long side."""
    short = side * 3 // 4
    return (side, short) if shape in LANDSCAPE_SHAPES else (short, side)


def _shade(colour: RGB, factor: float) -> RGB:
    if factor <= 1:
        return (int(colour[0] * factor), int(colour[1] * factor), int(colour[2] * factor))
    return tuple(int(c + (255 - c) * (factor - 1)) for c in colour)  # type: ignore[return-value]


def _silhouette(shape: str, rng: random.Random) -> tuple[list[Point], list[list[Point]]]:
    """The outline and the detail strokes of a shape, in a unit box (0..1, y down)."""
    if shape == "dress":
        hem, flare = rng.uniform(0.72, 0.95), rng.uniform(0.14, 0.26)
        outline = [(0.39, 0.06), (0.43, 0.06), (0.45, 0.18), (0.55, 0.18), (0.57, 0.06),
                   (0.61, 0.06), (0.64, 0.3), (0.59, 0.42), (0.6 + flare, hem),
                   (0.4 - flare, hem), (0.41, 0.42), (0.36, 0.3)]  # fmt: skip
        return outline, [[(0.41, 0.42), (0.59, 0.42)]]
    if shape == "coat":
        hem = rng.uniform(0.72, 0.95)
        outline = [(0.36, 0.06), (0.64, 0.06), (0.85, 0.18), (0.93, 0.7), (0.84, 0.72),
                   (0.78, 0.34), (0.77, hem), (0.23, hem), (0.22, 0.34), (0.16, 0.72),
                   (0.07, 0.7), (0.15, 0.18)]  # fmt: skip
        return outline, [[(0.42, 0.06), (0.5, 0.32), (0.58, 0.06)], [(0.5, 0.32), (0.5, hem)]]
    if shape == "top":
        hem = rng.uniform(0.55, 0.72)
        outline = [(0.36, 0.12), (0.64, 0.12), (0.86, 0.22), (0.94, 0.55), (0.84, 0.58),
                   (0.76, 0.36), (0.76, hem), (0.24, hem), (0.24, 0.36), (0.16, 0.58),
                   (0.06, 0.55), (0.14, 0.22)]  # fmt: skip
        neckline = [(0.42, 0.12), (0.5, 0.2), (0.58, 0.12)]
        return outline, [neckline, [(0.24, hem - 0.04), (0.76, hem - 0.04)]]
    if shape == "trousers":
        width = rng.uniform(0.0, 0.08)
        outline = [(0.3, 0.06), (0.7, 0.06), (0.74 + width, 0.94), (0.55, 0.94), (0.5, 0.34),
                   (0.45, 0.94), (0.26 - width, 0.94)]  # fmt: skip
        return outline, [[(0.3, 0.12), (0.7, 0.12)]]
    if shape == "skirt":
        hem = rng.uniform(0.55, 0.9)
        outline = [(0.33, 0.14), (0.67, 0.14), (0.8, hem), (0.2, hem)]
        return outline, [[(0.33, 0.2), (0.67, 0.2)], [(0.5, 0.2), (0.5, hem)]]
    if shape == "scarf":
        outline = [(0.34, 0.04), (0.66, 0.04), (0.66, 0.86), (0.34, 0.86)]
        fringe = [[(x, 0.86), (x, 0.95)] for x in (0.37, 0.43, 0.49, 0.55, 0.61)]
        return outline, [[(0.34, 0.3), (0.66, 0.3)], *fringe]
    if shape == "boot":
        shaft = rng.uniform(0.08, 0.45)
        outline = [(0.3, shaft), (0.56, shaft), (0.57, 0.6), (0.84, 0.7), (0.9, 0.86),
                   (0.28, 0.86)]  # fmt: skip
        return outline, [[(0.28, 0.82), (0.9, 0.82)]]
    if shape == "bag":
        top = rng.uniform(0.32, 0.45)
        outline = [(0.2, top), (0.8, top), (0.84, 0.9), (0.16, 0.9)]
        handle = [(0.34, top), (0.38, 0.12), (0.62, 0.12), (0.66, top)]
        return outline, [handle, [(0.2, top + 0.12), (0.8, top + 0.12)]]
    if shape == "shoe":
        vamp = rng.uniform(0.3, 0.5)
        outline = [(0.08, 0.72), (0.1, 0.55), (0.3, vamp), (0.58, 0.34), (0.74, 0.3),
                   (0.9, 0.42), (0.93, 0.72)]  # fmt: skip
        return outline, [[(0.08, 0.68), (0.93, 0.68)]]
    if shape == "belt":
        outline = [(0.04, 0.44), (0.96, 0.44), (0.96, 0.56), (0.04, 0.56)]
        return outline, [[(0.12, 0.38), (0.24, 0.38), (0.24, 0.62), (0.12, 0.62), (0.12, 0.38)]]
    # sunglasses: two lenses joined by a bridge
    left = [(0.16, 0.36), (0.46, 0.36), (0.44, 0.66), (0.18, 0.66)]
    right = [(0.54, 0.36), (0.84, 0.36), (0.82, 0.66), (0.56, 0.66)]
    temples = [[(0.16, 0.38), (0.04, 0.34)], [(0.84, 0.38), (0.96, 0.34)]]
    return left + right, [[(0.46, 0.42), (0.54, 0.42)], *temples]


def _to_pixels(points: list[Point], size: tuple[int, int], view: int) -> list[Point]:
    scale, shift_x, shift_y = VIEW_FRAMING[view]
    width, height = size
    mirrored = view == 3
    return [
        (
            width * (0.5 + ((1 - x if mirrored else x) - 0.5) * scale + shift_x),
            height * (0.5 + (y - 0.5) * scale + shift_y),
        )
        for x, y in points
    ]


@lru_cache(maxsize=8192)
def render_jpeg(spec: ImageSpec, side: int) -> bytes:
    """The JPEG bytes of ``spec`` at ``side`` pixels on the long side."""
    rng = random.Random(spec.variant)
    size = image_size(spec.shape, side)
    image = Image.new("RGB", size, BACKGROUNDS[(spec.variant + spec.view) % len(BACKGROUNDS)])
    draw = ImageDraw.Draw(image)
    outline, strokes = _silhouette(spec.shape, rng)
    line_width = max(1, side // 120)
    if spec.view == 4:  # a soft shadow under the piece
        shadow = [(x + 0.02, y + 0.02) for x, y in outline]
        draw.polygon(_to_pixels(shadow, size, spec.view), fill=(214, 212, 208))
    if spec.shape == "bag":  # the handle shows from every side, behind the body
        handle = strokes.pop(0)
        draw.line(_to_pixels(handle, size, spec.view), fill=_shade(spec.colour, 0.75),
                  width=line_width * 4, joint="curve")  # fmt: skip
    pieces = [outline[:4], outline[4:]] if spec.shape == "sunglasses" else [outline]
    for piece in pieces:
        draw.polygon(_to_pixels(piece, size, spec.view), fill=spec.colour,
                     outline=_shade(spec.colour, 0.55), width=line_width)  # fmt: skip
    if spec.view != 3:  # the back view has no front details
        stroke_colour = _shade(spec.colour, 0.6 if sum(spec.colour) > 240 else 1.6)
        for stroke in strokes:
            draw.line(_to_pixels(stroke, size, spec.view), fill=stroke_colour, width=line_width)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def corrupted(jpeg: bytes) -> bytes:
    """A JPEG cut in half: the header parses, the pixels do not."""
    return jpeg[: len(jpeg) // 2]
