"""The `generate` job: the subject's LoRA + a prompt in, N images with their seeds out."""

from __future__ import annotations

from core.db.models import Output
from core.errors import Conflict
from core.execution import JobContext, JobResult
from core.ml_runtime import resident_pipeline
from core.subjects import get_subject, latest_lora, output_key

_LOAD, _GENERATE = 0.05, 0.90


async def run_generation(ctx: JobContext) -> JobResult:
    from core.ml.generate import GenerateParams, generate_images, subject_prompt
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
    ctx.raise_if_stopped()

    params = GenerateParams(
        prompt=subject_prompt(subject.token, subject.class_noun, p["prompt"]),
        negative_prompt=p.get("negative_prompt") or "",
        num_images=int(p["num_images"]),
        seed=int(p["seed"]),
        steps=int(p.get("steps") or profile.inference_steps),
        guidance_scale=float(p.get("guidance_scale") or profile.guidance_scale),
        width=profile.resolution,
        height=profile.resolution,
    )
    ctx.progress.stage("generating", start=_LOAD, weight=_GENERATE)
    images = await ctx.compute(
        generate_images,
        pipe,
        lora,
        params,
        on_step=lambda done, total: ctx.progress.step(done, total),
        should_stop=ctx.stop.is_set,
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
        "prompt": params.prompt,
    }
    return JobResult(result=result, rows=list(rows), blob_keys=[r.blob_key for r in rows])
