"""Subject fidelity, prompt fidelity and FID for a set of generated images.

The DreamBooth paper (Ruiz et al., 2023, Table 1) judges personalisation with:

- DINO: mean pairwise cosine similarity between the ViT-S/16 DINO [CLS]
  embeddings of every (generated, real subject photo) pair;
- CLIP-I: the same with CLIP image embeddings;
- CLIP-T: mean cosine similarity between each generated image's CLIP image
  embedding and its prompt's CLIP text embedding, the subject token replaced by
  the class noun (the rare token means nothing to CLIP).

Its Stable Diffusion row (0.668 / 0.803 / 0.305) is printed beside ours. FID
compares Inception-v3 pool3 statistics of the generated set with a reference set;
on a handful of images it is unreliable (biased upward, high variance), so the
result carries n and a warning below ``FID_MIN_RELIABLE``.

The models come from ``core.ml.eval_models``; with random weights every number
here is meaningless and the report says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from core.errors import InvalidInput
from core.ml.eval_models import MetricModels

# DreamBooth (Stable Diffusion), Table 1 of the paper.
PAPER_SD: dict[str, float] = {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}
METRICS = ("dino", "clip_i", "clip_t", "fid")
FID_MIN_RELIABLE = 50
RANDOM_WEIGHTS_WARNING = "random weights: these numbers mean nothing"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass(frozen=True)
class NamedImage:
    name: str
    image: Image.Image


def load_images(directory: Path) -> list[NamedImage]:
    """The images in ``directory`` (sorted by name), EXIF orientation applied, RGB."""
    if not directory.is_dir():
        raise InvalidInput(f"image directory not found: {directory}")
    images = []
    for path in sorted(directory.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            with Image.open(path) as raw:
                images.append(NamedImage(path.name, ImageOps.exif_transpose(raw).convert("RGB")))
    if not images:
        raise InvalidInput(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {directory}")
    return images


def clean_prompt(prompt: str, subject_token: str | None, class_noun: str) -> str:
    """The prompt as CLIP should read it: ``"a photo of sks woman"`` -> ``"a photo of woman"``,
    a bare ``"sks"`` -> the class noun."""
    text = prompt
    if subject_token:
        token = re.escape(subject_token)
        text = re.sub(rf"\b{token}\s+(?={re.escape(class_noun)}\b)", "", text)
        text = re.sub(rf"\b{token}\b", class_noun, text)
    return " ".join(text.split())


def read_prompts(spec: str, names: list[str]) -> list[str]:
    """One prompt per generated image, from ``spec``.

    ``spec`` is a file or a literal prompt. A ``.json`` file holds a list (one per
    image in name order) or an object mapping image file names to prompts; any other
    file holds one prompt per line. A single prompt applies to every image.
    """
    path = Path(spec)
    prompts: list[str]
    if path.is_file():
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict):
                missing = [n for n in names if n not in data]
                if missing:
                    raise InvalidInput(f"{path} has no prompt for {', '.join(missing)}")
                return [str(data[n]) for n in names]
            if not isinstance(data, list):
                raise InvalidInput(f"{path} must hold a list of prompts or a name -> prompt object")
            prompts = [str(p) for p in data]
        else:
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = [spec]
    if len(prompts) == 1:
        return prompts * len(names)
    if len(prompts) != len(names):
        raise InvalidInput(
            f"{len(prompts)} prompts for {len(names)} generated images: give one prompt, "
            "one per image (in file-name order), or a JSON name -> prompt object"
        )
    return prompts


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` with every row of ``b`` (float64)."""
    return _unit(a) @ _unit(b).T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The mean cosine similarity over all (row of a, row of b) pairs."""
    return float(cosine_matrix(a, b).mean())


def mean_cosine_within(a: torch.Tensor) -> float | None:
    """The mean cosine similarity over pairs of distinct rows of ``a`` (None below 2)."""
    n = a.shape[0]
    if n < 2:
        return None
    sims = cosine_matrix(a, a)
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


# --- Fréchet distance -------------------------------------------------------------


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return np.asarray((v * np.sqrt(np.clip(w, 0.0, None))) @ v.T)


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr(sqrt(sigma1 @ sigma2)) for symmetric PSD matrices.

    sigma1 @ sigma2 is not symmetric, but it has the eigenvalues of the symmetric PSD
    matrix sqrt(sigma1) @ sigma2 @ sqrt(sigma1); so two symmetric eigendecompositions
    give the trace exactly, with no complex round-off (scipy is not a dependency).
    """
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum())


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)) of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise InvalidInput("means and covariances must have matching dimensions")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the rows of ``features``."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise InvalidInput("the statistics of a feature set need at least 2 samples")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance_of_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (rows).

    With fewer samples than dimensions (a few images, 2048-d Inception features) the
    covariances are low rank: sigma_i = A_i^T A_i with A_i the centred features over
    sqrt(n_i - 1), and Tr sqrt(sigma1 sigma2) is the sum of the singular values of
    A_1 A_2^T (an n1 x n2 matrix). Otherwise the covariance route is cheaper.
    """
    a = np.asarray(f1, dtype=np.float64)
    b = np.asarray(f2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InvalidInput("feature sets must be 2-D with the same number of columns")
    if min(a.shape[0], b.shape[0]) < 2:
        raise InvalidInput("FID needs at least 2 images in each set")
    if min(a.shape[0], b.shape[0]) >= a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    ca = (a - a.mean(axis=0)) / np.sqrt(a.shape[0] - 1)
    cb = (b - b.mean(axis=0)) / np.sqrt(b.shape[0] - 1)
    diff = a.mean(axis=0) - b.mean(axis=0)
    nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + (ca * ca).sum() + (cb * cb).sum() - 2.0 * nuclear)


# --- The metrics ------------------------------------------------------------------


@dataclass
class MetricResult:
    name: str
    value: float | None
    n_generated: int
    n_reference: int
    paper_sd: float | None = None
    note: str | None = None


@dataclass
class EvaluationReport:
    metrics: list[MetricResult]
    models: dict[str, Any]
    random_weights: bool
    prompts: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def warning(self) -> str | None:
        return RANDOM_WEIGHTS_WARNING if self.random_weights else None

    def value(self, name: str) -> float | None:
        return next(m.value for m in self.metrics if m.name == name)

    def to_json(self) -> dict[str, Any]:
        return {
            "random_weights": self.random_weights,
            "warning": self.warning,
            "metrics": {m.name: asdict(m) for m in self.metrics},
            "models": self.models,
            "prompts": self.prompts,
            "notes": self.notes,
        }


def _pil(images: list[NamedImage]) -> list[Image.Image]:
    return [i.image for i in images]


def evaluate(
    models: MetricModels,
    generated: list[NamedImage],
    real: list[NamedImage],
    prompts: list[str] | None = None,
    reference: list[NamedImage] | None = None,
    metrics: tuple[str, ...] = METRICS,
) -> EvaluationReport:
    """The requested metrics of ``generated`` against the subject's ``real`` photos.

    ``prompts`` (already cleaned of the subject token, one per generated image) are
    needed for CLIP-T; FID compares with ``reference``, or with ``real`` when None.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise InvalidInput(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if not generated or not real:
        raise InvalidInput("need at least one generated image and one real photo")
    needed = {"dino": "dino", "clip_i": "clip", "clip_t": "clip", "fid": "inception"}
    models.check_weights(sorted({needed[m] for m in metrics}))
    ng, nr = len(generated), len(real)
    results: list[MetricResult] = []
    notes: list[str] = []

    if "dino" in metrics:
        dino = models.dino()
        gen = dino.embed(_pil(generated))
        ref = gen if real is generated else dino.embed(_pil(real))
        results.append(
            MetricResult("dino", mean_pairwise_cosine(gen, ref), ng, nr, PAPER_SD["dino"])
        )
        within = mean_cosine_within(ref)
        if within is not None:
            results.append(
                MetricResult(
                    "dino_real_vs_real", within, nr, nr, note="ceiling: real photos, distinct pairs"
                )
            )
    if "clip_i" in metrics or "clip_t" in metrics:
        clip = models.clip()
        gen = clip.embed_images(_pil(generated))
        if "clip_i" in metrics:
            ref = gen if real is generated else clip.embed_images(_pil(real))
            results.append(
                MetricResult("clip_i", mean_pairwise_cosine(gen, ref), ng, nr, PAPER_SD["clip_i"])
            )
            within = mean_cosine_within(ref)
            if within is not None:
                results.append(
                    MetricResult(
                        "clip_i_real_vs_real",
                        within,
                        nr,
                        nr,
                        note="ceiling: real photos, distinct pairs",
                    )
                )
        if "clip_t" in metrics:
            if prompts is None or len(prompts) != ng:
                raise InvalidInput("CLIP-T needs one prompt per generated image")
            text = clip.embed_texts(prompts)
            value = float(cosine_matrix(gen, text).diagonal().mean())
            results.append(MetricResult("clip_t", value, ng, len(set(prompts)), PAPER_SD["clip_t"]))
    if "fid" in metrics:
        ref_images = reference if reference is not None else real
        inception = models.inception()
        nref = len(ref_images)
        if min(ng, nref) < 2:
            results.append(
                MetricResult("fid", None, ng, nref, note="needs at least 2 images per set")
            )
        else:
            gen = inception.embed(_pil(generated))
            ref = gen if ref_images is generated else inception.embed(_pil(ref_images))
            value = frechet_distance_of_features(gen.numpy(), ref.numpy())
            note = None
            if min(ng, nref) < FID_MIN_RELIABLE:
                note = (
                    f"n < {FID_MIN_RELIABLE}: unreliable (biased upward); compare only at equal n"
                )
            results.append(MetricResult("fid", value, ng, nref, note=note))
        notes.append(
            "FID uses torchvision's Inception-v3 architecture; published FIDs use the TF-ported "
            "Inception (pytorch-fid / clean-fid), so compare these FIDs only with each other"
        )
    if models.random_weights:
        notes.insert(0, RANDOM_WEIGHTS_WARNING)
    return EvaluationReport(results, models.describe(), models.random_weights, prompts or [], notes)
