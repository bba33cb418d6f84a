"""The `generate` job: a look's images, grounded in the catalog and linked to it.

Stages: load the pipeline, the subject's LoRA and the fashion CLIP; ground the
prompt in in-stock products; generate ``candidates`` images (image i from seed
+ i); rerank them and keep the best ``num_images``; match each kept image, whole
and by garment region, to in-stock products. Discarded candidates are never
stored. Without an active fashion-CLIP version (the catalog not embedded yet)
the look is made ungrounded, kept in generation order and linked to nothing,
and the result says why. The result's ``timings`` hold the seconds each stage
took (load, grounding, generation, reranking, matching, saving).
"""

from __future__ import annotations

import io
import time
from typing import Any

from PIL import Image

from core.db.models import Lora, Output
from core.db.shop_models import ClipModel, LookItem
from core.errors import Conflict
from core.fleet.measurement import expected_peak
from core.handlers.clip_catalog import version_encoder
from core.jobs.execution import JobContext, JobResult
from core.jobs.specs import GenerationSpec, generation_spec_of
from core.metrics import LORA_CACHE
from core.ml.resident import (
    resident_catalog_index,
    resident_clip_runtime,
    resident_lora_cache,
    resident_pipeline,
)
from core.shop import look
from core.shop.catalog_index import CatalogIndex
from core.shop.grounding import GroundedPrompt
from core.shop.rerank import CandidateScores, RerankWeights
from core.subjects import get_subject, latest_lora, output_key, subject_photos

# Shares of the job's progress bar per stage (denoising dominates).
_LOAD, _GROUND, _GENERATE, _RERANK, _MATCH = 0.05, 0.02, 0.80, 0.05, 0.06


class _StageClock:
    """Wall seconds per stage, for ``result["timings"]``: a client sees only the
    job's start and end, and what shop the look costs is the stages between."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._mark = time.perf_counter()

    def lap(self, stage: str) -> None:
        """The time since the previous lap (or the start) was spent on ``stage``."""
        now = time.perf_counter()
        self.seconds[f"{stage}_s"] = now - self._mark
        self._mark = now


def _weights(ctx: JobContext) -> RerankWeights:
    s = ctx.settings
    return RerankWeights(s.rerank_prompt_weight, s.rerank_catalog_weight, s.rerank_likeness_weight)


async def _photos(ctx: JobContext, subject_id: Any) -> list[Image.Image]:
    """The subject's training crops (the face and shoulders), for likeness."""
    async with ctx.sessions() as session:
        photos = await subject_photos(session, subject_id)
    keys = [p.train_blob_key or p.blob_key for p in photos]
    return [Image.open(io.BytesIO(await ctx.store.get(key))).convert("RGB") for key in keys]


async def _ground(
    ctx: JobContext, spec: GenerationSpec, prompt: str, clip: Any, index: CatalogIndex, pipe: Any
) -> GroundedPrompt:
    query = (await ctx.compute(clip.encode_texts, [spec.prompt]))[0]

    def count_tokens(text: str) -> int:
        return len(pipe.tokenizer(text).input_ids)

    async with ctx.sessions() as session:
        return await look.ground(
            session, index, query, prompt, spec.filters, ctx.settings.grounding_products,
            count_tokens,
        )  # fmt: skip


async def _match(
    ctx: JobContext, spec: GenerationSpec, clip: Any, index: CatalogIndex, images: list[Any]
) -> list[list[look.RegionMatches]]:
    side = ctx.settings.catalog_image_side
    assert spec.products_per_image is not None
    matched = []
    for done, image in enumerate(images):
        crops = look.region_images(image, side)
        vectors = await ctx.compute(clip.encode_images, crops)
        async with ctx.sessions() as session:
            matched.append(
                await look.match(session, index, vectors, spec.filters, spec.products_per_image)
            )
        ctx.progress.step(done + 1, len(images))
    return matched


