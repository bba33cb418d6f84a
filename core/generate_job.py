"""The `generate` job: the subject's LoRA + a prompt in, N images with their seeds out."""

from __future__ import annotations

from core.db.models import Output
from core.errors import Conflict
from core.execution import JobContext, JobResult
from core.ml_runtime import resident_lora_cache, resident_pipeline
from core.subjects import get_subject, latest_lora, output_key

_LOAD, _GENERATE = 0.05, 0.90


async def run_generation(ctx: JobContext) -> JobResult:
    from core.ml.generate import DEFAULT_SCHEDULER, GenerateParams, generate_images, subject_prompt
    from core.ml.lora_cache import LoraWeights
    from core.ml.profiles import get_profile

    job = ctx.job
    assert job.subject_id is not None
    p = job.params
    profile = get_profile(p["profile"])
    ctx.progress.stage("loading model", start=0.0, weight=_LOAD)
    async with ctx.sessions() as session:
        subject = await get_subject(session, job.account_id, job.subject_id)
        lora_row = await latest_lora(session, subject.id, profile.name)
    if lora_row is None:
        raise Conflict(f"subject {subject.id} has no LoRA for profile {profile.name}")
    lora = await ctx.store.get(lora_row.blob_key)
    pipe = await ctx.compute(resident_pipeline, ctx.settings, profile)
    cache = resident_lora_cache(ctx.settings, pipe, profile)
    ctx.raise_if_stopped()

    # Jobs created before width/height/scheduler existed lack them: the defaults.
    params = GenerateParams(
        prompt=subject_prompt(subject.token, subject.class_noun, p["prompt"]),
        negative_prompt=p.get("negative_prompt") or "",
        num_images=int(p["num_images"]),
        seed=int(p["seed"]),
        steps=int(p.get("steps") or profile.inference_steps),
        guidance_scale=float(
            profile.guidance_scale if p.get("guidance_scale") is None else p["guidance_scale"]
        ),
        width=int(p.get("width") or profile.resolution),
        height=int(p.get("height") or profile.resolution),
        scheduler=p.get("scheduler") or DEFAULT_SCHEDULER,
    )
    ctx.progress.stage("generating", start=_LOAD, weight=_GENERATE)
    images = await ctx.compute(
        generate_images,
        pipe,
        # The cache is keyed by the sha recorded at training; a blob whose bytes
        # no longer match it fails the job rather than generating from them.
        LoraWeights(lora_row.sha256, lora),
        params,
        on_step=lambda done, total: ctx.progress.step(done, total),
        should_stop=ctx.stop.is_set,
        cache=cache,
    )
    ctx.progress.stage("saving", start=_LOAD + _GENERATE, weight=1 - _LOAD - _GENERATE)
    rows = []
    for position, image in enumerate(images):
        key = output_key(subject.id, job.id, position)
        await ctx.put_blob(key, image.png)
        rows.append(
            Output(
                job_id=job.id,
                subject_id=subject.id,
                account_id=job.account_id,
                position=position,
                blob_key=key,
                seed=image.seed,
                width=image.width,
                height=image.height,
            )
        )
    result = {
        "output_ids": [str(r.id) for r in rows],
        "seeds": [r.seed for r in rows],
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
        "profile": profile.name,
    }
    return JobResult(result=result, rows=list(rows), blob_keys=[r.blob_key for r in rows])
