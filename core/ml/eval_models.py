"""The models behind the evaluation metrics: DINO ViT-S/16, CLIP and Inception-v3.

Weights only ever come from local files: a missing file is a ``MetricWeightsMissing``
error that names the path and what belongs there, never a download. With
``random_weights=True`` the same architectures are built with seeded random weights,
so every code path runs on a machine without the checkpoints (tests, the tiny
profile); the numbers they give mean nothing.

Each encoder preprocesses with its model's own recipe: timm's data config for DINO,
open_clip's inference transform for CLIP, 299 px and ImageNet normalisation for
Inception.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from core.errors import CheckpointMissing, InvalidInput

DINO_ARCH = "vit_small_patch16_224.dino"
DEFAULT_CLIP_MODEL = "ViT-L-14"
INCEPTION_SIZE = 299
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ENV_CLIP_MODEL = "ATELIER_EVAL_CLIP_MODEL"
ENV_CLIP_WEIGHTS = "ATELIER_EVAL_CLIP_WEIGHTS"
ENV_DINO_WEIGHTS = "ATELIER_EVAL_DINO_WEIGHTS"
ENV_INCEPTION_WEIGHTS = "ATELIER_EVAL_INCEPTION_WEIGHTS"


@dataclass(frozen=True)
class WeightsSpec:
    """What one metric model's weights are, for lookup and for the error that says
    what to put where."""

    what: str
    flag: str
    env: str
    hint: str
    file_names: tuple[str, ...]  # looked for, in order, when the path is a directory


DINO_WEIGHTS = WeightsSpec(
    "DINO",
    "--dino-weights",
    ENV_DINO_WEIGHTS,
    "the DINO ViT-S/16 backbone (timm 'vit_small_patch16_224.dino'): model.safetensors "
    "from the Hugging Face repository timm/vit_small_patch16_224.dino, or "
    "dino_deitsmall16_pretrain.pth from facebookresearch/dino",
    ("model.safetensors", "pytorch_model.bin"),
)
CLIP_WEIGHTS = WeightsSpec(
    "CLIP",
    "--clip-weights",
    ENV_CLIP_WEIGHTS,
    "an open_clip checkpoint of the model named by --clip-model (open_clip_model.safetensors "
    "or open_clip_pytorch_model.bin of an open_clip repository; OpenAI's weights need the "
    "'-quickgelu' model name, e.g. ViT-L-14-quickgelu)",
    ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
)
INCEPTION_WEIGHTS = WeightsSpec(
    "Inception-v3",
    "--inception-weights",
    ENV_INCEPTION_WEIGHTS,
    "a state dict of torchvision's inception_v3 (e.g. inception_v3_google-0cc3c7bd.pth, "
    "torchvision's IMAGENET1K_V1 weights)",
    ("model.safetensors", "model.pth"),
)


class MetricWeightsMissing(CheckpointMissing):
    """An evaluation model's weights are not where the configuration says."""

    code = "metric-weights-missing"
    title = "Evaluation model weights missing"


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Random initialisation from ``seed`` without disturbing the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _resolve_weights(path: Path | None, spec: WeightsSpec) -> Path:
    """The weights file ``path`` names, or MetricWeightsMissing saying what to put where."""
    remedy = f"pass {spec.flag} PATH or set {spec.env}"
    never = "Weights are never downloaded."
    if path is None:
        raise MetricWeightsMissing(
            f"no {spec.what} weights configured: put {spec.hint} on this host and {remedy}; "
            f"or use --random-weights for a smoke run. {never}",
            model=spec.what,
        )
    if path.is_dir():
        for name in spec.file_names:
            if (path / name).is_file():
                return path / name
        raise MetricWeightsMissing(
            f"{spec.what} weights not found in directory {path} (looked for "
            f"{', '.join(spec.file_names)}): put {spec.hint} there, or {remedy}. {never}",
            model=spec.what,
            path=str(path),
        )
    if not path.is_file():
        raise MetricWeightsMissing(
            f"{spec.what} weights not found at {path}: put {spec.hint} there, or {remedy}. {never}",
            model=spec.what,
            path=str(path),
        )
    return path


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a safetensors or torch file, unwrapping common containers."""
    obj: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "teacher"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise InvalidInput(f"{path} does not hold a state dict")
    state = {str(k).removeprefix("module."): v for k, v in obj.items()}
    if any(k.startswith("backbone.") for k in state):  # a DINO training checkpoint
        state = {
            k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")
        }
    return state


def _load_strict(
    model: nn.Module, state: Mapping[str, torch.Tensor], what: str, path: Path
) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InvalidInput(
            f"{path} does not match the {what} architecture: missing "
            f"{list(result.missing_keys)[:5]}, unexpected {list(result.unexpected_keys)[:5]}"
        )


def _batched_embeddings(
    images: Sequence[Image.Image],
    transform: Callable[[Image.Image], torch.Tensor],
    encode: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    device: str,
) -> torch.Tensor:
    """``encode`` over small batches of preprocessed images, float32 on the CPU."""
    if not images:
        raise InvalidInput("no images to embed")
    out = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = torch.stack(
                [transform(im.convert("RGB")) for im in images[start : start + batch_size]]
            )
            out.append(encode(batch.to(device)).float().cpu())
    return torch.cat(out)


@dataclass
class ImageEncoder:
    """A vision model whose forward pass is the embedding: DINO's [CLS] token after
    the final norm (n, 384), or Inception-v3's pool3 features (n, 2048)."""

    model: nn.Module
    transform: Callable[[Image.Image], torch.Tensor]
    device: str
    batch_size: int

    def embed(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return _batched_embeddings(images, self.transform, self.model, self.batch_size, self.device)


@dataclass
class ClipEncoder:
    model: Any  # open_clip.CLIP
    transform: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: str
    batch_size: int

    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return _batched_embeddings(
            images, self.transform, self.model.encode_image, self.batch_size, self.device
        )

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start : start + self.batch_size]))
                out.append(self.model.encode_text(tokens.to(self.device)).float().cpu())
        return torch.cat(out)


