"""A worker's fashion CLIP: the base loaded once, versions' heads on top of it.

This is what the CLIP jobs and the generate job hold (``core.ml_runtime``): base
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

from core.errors import InvalidInput
from core.ml.fashion_clip import features as tower_features
from core.ml.fashion_clip.finetune import ClipTrainConfig, train_heads
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


class VersionEncoder:
    """One version on the resident base: the ``core.shop.look.Encoder`` protocol and more."""

    def __init__(self, runtime: ClipRuntime, model: FashionClip) -> None:
        self.runtime = runtime
        self.model = model

    def _device(self) -> torch.device:
        return next(self.model.base.parameters()).device

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
        """Heads trained over the stored features of the ``train`` products."""
        if spec.unfreeze_image_blocks or spec.unfreeze_text_blocks:
            raise InvalidInput(
                "clip_finetune jobs train heads only for now; `python -m core.ml.clip_eval`"
                " measures the unfrozen-block variant",
                field="unfreeze_image_blocks",
            )
        defaults = ClipTrainConfig.from_profile(self.profile)
        config = ClipTrainConfig(
            steps=spec.steps,
            batch_size=spec.batch_size,
            learning_rate=spec.learning_rate,
            weight_decay=defaults.weight_decay,
            bottleneck=defaults.bottleneck,
        )
        images, image_products = _rows_of(data, "image", train)
        texts, text_products = _rows_of(data, "text", train)
        trained = train_heads(
            images, texts, image_products, text_products, config, on_step, should_stop,
            spec.seed, init_logit_scale=base_logit_scale(self.base),
            device=next(self.base.parameters()).device,
        )  # fmt: skip
        return VersionEncoder(self, FashionClip(self.base, trained.model))  # type: ignore[arg-type]

    def held_out_metrics(
        self, encoder: VersionEncoder, data: dict[str, Any], held_out: set[uuid.UUID]
    ) -> dict[str, float]:
        """Text-to-image and image-to-text R@1/5/10 and MRR over the held-out products."""
        images, image_products = _rows_of(data, "image", held_out)
        texts, text_products = _rows_of(data, "text", held_out)
        report = retrieval_report(
            encoder.heads_over_image_features(images), image_products,
            encoder.heads_over_text_features(texts), text_products,
        )  # fmt: skip
        flat: dict[str, float] = {}
        for direction, prefix in (("text_to_image", "t2i"), ("image_to_text", "i2t")):
            scores = report[direction]
            flat.update({f"{prefix}_r{k}": v for k, v in scores.recall.items()})
            flat[f"{prefix}_mrr"] = scores.mrr
        return flat


def _rows_of(
    data: dict[str, Any], tower: str, products: set[uuid.UUID]
) -> tuple[np.ndarray, list[uuid.UUID]]:
    matrix, owners = data[f"{tower}_features"], data[f"{tower}_products"]
    keep = [i for i, pid in enumerate(owners) if pid in products]
    return matrix[keep], [owners[i] for i in keep]
