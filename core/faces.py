"""Find faces in a photo, offline, and frame the person for training.

The detector is OpenCV's Haar cascade for frontal faces, read from the XML file
the ``opencv-python-headless`` wheel ships (``cv2.data.haarcascades``): nothing is
downloaded, ever. It is a classic detector, fast on a CPU and good at what an
upload check needs, a frontal or near-frontal face of a real person; drawn faces
and flat images do not trigger it. Faces turned far to the side are missed,
which suits training: DreamBooth needs to see the face.

Boxes are square (the cascade scans a square window) and in the pixel coordinates
of the image passed in, largest first.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import cv2
import numpy as np
from cv2.data import haarcascades as CASCADES_DIR  # the folder the wheel ships
from PIL import Image

CASCADE_FILE: Final = "haarcascade_frontalface_default.xml"

# Detection runs on a copy whose longer side is at most this: the cascade is
# scale-invariant, a face worth training on (10% of the shorter side and up)
# is still several times the cascade's 24-pixel window there, and scanning a
# 1024-pixel photo would take about 2.5 times as long.
DETECT_SIDE: Final = 640
# Each step of the scale pyramid is this much coarser than the last; 1.1 is
# OpenCV's documented default, the usual trade-off between recall and time.
_SCALE_FACTOR: Final = 1.1
# A face must be found by this many overlapping windows to count. Lower values
# report textures (a collar, a shadow) as faces; 5 keeps the demo photos at
# exactly one face each while a real face, found dozens of times, still passes.
_MIN_NEIGHBORS: Final = 5
# Contrast is evened out per tile (CLAHE) rather than over the whole image: a
# global histogram equalization lets a large flat background (a studio backdrop,
# a wall) take most of the grey levels and flattens the face, which then goes
# unseen. 8x8 tiles with a clip limit of 2 are OpenCV's documented example
# values; they recover over- and under-exposed faces without boosting noise.
_CLAHE_CLIP_LIMIT: Final = 2.0
_CLAHE_TILES: Final = (8, 8)


@dataclass(frozen=True)
class FaceBox:
    """A face's bounding box in pixels: left, top, width, height."""

    x: int
    y: int
    w: int
    h: int

    @property
    def side(self) -> int:
        return max(self.w, self.h)

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.w / 2, self.y + self.h / 2)


_cascade: cv2.CascadeClassifier | None = None
# OpenCV does not promise that one CascadeClassifier may run detectMultiScale
# from several threads at once (photos are checked in a thread pool), so calls
# are serialized; each one still uses OpenCV's own worker threads inside.
_lock = threading.Lock()


def _classifier() -> cv2.CascadeClassifier:
    """The cascade, loaded once per process. Call with ``_lock`` held."""
    global _cascade
    if _cascade is None:
        path = Path(CASCADES_DIR) / CASCADE_FILE
        cascade = cv2.CascadeClassifier(str(path))
        if cascade.empty():
            raise RuntimeError(
                f"face detector not loaded: {path} is missing or unreadable; "
                "reinstall opencv-python-headless"
            )
        _cascade = cascade
    return _cascade


def detect_faces(image: Image.Image, *, min_side: int = 0) -> list[FaceBox]:
    """Every face in ``image``, largest first, in ``image``'s pixel coordinates.

    ``min_side`` (pixels of ``image``) skips smaller faces, which is also faster;
    faces much under the cascade's window (24 pixels at detection scale, about 4%
    of a large photo's longer side) are never found.
    """
    gray = image.convert("L")
    scale = min(1.0, DETECT_SIDE / max(gray.size))
    if scale < 1.0:
        small = (max(1, round(gray.width * scale)), max(1, round(gray.height * scale)))
        gray = gray.resize(small, Image.Resampling.BILINEAR)
    # Equalized, under- or over-exposed photos look like the well-lit faces the
    # cascade was trained on.
    equalizer = cv2.createCLAHE(clipLimit=_CLAHE_CLIP_LIMIT, tileGridSize=_CLAHE_TILES)
    pixels = equalizer.apply(np.asarray(gray))
    with _lock:
        cascade = _classifier()
        window = max(cascade.getOriginalWindowSize())
        smallest = max(window, math.ceil(min_side * scale))
        found = cascade.detectMultiScale(
            pixels,
            scaleFactor=_SCALE_FACTOR,
            minNeighbors=_MIN_NEIGHBORS,
            minSize=(smallest, smallest),
        )
    sx, sy = image.width / gray.width, image.height / gray.height
    boxes = [_to_full_size(tuple(int(v) for v in box), sx, sy, image.size) for box in found]
    return _without_nested(sorted(boxes, key=lambda b: b.w * b.h, reverse=True))


def _without_nested(boxes: list[FaceBox]) -> list[FaceBox]:
    """Drop boxes centred inside a larger one (given largest first): a face holds
    no other face, so such a box is the same face, or a part of it (an eye and
    brow), found again at another scale."""
    kept: list[FaceBox] = []
    for box in boxes:
        cx, cy = box.center
        if not any(k.x <= cx < k.x + k.w and k.y <= cy < k.y + k.h for k in kept):
            kept.append(box)
    return kept


def rescale(face: FaceBox, from_size: tuple[int, int], to_size: tuple[int, int]) -> FaceBox:
    """``face``, found in an image of ``from_size``, in the pixels of the same
    picture at ``to_size`` (the photo as uploaded, before it was downscaled)."""
    sx, sy = to_size[0] / from_size[0], to_size[1] / from_size[1]
    return _to_full_size((face.x, face.y, face.w, face.h), sx, sy, to_size)


def _to_full_size(box: tuple[int, ...], sx: float, sy: float, size: tuple[int, int]) -> FaceBox:
    x, y, w, h = box
    left, top = min(round(x * sx), size[0] - 1), min(round(y * sy), size[1] - 1)
    right, bottom = min(round((x + w) * sx), size[0]), min(round((y + h) * sy), size[1])
    return FaceBox(left, top, max(1, right - left), max(1, bottom - top))


def crop_box(size: tuple[int, int], face: FaceBox, scale: float) -> tuple[int, int, int, int]:
    """The (left, top, right, bottom) square that ``training_crop`` cuts.

    The square is ``scale`` face-box sides wide, centred on the face, clamped to
    the image's shorter side and shifted inside the image where the face is near
    an edge. It never reaches outside the image, so there is nothing to pad:
    padding would put flat bands into the training set, and DreamBooth would
    learn them as part of how the person looks. A close-up therefore gives a
    tighter frame than ``scale`` asks for, never a padded one. The square holds
    the whole face box whenever the box is square (the detector's always are).
    """
    width, height = size
    inside = 0 <= face.x and face.x + face.w <= width and 0 <= face.y and face.y + face.h <= height
    if not (inside and face.w > 0 and face.h > 0):
        raise ValueError(f"face box {face} is not inside a {width}x{height} image")
    side = min(max(face.side, round(scale * face.side)), width, height)
    cx, cy = face.center
    left = _clamp(round(cx - side / 2), 0, width - side)
    top = _clamp(round(cy - side / 2), 0, height - side)
    return (left, top, left + side, top + side)


def training_crop(image: Image.Image, face: FaceBox, scale: float) -> Image.Image:
    """A square around the face for training; see ``crop_box`` for the framing."""
    return image.crop(crop_box(image.size, face, scale))


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))
