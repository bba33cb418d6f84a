"""Small things every ML unit test module needs: callbacks that do nothing,
random photos (not square and not 64 px, so cropping and resizing run) and
training parameters for the tiny checkpoints."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from core.ml.profiles import Profile, get_profile
from core.ml.train import TrainParams

HIGH_LR = 1e-2  # far above a real run's, so a few steps visibly move the weights


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


def tiny_train_params(
    steps: int, profile: Profile | None = None, *, alpha: int = 8, **options: Any
) -> TrainParams:
    """A short, fast-moving run on a tiny profile (default ``tiny``): rank 4 at a
    high learning rate, alpha 8 unless given (alpha != rank: the export must fold
    alpha / rank in); ``options`` replace any other field."""
    shape = profile or get_profile("tiny")
    base = TrainParams(
        steps=steps,
        learning_rate=HIGH_LR,
        rank=4,
        alpha=alpha,
        target_modules=shape.lora_target_modules,
        resolution=shape.resolution,
    )
    return replace(base, **options)