def _env_path(environ: Mapping[str, str], name: str) -> Path | None:
    value = environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


@dataclass
class MetricModels:
    """Where each metric model's weights are, and the models once loaded (lazily).

    ``random_weights=True`` builds the same architectures with weights drawn from
    ``seed``: for tests and the tiny profile only; its numbers mean nothing.
    """

    clip_model: str = DEFAULT_CLIP_MODEL
    clip_weights: Path | None = None
    dino_weights: Path | None = None
    inception_weights: Path | None = None
    random_weights: bool = False
    seed: int = 0
    device: str = "cpu"
    batch_size: int = 4
    _loaded: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MetricModels:
        """Paths from ``ATELIER_EVAL_*`` variables; ``overrides`` that are not None win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "clip_model": env.get(ENV_CLIP_MODEL, "").strip() or DEFAULT_CLIP_MODEL,
            "clip_weights": _env_path(env, ENV_CLIP_WEIGHTS),
            "dino_weights": _env_path(env, ENV_DINO_WEIGHTS),
            "inception_weights": _env_path(env, ENV_INCEPTION_WEIGHTS),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        def where(path: Path | None) -> str | None:
            return "random" if self.random_weights else (str(path) if path else None)

        return {
            "dino": {"architecture": DINO_ARCH, "weights": where(self.dino_weights)},
            "clip": {"architecture": self.clip_model, "weights": where(self.clip_weights)},
            "inception": {
                "architecture": "torchvision inception_v3",
                "weights": where(self.inception_weights),
            },
            "random_weights": self.random_weights,
            "seed": self.seed if self.random_weights else None,
        }

    def check_weights(self, models: Sequence[str]) -> None:
        """Fail now, before any model runs, if a weights file of ``models`` (names among
        "dino", "clip", "inception") is missing."""
        if self.random_weights:
            return
        specs = {
            "dino": (self.dino_weights, DINO_WEIGHTS),
            "clip": (self.clip_weights, CLIP_WEIGHTS),
            "inception": (self.inception_weights, INCEPTION_WEIGHTS),
        }
        for name in models:
            _resolve_weights(*specs[name])

    def _cached(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._loaded:
            self._loaded[name] = build()
        return self._loaded[name]

    def dino(self) -> ImageEncoder:
        encoder: ImageEncoder = self._cached("dino", self._build_dino)
        return encoder

    def clip(self) -> ClipEncoder:
        encoder: ClipEncoder = self._cached("clip", self._build_clip)
        return encoder

    def inception(self) -> ImageEncoder:
        encoder: ImageEncoder = self._cached("inception", self._build_inception)
        return encoder

    def _build_dino(self) -> ImageEncoder:
        import timm
        from timm.data import create_transform, resolve_data_config
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

        path = None
        if not self.random_weights:
            path = _resolve_weights(self.dino_weights, DINO_WEIGHTS)
        # pretrained=False: timm never looks at the hub; the weights are ours to load.
        with _seeded(self.seed):
            model = timm.create_model(DINO_ARCH, pretrained=False, num_classes=0)
        assert isinstance(model, VisionTransformer)
        if path is not None:
            state = checkpoint_filter_fn(_read_state_dict(path), model)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            _load_strict(model, state, "DINO ViT-S/16", path)
        model.eval().to(self.device)
        transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
        return ImageEncoder(model, transform, self.device, self.batch_size)

    def _build_clip(self) -> ClipEncoder:
        import open_clip

        if self.clip_model not in open_clip.list_models():
            raise InvalidInput(
                f"unknown CLIP model {self.clip_model!r}: use an open_clip built-in name "
                "such as ViT-L-14, ViT-L-14-quickgelu or ViT-B-32"
            )
        pretrained = None
        if not self.random_weights:
            path = _resolve_weights(self.clip_weights, CLIP_WEIGHTS)
            # An absolute path: open_clip treats a bare name such as "openai" as a tag
            # to download, so a relative path must never reach it.
            pretrained = str(path.resolve())
        with _seeded(self.seed):
            try:
                model, _, transform = open_clip.create_model_and_transforms(
                    self.clip_model, pretrained=pretrained, device=self.device
                )
            except RuntimeError as exc:  # a checkpoint of another architecture
                raise InvalidInput(
                    f"{pretrained} does not load into open_clip {self.clip_model!r} (is "
                    f"--clip-model the model these weights are for?): {str(exc)[:300]}"
                ) from exc
        model.eval()
        tokenizer = open_clip.get_tokenizer(self.clip_model)
        return ClipEncoder(model, transform, tokenizer, self.device, self.batch_size)

    def _build_inception(self) -> ImageEncoder:
        from torchvision import transforms
        from torchvision.models import inception_v3

        state = None
        path = None
        if not self.random_weights:
            path = _resolve_weights(self.inception_weights, INCEPTION_WEIGHTS)
            state = _read_state_dict(path)
        num_classes = int(state["fc.weight"].shape[0]) if state and "fc.weight" in state else 1000
        aux_logits = state is None or any(k.startswith("AuxLogits.") for k in state)
        with _seeded(self.seed):
            # transform_input: ImageNet-normalised input is mapped to the [-1, 1] range
            # the Inception weights were trained on (as torchvision does for its own).
            model = inception_v3(
                weights=None,
                aux_logits=aux_logits,
                init_weights=False,
                transform_input=True,
                num_classes=num_classes,
            )
            if state is None:
                # Variance-preserving random weights: PyTorch's default init makes the
                # activations vanish (~1e-7) through Inception's ~90 layers.
                for module in model.modules():
                    if isinstance(module, nn.Conv2d | nn.Linear):
                        nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        if state is not None and path is not None:
            _load_strict(model, state, "Inception-v3", path)
        model.fc = nn.Identity()
        model.eval().to(self.device)
        transform = transforms.Compose(
            [
                transforms.Resize(
                    (INCEPTION_SIZE, INCEPTION_SIZE),
                    interpolation=transforms.InterpolationMode.BILINEAR,
                    antialias=True,
                ),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        return ImageEncoder(model, transform, self.device, self.batch_size)
