"""A worker's fashion CLIP: the base loaded once, versions' heads on top of it.

This is what the CLIP jobs and the generate job hold (``core.ml.resident``): base
features for the feature store, a version's encoder (embeddings of texts and
images, its heads over stored features, its ONNX export, its state), head
training over stored features and held-out judging.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image

from core.ml.fashion_clip import features as tower_features
from core.ml.fashion_clip.finetune import ClipTrainConfig, train_heads, train_unfrozen
from core.ml.fashion_clip.model import (
    FashionClip,
    base_identity,
    base_logit_scale,
    load_base,
    load_version_state,
    resolve_model_path,
    save_version_state,
    tokenizer_for,
)
from core.ml.fashion_clip.onnx_export import export_onnx
from core.ml.fashion_clip.profiles import ClipProfile, get_clip_profile
from core.ml.fashion_clip.retrieval_metrics import retrieval_report
from core.settings import Settings

# Versions whose heads a process keeps (each is the base plus a few small tensors;
# one with unfrozen blocks holds copies of those blocks).
MAX_RESIDENT_VERSIONS = 4
# Inputs per tower forward pass when a version recomputes (judging, index rows).
TOWER_BATCH = 64


class VersionEncoder:
    """One version on the resident base: the ``core.shop.look.Encoder`` protocol and more."""

    def __init__(self, runtime: ClipRuntime, model: FashionClip) -> None:
        self.runtime = runtime
        self.model = model

    def _device(self) -> torch.device:
        return next(self.model.base.parameters()).device

    @property
    def recomputes(self) -> bool:
        """True when the version has unfrozen tower blocks of its own: the stored base
        features are not its towers' outputs, so it embeds from pixels and captions."""
        return bool(getattr(self.model, "unfrozen_prefixes", None))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        with torch.inference_mode():
            ids = self.runtime.tokenizer(list(texts)).to(self._device())
            return self.model.encode_texts(ids).float().cpu().numpy()

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        with torch.inference_mode():
            pixels = torch.stack([self.runtime.preprocess(im) for im in images])
            return self.model.encode_images(pixels.to(self._device())).float().cpu().numpy()

    def heads_over_image_features(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.as_tensor(np.asarray(features, np.float32), device=self._device())
            return self.model.embed_image_features(tensor).float().cpu().numpy()

    def heads_over_text_features(self, features: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            tensor = torch.as_tensor(np.asarray(features, np.float32), device=self._device())
            return self.model.embed_text_features(tensor).float().cpu().numpy()

    def export_onnx(self, directory: Path) -> dict[str, Any]:
        cfg = open_clip.get_model_preprocess_cfg(self.model.base)
        heads = self.model.heads
        return export_onnx(
            self.model.base, heads.image_head, heads.text_head, directory,
            cfg["size"], cfg["mean"], cfg["std"],
            resize_mode=cfg.get("resize_mode", "shortest"),
            interpolation=cfg.get("interpolation", "bicubic"),
        )  # fmt: skip

    def state(self) -> tuple[bytes, dict[str, Any]]:
        saved = save_version_state(self.model, self.runtime.base_id)
        return saved.weights, saved.config


class ClipRuntime:
    def __init__(
        self, profile: ClipProfile, base: Any, preprocess: Any, tokenizer: Any, base_id: str
    ) -> None:
        self.profile = profile
        self.base = base
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.base_id = base_id
        self._versions: OrderedDict[uuid.UUID, VersionEncoder] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def load(cls, settings: Settings) -> ClipRuntime:
        """The profile's base from local files (CheckpointMissing names the fetch)."""
        profile = get_clip_profile(settings.clip_profile)
        path = resolve_model_path(profile, settings.models_dir, settings.clip_model_path)
        base, preprocess = load_base(profile, path, settings.device)
        return cls(profile, base, preprocess, tokenizer_for(profile), base_identity(profile, path))

    # --- the frozen towers --------------------------------------------------------------

    def base_image_features(self, images: Sequence[Image.Image]) -> np.ndarray:
        return tower_features.image_features(self.base, self.preprocess, images)

    def base_text_features(self, texts: Sequence[str]) -> np.ndarray:
        return tower_features.text_features(self.base, self.tokenizer, texts)

    # --- versions -----------------------------------------------------------------------

    def base_encoder(self) -> VersionEncoder:
        """The base version: identity heads, so its embeddings are the base's."""
        return VersionEncoder(self, FashionClip(self.base))

    def version_encoder(
        self, model_id: uuid.UUID, state: bytes | None, config: dict[str, Any]
    ) -> VersionEncoder:
        with self._lock:
            if model_id in self._versions:
                self._versions.move_to_end(model_id)
                return self._versions[model_id]
        if state is None:
            encoder = self.base_encoder()
        else:
            model = load_version_state(self.base, state, config, self.base_id)
            encoder = VersionEncoder(self, model)
        with self._lock:
            self._versions[model_id] = encoder
            while len(self._versions) > MAX_RESIDENT_VERSIONS:
                self._versions.popitem(last=False)
        return encoder

    def train_version(
        self,
        data: dict[str, Any],
        train: set[uuid.UUID],
        spec: Any,
        on_step: Callable[[int, int, float], None],
        should_stop: Callable[[], bool],
    ) -> VersionEncoder:
        """A version trained on the ``train`` products: heads over their stored features,
        or, with unfrozen blocks, heads and blocks over their padded images and captions
        (``data["images"]``, ``data["captions"]``), the towers run every step."""
        defaults = ClipTrainConfig.from_profile(self.profile)
        config = ClipTrainConfig(
            steps=spec.steps,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            weight_decay=defaults.weight_decay,
            bottleneck=defaults.bottleneck,
            unfreeze_image_blocks=spec.unfreeze_image_blocks or 0,
            unfreeze_text_blocks=spec.unfreeze_text_blocks or 0,
            block_learning_rate=defaults.block_learning_rate,
        )
        image_rows = _rows(data["image_products"], train)
        text_rows = _rows(data["text_products"], train)
        image_products = [data["image_products"][i] for i in image_rows]
        text_products = [data["text_products"][i] for i in text_rows]
        if config.unfreeze_image_blocks or config.unfreeze_text_blocks:
            trained = train_unfrozen(
                self.base, self.preprocess, self.tokenizer,
                _Picked(data["images"], image_rows), image_products,
                [data["captions"][i] for i in text_rows], text_products,
                config, on_step, should_stop, spec.seed,
            )  # fmt: skip
            return VersionEncoder(self, trained.model)  # type: ignore[arg-type]
        trained = train_heads(
            data["image_features"][image_rows], data["text_features"][text_rows],
            image_products, text_products, config, on_step, should_stop,
            spec.seed, init_logit_scale=base_logit_scale(self.base),
            device=next(self.base.parameters()).device,
        )  # fmt: skip
        return VersionEncoder(self, FashionClip(self.base, trained.model))  # type: ignore[arg-type]

    def version_embeddings(
        self, encoder: VersionEncoder, data: dict[str, Any], products: set[uuid.UUID]
    ) -> tuple[np.ndarray, list[uuid.UUID], np.ndarray, list[uuid.UUID]]:
        """The version's image and text embeddings of ``products`` (heads over stored
        features, or the towers again for a version that recomputes)."""
        image_rows = _rows(data["image_products"], products)
        text_rows = _rows(data["text_products"], products)
        if encoder.recomputes:
            images = _in_batches(encoder.encode_images, _Picked(data["images"], image_rows))
            texts = _in_batches(encoder.encode_texts, [data["captions"][i] for i in text_rows])
        else:
            images = encoder.heads_over_image_features(data["image_features"][image_rows])
            texts = encoder.heads_over_text_features(data["text_features"][text_rows])
        return (
            images,
            [data["image_products"][i] for i in image_rows],
            texts,
            [data["text_products"][i] for i in text_rows],
        )

    def held_out_metrics(
        self, encoder: VersionEncoder, data: dict[str, Any], held_out: set[uuid.UUID]
    ) -> dict[str, float]:
        """Text-to-image and image-to-text R@1/5/10 and MRR over the held-out products."""
        report = retrieval_report(*self.version_embeddings(encoder, data, held_out))
        flat: dict[str, float] = {}
        for direction, prefix in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
            scores = report[direction]
            flat.update({f"{prefix}_r{k}": v for k, v in scores.recall.items()})
            flat[f"{prefix}_mrr"] = scores.mrr
        return flat


def _rows(owners: Sequence[uuid.UUID], products: set[uuid.UUID]) -> list[int]:
    return [i for i, pid in enumerate(owners) if pid in products]


class _Picked(Sequence[Image.Image]):
    """``rows`` of a sequence of images, read on access (the job's images decode lazily)."""

    def __init__(self, images: Sequence[Image.Image], rows: list[int]) -> None:
        self._images, self._rows = images, rows

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Image.Image:  # type: ignore[override]
        return self._images[self._rows[index]]


def _in_batches(encode: Callable[[list[Any]], np.ndarray], items: Sequence[Any]) -> np.ndarray:
    chunks = [
        encode([items[i] for i in range(start, min(start + TOWER_BATCH, len(items)))])
        for start in range(0, len(items), TOWER_BATCH)
    ]
    return np.concatenate(chunks)
