"""Grounding a look in the catalog: in-stock products' descriptors added to the prompt.

The prompt is matched to the catalog first (text to product, available items
only, the request's filters); the best matches' descriptors then follow the
prompt, "..., wearing a red silk dress by Valentino and black leather boots by
Prada", so the images show clothes the shop sells today. The text encoder reads
77 tokens at most (start and end included) and cuts the rest silently, so a
descriptor is added only while the whole prompt still fits: the user's words
and the subject's token always survive, and no descriptor is cut in half.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# CLIP's text encoders (SD 1.x, SDXL) read 77 positions, 2 of them start and end.
TEXT_ENCODER_TOKENS = 77


@dataclass(frozen=True)
class GroundingProduct:
    product_id: str
    designer: str
    name: str
    score: float

    @property
    def descriptor(self) -> str:
        """ "red silk dress by Valentino": the product's name as a garment, then its maker."""
        name = " ".join(self.name.split()).lower()
        return f"{name} by {self.designer}" if self.designer else name


@dataclass(frozen=True)
class GroundedPrompt:
    prompt: str
    used: list[GroundingProduct]  # the products whose descriptors made it in
    tokens: int  # the prompt's length in tokens, start and end included


def enrich_prompt(
    prompt: str,
    products: Sequence[GroundingProduct],
    count_tokens: Callable[[str], int],
    max_tokens: int = TEXT_ENCODER_TOKENS,
) -> GroundedPrompt:
    """``prompt`` with as many of ``products``' descriptors, best first, as fit.

    ``count_tokens`` counts a text's tokens as the pipeline's tokenizer does
    (start and end included). A descriptor that does not fit is skipped and a
    shorter later one may still go in; the prompt alone is returned unchanged
    even when it is itself too long (the encoder cuts it, as it would anyway).
    """
    used: list[GroundingProduct] = []
    text = prompt
    tokens = count_tokens(text)
    for product in products:
        candidate = _join(prompt, [*used, product])
        length = count_tokens(candidate)
        if length <= max_tokens:
            used.append(product)
            text, tokens = candidate, length
    return GroundedPrompt(text, used, tokens)


def _join(prompt: str, products: Sequence[GroundingProduct]) -> str:
    if not products:
        return prompt
    wearing = " and ".join(p.descriptor for p in products)
    return f"{prompt}, wearing {wearing}"
