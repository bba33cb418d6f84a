"""The subjects of one DreamBooth run: one, or several people each bound to a token.

A run trains on one or more ``InstanceSet``s (a person's photos and the instance
prompt naming their token and class noun, "a photo of pgh man"), each with the
prior preservation of its class noun: class images drawn from "a photo of a man",
shared by every subject of that noun. A run of N subjects takes N times the
optimizer steps of one (``TrainParams.total_steps``), so each subject gets a
single-subject run's budget, and batch ``b`` (1-based, counting the
``gradient_accumulation_steps`` batches of every optimizer step) trains subject
``(b - 1) % N``: every subject gets exactly the same number of batches, the order
follows from the batch number alone, so a resumed run picks up where it left, and
one subject draws nothing more than a single-subject run always did (the same seed
still gives the same LoRA).

The text conditioning has one row per instance prompt, then one per distinct class
prompt; a step selects its subject's row and its class's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from core.errors import InvalidInput
from core.ml.families import PromptEmbeddings
from core.ml.train_data import Example, LatentViews, encode_views, sample_example
from core.ml.train_state import fingerprint

if TYPE_CHECKING:
    from core.ml.families import Pipeline


@dataclass(frozen=True)
class PriorPreservation:
    """DreamBooth's class images and the prompt they were generated from."""

    images: list[Image.Image]
    prompt: str


@dataclass(frozen=True)
class InstanceSet:
    """One subject of a run: its photos, its instance prompt and, with prior
    preservation, the class images of its noun (the same object, or an equal one,
    for every subject of that noun)."""

    photos: list[Image.Image]
    prompt: str
    prior: PriorPreservation | None = None


@dataclass(frozen=True)
class SubjectViews:
    """The latent views of every subject and every distinct class of a run."""

    instances: list[LatentViews]
    classes: list[LatentViews]  # one per distinct class prompt
    class_of: list[int | None]  # each subject's index into ``classes``

    def batch(self, batch: int, generator: torch.Generator) -> tuple[list[Example], list[int]]:
        """Batch ``batch``'s (1-based) examples: one of its subject, then, with prior
        preservation, one of its class; and the prompt row of each."""
        subject = (batch - 1) % len(self.instances)
        examples = [sample_example(self.instances[subject], generator)]
        rows = [subject]
        noun = self.class_of[subject]
        if noun is not None:
            examples.append(sample_example(self.classes[noun], generator))
            rows.append(len(self.instances) + noun)
        return examples, rows


def distinct_priors(subjects: list[InstanceSet]) -> list[PriorPreservation]:
    """The class image sets of a run, one per class prompt, in first-use order."""
    priors: dict[str, PriorPreservation] = {}
    for subject in subjects:
        prior = subject.prior
        if prior is None:
            continue
        known = priors.setdefault(prior.prompt, prior)
        # Two sets under one prompt would make "the class of a subject" ambiguous.
        if known is not prior and known.images != prior.images:
            raise InvalidInput(f"two different class image sets for {prior.prompt!r}")
    return list(priors.values())


def check_subjects(subjects: list[InstanceSet]) -> None:
    if not subjects:
        raise InvalidInput("training needs at least one subject")
    if any(not subject.photos for subject in subjects):
        raise InvalidInput("training needs at least one photo")
    if len({subject.prompt for subject in subjects}) != len(subjects):
        # Same prompt, same token: the run could not tell those people apart.
        raise InvalidInput("each subject of a run needs its own instance prompt")
    if len({subject.prior is None for subject in subjects}) > 1:
        raise InvalidInput("prior preservation is for every subject of a run or for none")
    if any(subject.prior is not None and not subject.prior.images for subject in subjects):
        raise InvalidInput("prior preservation needs at least one class image")
    distinct_priors(subjects)


def prompts(subjects: list[InstanceSet]) -> list[str]:
    """The rows of the run's text conditioning: instance prompts, then class prompts."""
    return [s.prompt for s in subjects] + [p.prompt for p in distinct_priors(subjects)]


def encode_subjects(
    pipe: Pipeline,
    subjects: list[InstanceSet],
    resolution: int,
    crop_jitter: float,
    flip: bool = False,
) -> SubjectViews:
    def encode(images: list[Image.Image]) -> LatentViews:
        return encode_views(pipe, images, resolution, crop_jitter, flip)

    instances = [encode(s.photos) for s in subjects]
    priors = distinct_priors(subjects)
    classes = [encode(p.images) for p in priors]
    index = {prior.prompt: i for i, prior in enumerate(priors)}
    class_of = [None if s.prior is None else index[s.prior.prompt] for s in subjects]
    return SubjectViews(instances, classes, class_of)


def select_rows(embeddings: PromptEmbeddings, rows: list[int]) -> PromptEmbeddings:
    """The conditioning of a step's examples out of the run's precomputed prompts."""
    pooled = None if embeddings.pooled is None else embeddings.pooled[rows]
    return PromptEmbeddings(embeddings.hidden[rows], pooled)


def subjects_fingerprint(params: Any, subjects: list[InstanceSet], ignore: frozenset[str]) -> str:
    """What a checkpoint must have been trained on to resume this run: every
    subject's photos and prompt, every class's images and prompt. One subject
    hashes exactly as single-subject runs always have, so their checkpoints stay
    resumable."""
    if len(subjects) == 1:
        (only,) = subjects
        prior = only.prior
        texts = [only.prompt, prior.prompt if prior else ""]
        images = only.photos + (prior.images if prior else [])
        return fingerprint(params, texts, images, {"prior": prior is not None}, ignore)
    priors = distinct_priors(subjects)
    images = [photo for s in subjects for photo in s.photos]
    images += [image for p in priors for image in p.images]
    # Set sizes too: the same images cut into sets differently are another run.
    extra = {
        "prior": bool(priors),
        "photos": [len(s.photos) for s in subjects],
        "class_images": [len(p.images) for p in priors],
    }
    return fingerprint(params, prompts(subjects), images, extra, ignore)
