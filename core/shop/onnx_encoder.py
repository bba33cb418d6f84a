"""The fashion CLIP towers for the API process: onnxruntime on the CPU, no torch.

An exported encoder directory (written by ``core.ml.fashion_clip.onnx_export``) holds
``text.onnx`` (int64 token ids -> L2-normalised embedding after the text head),
``image.onnx`` (preprocessed float32 pixels -> L2-normalised embedding after the image
head), their weights (``*.onnx.data``), the BPE vocabulary and ``encoder.json``. Here
the API tokenises with ``core.shop.clip_tokenizer`` and preprocesses images with PIL +
numpy exactly as open_clip's eval transform does (resize the shortest side with bicubic,
center crop, RGB, /255, normalise), so a query vector matches the torch model's.

This module also owns the directory's format (file names, tensor names, the config), so
the exporter writes what this reads. ``OnnxClipEncoder`` methods block: call them from a
thread (e.g. ``asyncio.to_thread``), never on the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
from PIL import Image

from core.shop.clip_tokenizer import BPE_VOCAB_FILE, ClipTokenizer

CONFIG_FILE = "encoder.json"
TEXT_MODEL_FILE = "text.onnx"
IMAGE_MODEL_FILE = "image.onnx"
TEXT_INPUT = "token_ids"
IMAGE_INPUT = "pixels"
# Not "embedding": the exporter names the token-embedding lookup's output that.
EMBEDDING_OUTPUT = "unit_embedding"
# Bumped when the directory layout or the meaning of a field changes.
FORMAT_VERSION = 1
# open_clip's eval transform defaults (PreprocessCfg: resize_mode "shortest",
# interpolation "bicubic"); the only preprocessing this module reproduces.
RESIZE_MODE = "shortest"
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
# One thread per run: the API serves many requests at once from a thread pool, and runs
# that each fan out over every core oversubscribe the CPU. Raise it for lone-query latency.
DEFAULT_INTRA_OP_THREADS = 1
# torchvision's to_tensor divides uint8 pixels by 255 in float32.
PIXEL_MAX = np.float32(255.0)


class EncoderFilesMissing(FileNotFoundError):
    """The directory is not a complete exported encoder."""


@dataclass(frozen=True)
class TowerSpec:
    """One ONNX graph of the directory: its file, the files holding its weights (beside it:
    onnxruntime maps them at ~half the memory of weights inside the graph, measured), and
    the names of its single input and output."""

    file: str
    input: str
    output: str = EMBEDDING_OUTPUT
    data_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class EncoderConfig:
    """``encoder.json``: what the API needs to feed and read the two ONNX files."""

    context_length: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embed_dim: int
    opset: int
    text: TowerSpec = TowerSpec(TEXT_MODEL_FILE, TEXT_INPUT)
    image: TowerSpec = TowerSpec(IMAGE_MODEL_FILE, IMAGE_INPUT)
    vocab_file: str = BPE_VOCAB_FILE
    resize_mode: str = RESIZE_MODE
    interpolation: str = "bicubic"
    format_version: int = FORMAT_VERSION
    # Facts about the export (torch version, exporter, measured error); not read back.
    provenance: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> EncoderConfig:
        raw = json.loads(text)
        if raw.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"encoder format {raw.get('format_version')} is not {FORMAT_VERSION}: re-export"
            )
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        for tower in ("text", "image"):
            spec = raw[tower]
            raw[tower] = TowerSpec(**{**spec, "data_files": tuple(spec.get("data_files", ()))})
        return cls(**raw)

    def __post_init__(self) -> None:
        if self.resize_mode != RESIZE_MODE or self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unsupported preprocessing {self.resize_mode}/{self.interpolation}: "
                f"only {RESIZE_MODE} resize with {sorted(INTERPOLATIONS)} is reproduced"
            )


def required_files(config: EncoderConfig) -> list[str]:
    towers = (config.text, config.image)
    return [name for tower in towers for name in (tower.file, *tower.data_files)] + [
        config.vocab_file
    ]


def preprocess_image(
    image: Image.Image,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> npt.NDArray[np.float32]:
    """``[3, size, size]`` float32, as open_clip's eval transform: torchvision's
    ``Resize(size)`` (shortest side), ``CenterCrop(size)``, ``convert("RGB")``,
    ``to_tensor``, ``Normalize(mean, std)``, step by step in the same order."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    # torchvision truncates the long side (int(), not round()).
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    if new_size != image.size:  # torchvision skips a resize to the same size
        image = image.resize(new_size, INTERPOLATIONS[interpolation])
    # torchvision's center_crop rounds the offsets half to even (Python's round).
    top = round((image.height - size) / 2.0)
    left = round((image.width - size) / 2.0)
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / PIXEL_MAX
    mean_c = np.asarray(mean, dtype=np.float32)[:, None, None]
    std_c = np.asarray(std, dtype=np.float32)[:, None, None]
    result: npt.NDArray[np.float32] = (pixels.transpose(2, 0, 1) - mean_c) / std_c
    return result


