"""Small things every ML unit test module needs: callbacks that do nothing and
random photos (not square and not 64 px, so cropping and resizing run)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def never() -> bool:
    """A ``should_stop`` that never stops."""
    return False


def ignore(*_args: object) -> None:
    """An ``on_step`` / progress callback that records nothing."""
    return None


def random_photos(count: int = 3, *, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(count)
    ]