async def _subject_lora(ctx: JobContext, cache: Any, lora_row: Lora) -> Any:
    """The LoRA to generate with: from the worker's own tiers when one holds it
    (resident, host RAM, disk: the blob store is not read), else the blob's bytes,
    which the cache checks against the row's sha256 and keeps on disk."""
    from core.ml.lora_cache import LoraWeights

    local = await ctx.compute(cache.local, lora_row.sha256)
    if local is not None:
        tier = "disk" if local.from_disk else "vram" if cache.adapter_name(local.sha256) else "host"
        LORA_CACHE.labels(tier=tier, event="hit").inc()
        return local
    LORA_CACHE.labels(tier="blob", event="miss").inc()
    return LoraWeights(lora_row.sha256, await ctx.store.get(lora_row.blob_key))


async def _fashion_clip(ctx: JobContext) -> tuple[CatalogIndex | None, Any]:
    """The catalog index and the encoder of its version; (None, None) before the
    catalog was first embedded."""
    async with ctx.sessions() as session:
        index = await resident_catalog_index(ctx.settings, session)
        version = await session.get(ClipModel, index.model_id) if index else None
    if index is None or version is None:
        return None, None
    runtime = await ctx.compute(resident_clip_runtime, ctx.settings)
    return index, await version_encoder(ctx, runtime, version)


async def _rerank(
    ctx: JobContext,
    spec: GenerationSpec,
    clip: Any,
    index: CatalogIndex | None,
    pictures: list[Image.Image],
    subject_id: Any,
) -> tuple[list[int], dict[int, CandidateScores]]:
    """Which candidates to keep (best first) and every candidate's scores; in
    generation order, unscored, when there is no fashion CLIP yet."""
    if clip is None:
        return list(range(spec.num_images)), {}
    photos = await _photos(ctx, subject_id)
    scores = await ctx.compute(
        look.rerank, clip, pictures, spec.prompt, photos, index, spec.filters, _weights(ctx)
    )
    return [s.index for s in scores[: spec.num_images]], {s.index: s for s in scores}


async def _save(
    ctx: JobContext,
    subject_id: Any,
    kept: list[tuple[Any, CandidateScores | None, list[look.RegionMatches]]],
    index: CatalogIndex | None,
) -> tuple[list[Output], list[LookItem]]:
    """The kept images' blobs, and their output and look-item rows (not yet committed)."""
    job = ctx.job
    outputs: list[Output] = []
    items: list[LookItem] = []
    for position, (image, score, found) in enumerate(kept):
        key = output_key(subject_id, job.id, position)
        await ctx.put_blob(key, image.png)
        output = Output(
            job_id=job.id,
            subject_id=subject_id,
            account_id=job.account_id,
            position=position,
            blob_key=key,
            seed=image.seed,
            width=image.width,
            height=image.height,
            scores=score.as_dict() if score else None,
            candidate_rank=score.rank if score else None,
        )
        outputs.append(output)
        if index is not None:
            items += look.look_item_rows(output.id, found, index.model_id)
    return outputs, items