def _session(path: Path, intra_op_threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # One graph, one run at a time per call: no use for a second pool.
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle pool threads would otherwise spin after each run, taking the cores the API's
    # other requests need (measured: a torch loop beside a spinning session ran 7x slower).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OnnxClipEncoder:
    """Text and image embeddings from an exported encoder directory."""

    def __init__(
        self,
        config: EncoderConfig,
        tokenizer: ClipTokenizer,
        text_session: ort.InferenceSession,
        image_session: ort.InferenceSession,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self._text = text_session
        self._image = image_session

    @classmethod
    def load(
        cls, model_dir: Path, *, intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
    ) -> OnnxClipEncoder:
        """Open both towers on the CPU; raises ``EncoderFilesMissing`` naming what is absent."""
        config_path = model_dir / CONFIG_FILE
        if not config_path.is_file():
            raise EncoderFilesMissing(
                f"no exported fashion CLIP encoder in {model_dir}: {CONFIG_FILE} is missing "
                "(write one with core.ml.fashion_clip.onnx_export.export_onnx)"
            )
        config = EncoderConfig.from_json(config_path.read_text("utf-8"))
        missing = [name for name in required_files(config) if not (model_dir / name).is_file()]
        if missing:
            raise EncoderFilesMissing(f"incomplete encoder in {model_dir}: missing {missing}")
        tokenizer = ClipTokenizer(model_dir / config.vocab_file, config.context_length)
        return cls(
            config,
            tokenizer,
            _session(model_dir / config.text.file, intra_op_threads),
            _session(model_dir / config.image.file, intra_op_threads),
        )

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_token_ids(self, token_ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        """``[B, context_length]`` int64 ids -> ``[B, D]`` unit vectors."""
        return self._run(self._text, self.config.text, token_ids)

    def encode_texts(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """``[len(texts), D]`` float32 unit vectors (after the text head)."""
        if not texts:
            return self._empty()
        return self.encode_token_ids(self.tokenizer(texts))

    def preprocess(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """``[len(images), 3, S, S]`` float32, the image tower's input."""
        config = self.config
        return np.stack(
            [
                preprocess_image(
                    image, config.image_size, config.mean, config.std, config.interpolation
                )
                for image in images
            ]
        )

    def encode_images(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """``[len(images), D]`` float32 unit vectors (after the image head)."""
        if not images:
            return self._empty()
        return self._run(self._image, self.config.image, self.preprocess(images))

    def _run(
        self, session: ort.InferenceSession, tower: TowerSpec, batch: npt.NDArray[Any]
    ) -> npt.NDArray[np.float32]:
        (embedding,) = session.run([tower.output], {tower.input: batch})
        return np.asarray(embedding, dtype=np.float32)

    def _empty(self) -> npt.NDArray[np.float32]:
        return np.zeros((0, self.embed_dim), dtype=np.float32)
