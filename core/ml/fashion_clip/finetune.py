"""Fine-tuning a fashion CLIP version on catalog pairs: symmetric InfoNCE.

Each step draws a batch of DISTINCT products (``ProductBatches``: one of each
product's images and one of its texts, never two images of one product, which
would make a right answer a negative) and minimises CLIP's symmetric contrastive
loss at a learnable temperature (Radford et al. 2021), with AdamW.

Two ways to train:

- ``train_heads``: the heads and temperature only, over STORED base features (no
  tower pass at all): milliseconds a step, whatever the base's size.
- ``train_unfrozen``: the heads plus the last N transformer blocks of either tower.
  Every step runs both towers on the batch's images and texts (forward and
  backward through the unfrozen blocks), so it costs what fine-tuning the base
  costs: slower by the towers' price, seconds a step for ViT-B-16 on a CPU.

Both report ``on_step(step, total, loss)`` after each step, ask ``should_stop()``
before each and raise ``core.errors.Canceled`` when it is true, and are
deterministic given ``seed`` (on one device).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from core.errors import Canceled, InvalidInput
from core.ml.fashion_clip.model import (
    DEFAULT_LOGIT_SCALE,
    ClipHeads,
    FashionClip,
    Preprocess,
    VersionState,
    base_embed_dim,
    base_logit_scale,
    save_version_state,
)
from core.ml.fashion_clip.profiles import ClipProfile

# open_clip's training loop clamps the logit scale to [1, 100] (log: [0, ln 100]),
# as CLIP did, so the temperature cannot collapse or explode.
MAX_LOG_LOGIT_SCALE = math.log(100)

OnStep = Callable[[int, int, float], None]
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class ClipTrainConfig:
    steps: int
    batch_size: int  # distinct products per batch; capped by the products there are
    learning_rate: float  # heads and temperature
    weight_decay: float = 0.01  # on weight matrices only (not biases, not the temperature)
    bottleneck: int | None = None  # None: embed_dim // 4
    unfreeze_image_blocks: int = 0  # train_unfrozen only
    unfreeze_text_blocks: int = 0
    block_learning_rate: float = 1e-5  # the unfrozen blocks' rate

    @classmethod
    def from_profile(cls, profile: ClipProfile, steps: int | None = None) -> ClipTrainConfig:
        """The profile's defaults; ``steps`` None or 0 means the profile's."""
        return cls(
            steps=steps or profile.train_steps,
            batch_size=profile.batch_size,
            learning_rate=profile.learning_rate,
            weight_decay=profile.weight_decay,
            bottleneck=profile.bottleneck,
            unfreeze_image_blocks=profile.unfreeze_image_blocks,
            unfreeze_text_blocks=profile.unfreeze_text_blocks,
            block_learning_rate=profile.block_learning_rate,
        )


@dataclass
class TrainedVersion:
    model: ClipHeads | FashionClip  # heads alone for a head-only run
    losses: list[float]  # one per step

    def state(self, base_identity: str | None = None) -> VersionState:
        return save_version_state(self.model, base_identity)


class _Groups:
    """Rows grouped by product, flat: product k's rows are ``rows[starts[k]:][:counts[k]]``."""

    def __init__(self, by_product: list[np.ndarray]) -> None:
        self.counts = np.array([len(rows) for rows in by_product])
        self.starts = np.r_[0, np.cumsum(self.counts)[:-1]]
        self.rows = np.concatenate(by_product)

    def one_each(self, products: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn row of each of ``products``."""
        offsets = (rng.random(len(products)) * self.counts[products]).astype(np.int64)
        return self.rows[self.starts[products] + offsets]


class ProductBatches:
    """Batches of distinct products, each with one of its image rows and one of its
    text rows, drawn from a seeded generator. Products with no image or no text are
    left out."""

    def __init__(
        self,
        image_product_ids: Sequence[Any],
        text_product_ids: Sequence[Any],
        batch_size: int,
        seed: int,
    ) -> None:
        images = _rows_by_product(image_product_ids)
        texts = _rows_by_product(text_product_ids)
        self.products = sorted(set(images) & set(texts), key=str)
        if len(self.products) < 2:
            raise InvalidInput("contrastive training needs at least 2 products with pairs")
        self._images = _Groups([images[p] for p in self.products])
        self._texts = _Groups([texts[p] for p in self.products])
        self.batch_size = min(batch_size, len(self.products))
        self._rng = np.random.default_rng(seed)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        """(image rows, text rows) of one batch; row i of both is the same product."""
        chosen = self._rng.choice(len(self.products), size=self.batch_size, replace=False)
        return self._images.one_each(chosen, self._rng), self._texts.one_each(chosen, self._rng)


def _rows_by_product(product_ids: Sequence[Any]) -> dict[Any, np.ndarray]:
    rows: dict[Any, list[int]] = {}
    for row, product in enumerate(product_ids):
        rows.setdefault(product, []).append(row)
    return {product: np.array(found) for product, found in rows.items()}


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Heads are small matrices: on them torch's intra-op threads cost more in
    hand-offs than they compute (3.5x slower with 2 threads on 2 busy cores, measured
    here), so head-only training runs on one; the setting is process-wide, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, log_logit_scale: torch.Tensor
) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over normalised embeddings; row i of each is a pair."""
    logits = log_logit_scale.exp() * image_emb @ text_emb.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _param_groups(
    parameters: Sequence[torch.nn.Parameter], lr: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not gains, biases, the temperature), as open_clip's
    training does."""
    trainable = [p for p in parameters if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    rest = [p for p in trainable if p.ndim < 2]
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": rest, "lr": lr, "weight_decay": 0.0},
    ]


def _new_heads(embed_dim: int, config: ClipTrainConfig, logit_scale: float, seed: int) -> ClipHeads:
    # Seed the global RNG (nn.Linear init uses it) without disturbing the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ClipHeads(embed_dim, config.bottleneck, logit_scale)


def _run_steps(
    config: ClipTrainConfig,
    step_loss: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    logit_scale: torch.nn.Parameter,
    on_step: OnStep,
    should_stop: ShouldStop,
) -> list[float]:
    losses: list[float] = []
    for step in range(1, config.steps + 1):
        if should_stop():
            raise Canceled(f"CLIP fine-tuning canceled before step {step} of {config.steps}")
        loss = step_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            logit_scale.clamp_(0, MAX_LOG_LOGIT_SCALE)
        losses.append(float(loss.detach()))
        on_step(step, config.steps, losses[-1])
    return losses


def train_heads(
    image_feats: np.ndarray,
    text_feats: np.ndarray,
    image_product_ids: Sequence[Any],
    text_product_ids: Sequence[Any],
    config: ClipTrainConfig,
    on_step: OnStep,
    should_stop: ShouldStop,
    seed: int = 0,
    *,
    init_logit_scale: float = DEFAULT_LOGIT_SCALE,
    device: str | torch.device = "cpu",
) -> TrainedVersion:
    """Train heads and temperature over stored base features (rows of ``image_feats``
    and ``text_feats`` belong to the products in ``*_product_ids``). No tower runs.
    ``init_logit_scale`` should be the base's (``model.base_logit_scale``)."""
    if len(image_feats) != len(image_product_ids) or len(text_feats) != len(text_product_ids):
        raise InvalidInput("features and product ids differ in length")
    images = torch.as_tensor(np.asarray(image_feats, dtype=np.float32), device=device)
    texts = torch.as_tensor(np.asarray(text_feats, dtype=np.float32), device=device)
    heads = _new_heads(images.shape[1], config, init_logit_scale, seed).to(device)
    heads.train()
    batches = ProductBatches(image_product_ids, text_product_ids, config.batch_size, seed)
    optimizer = torch.optim.AdamW(
        _param_groups(list(heads.parameters()), config.learning_rate, config.weight_decay)
    )

    def step_loss() -> torch.Tensor:
        image_rows, text_rows = batches.next()
        return contrastive_loss(
            heads.embed_images(images[image_rows]),
            heads.embed_texts(texts[text_rows]),
            heads.logit_scale,
        )

    with one_torch_thread():
        losses = _run_steps(config, step_loss, optimizer, heads.logit_scale, on_step, should_stop)
    heads.eval()
    return TrainedVersion(heads, losses)


def train_unfrozen(
    base: Any,
    preprocess: Preprocess,
    tokenizer: Any,
    images: Sequence[Image.Image],
    image_product_ids: Sequence[Any],
    texts: Sequence[str],
    text_product_ids: Sequence[Any],
    config: ClipTrainConfig,
    on_step: OnStep,
    should_stop: ShouldStop,
    seed: int = 0,
    *,
    initial_heads: ClipHeads | None = None,
) -> TrainedVersion:
    """Train heads, temperature and the last ``config.unfreeze_*_blocks`` blocks of the
    towers, which run forward and backward on every batch (slow: the towers' cost per
    step; use ``train_heads`` when the towers stay frozen). ``base`` is not modified:
    the version owns copies of the blocks it trains. ``initial_heads`` (say, a head-only
    version's) start the heads instead of the identity."""
    if len(images) != len(image_product_ids) or len(texts) != len(text_product_ids):
        raise InvalidInput("inputs and product ids differ in length")
    heads = initial_heads
    if heads is None:
        heads = _new_heads(base_embed_dim(base), config, base_logit_scale(base), seed)
    model = FashionClip(
        base,
        heads,
        unfreeze_image_blocks=config.unfreeze_image_blocks,
        unfreeze_text_blocks=config.unfreeze_text_blocks,
    )
    model.heads.requires_grad_(True)
    model.heads.train()
    device = next(model.base.parameters()).device
    batches = ProductBatches(image_product_ids, text_product_ids, config.batch_size, seed)
    groups = _param_groups(
        list(model.heads.parameters()), config.learning_rate, config.weight_decay
    ) + _param_groups(model.block_parameters(), config.block_learning_rate, config.weight_decay)
    optimizer = torch.optim.AdamW([group for group in groups if group["params"]])

    def step_loss() -> torch.Tensor:
        image_rows, text_rows = batches.next()
        pixels = torch.stack([preprocess(images[int(i)]) for i in image_rows]).to(device)
        ids = tokenizer([texts[int(i)] for i in text_rows]).to(device)
        return contrastive_loss(
            model.encode_images(pixels), model.encode_texts(ids), model.heads.logit_scale
        )

    losses = _run_steps(config, step_loss, optimizer, model.heads.logit_scale, on_step, should_stop)
    model.requires_grad_(False)
    model.eval()
    return TrainedVersion(model, losses)
