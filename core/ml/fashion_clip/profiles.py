"""CLIP profiles for the shop's fashion model: every per-model number lives in ``CLIP_PROFILES``.

A profile names an open_clip base (where its weights live on this host and how an
operator fetches them) and the fine-tuning hyper-parameters that suit it. Code
never branches on a profile's name; it reads these fields. This module imports
nothing heavy, so the API can validate profile names without loading torch.

Where the numbers come from:

- ``vit-b-16``: open_clip's built-in "ViT-B-16" architecture (224 px, 512-d
  embeddings) with the ``laion2b_s34b_b88k`` weights, published as the Hugging
  Face repository ``laion/CLIP-ViT-B-16-laion2B-s34B-b88K`` (open_clip's
  ``pretrained.py`` points that tag there; the repository carries
  ``open_clip_config.json`` and ``open_clip_model.safetensors``). It is the base
  Marqo-FashionCLIP was fine-tuned from.
- ``marqo-fashionclip``: the same architecture with Marqo's fashion fine-tune
  (``Marqo/marqo-fashionCLIP``, loaded by open_clip as ``hf-hub:Marqo/marqo-fashionCLIP``).
  The file names of both repositories were not checked from this host (no internet).
- Heads: CLIP-Adapter (Gao et al. 2021, arXiv:2110.04544) puts a bottleneck MLP
  with a reduction of 4 on each tower's output; ours is residual with a
  zero-initialised up projection so a version starts exactly at its base.
- Unfrozen blocks: a lower rate for tower weights than for the heads, of the order
  end-to-end CLIP fine-tuning uses (1e-5 to 3e-5 with AdamW, e.g. WiSE-FT, Wortsman
  et al. 2022); the step counts and head rates of ``vit-b-16`` are our choice,
  not measured on a GPU yet.
- ``tiny``: seeded random weights built on this host (``python -m
  core.ml.fashion_clip.tiny``); its numbers are for speed on 2 CPU cores and were
  chosen so that fine-tuning on the fixture shop's catalog measurably learns
  (tests/unit/test_clip_finetune.py), not for quality.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import InvalidInput

# open_clip's names for what a Hugging Face style checkpoint directory holds.
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_PICKLE_WEIGHTS = "open_clip_pytorch_model.bin"
# The tokenizer every profile here uses: open_clip's bundled CLIP BPE (offline).
CLIP_TOKENIZER = "ViT-B-16"
CLIP_CONTEXT_LENGTH = 77


@dataclass(frozen=True)
class ClipProfile:
    name: str
    embed_dim: int  # width of both towers' output embeddings
    image_size: int  # side of the preprocessed square, in pixels
    # open_clip architecture for a bare weights file; None: a directory with its own
    # open_clip_config.json is the only way to load it.
    open_clip_arch: str | None
    model_dir: str  # default checkpoint directory, under <models_dir>
    weights_file: str  # the file in that directory the weights are read from
    fetch_command: str  # what an operator runs (with internet) to put it there
    random_weights: bool = False  # seeded random base: its own scores are chance level
    tokenizer: str = CLIP_TOKENIZER
    context_length: int = CLIP_CONTEXT_LENGTH
    # --- fine-tuning defaults -----------------------------------------------------------
    train_steps: int = 1000
    batch_size: int = 256  # distinct products per batch (capped by the training set)
    learning_rate: float = 1e-3  # heads and temperature
    weight_decay: float = 0.01
    bottleneck: int | None = None  # adapter width; None = embed_dim // 4 (CLIP-Adapter)
    unfreeze_image_blocks: int = 0  # last N vision transformer blocks trained too
    unfreeze_text_blocks: int = 0
    block_learning_rate: float = 1e-5  # for unfrozen tower blocks


TINY_CLIP = ClipProfile(
    name="tiny",
    embed_dim=64,
    image_size=64,
    open_clip_arch=None,
    model_dir="clip-tiny",
    weights_file=OPEN_CLIP_WEIGHTS,
    fetch_command="python -m core.ml.fashion_clip.tiny {path}",
    random_weights=True,
    # 800 steps of 128 products at 3e-3: on 1,000 fixture-shop products (100 held
    # out) the heads beat the random base by 13 to 33 points of text->image R@10
    # (3 tower seeds x 4 splits, mean 22) in ~2 s on one CPU thread. Wider heads
    # (bottleneck 64) or more steps memorise the training products and gain less.
    train_steps=800,
    batch_size=128,
    learning_rate=3e-3,
    weight_decay=0.01,
    bottleneck=None,
    unfreeze_image_blocks=1,
    unfreeze_text_blocks=1,
    block_learning_rate=1e-3,  # random towers: nothing pretrained to protect
)
VIT_B_16 = ClipProfile(
    name="vit-b-16",
    embed_dim=512,
    image_size=224,
    open_clip_arch="ViT-B-16",
    model_dir="clip-vit-b-16",
    weights_file=OPEN_CLIP_WEIGHTS,
    fetch_command=(
        "huggingface-cli download laion/CLIP-ViT-B-16-laion2B-s34B-b88K "
        f"{OPEN_CLIP_CONFIG} {OPEN_CLIP_WEIGHTS} --local-dir {{path}}"
    ),
    train_steps=2000,
    batch_size=256,
    learning_rate=1e-3,
    weight_decay=0.01,
    bottleneck=None,
    unfreeze_image_blocks=2,
    unfreeze_text_blocks=2,
    block_learning_rate=1e-5,
)
MARQO_FASHIONCLIP = ClipProfile(
    name="marqo-fashionclip",
    embed_dim=512,
    image_size=224,
    open_clip_arch="ViT-B-16",
    model_dir="clip-marqo-fashionclip",
    weights_file=OPEN_CLIP_PICKLE_WEIGHTS,
    fetch_command=(
        "huggingface-cli download Marqo/marqo-fashionCLIP "
        f"{OPEN_CLIP_CONFIG} {OPEN_CLIP_PICKLE_WEIGHTS} --local-dir {{path}}"
    ),
    train_steps=2000,
    batch_size=256,
    learning_rate=1e-3,
    weight_decay=0.01,
    bottleneck=None,
    unfreeze_image_blocks=2,
    unfreeze_text_blocks=2,
    block_learning_rate=1e-5,
)

CLIP_PROFILES: dict[str, ClipProfile] = {
    p.name: p for p in (TINY_CLIP, VIT_B_16, MARQO_FASHIONCLIP)
}


def get_clip_profile(name: str) -> ClipProfile:
    try:
        return CLIP_PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(CLIP_PROFILES))
        raise InvalidInput(
            f"unknown CLIP profile {name!r}; known profiles: {known}", profile=name
        ) from None


def fetch_hint(profile: ClipProfile, path: object) -> str:
    """The command that puts ``profile``'s checkpoint at ``path``."""
    return profile.fetch_command.format(path=path)
