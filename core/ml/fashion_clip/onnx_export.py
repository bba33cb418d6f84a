"""Export the fashion CLIP towers to ONNX, for the API's torch-free encoder.

``export_onnx`` writes a self-contained directory that ``core.shop.onnx_encoder`` loads:
``text.onnx`` (int64 token ids ``[B, context_length]`` -> L2-normalised embedding after
the text head), ``image.onnx`` (float32 preprocessed pixels ``[B, 3, S, S]`` -> the same
after the image head), both with a dynamic batch and their weights beside them
(``*.onnx.data``), the BPE vocabulary the tokenizer reads and ``encoder.json``. The
directory's format is defined by ``core.shop.onnx_encoder``. A directory is written once:
an API process may have its files mapped, so a new model version gets a new directory.

The exporter is torch.export-based (``dynamo=True``): the TorchScript one is deprecated
since torch 2.9 and traces silently through Python control flow, where torch.export
either proves the batch dimension dynamic or refuses. Both towers are checked against
torch through onnxruntime at a batch size other than the traced one before
``encoder.json`` (written last, so its absence marks an unfinished export) appears.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import default_bpe
from torch import nn

from core.shop.clip_tokenizer import BPE_VOCAB_FILE, ClipTokenizer
from core.shop.onnx_encoder import (
    CONFIG_FILE,
    EMBEDDING_OUTPUT,
    IMAGE_INPUT,
    IMAGE_MODEL_FILE,
    TEXT_INPUT,
    TEXT_MODEL_FILE,
    EncoderConfig,
    TowerSpec,
)

# torch 2.14's torch.export-based exporter targets opset 20 by default; onnxruntime
# reads it from 1.17 on. Pinned so an upgrade of torch does not change the files.
OPSET = 20
# Traced with 2 rows: torch.export specialises dimensions of size 0 and 1.
TRACE_BATCH = 2
# Checked with 3 rows, neither the traced size nor 1, so a batch baked in would show.
CHECK_BATCH = 3
# Largest |onnxruntime - torch| accepted on a unit vector. Measured: ~2e-7 for ViT-B-16.
CHECK_TOLERANCE = 1e-4
CHECK_SEED = 0
CHECK_TEXTS = (
    "a black wool coat",
    "Dolce & Gabbana floral silk dress",
    "sneakers",
)
# Every open_clip text tower tokenised by the SimpleTokenizer embeds this many ids.
SIMPLE_TOKENIZER_VOCAB = 49408


class _TextTower(nn.Module):
    """Token ids -> unit vector: the base text tower, the text head, L2 normalisation."""

    def __init__(self, base: CLIP | CustomTextCLIP, head: nn.Module) -> None:
        super().__init__()
        self.base, self.head = base, head

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.base.encode_text(token_ids)), dim=-1)


class _ImageTower(nn.Module):
    """Preprocessed pixels -> unit vector: the base image tower, the image head, L2."""

    def __init__(self, base: CLIP | CustomTextCLIP, head: nn.Module) -> None:
        super().__init__()
        self.base, self.head = base, head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.base.encode_image(pixels)), dim=-1)


def _cpu_float32_copy(module: nn.Module | None) -> nn.Module:
    """A CPU float32 eval copy, so the caller's model (maybe on a GPU, maybe half precision,
    maybe training) is left as it was."""
    if module is None:
        return nn.Identity()
    return copy.deepcopy(module).to("cpu", torch.float32).eval()


def _square_size(image_size: int | Sequence[int]) -> int:
    if isinstance(image_size, int):
        return image_size
    height, width = image_size
    if height != width:
        raise ValueError(f"only square image towers are supported, got {height}x{width}")
    return int(height)


def _export(
    tower: nn.Module, example: torch.Tensor, input_name: str, path: Path
) -> tuple[str, ...]:
    """Write the graph; returns the names of the weight files written beside it."""
    batch = torch.export.Dim("batch")
    torch.onnx.export(
        tower,
        (example,),
        str(path),
        input_names=[input_name],
        output_names=[EMBEDDING_OUTPUT],
        dynamic_shapes=({0: batch},),
        opset_version=OPSET,
        dynamo=True,
        # Weights beside the graph: onnxruntime maps them (ViT-B-16 text tower: 216 MB RSS
        # vs 406 MB with the weights inside, and 0.2 s vs 0.7 s to load); no 2 GiB limit.
        external_data=True,
        verbose=False,
    )
    graph = onnx.load(str(path), load_external_data=False)
    return tuple(sorted(_external_locations(graph)))


def _external_locations(graph: onnx.ModelProto) -> set[str]:
    return {
        entry.value
        for tensor in graph.graph.initializer
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _export_and_check(
    tower: nn.Module, inputs: np.ndarray, input_name: str, path: Path
) -> tuple[TowerSpec, float, int]:
    """Export from the first TRACE_BATCH rows, run all rows through onnxruntime and torch:
    (the tower's files, largest |difference|, embedding width). Raises above tolerance."""
    data_files = _export(tower, torch.from_numpy(inputs[:TRACE_BATCH]), input_name, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run([EMBEDDING_OUTPUT], {input_name: inputs})
    with torch.no_grad():
        torch_out = tower(torch.from_numpy(inputs)).numpy()
    if onnx_out.shape != torch_out.shape:
        raise RuntimeError(f"{path.name} gives {onnx_out.shape}, torch {torch_out.shape}")
    error = float(np.abs(onnx_out - torch_out).max())
    if error > CHECK_TOLERANCE:
        raise RuntimeError(
            f"{path.name} disagrees with torch by {error:.2e} (tolerance {CHECK_TOLERANCE:.0e})"
        )
    return TowerSpec(path.name, input_name, data_files=data_files), error, torch_out.shape[-1]


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    red, green, blue = (float(value) for value in values)
    return red, green, blue


def export_onnx(
    base: CLIP | CustomTextCLIP,
    image_head: nn.Module | None,
    text_head: nn.Module | None,
    out_dir: Path,
    image_size: int | Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    *,
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """Write text.onnx, image.onnx, the BPE vocabulary and encoder.json into ``out_dir``.

    ``base`` is an open_clip ``CLIP`` (``encode_text``/``encode_image`` before their
    normalisation); each head maps ``[B, D] -> [B, D]`` (``None``: identity).
    ``image_size``, ``mean``, ``std`` (and ``resize_mode``, ``interpolation``, open_clip's
    defaults) are the base's eval preprocessing, ``open_clip.get_model_preprocess_cfg``;
    an unsupported one raises ValueError before anything is exported.
    Returns encoder.json's content.
    """
    if getattr(base, "vocab_size", None) != SIMPLE_TOKENIZER_VOCAB:
        raise ValueError(
            f"text tower has {getattr(base, 'vocab_size', None)} token ids, but the "
            f"torch-free tokenizer is open_clip's SimpleTokenizer ({SIMPLE_TOKENIZER_VOCAB})"
        )
    if (out_dir / CONFIG_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds an export; use a new directory")
    started = time.perf_counter()
    size, context_length = _square_size(image_size), int(base.context_length)
    # Built (and so validated) before the slow part; the width is known after the export.
    config = EncoderConfig(
        context_length=context_length,
        image_size=size,
        mean=_rgb(mean),
        std=_rgb(std),
        embed_dim=0,
        opset=OPSET,
        resize_mode=resize_mode,
        interpolation=interpolation,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(default_bpe(), out_dir / BPE_VOCAB_FILE)
    token_ids = ClipTokenizer(out_dir / BPE_VOCAB_FILE, context_length)(list(CHECK_TEXTS))
    rng = np.random.default_rng(CHECK_SEED)
    pixels = rng.standard_normal((CHECK_BATCH, 3, size, size)).astype(np.float32)
    cpu_base = _cpu_float32_copy(base)
    text_tower = _TextTower(cpu_base, _cpu_float32_copy(text_head)).eval()
    image_tower = _ImageTower(cpu_base, _cpu_float32_copy(image_head)).eval()
    text, text_error, embed_dim = _export_and_check(
        text_tower, token_ids, TEXT_INPUT, out_dir / TEXT_MODEL_FILE
    )
    image, image_error, image_dim = _export_and_check(
        image_tower, pixels, IMAGE_INPUT, out_dir / IMAGE_MODEL_FILE
    )
    if image_dim != embed_dim:
        raise ValueError(f"towers disagree on the embedding width: {image_dim} vs {embed_dim}")
    errors = {"text": text_error, "image": image_error}
    provenance = _provenance(out_dir / TEXT_MODEL_FILE, errors, started)
    config = dataclasses.replace(
        config, text=text, image=image, embed_dim=embed_dim, provenance=provenance
    )
    (out_dir / CONFIG_FILE).write_text(config.to_json(), "utf-8")
    return dataclasses.asdict(config)


def _provenance(text_model: Path, errors: dict[str, float], started: float) -> dict[str, Any]:
    graph = onnx.load(str(text_model), load_external_data=False)
    return {
        "exporter": "torch.onnx.export(dynamo=True)",
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime_checked": ort.__version__,
        "ir_version": graph.ir_version,
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in graph.opset_import},
        "check_batch": CHECK_BATCH,
        "check_max_abs_error": errors,
        "export_s": round(time.perf_counter() - started, 2),
        "dynamic_axes": {TEXT_INPUT: [0], IMAGE_INPUT: [0]},
        "providers": ["CPUExecutionProvider"],
    }
