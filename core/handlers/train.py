"""The `train` job: the subject's photos in, a DreamBooth-LoRA in the blob store out.

A job whose params list ``subject_ids`` (a request ``with_subjects``) trains one
LoRA on all of them, each bound to its own token, with the class images of each
one's noun; every subject gets a ``lora`` row and its own copy of the file under
its prefix, ``trained_with`` naming the whole run (see ``core.subjects``).

Besides the LoRA, training keeps two kinds of blobs:

- **class images** for prior preservation,
  ``class_images/<profile>/<noun>/<recipe>/<i>.png``: drawn by the base model from
  "a photo of a <noun>" the first time a profile trains that noun, then shared by
  every later job. ``<recipe>`` digests the checkpoint's contents and every
  sampler setting (``core.ml.class_images.class_image_recipe``), so another
  checkpoint or sampler makes a new set instead of reusing the old one. They hold
  nothing of any user, so they live outside ``subjects/`` and survive subject
  erasure.
- **checkpoints**, ``subjects/<subject>/checkpoints/<job>/latest`` (the job's own
  subject, the first of a run of several): a resumable
  training state (``core.ml.train_state``) written every ``checkpoint_every``
  steps, one atomic put each. A retried attempt of the job (worker killed,
  handed back on SIGTERM, reaped) resumes from it and still ends at the same
  total number of steps. It is deleted when the job succeeds or is canceled; a
  job that fails for good leaves it until its subject is erased.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image

from core.blobs.store import BlobNotFound, BlobStore
from core.db.models import Job, Lora, Subject
from core.errors import Canceled
from core.fleet.measurement import expected_peak
from core.jobs.execution import JobContext, JobResult
from core.jobs.specs import TrainSpec
from core.ml.resident import (
    forget_resident_loras,
    pin_lora,
    resident_checkpoint_identity,
    resident_lora_cache,
    resident_pipeline,
)
from core.subjects import checkpoint_prefix, get_subject, lora_key, subject_photos

if TYPE_CHECKING:
    from core.ml.profiles import Profile
    from core.ml.train import InstanceSet, PriorPreservation, TrainParams
    from core.ml.train_state import TrainState
    from core.settings import Settings

log = logging.getLogger("atelier.jobs.train")

# Share of the job's progress each stage is worth.
_LOAD, _CLASS, _TRAIN = 0.05, 0.10, 0.80
# How long the training thread waits for a checkpoint write before going on without it.
CHECKPOINT_WRITE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ClassImageSet:
    """Where one noun's class images of one recipe live in the blob store."""

    profile: str
    class_noun: str
    recipe: str  # core.ml.class_images.class_image_recipe

    def key(self, index: int) -> str:
        noun = self.class_noun.replace(" ", "-")
        return f"class_images/{self.profile}/{noun}/{self.recipe}/{index}.png"


def checkpoint_key(subject_id: uuid.UUID, job_id: uuid.UUID) -> str:
    return f"{checkpoint_prefix(subject_id, job_id)}/latest"


@dataclass(frozen=True)
class TrainPlan:
    """A job's training recipe: the profile's, with the settings' overrides."""

    params: TrainParams
    class_images: int  # 0 = no prior preservation
    checkpoint_every: int  # 0 = no checkpoints


def plan_training(profile: Profile, settings: Settings, steps: int, seed: int) -> TrainPlan:
    from core.ml.train import TrainParams

    def pick(override: Any, default: Any) -> Any:
        return default if override is None else override

    params = TrainParams.from_profile(profile, steps=steps, seed=seed)
    weight = pick(settings.prior_loss_weight, profile.prior_loss_weight)
    prior = pick(settings.prior_preservation, profile.prior_preservation)
    return TrainPlan(
        params=replace(params, prior_loss_weight=weight),
        class_images=pick(settings.class_images, profile.class_images) if prior else 0,
        checkpoint_every=pick(settings.checkpoint_every, profile.checkpoint_every),
    )


async def cached_class_images(
    store: BlobStore,
    images: ClassImageSet,
    count: int,
    make: Callable[[int], Awaitable[bytes]],
    on_made: Callable[[int, int], None] = lambda _done, _total: None,
) -> list[bytes]:
    """Class images 0..count-1 of the set from the blob store, making (and
    storing) only the missing ones. ``make(i)`` returns image i's PNG; it is
    deterministic, so two workers filling the same gap store the same bytes."""
    found: dict[int, bytes] = {}
    for index in range(count):
        try:
            found[index] = await store.get(images.key(index))
        except BlobNotFound:
            pass
    missing = [index for index in range(count) if index not in found]
    for done, index in enumerate(missing, start=1):
        found[index] = await make(index)
        # Stored one by one: a worker that dies midway keeps what it made.
        await store.put(images.key(index), found[index])
        on_made(done, len(missing))
    return [found[index] for index in range(count)]


