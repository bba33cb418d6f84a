"""Fixtures the fashion-CLIP unit modules share (the tiny CLIP itself is the
session's ``tiny_clip_dir``, in tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module (``pytestmark = usefixtures(...)``): the tiny
    towers and heads are small matrices, and on a busy 2-core host two threads waiting
    on each other made them up to 10x slower (measured), so timings stop depending on
    the load."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_dir: Path) -> tuple[Any, Any]:
    """The tiny CLIP's base model and preprocessing, loaded once per module (tests may
    train copies of it, never it)."""
    from core.ml.fashion_clip.model import load_base
    from core.ml.fashion_clip.profiles import TINY_CLIP

    return load_base(TINY_CLIP, tiny_clip_dir)
