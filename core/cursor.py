"""Opaque keyset cursors: the last row's (timestamp, id), so pages are stable
under inserts and cost the same however deep a client pages."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, tuple_

from core.errors import InvalidInput


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