async def _class_images(
    ctx: JobContext,
    pipe: Any,
    profile: Profile,
    class_noun: str,
    count: int,
    progress: tuple[float, float] = (_LOAD, _CLASS),
) -> PriorPreservation:
    """The noun's class images, reporting within ``progress`` (start, weight)."""
    from core.ml.class_images import class_image_recipe, class_prompt, generate_class_images
    from core.ml.train import PriorPreservation

    async def make(index: int) -> bytes:
        ctx.raise_if_stopped()
        pngs = await ctx.compute(
            generate_class_images, pipe, profile, class_noun, [index], ctx.stop.is_set
        )
        return pngs[0]

    ctx.progress.stage("preparing class images", start=progress[0], weight=progress[1])
    checkpoint = await asyncio.to_thread(resident_checkpoint_identity, ctx.settings, profile)
    recipe = class_image_recipe(profile, class_noun, checkpoint)
    cached = ClassImageSet(profile.name, class_noun, recipe)
    pngs = await cached_class_images(
        ctx.store, cached, count, make, lambda d, t: ctx.progress.step(d, t)
    )
    images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
    return PriorPreservation(images, class_prompt(class_noun))


async def _checkpoint_to_resume(ctx: JobContext, key: str, expected: str) -> TrainState | None:
    """The job's last checkpoint when it belongs to this very run, else None."""
    from core.ml.train_state import TrainState

    try:
        data = await ctx.store.get(key)
    except BlobNotFound:
        return None
    try:
        state = await asyncio.to_thread(TrainState.from_bytes, data)
    except ValueError as error:
        log.warning("job %s: ignoring checkpoint %s: %s", ctx.job.id, key, error)
        return None
    if state.fingerprint != expected:
        log.warning("job %s: checkpoint %s is from another recipe: starting over", ctx.job.id, key)
        return None
    log.info("job %s: resuming from step %d of %d", ctx.job.id, state.step, state.total)
    return state


def _checkpoint_writer(
    ctx: JobContext, key: str, loop: asyncio.AbstractEventLoop
) -> Callable[[TrainState], None]:
    """``on_checkpoint`` for the training thread: put the state with the event
    loop's store and wait for it; a failed write costs only the steps since the
    previous checkpoint, so training goes on."""

    def write(state: TrainState) -> None:
        if ctx.stop.is_set() and not ctx.yielding:
            # The attempt is ending (canceled, taken, worker stopping, its loop maybe
            # with it): the previous checkpoint stands. Yielding to a look is the
            # exception: that checkpoint is where the job resumes.
            return
        put = ctx.store.put(key, state.to_bytes())
        try:
            future = asyncio.run_coroutine_threadsafe(put, loop)
        except RuntimeError:  # the loop is closed
            put.close()
            log.warning("job %s: checkpoint at step %d not written", ctx.job.id, state.step)
            return
        try:
            future.result(timeout=CHECKPOINT_WRITE_TIMEOUT_S)
        except Exception:  # timeout, storage error
            future.cancel()
            log.warning(
                "job %s: checkpoint at step %d not written", ctx.job.id, state.step, exc_info=True
            )

    return write


async def _cancel_requested(ctx: JobContext) -> bool:
    async with ctx.sessions() as session:
        row = await session.get(Job, ctx.job.id)
    return row is None or row.cancel_requested


def run_subject_ids(job: Job) -> list[uuid.UUID]:
    """The subjects a training job learns, its own first."""
    assert job.subject_id is not None
    return TrainSpec.of_job(job).run_subject_ids(job.subject_id)


async def _photos(ctx: JobContext, subject: Subject) -> list[Image.Image]:
    async with ctx.sessions() as session:
        rows = await subject_photos(session, subject.id)
    photos = []
    for row in rows:
        # The face-centred training crop where the photo has one.
        key = getattr(row, "train_blob_key", None) or row.blob_key
        photos.append(Image.open(io.BytesIO(await ctx.store.get(key))).convert("RGB"))
    return photos


async def _load_subjects(ctx: JobContext) -> list[tuple[Subject, list[Image.Image]]]:
    """Every subject of the run with its photos; one erased meanwhile fails the job."""
    job = ctx.job
    async with ctx.sessions() as session:
        subjects = [
            await get_subject(session, job.account_id, subject_id)
            for subject_id in run_subject_ids(job)
        ]
    return [(subject, await _photos(ctx, subject)) for subject in subjects]


async def _instance_sets(
    ctx: JobContext,
    pipe: Any,
    profile: Profile,
    class_images: int,
    run: list[tuple[Subject, list[Image.Image]]],
) -> list[InstanceSet]:
    """What the run trains on: each subject's photos and prompt, and (with prior
    preservation) the class images of its noun, made once per noun."""
    from core.ml.generate import instance_prompt
    from core.ml.train import InstanceSet

    nouns = list(dict.fromkeys(subject.class_noun for subject, _ in run))
    priors: dict[str, PriorPreservation] = {}
    share = _CLASS / len(nouns)
    for i, noun in enumerate(nouns if class_images else []):
        progress = (_LOAD + i * share, share)
        priors[noun] = await _class_images(ctx, pipe, profile, noun, class_images, progress)
    return [
        InstanceSet(photos, instance_prompt(s.token, s.class_noun), priors.get(s.class_noun))
        for s, photos in run
    ]


