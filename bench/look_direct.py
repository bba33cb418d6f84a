"""bench.look_tiny's direct side: a look's work with core's functions called in
this process, none of the service around them.

The same work as the stack's train and generate jobs (``core.handlers.train``,
``core.handlers.generate``), stage for stage and with the same functions and
settings: training planned by ``plan_training`` (prior preservation on the
profile's class images, resumable checkpoints at its cadence, each
``TrainState.to_bytes`` put atomically into a local ``LocalBlobStore``);
grounding, candidates, reranking and matching through ``core.shop.look`` over
the active fashion-CLIP version's catalog index, loaded once and held in
memory. The Postgres stock re-checks of grounding and matching are part of
those functions, so this side makes them too. What it leaves out is the
service: no job rows, heartbeats, queue, scheduler, HTTP, stored outputs.

Class images are made once, up front (``prepare_class_images``), through
``cached_class_images`` as the stack makes them once per profile and noun, and
kept in the store between runs as the stack's are; every look then reads them
back from the store, as a train job does.

Each look also says what work it did (``LookWork``: steps, class images,
candidates, what grounded it, what it kept and matched) in the terms the stack's
job results use, so the benchmark can check the two sides did the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image

from core.blobs.store import LocalBlobStore, blob_store_from_settings
from core.db.engine import make_engine, make_sessionmaker
from core.db.shop_models import ClipModel
from core.handlers.train import ClassImageSet, TrainPlan, cached_class_images, plan_training
from core.jobs.specs import GenerationSpec
from core.ml.class_images import class_image_recipe, class_prompt, generate_class_images
from core.ml.generate import GenerateParams, generate_images, instance_prompt, subject_prompt
from core.ml.lora_cache import LoraWeights
from core.ml.profiles import Profile, get_profile
from core.ml.resident import (
    forget_resident_loras,
    resident_checkpoint_identity,
    resident_clip_runtime,
    resident_lora_cache,
    resident_pipeline,
)
from core.ml.train import InstanceSet, PriorPreservation, subjects_run_fingerprint, train_subjects
from core.photos import PhotoLimits, normalize_photo
from core.settings import Settings
from core.shop import look
from core.shop.catalog_index import CatalogIndex, load_index
from core.shop.grounding import GroundedPrompt
from core.shop.rerank import RerankWeights

T = TypeVar("T")
# The train job's seed is its attempt number: 1 on a first attempt.
FIRST_ATTEMPT = 1
CHECKPOINT_KEY = "checkpoints/direct/latest"


def _decode(png: bytes) -> Image.Image:
    return Image.open(io.BytesIO(png)).convert("RGB")


@dataclass(frozen=True)
class LookWork:
    """What one look did, as the stack's train and generate results record it."""

    steps: int
    prior_preservation: bool
    class_images: int
    candidates: int
    kept: int
    grounded: tuple[str, ...]  # the product ids whose descriptors made the prompt
    prompt: str  # the grounded prompt the candidates came from
    look_items: int  # (kept image, region, product) links
    # Equal on both sides only when training is bitwise reproducible across processes.
    lora_sha256: str
    seeds: tuple[int, ...]  # the kept images', in rank order


