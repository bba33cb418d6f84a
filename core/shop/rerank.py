"""Keeping the best images of a look's candidates.

Each candidate gets three cosine similarities from the fashion CLIP: prompt
match (CLIP-T: the image against the user's prompt), catalog match (the image
against its best in-stock product: a look the shop can dress) and likeness (the
image against the subject's own photos: mean similarity, CLIP-I style). Their
weighted sum, weights from settings, ranks the candidates; the best
``keep`` survive, each with its scores and its rank among all candidates.
Cosine similarities of one model share a scale, so the sum needs no
normalisation per look (which would also make one look's scores meaningless
beside another's).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RerankWeights:
    prompt: float = 1.0
    catalog: float = 1.0
    likeness: float = 1.0


@dataclass(frozen=True)
class CandidateScores:
    index: int  # the candidate's position in generation order (seed = seed + index)
    prompt: float
    catalog: float
    likeness: float
    combined: float
    rank: int  # 0 = best among all candidates

    def as_dict(self) -> dict[str, float | int]:
        return {
            "prompt": round(self.prompt, 6),
            "catalog": round(self.catalog, 6),
            "likeness": round(self.likeness, 6),
            "combined": round(self.combined, 6),
            "candidates_rank": self.rank,
        }


def score_candidates(
    images: np.ndarray,
    prompt: np.ndarray,
    catalog_best: np.ndarray,
    photos: np.ndarray,
    weights: RerankWeights,
) -> list[CandidateScores]:
    """Scores of every candidate, best first.

    ``images`` [N, D] and ``photos`` [P, D] are L2-normalised embeddings,
    ``prompt`` [D] the prompt's, ``catalog_best`` [N] each candidate's best
    in-stock product similarity (0 where the catalog is empty). Ties keep
    generation order, so the same candidates always rank the same.
    """
    prompt_match = images @ prompt
    likeness = (images @ photos.T).mean(axis=1) if len(photos) else np.zeros(len(images))
    combined = (
        weights.prompt * prompt_match + weights.catalog * catalog_best + weights.likeness * likeness
    )
    order = sorted(range(len(images)), key=lambda i: (-float(combined[i]), i))
    return [
        CandidateScores(
            index=i,
            prompt=float(prompt_match[i]),
            catalog=float(catalog_best[i]),
            likeness=float(likeness[i]),
            combined=float(combined[i]),
            rank=rank,
        )
        for rank, i in enumerate(order)
    ]
