"""Opaque keyset cursors: the last row's (timestamp, id), so pages are stable
under inserts and cost the same however deep a client pages."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, tuple_
from sqlmodel.ext.asyncio.session import AsyncSession
from sqlmodel.sql.expression import SelectOfScalar

from core.errors import InvalidInput

Row = TypeVar("Row")


def encode_cursor(at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{at.isoformat()}|{row_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, row_id = raw.split("|")
        return datetime.fromisoformat(at), uuid.UUID(row_id)
    except ValueError as exc:  # UnicodeDecodeError and binascii.Error are ValueErrors
        raise InvalidInput("cursor is not one this API returned", field="cursor") from exc


def before_cursor(at_column: Any, id_column: Any, cursor: str) -> ColumnElement[bool]:
    """Rows after the cursor's row in (at desc, id desc) order."""
    at, row_id = decode_cursor(cursor)
    return tuple_(at_column, id_column) < tuple_(at, row_id)


async def newest_first(
    session: AsyncSession,
    query: SelectOfScalar[Row],
    at_column: Any,
    id_column: Any,
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[Row], str | None]:
    """One page of ``query`` in (at desc, id desc) order after ``cursor``, and the
    cursor of the next page (None on the last)."""
    if cursor:
        query = query.where(before_cursor(at_column, id_column, cursor))
    query = query.order_by(at_column.desc(), id_column.desc()).limit(limit + 1)
    rows = list((await session.exec(query)).all())
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(getattr(last, at_column.key), getattr(last, id_column.key))