class DirectLook:
    """One process's pipeline, fashion CLIP and catalog index, and a look over them."""

    def __init__(
        self, settings: Settings, photos: list[Path], class_noun: str, store_dir: Path
    ) -> None:
        """``store_dir``: the local blob store's root, on the stack's disk so that
        checkpoint writes cost the same; it keeps the class images between runs,
        as the stack's store does."""
        self.settings = settings
        self.profile: Profile = get_profile(settings.profile)
        self.class_noun = class_noun
        # One event loop for every database call, so the pool's connections live on.
        self.runner = asyncio.Runner()
        self.engine = make_engine(settings)
        self.sessions = make_sessionmaker(self.engine)
        self.store = LocalBlobStore(store_dir)
        limits = PhotoLimits.from_settings(settings)
        # The upload's face-centred training crops, which train and rerank read.
        self.crops = [normalize_photo(p.read_bytes(), p.name, limits).train_data for p in photos]
        if settings.torch_threads:  # as the worker sets it before loading its models
            torch.set_num_threads(settings.torch_threads)
        self.pipe = resident_pipeline(settings, self.profile)
        self.index: CatalogIndex | None = None
        self.clip: Any = None
        self.checkpoints_written = 0  # over every look, for the report

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.runner.run(coroutine)

    def close(self) -> None:
        self._run(self.engine.dispose())
        self.runner.close()

    # --- once, up front ---------------------------------------------------------------

    def load_catalog(self) -> uuid.UUID:
        """The active version's index and encoder, held from now on; its id."""
        self.index, version = self._run(self._active_version())
        state = self._run(blob_store_from_settings(self.settings).get(version.blob_key)) if (
            version.blob_key
        ) else None  # fmt: skip
        runtime = resident_clip_runtime(self.settings)
        self.clip = runtime.version_encoder(version.id, state, version.config)
        return version.id

    async def _active_version(self) -> tuple[CatalogIndex, ClipModel]:
        async with self.sessions() as session:
            index = await load_index(session, self.settings.clip_profile)
            version = await session.get(ClipModel, index.model_id) if index else None
        if index is None or version is None:
            raise SystemExit("no active fashion-CLIP version: the catalog is not embedded")
        return index, version

    def _class_images(self) -> list[bytes]:
        # How many the profile and settings ask for (0 without prior preservation).
        count = plan_training(self.profile, self.settings, 1, FIRST_ATTEMPT).class_images

        async def make(index: int) -> bytes:
            pngs = generate_class_images(
                self.pipe, self.profile, self.class_noun, [index], lambda: False
            )
            return pngs[0]

        checkpoint = resident_checkpoint_identity(self.settings, self.profile)
        recipe = class_image_recipe(self.profile, self.class_noun, checkpoint)
        images = ClassImageSet(self.profile.name, self.class_noun, recipe)
        return self._run(cached_class_images(self.store, images, count, make))

    def prepare_class_images(self) -> tuple[int, float]:
        """Make the class images into the local store: (how many, seconds)."""
        started = time.perf_counter()
        made = self._class_images()
        return len(made), time.perf_counter() - started

    # --- a look -------------------------------------------------------------------------

    def look(
        self, token: str, prompt: str, steps: int, seed: int
    ) -> tuple[dict[str, float], LookWork]:
        """Train on the photos, then the look: seconds per stage and in all, and
        what was done."""
        times: dict[str, float] = {}
        started = time.perf_counter()
        plan = plan_training(self.profile, self.settings, steps, seed=FIRST_ATTEMPT)
        lora = self._train(token, plan)
        times["train_s"] = time.perf_counter() - started
        spec = GenerationSpec(subject_id=uuid.uuid4(), prompt=prompt, seed=seed).resolve(
            self.settings
        )
        mark = time.perf_counter()
        grounded = self._ground(spec, token)
        times["grounding_s"], mark = time.perf_counter() - mark, time.perf_counter()
        pictures = self._generate(spec, grounded, lora)
        times["generation_s"], mark = time.perf_counter() - mark, time.perf_counter()
        kept = self._rerank(spec, pictures)
        times["reranking_s"], mark = time.perf_counter() - mark, time.perf_counter()
        look_items = self._match(spec, [pictures[i] for i in kept])
        times["matching_s"] = time.perf_counter() - mark
        times["look_s"] = time.perf_counter() - started
        assert spec.seed is not None and spec.candidates is not None
        work = LookWork(
            steps=plan.params.steps,
            prior_preservation=plan.class_images > 0,
            class_images=plan.class_images,
            candidates=len(pictures),
            kept=len(kept),
            grounded=tuple(p.product_id for p in grounded.used),
            prompt=grounded.prompt,
            look_items=look_items,
            lora_sha256=lora.sha256,
            seeds=tuple(spec.seed + i for i in kept),
        )
        return times, work

    def _train(self, token: str, plan: TrainPlan) -> LoraWeights:
        photos = [_decode(png) for png in self.crops]
        prior = None
        if plan.class_images:  # read back from the store, as every train job does
            images = [_decode(png) for png in self._class_images()]
            prior = PriorPreservation(images, class_prompt(self.class_noun))
        sets = [InstanceSet(photos, instance_prompt(token, self.class_noun), prior)]
        subjects_run_fingerprint(plan.params, sets)  # what a resume is checked against

        def write_checkpoint(state: Any) -> None:
            self._run(self.store.put(CHECKPOINT_KEY, state.to_bytes()))
            self.checkpoints_written += 1

        forget_resident_loras(self.pipe)
        lora = train_subjects(
            self.pipe,
            sets,
            plan.params,
            on_step=lambda *_: None,
            should_stop=lambda: False,
            on_checkpoint=write_checkpoint,
            checkpoint_every=plan.checkpoint_every,
        )
        self._run(self.store.delete_prefix("checkpoints/direct"))  # as a finished job does
        return LoraWeights(hashlib.sha256(lora).hexdigest(), lora)

    def _ground(self, spec: GenerationSpec, token: str) -> GroundedPrompt:
        prompt = subject_prompt(token, self.class_noun, spec.prompt)
        if not spec.grounding:
            return GroundedPrompt(prompt, [], 0)
        query = self.clip.encode_texts([spec.prompt])[0]

        def count_tokens(text: str) -> int:
            return len(self.pipe.tokenizer(text).input_ids)

        async def ground() -> GroundedPrompt:
            assert self.index is not None
            async with self.sessions() as session:
                return await look.ground(
                    session, self.index, query, prompt, spec.filters,
                    self.settings.grounding_products, count_tokens,
                )  # fmt: skip

        return self._run(ground())

    def _generate(
        self, spec: GenerationSpec, grounded: GroundedPrompt, lora: LoraWeights
    ) -> list[Image.Image]:
        assert spec.seed is not None and spec.candidates is not None and spec.steps is not None
        params = GenerateParams(
            prompt=grounded.prompt,
            negative_prompt=spec.negative_prompt,
            num_images=spec.candidates,
            seed=spec.seed,
            steps=spec.steps,
            guidance_scale=float(spec.guidance_scale or 0.0),
            width=spec.width or self.profile.resolution,
            height=spec.height or self.profile.resolution,
            scheduler=spec.scheduler or "dpmpp_2m",
            timestep_spacing=spec.timestep_spacing,
        )
        cache = resident_lora_cache(self.settings, self.pipe, self.profile)
        candidates = generate_images(
            self.pipe, lora, params, lambda *_: None, lambda: False, cache=cache
        )
        return [_decode(c.png) for c in candidates]

    def _rerank(self, spec: GenerationSpec, pictures: list[Image.Image]) -> list[int]:
        s = self.settings
        weights = RerankWeights(
            s.rerank_prompt_weight, s.rerank_catalog_weight, s.rerank_likeness_weight
        )
        photos = [_decode(png) for png in self.crops]
        scores = look.rerank(
            self.clip, pictures, spec.prompt, photos, self.index, spec.filters, weights
        )
        return [score.index for score in scores[: spec.num_images]]

    def _match(self, spec: GenerationSpec, images: list[Image.Image]) -> int:
        """Every kept image's products, whole and by region; how many links."""
        assert spec.products_per_image is not None and self.index is not None
        index, k = self.index, spec.products_per_image
        links = 0
        for image in images:
            vectors = self.clip.encode_images(
                look.region_images(image, self.settings.catalog_image_side)
            )

            async def match(vectors: Any = vectors) -> list[look.RegionMatches]:
                async with self.sessions() as session:
                    return await look.match(session, index, vectors, spec.filters, k)

            links += sum(len(found.hits) for found in self._run(match()))
        return links
