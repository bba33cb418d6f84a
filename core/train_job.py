"""The `train` job: the subject's photos in, a DreamBooth-LoRA in the blob store out."""

from __future__ import annotations

import hashlib
import io

from PIL import Image

from core.db.models import Lora
from core.execution import JobContext, JobResult
from core.ml_runtime import resident_pipeline
from core.subjects import get_subject, lora_key, subject_photos

# Share of the job's progress each stage is worth.
_LOAD, _TRAIN = 0.05, 0.90


async def run_training(ctx: JobContext) -> JobResult:
    from core.ml.generate import instance_prompt
    from core.ml.profiles import get_profile
    from core.ml.train import TrainParams, train_dreambooth_lora

    job = ctx.job
    assert job.subject_id is not None
    profile = get_profile(job.params["profile"])
    steps = int(job.params.get("steps") or ctx.settings.train_steps or profile.train_steps)
    ctx.progress.stage("loading photos and model", start=0.0, weight=_LOAD)
    async with ctx.sessions() as session:
        subject = await get_subject(session, job.account_id, job.subject_id)
        photo_rows = await subject_photos(session, subject.id)
    photos = [
        Image.open(io.BytesIO(await ctx.store.get(p.blob_key))).convert("RGB") for p in photo_rows
    ]
    pipe = await ctx.compute(resident_pipeline, ctx.settings, profile)
    ctx.raise_if_stopped()

    params = TrainParams(
        steps=steps,
        learning_rate=profile.learning_rate,
        rank=profile.lora_rank,
        alpha=profile.lora_alpha,
        target_modules=profile.lora_target_modules,
        resolution=profile.resolution,
        seed=job.attempts,
    )
    ctx.progress.stage("training", start=_LOAD, weight=_TRAIN)
    losses: list[float] = []

    def on_step(step: int, total: int, loss: float) -> None:
        losses.append(loss)
        ctx.progress.step(step, total, loss=loss)

    lora = await ctx.compute(
        train_dreambooth_lora,
        pipe,
        photos,
        instance_prompt(subject.token, subject.class_noun),
        params,
        on_step=on_step,
        should_stop=ctx.stop.is_set,
    )
    ctx.progress.stage("saving", start=_LOAD + _TRAIN, weight=1 - _LOAD - _TRAIN)
    key = lora_key(subject.id, profile.name, job.id)
    await ctx.put_blob(key, lora)
    row = Lora(
        subject_id=subject.id,
        job_id=job.id,
        profile=profile.name,
        rank=profile.lora_rank,
        steps=steps,
        blob_key=key,
        bytes=len(lora),
        sha256=hashlib.sha256(lora).hexdigest(),
    )
    result = {"lora_id": str(row.id), "steps": steps, "final_loss": losses[-1] if losses else None}
    return JobResult(result=result, rows=[row], blob_keys=[key])
