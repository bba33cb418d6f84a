"""Which pool of workers runs which kind of job: the rule the scheduler routes by.

The GPU pool's jobs are placed on one GPU each by the scheduler (core/fleet);
the CPU pool's share one queue. A kind missing here is a bug caught at dispatch
(KeyError), not a job silently waiting on a queue nobody reads. Queue names, the
transport's business, are in transport/queues.py.
"""

from __future__ import annotations

from enum import StrEnum

from core.db.models import JobKind


class Pool(StrEnum):
    gpu = "gpu"  # one worker process per GPU, holding the diffusion and CLIP models
    cpu = "cpu"  # crawls and CLIP head fine-tuning (later webhooks): no diffusion model


POOL_BY_KIND: dict[JobKind, Pool] = {
    JobKind.train: Pool.gpu,
    JobKind.generate: Pool.gpu,
    JobKind.crawl: Pool.cpu,
    # Runs the CLIP towers over new catalog images: a GPU's work.
    JobKind.catalog_embed: Pool.gpu,
    # Trains heads over stored features (no tower pass): cheap enough for a CPU.
    JobKind.clip_finetune: Pool.cpu,
}


def pool_of(kind: str) -> Pool:
    return POOL_BY_KIND[JobKind(kind)]
