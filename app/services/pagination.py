"""Opaque keyset cursors: stable while rows are inserted between pages."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

from app.problems import BadRequest


def encode_cursor(moment: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([moment.isoformat(), str(row_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        moment, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        return datetime.fromisoformat(moment), uuid.UUID(row_id)
    except (ValueError, TypeError, json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest(
            "cursor: not a cursor this API handed out.", code="invalid_cursor"
        ) from None
