"""Fashion-CLIP versions: which one is active, and switching atomically.

A deployment starts with the *base version* (the base model with identity heads,
made by the first catalog embedding), so looks are grounded and matched from the
first crawl on. A ``clip_finetune`` job makes a candidate, judges it against the
active version on the same held-out products, writes its embeddings of the
whole catalog, and only then activates it (``activate_if_better``): the index
never points at a version whose embeddings are not all written.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, update
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from core.db.shop_models import ClipModel, ClipModelStatus

# The held-out metric that decides whether a candidate replaces the active version:
# text-to-image recall@10, the figure fashion-CLIP papers report.
DECIDING_METRIC = "t2i_r10"


async def active_version(session: AsyncSession, profile: str) -> ClipModel | None:
    query = select(ClipModel).where(
        col(ClipModel.profile) == profile, col(ClipModel.status) == ClipModelStatus.active
    )
    return (await session.exec(query)).first()


async def create_base_version(
    session: AsyncSession,
    profile: str,
    base_id: str,
    onnx_prefix: str | None,
    onnx_files: list[str] | None = None,
    *,
    model_id: uuid.UUID | None = None,
) -> ClipModel | None:
    """Make the base version active, unless a version is active already (then None).

    Two embedders racing here both insert; the partial unique index lets one win.
    """
    values: dict[str, Any] = dict(
        id=model_id or uuid.uuid4(),
        profile=profile,
        base_id=base_id,
        status=ClipModelStatus.active,
        config={"heads": "identity", "onnx_files": onnx_files or []},
        onnx_prefix=onnx_prefix,
        activated_at=func.now(),
    )
    stmt = insert(ClipModel).values(**values).on_conflict_do_nothing()
    inserted = (await session.execute(stmt.returning(col(ClipModel.id)))).scalar_one_or_none()
    return None if inserted is None else await session.get(ClipModel, inserted)


def beats(candidate: dict[str, Any], active: dict[str, Any]) -> bool:
    return float(candidate[DECIDING_METRIC]) > float(active[DECIDING_METRIC])


async def activate_if_better(
    session: AsyncSession, candidate: ClipModel, metrics: dict[str, Any]
) -> bool:
    """Make ``candidate`` active or rejected on ``metrics``, in the caller's transaction.

    ``metrics`` holds the candidate's and the active version's held-out figures on
    one split (``candidate``, ``active``) and which version that was
    (``judged_against``). The active row is locked first; if another version
    became active since the judging, the comparison is stale and the candidate is
    rejected with that reason (a later fine-tune judges against the new one).
    """
    active = (
        await session.exec(
            select(ClipModel)
            .where(
                col(ClipModel.profile) == candidate.profile,
                col(ClipModel.status) == ClipModelStatus.active,
            )
            .with_for_update()
        )
    ).first()
    active_id = str(active.id) if active is not None else None
    if active_id != metrics.get("judged_against"):
        metrics = {**metrics, "rejected_because": "another version became active meanwhile"}
        better = False
    else:
        better = active is None or beats(metrics["candidate"], metrics["active"])
    if better and active is not None:
        await session.execute(
            update(ClipModel)
            .where(col(ClipModel.id) == active.id)
            .values(status=ClipModelStatus.retired)
        )
    status = ClipModelStatus.active if better else ClipModelStatus.rejected
    await session.execute(
        update(ClipModel)
        .where(col(ClipModel.id) == candidate.id)
        .values(status=status, metrics=metrics, activated_at=func.now() if better else None)
    )
    return better