async def run_generation(ctx: JobContext) -> JobResult:
    from core.ml.generate import GenerateParams, generate_images, subject_prompt
    from core.ml.profiles import get_profile

    job = ctx.job
    clock = _StageClock()
    spec = generation_spec_of(job)
    profile = get_profile(spec.profile or ctx.settings.profile)
    ctx.progress.stage("loading model", start=0.0, weight=_LOAD)
    async with ctx.sessions() as session:
        subject = await get_subject(session, job.account_id, spec.subject_id)
        lora_row = await latest_lora(session, subject.id, profile.name)
    if lora_row is None:
        raise Conflict(f"subject {subject.id} has no LoRA for profile {profile.name}")
    pipe = await ctx.compute(resident_pipeline, ctx.settings, profile, expected_peak(ctx.job))
    cache = resident_lora_cache(ctx.settings, pipe, profile)
    lora = await _subject_lora(ctx, cache, lora_row)
    index, clip = await _fashion_clip(ctx)
    ctx.raise_if_stopped()
    clock.lap("load")

    prompt = subject_prompt(subject.token, subject.class_noun, spec.prompt)
    grounded = GroundedPrompt(prompt, [], 0)
    ctx.progress.stage("grounding", start=_LOAD, weight=_GROUND)
    if spec.grounding and index is not None and clip is not None:
        grounded = await _ground(ctx, spec, prompt, clip, index, pipe)
    clock.lap("grounding")
    assert spec.seed is not None and spec.candidates is not None and spec.steps is not None
    params = GenerateParams(
        prompt=grounded.prompt,
        negative_prompt=spec.negative_prompt,
        # Without a fashion CLIP there is nothing to rank candidates by.
        num_images=spec.candidates if clip is not None else spec.num_images,
        seed=spec.seed,
        steps=spec.steps,
        guidance_scale=float(spec.guidance_scale or 0.0),
        width=spec.width or profile.resolution,
        height=spec.height or profile.resolution,
        scheduler=spec.scheduler or "dpmpp_2m",
        timestep_spacing=spec.timestep_spacing,
    )
    ctx.progress.stage("generating", start=_LOAD + _GROUND, weight=_GENERATE)
    candidates = await ctx.compute(
        generate_images,
        pipe,
        # The cache is keyed by the sha recorded at training; a blob whose bytes
        # no longer match it fails the job rather than generating from them.
        lora,
        params,
        on_step=lambda done, total: ctx.progress.step(done, total),
        should_stop=ctx.stop.is_set,
        cache=cache,
    )
    pictures = [Image.open(io.BytesIO(c.png)).convert("RGB") for c in candidates]
    clock.lap("generation")
    ctx.progress.stage("reranking", start=_LOAD + _GROUND + _GENERATE, weight=_RERANK)
    kept, scores = await _rerank(ctx, spec, clip, index, pictures, subject.id)
    ctx.raise_if_stopped()
    clock.lap("reranking")
    ctx.progress.stage("matching", start=1 - _MATCH - 0.02, weight=_MATCH)
    matches = (
        await _match(ctx, spec, clip, index, [pictures[i] for i in kept])
        if clip is not None and index is not None
        else [[] for _ in kept]
    )
    clock.lap("matching")
    ctx.progress.stage("saving", start=0.98, weight=0.02)
    kept_images = [
        (candidates[i], scores.get(i), found) for i, found in zip(kept, matches, strict=True)
    ]
    outputs, items = await _save(ctx, subject.id, kept_images, index)
    clock.lap("saving")  # the blobs; the rows commit after the handler returns
    result = _result(spec, params, profile.name, lora_row, outputs, grounded, index, len(items))
    result["timings"] = clock.seconds
    keys = [o.blob_key for o in outputs]
    return JobResult(result=result, rows=[*outputs, *items], blob_keys=keys)


def _result(
    spec: GenerationSpec,
    params: Any,
    profile: str,
    lora_row: Any,
    outputs: list[Output],
    grounded: GroundedPrompt,
    index: CatalogIndex | None,
    look_items: int,
) -> dict[str, Any]:
    return {
        "output_ids": [str(o.id) for o in outputs],
        "seeds": [o.seed for o in outputs],
        "lora_id": str(lora_row.id),
        "lora_sha256": lora_row.sha256,
        "prompt": params.prompt,
        # Everything the images depend on besides the LoRA and the seeds: the same
        # values on the same device reproduce the same PNG bytes.
        "negative_prompt": params.negative_prompt,
        "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "width": params.width,
        "height": params.height,
        "scheduler": params.scheduler,
        "profile": profile,
        "candidates": params.num_images,
        "grounding": {
            "products": [
                {"product_id": p.product_id, "descriptor": p.descriptor, "score": p.score}
                for p in grounded.used
            ],
            "tokens": grounded.tokens,
        },
        "clip_model_id": str(index.model_id) if index else None,
        "look_items": look_items,
        "shop": "matched" if index else "index-not-ready: ungrounded, unmatched",
    }