async def run_training(ctx: JobContext) -> JobResult:
    from core.ml.profiles import get_profile
    from core.ml.train import subjects_run_fingerprint, train_subjects

    job = ctx.job
    spec = TrainSpec.of_job(job)
    profile = get_profile(spec.profile or ctx.settings.profile)
    steps = spec.steps or ctx.settings.train_steps or profile.train_steps
    plan = plan_training(profile, ctx.settings, steps, seed=job.attempts)
    ctx.progress.stage("loading photos and model", start=0.0, weight=_LOAD)
    run = await _load_subjects(ctx)
    subjects = [subject for subject, _ in run]
    owner = subjects[0].id  # the job's subject: its checkpoints live under its prefix
    pipe = await ctx.compute(resident_pipeline, ctx.settings, profile, expected_peak(ctx.job))
    ctx.raise_if_stopped()
    sets = await _instance_sets(ctx, pipe, profile, plan.class_images, run)
    key = checkpoint_key(owner, job.id)
    expected = await asyncio.to_thread(subjects_run_fingerprint, plan.params, sets)
    resume = await _checkpoint_to_resume(ctx, key, expected)

    ctx.progress.stage("training", start=_LOAD + _CLASS, weight=_TRAIN)
    losses: list[float] = list(resume.losses) if resume else []

    def on_step(step: int, total: int, loss: float) -> None:
        losses.append(loss)
        ctx.progress.step(step, total, loss=loss)

    # Training ends by unloading every adapter of the pipeline: the resident LoRA
    # cache forgets them first.
    await ctx.compute(forget_resident_loras, pipe)
    try:
        lora = await ctx.compute(
            train_subjects,
            pipe,
            sets,
            plan.params,
            on_step=on_step,
            should_stop=ctx.stop.is_set,
            resume=resume,
            on_checkpoint=_checkpoint_writer(ctx, key, asyncio.get_running_loop()),
            checkpoint_every=plan.checkpoint_every,
            checkpoint_on_stop=lambda: ctx.yielding,
        )
    except Canceled:
        # A checkpoint holds a model of the subjects: gone with a canceled job. A job
        # taken from this worker keeps it for the attempt that replaces this one.
        if await _cancel_requested(ctx):
            await ctx.store.delete_prefix(checkpoint_prefix(owner, job.id))
        raise
    ctx.progress.stage("saving", start=_LOAD + _CLASS + _TRAIN, weight=1 - _LOAD - _CLASS - _TRAIN)
    result = await _save(ctx, subjects, profile, steps, lora, losses, resume, plan)
    # The user's looks come next, placed where their LoRA is hot: this GPU.
    saved = result.rows[0]
    assert isinstance(saved, Lora)  # _save hashed the file already
    await ctx.compute(_keep_hot, ctx.settings, pipe, profile, saved.sha256, lora)
    return result


def _keep_hot(settings: Settings, pipe: Any, profile: Profile, sha256: str, lora: bytes) -> None:
    """Put the trained LoRA in this worker's cache (a resident adapter, disabled),
    pinned against the erasure sweep until its row commits with the job."""
    from core.ml.lora_cache import LoraWeights
    from core.ml.pipeline import exclusive

    pin_lora(sha256)
    cache = resident_lora_cache(settings, pipe, profile)
    with exclusive(pipe):
        cache.activate(LoraWeights(sha256, lora))
        cache.deactivate()


async def _save(
    ctx: JobContext,
    subjects: list[Subject],
    profile: Profile,
    steps: int,
    lora: bytes,
    losses: list[float],
    resume: TrainState | None,
    plan: TrainPlan,
) -> JobResult:
    job = ctx.job
    sha256 = hashlib.sha256(lora).hexdigest()
    trained_with = [str(subject.id) for subject in subjects]
    rows: list[Lora] = []
    for subject in subjects:
        # A copy under each subject's own prefix: what a subject owns stays in one
        # place, and erasing any of them deletes the others' copies by row.
        key = lora_key(subject.id, profile.name, job.id)
        await ctx.put_blob(key, lora)
        rows.append(
            Lora(
                subject_id=subject.id,
                job_id=job.id,
                profile=profile.name,
                rank=profile.lora_rank,
                steps=steps,
                blob_key=key,
                bytes=len(lora),
                sha256=sha256,
                trained_with=trained_with,
            )
        )
    await ctx.store.delete_prefix(checkpoint_prefix(subjects[0].id, job.id))
    result = {
        "lora_id": str(rows[0].id),
        "subject_ids": trained_with,
        "lora_ids": [str(row.id) for row in rows],
        "steps": steps,
        "final_loss": losses[-1] if losses else None,
        "resumed_from_step": resume.step if resume else 0,
        "prior_preservation": plan.class_images > 0,
        "class_images": plan.class_images,
    }
    return JobResult(result=result, rows=list(rows), blob_keys=[row.blob_key for row in rows])
