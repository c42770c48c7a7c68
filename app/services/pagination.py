"""Opaque keyset cursors: stable while rows are inserted between pages.

A cursor is urlsafe base64 of `["<timezone-aware ISO timestamp>", "<UUID>"]`. Clients can
forge one, so decoding is strict: anything but exactly that shape is a 400, never a value
of another type reaching the query.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from datetime import datetime

from app.problems import BadRequest
from app.services.access import is_uuid_text

# Unpadded urlsafe base64, as encode_cursor writes it; the decoder would otherwise skip
# characters outside the alphabet, and accept cursors we never handed out.
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,512}", re.ASCII)


def encode_cursor(moment: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([moment.isoformat(), str(row_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _invalid() -> BadRequest:
    return BadRequest("cursor: not a cursor this API handed out.", code="invalid_cursor")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor from `encode_cursor` names; 400 `invalid_cursor` otherwise."""
    if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
        raise _invalid()
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        decoded = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except (ValueError, binascii.Error):  # includes JSONDecodeError and UnicodeDecodeError
        raise _invalid() from None
    if not (isinstance(decoded, list) and len(decoded) == 2):
        raise _invalid()
    moment_text, id_text = decoded
    if not (isinstance(moment_text, str) and isinstance(id_text, str) and is_uuid_text(id_text)):
        raise _invalid()
    try:
        moment = datetime.fromisoformat(moment_text)
    except ValueError:
        raise _invalid() from None
    # A naive time would be read in the database session's zone: not what we handed out.
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _invalid()
    return moment, uuid.UUID(id_text)
