"""Base features, batched, and the caption every product is embedded by.

Base features are the frozen towers' output embeddings (after each tower's own
projection, BEFORE L2 normalisation), float32: what is stored per image (by
sha256) and per product text, so that a head-only version re-embeds the catalog
by running its heads over them, no tower pass.

torch is imported inside the functions that need it: ``product_text`` is a pure
function the API imports without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

    from core.ml.fashion_clip.model import Preprocess

# Images per tower pass: ViT-B-16 at 224 px holds 64 images' activations in well under
# a GB; larger batches barely raise CPU throughput (bench/clip_embed.py).
IMAGE_BATCH = 64
TEXT_BATCH = 256
CATEGORY_SEPARATOR = " > "


def product_text(
    designer: str, name: str, description: str, category_path: Sequence[str] = ()
) -> str:
    """The caption of a product: "<designer> <name>: <description>" plus
    " | Women > Clothing > Dresses" when a category is known (the catalog export
    writes the same)."""
    text = f"{designer} {name}: {description}".strip()
    category = CATEGORY_SEPARATOR.join(part for part in category_path if part)
    return f"{text} | {category}" if category else text


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def image_features(
    model: Any,
    preprocess: Preprocess,
    images: Sequence[Image.Image],
    batch_size: int = IMAGE_BATCH,
) -> np.ndarray:
    """The image tower's output for each image: float32 [N, D], not normalised.
    ``images`` may be a lazy sequence (files opened on access), read a batch at a time."""
    import torch

    device = _device_of(model)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            stop = min(start + batch_size, len(images))
            pixels = torch.stack([preprocess(images[i]) for i in range(start, stop)]).to(device)
            out.append(model.encode_image(pixels).float().cpu().numpy())
    return _stacked(out, model)


def text_features(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = TEXT_BATCH
) -> np.ndarray:
    """The text tower's output for each text: float32 [N, D], not normalised."""
    import torch

    device = _device_of(model)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            ids = tokenizer(list(texts[start : start + batch_size])).to(device)
            out.append(model.encode_text(ids).float().cpu().numpy())
    return _stacked(out, model)


def _stacked(batches: list[np.ndarray], model: Any) -> np.ndarray:
    if not batches:
        return np.zeros((0, int(model.visual.output_dim)), dtype=np.float32)
    return np.concatenate(batches).astype(np.float32, copy=False)
