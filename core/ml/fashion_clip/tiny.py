"""Build the "tiny" fashion CLIP checkpoint: a genuine open_clip CLIP, small and seeded.

It is written the way Hugging Face hosts open_clip models (``open_clip_config.json``
with ``model_cfg`` and ``preprocess_cfg``, plus ``open_clip_model.safetensors``), so
``core.ml.fashion_clip.model.load_base`` reads it through the same open_clip call
as a downloaded ViT-B-16 directory. Its weights are random: its embeddings carry
no meaning until fine-tuned, and then only what the catalog taught them.

Run ``python -m core.ml.fashion_clip.tiny [DIR]`` to build it (default:
<models_dir>/clip-tiny).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from safetensors.torch import save_file

from core.ml.fashion_clip.profiles import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, TINY_CLIP
from core.ml.local_checkpoint import build_atomically, is_complete

# Architecture of the tiny model, in one place. Patch 16 on 64 px gives 16 tokens:
# on the fixture shop, fine-tuning over these features learns more than over patch 8's
# 64 tokens (a deeper random mix scrambles more), and it is 4x cheaper.
VISION_LAYERS = 2
VISION_WIDTH = 64
VISION_HEAD_WIDTH = 16  # 4 attention heads
PATCH_SIZE = 16
TEXT_LAYERS = 2
TEXT_WIDTH = 64
TEXT_HEADS = 4
CLIP_VOCAB_SIZE = 49408  # the bundled BPE's vocabulary, as every OpenAI/LAION CLIP

REQUIRED_FILES = (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS)


def model_config() -> dict[str, Any]:
    """open_clip's ``model_cfg`` of the tiny CLIP (the keys of ``open_clip.CLIP``)."""
    return {
        "embed_dim": TINY_CLIP.embed_dim,
        "vision_cfg": {
            "image_size": TINY_CLIP.image_size,
            "layers": VISION_LAYERS,
            "width": VISION_WIDTH,
            "head_width": VISION_HEAD_WIDTH,
            "patch_size": PATCH_SIZE,
        },
        "text_cfg": {
            "context_length": TINY_CLIP.context_length,
            "vocab_size": CLIP_VOCAB_SIZE,
            "width": TEXT_WIDTH,
            "heads": TEXT_HEADS,
            "layers": TEXT_LAYERS,
        },
    }


def preprocess_config() -> dict[str, Any]:
    """open_clip's defaults, written out so torch-free readers need not know them."""
    return {
        "size": TINY_CLIP.image_size,
        "mode": "RGB",
        "mean": list(OPENAI_DATASET_MEAN),
        "std": list(OPENAI_DATASET_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def _save(out_dir: Path, seed: int) -> None:
    # Seed the global RNG (module init uses it) without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**model_config())
    config = {"model_cfg": model_config(), "preprocess_cfg": preprocess_config()}
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(out_dir / OPEN_CLIP_WEIGHTS))


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """Build the tiny CLIP checkpoint directory at ``path`` unless a complete one is
    there (atomically: see ``core.ml.local_checkpoint``)."""
    return build_atomically(path, _save, REQUIRED_FILES, seed)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m core.ml.fashion_clip.tiny [DIR]", file=sys.stderr)
        return 2
    if args:
        path = Path(args[0])
    else:
        from core.settings import Settings

        path = Settings().models_dir / TINY_CLIP.model_dir
    if is_complete(path, REQUIRED_FILES):
        print(f"tiny CLIP checkpoint already complete at {path}; nothing to do")
        return 0
    started = time.monotonic()
    build_tiny_clip(path)
    print(f"built tiny CLIP checkpoint at {path} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
