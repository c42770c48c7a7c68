"""Image attachments: upload requests, claiming them for a send, the worker's check of
the bytes, reading them with signed URLs, and deleting their objects.

The bytes never pass through the API. `request_upload` records a `pending` row and
hands out a presigned POST (the store refuses another key, type or size). A send names
its attachments; the API claims them for the message in the send's transaction (each
goes with one message). Before storing the message the worker downloads each one,
checks that its bytes are an allowed image whatever the client declared, within the
size and pixel limits, writes a thumbnail next to it and marks it `ready`; a failed
check marks it `rejected` and the message is rejected `attachment_invalid`.

Objects go with their message: whatever soft-deletes a message (its sender, a
moderator, retention) marks its attachments `deleted`, and a task deletes the objects,
then the rows; uploads never sent are deleted after `UNSENT_LIFETIME` by the
`clean-attachments` job, which also finishes any deletion whose task was lost.

Object keys derive from the attachment's random id (uuid4): nothing about the user,
the tenant or the file name is in them.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError
from sqlalchemy import bindparam, func, select, text
from sqlalchemy.orm import Session

from app.db import after_commit
from app.models import Attachment, User
from app.policy import Policy
from app.problems import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge
from app.services.access import parse_uuid
from app.storage import ObjectStore
from monitoring.metrics import ATTACHMENT_CHECKS, ATTACHMENT_OBJECTS_DELETED, ATTACHMENT_UPLOADS

log = logging.getLogger(__name__)

#: Where the app keeps the callable that enqueues the deletion of attachments' objects
#: (in `Session.info`, as the event publisher is): services stay free of Celery.
OBJECT_REMOVER_KEY = "switchboard.attachment_object_remover"

#: Uploads not sent with a message within this long are deleted.
UNSENT_LIFETIME = timedelta(hours=24)
#: Unsent uploads one user may hold at once: a client cannot fill the bucket with
#: upload URLs it never uses.
MAX_UNSENT_PER_USER = 50
#: Rows the clean-up handles per transaction.
CLEANUP_BATCH = 200

# The thumbnail of an image with transparency stays PNG; every other one is JPEG.
THUMBNAIL_JPEG_QUALITY = 82

_PIL_FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}
_TYPE_NAMES = {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WebP"}
_FILENAME_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f/\\]")


def object_key(attachment_id: uuid.UUID | str) -> str:
    return f"attachments/{attachment_id}"


def thumbnail_key(attachment_id: uuid.UUID | str) -> str:
    # A sibling, not a child: filer-backed stores (SeaweedFS) cannot hold an object and
    # a "directory" of the same name.
    return f"attachments/{attachment_id}.thumb"


def _type_list(types: Iterable[str]) -> str:
    return ", ".join(_TYPE_NAMES[t] for t in types)


# --------------------------------------------------------------------------- upload


@dataclass(frozen=True, slots=True)
class UploadRequest:
    filename: str
    content_type: str
    size: int


def _check_filename(filename: str) -> str:
    name = filename.strip()
    if not name or len(name) > 255 or _FILENAME_FORBIDDEN.search(name):
        raise BadRequest(
            "filename: 1 to 255 characters, without control characters or slashes.",
            code="invalid_filename",
        )
    return name


def request_upload(
    session: Session, policy: Policy, store: ObjectStore | None, user: User, upload: UploadRequest
) -> dict[str, Any]:
    """Record a pending attachment and return where to send its bytes: a presigned POST
    for exactly this key, `content_type` and at most `size` bytes."""
    rules = policy.attachments
    if not rules.enabled or store is None:
        raise Forbidden("Attachments are not enabled here.", code="attachments_disabled")
    filename = _check_filename(upload.filename)
    if upload.content_type not in rules.allowed_types:
        raise BadRequest(
            f"content_type: must be one of {', '.join(rules.allowed_types)}.",
            code="unsupported_attachment_type",
        )
    if upload.size > rules.max_bytes:
        raise PayloadTooLarge(
            f"An attachment may be at most {rules.max_bytes} bytes.", code="attachment_too_large"
        )
    unsent = session.scalar(
        select(func.count())
        .select_from(Attachment)
        .where(
            Attachment.uploader_id == user.id,
            Attachment.message_id.is_(None),
            Attachment.status.in_(("pending", "ready")),
        )
    )
    if unsent >= MAX_UNSENT_PER_USER:
        raise Conflict(
            f"You have {unsent} uploads not sent yet; send or wait for them to expire.",
            code="too_many_unsent_attachments",
        )
    attachment = Attachment(
        id=uuid.uuid4(),
        tenant_id=user.tenant_id,
        uploader_id=user.id,
        filename=filename,
        declared_type=upload.content_type,
        declared_size=upload.size,
        status="pending",
    )
    session.add(attachment)
    session.flush()
    ATTACHMENT_UPLOADS.inc()
    # The store checks the policy's expiry against the time boto3 signed it with: ours.
    expires_at = datetime.now(UTC) + timedelta(seconds=store.upload_ttl_seconds)
    presigned = store.presigned_upload(object_key(attachment.id), upload.content_type, upload.size)
    return attachment_json(attachment, store) | {
        "upload": {"method": "POST", "url": presigned["url"], "fields": presigned["fields"]},
        "expires_at": expires_at.isoformat(),
    }


# --------------------------------------------------------------------------- reading


def attachment_json(
    attachment: Any, store: ObjectStore | None, *, urls: bool = True
) -> dict[str, Any]:
    """An attachment (ORM object or row) as the API shows it; a ready one with URLs
    signed now, for the configured lifetime (never stored)."""
    data: dict[str, Any] = {
        "id": str(attachment.id),
        "status": attachment.status,
        "filename": attachment.filename,
        "content_type": attachment.content_type or attachment.declared_type,
        "size": attachment.size if attachment.size is not None else attachment.declared_size,
        "width": attachment.width,
        "height": attachment.height,
    }
    if attachment.status == "rejected":
        data["reason"] = attachment.rejection_reason
    if urls:
        data.update(signed_urls(store, data))
    return data


def event_attachment(attachment: Any) -> dict[str, Any]:
    """What a `message.created` event keeps of a ready attachment: no URLs (they are
    signed when the event is written to a socket, see `sign_event_data`)."""
    return {
        key: value
        for key, value in attachment_json(attachment, None, urls=False).items()
        if key != "status"
    }


def signed_urls(store: ObjectStore | None, attachment: dict[str, Any]) -> dict[str, Any]:
    if store is None or attachment.get("status", "ready") != "ready":
        return {"url": None, "thumbnail_url": None}
    return {
        "url": store.signed_url(object_key(attachment["id"])),
        "thumbnail_url": store.signed_url(thumbnail_key(attachment["id"])),
    }


def sign_event_data(store: ObjectStore | None, type_: str, data: dict[str, Any]) -> dict[str, Any]:
    """An event's data as a socket gets it: a message's attachments with URLs signed now."""
    attachments = data.get("attachments") if type_ == "message.created" else None
    if not attachments:
        return data
    return data | {"attachments": [item | signed_urls(store, item) for item in attachments]}


_READY_OF_MESSAGES = (
    select(Attachment)
    .where(Attachment.message_id.in_(bindparam("ids", expanding=True)))
    .order_by(Attachment.created_at, Attachment.id)
)


def attachments_of_messages(
    session: Session,
    store: ObjectStore | None,
    messages: Sequence[Any],
    *,
    include_unready: bool = False,
) -> dict[uuid.UUID, list[dict[str, Any]]]:
    """The attachments of these messages (rows or objects with `id` and
    `attachment_count`), keyed by message id, signed; one query, and none when no
    message carries any. Only ready ones unless `include_unready` (a sender looking at
    their own rejected send sees why)."""
    ids = [message.id for message in messages if message.attachment_count]
    if not ids:
        return {}
    found: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
    for attachment in session.scalars(_READY_OF_MESSAGES, {"ids": ids}):
        if attachment.status == "ready" or (include_unready and attachment.status != "deleted"):
            found[attachment.message_id].append(attachment_json(attachment, store))
    return found


def visible_attachment(
    session: Session, store: ObjectStore | None, user: User, attachment_id: str
) -> dict[str, Any]:
    """An attachment for its uploader, or for a member of the conversation of the stored
    message it was sent with; the same 404 for everyone else as for no such id."""
    attachment = session.get(Attachment, parse_uuid(attachment_id, "attachment"))
    if (
        attachment is None
        or attachment.tenant_id != user.tenant_id
        or attachment.status == "deleted"
        or not (attachment.uploader_id == user.id or _seen_by_member(session, attachment, user))
    ):
        raise NotFound("No such attachment.", code="attachment_not_found")
    return attachment_json(attachment, store)


_MEMBER_OF_MESSAGE = text(
    """
    SELECT 1 FROM messages m JOIN participants p ON p.conversation_id = m.conversation_id
    WHERE m.id = :message_id AND m.status = 'stored' AND m.deleted_at IS NULL
      AND p.user_id = :user_id
    """
)


def _seen_by_member(session: Session, attachment: Attachment, user: User) -> bool:
    if attachment.message_id is None or attachment.status != "ready":
        return False
    return (
        session.execute(
            _MEMBER_OF_MESSAGE, {"message_id": attachment.message_id, "user_id": user.id}
        ).first()
        is not None
    )


# --------------------------------------------------------------------------- sending


def check_attachment_ids(policy: Policy, raw_ids: Sequence[str]) -> list[uuid.UUID]:
    """The send's `attachment_ids` as UUIDs: within the policy's count, no repeats; an id
    that is not one of ours is simply not found."""
    if not raw_ids:
        return []
    if not policy.attachments.enabled:
        raise Forbidden("Attachments are not enabled here.", code="attachments_disabled")
    if len(raw_ids) > policy.attachments.max_per_message:
        raise BadRequest(
            f"A message may carry at most {policy.attachments.max_per_message} attachments.",
            code="too_many_attachments",
        )
    ids = [parse_uuid(raw, "attachment") for raw in raw_ids]
    if len(set(ids)) != len(ids):
        raise BadRequest("attachment_ids: an attachment is named twice.", code="invalid_request")
    return ids


def check_for_send(
    session: Session,
    store: ObjectStore | None,
    sender: User,
    message_id: uuid.UUID,
    attachment_ids: Sequence[uuid.UUID],
) -> None:
    """May these attachments go with the send being accepted? Every one must exist, be
    the sender's, not be in another message and be uploaded; else the error names it.
    Called before the send's row is written, so no lock is held while the store answers."""
    if not attachment_ids:
        return
    rows = {
        row.id: row
        for row in session.scalars(
            select(Attachment).where(
                Attachment.id.in_(attachment_ids),
                Attachment.uploader_id == sender.id,
                Attachment.tenant_id == sender.tenant_id,
            )
        )
    }
    for attachment_id in attachment_ids:
        row = rows.get(attachment_id)
        if row is None or row.status == "deleted":
            raise NotFound(f"No such attachment: {attachment_id}.", code="attachment_not_found")
        if row.message_id is not None and row.message_id != message_id:
            raise Conflict(
                f"Attachment {attachment_id} was already sent with another message.",
                code="attachment_in_use",
            )
        if row.status == "rejected":
            raise BadRequest(
                f"Attachment {attachment_id} was refused: {row.rejection_reason}",
                code="attachment_invalid",
            )
    for attachment_id in attachment_ids:
        # A cheap HEAD, so a send before the upload finished is a 400 now rather than a
        # rejection later. The worker checks the bytes themselves.
        pending = rows[attachment_id].status == "pending"
        if pending and store is not None and store.head(object_key(attachment_id)) is None:
            raise BadRequest(
                f"Attachment {attachment_id} has not been uploaded yet.",
                code="attachment_not_uploaded",
            )


def claim_for_send(
    session: Session, message_id: uuid.UUID, attachment_ids: Sequence[uuid.UUID]
) -> None:
    """Attach the checked uploads to the send's new row (each goes with one message);
    a concurrent send that took one first makes this a 409, and the caller's transaction
    rolls back with nothing claimed."""
    if not attachment_ids:
        return
    claimed = session.execute(
        text(
            """
            UPDATE attachments SET message_id = :message_id
            WHERE id = ANY(:ids) AND message_id IS NULL AND status IN ('pending', 'ready')
            RETURNING id
            """
        ).bindparams(bindparam("ids")),
        {"message_id": message_id, "ids": list(attachment_ids)},
    ).all()
    if len(claimed) != len(attachment_ids):
        # A concurrent send took one between the look-up and the update.
        raise Conflict(
            "An attachment was sent with another message at the same moment.",
            code="attachment_in_use",
        )


# --------------------------------------------------------------------------- the check


@dataclass(frozen=True, slots=True)
class ImageFacts:
    content_type: str
    width: int
    height: int
    thumbnail: bytes
    thumbnail_type: str


class InvalidImage(ValueError):
    """The bytes are not an acceptable image; the message says why, for a person."""


def sniff_image_type(head: bytes) -> str | None:
    """The image type the first bytes announce (JPEG, PNG, WebP), whatever was declared."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


def inspect_image(
    data: bytes, *, allowed_types: Sequence[str], max_pixels: int, thumbnail_size: int
) -> ImageFacts:
    """Check that `data` is an allowed image within `max_pixels` that decodes whole, and
    make its thumbnail (longer side `thumbnail_size`). Raises `InvalidImage`."""
    kind = sniff_image_type(data[:16])
    if kind is None:
        raise InvalidImage(f"is not a {_type_list(allowed_types)} image")
    if kind not in allowed_types:
        raise InvalidImage(f"is a {_TYPE_NAMES[kind]} image; allowed: {_type_list(allowed_types)}")
    try:
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[kind]]) as image:
            width, height = image.size
            # Before decoding: the header alone says how big the decoded image would be.
            if width * height > max_pixels:
                raise InvalidImage(
                    f"is {width}x{height} pixels, more than the {max_pixels} allowed"
                )
            if kind == "image/jpeg":
                # Decode at the smallest DCT scale that still covers the thumbnail: a
                # fraction of the work, and the whole entropy stream is still read.
                image.draft("RGB", (thumbnail_size, thumbnail_size))
            image.load()
            thumbnail, thumbnail_type = _thumbnail(image, thumbnail_size)
    except InvalidImage:
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own guard, at twice its limit: the header alone told it.
        raise InvalidImage(f"has more than the {max_pixels} pixels allowed") from exc
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
    ) as exc:
        raise InvalidImage(f"could not be read as a {_TYPE_NAMES[kind]} image ({exc})") from exc
    return ImageFacts(kind, width, height, thumbnail, thumbnail_type)


def _thumbnail(image: Image.Image, size: int) -> tuple[bytes, str]:
    image = ImageOps.exif_transpose(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (
        image.mode == "P" and "transparency" in image.info
    )
    image = image.convert("RGBA" if has_alpha else "RGB")
    image.thumbnail((size, size))
    out = io.BytesIO()
    if has_alpha:
        image.save(out, format="PNG", optimize=True)
        return out.getvalue(), "image/png"
    image.save(out, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY, optimize=True)
    return out.getvalue(), "image/jpeg"


def check_message_attachments(
    session: Session, policy: Policy, store: ObjectStore | None, message_id: uuid.UUID
) -> int:
    """The worker's check of a queued send's pending attachments, before it takes any
    lock: each becomes `ready` (with its facts and a thumbnail in the store) or
    `rejected` (with why). Safe to run again: a ready one is not checked twice, and the
    thumbnail's key is fixed. Raises `StorageUnavailable` when the store cannot be
    reached (the task retries). Returns how many it rejected."""
    pending = session.scalars(
        select(Attachment)
        .where(Attachment.message_id == message_id, Attachment.status == "pending")
        .order_by(Attachment.created_at, Attachment.id)
    ).all()
    rejected = 0
    for attachment in pending:
        try:
            facts = _check_one(policy, store, attachment)
        except InvalidImage as exc:
            attachment.status = "rejected"
            attachment.rejection_reason = f"{attachment.filename} {exc}."
            rejected += 1
            ATTACHMENT_CHECKS.labels("rejected").inc()
        else:
            attachment.status = "ready"
            attachment.content_type = facts.content_type
            attachment.width, attachment.height = facts.width, facts.height
            attachment.thumbnail_type = facts.thumbnail_type
            ATTACHMENT_CHECKS.labels("ready").inc()
        attachment.checked_at = func.clock_timestamp()
    session.flush()
    return rejected


def _check_one(policy: Policy, store: ObjectStore | None, attachment: Attachment) -> ImageFacts:
    rules = policy.attachments
    if store is None:
        raise InvalidImage("cannot be checked: no object store is configured")
    key = object_key(attachment.id)
    stored = store.head(key)
    if stored is None:
        raise InvalidImage("was never uploaded")
    if stored.size > rules.max_bytes:
        raise InvalidImage(f"is {stored.size} bytes, more than the {rules.max_bytes} allowed")
    data = store.read(key, rules.max_bytes)
    if data is None:
        raise InvalidImage("was never uploaded")
    if len(data) > rules.max_bytes:
        raise InvalidImage(f"is more than the {rules.max_bytes} bytes allowed")
    facts = inspect_image(
        data,
        allowed_types=rules.allowed_types,
        max_pixels=rules.max_pixels,
        thumbnail_size=rules.thumbnail_size,
    )
    attachment.size = len(data)
    store.put(thumbnail_key(attachment.id), facts.thumbnail, facts.thumbnail_type)
    if stored.content_type != facts.content_type:
        # Declared PNG, is a JPEG: serve it as what it is.
        store.set_content_type(key, facts.content_type)
    return facts


def rejected_attachments(session: Session, message_id: uuid.UUID) -> list[dict[str, str]]:
    """`[{id, reason}]` of a send's attachments that failed the check."""
    return [
        {"id": str(row.id), "reason": row.rejection_reason or "rejected"}
        for row in session.execute(
            select(Attachment.id, Attachment.rejection_reason)
            .where(Attachment.message_id == message_id, Attachment.status == "rejected")
            .order_by(Attachment.created_at, Attachment.id)
        )
    ]


def ready_attachments_for_event(session: Session, message_id: uuid.UUID) -> list[dict[str, Any]]:
    return [
        event_attachment(row)
        for row in session.scalars(
            select(Attachment)
            .where(Attachment.message_id == message_id, Attachment.status == "ready")
            .order_by(Attachment.created_at, Attachment.id)
        )
    ]


def release_attachments(session: Session, message_id: uuid.UUID) -> None:
    """A rejected send lets go of its good attachments (the sender may send them again);
    the ones that failed the check stay with it, and their objects are deleted."""
    session.execute(
        text(
            "UPDATE attachments SET message_id = NULL "
            "WHERE message_id = :message_id AND status IN ('pending', 'ready')"
        ),
        {"message_id": message_id},
    )
    failed = [uuid.UUID(row["id"]) for row in rejected_attachments(session, message_id)]
    _remove_after_commit(session, failed)


# --------------------------------------------------------------------------- deleting

_MARK_DELETED = text(
    """
    UPDATE attachments SET status = 'deleted', deleted_at = clock_timestamp()
    WHERE message_id = ANY(:ids) AND status <> 'deleted'
    RETURNING id
    """
).bindparams(bindparam("ids"))


def delete_with_messages(session: Session, message_ids: Sequence[uuid.UUID]) -> int:
    """The attachments of these messages go with them: marked deleted now (no one sees
    them again), their objects deleted by a task after commit. Returns how many."""
    if not message_ids:
        return 0
    ids = session.execute(_MARK_DELETED, {"ids": list(message_ids)}).scalars().all()
    _remove_after_commit(session, list(ids))
    return len(ids)


def _remove_after_commit(session: Session, attachment_ids: list[uuid.UUID]) -> None:
    remover: Callable[[list[uuid.UUID]], None] | None = session.info.get(OBJECT_REMOVER_KEY)
    if attachment_ids and remover is not None:
        # If this enqueue is lost, the clean-attachments job deletes them on its next run.
        after_commit(session, lambda: remover(attachment_ids))


_CLAIM_OBJECTS_TO_DELETE = text(
    """
    SELECT id, status FROM attachments
    WHERE status IN ('rejected', 'deleted') AND objects_deleted_at IS NULL
      AND (CAST(:ids AS uuid[]) IS NULL OR id = ANY(:ids))
    ORDER BY created_at
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
    """
).bindparams(bindparam("ids"))


def delete_objects(
    session: Session,
    store: ObjectStore | None,
    attachment_ids: Sequence[uuid.UUID] | None = None,
    *,
    limit: int = CLEANUP_BATCH,
) -> int:
    """Delete the objects (image and thumbnail) of deleted and rejected attachments (these
    ids, or any), then the rows of the deleted ones (a rejected one's row stays, so its
    uploader can read why, until the clean-up job ages it out). Idempotent: deleting a
    missing object succeeds. Raises `StorageUnavailable` when the store cannot be
    reached; nothing is marked done then. Returns how many attachments it finished."""
    if store is None:
        return 0
    rows = session.execute(
        _CLAIM_OBJECTS_TO_DELETE,
        {"ids": list(attachment_ids) if attachment_ids is not None else None, "limit": limit},
    ).all()
    if not rows:
        return 0
    store.delete([key for row in rows for key in (object_key(row.id), thumbnail_key(row.id))])
    ATTACHMENT_OBJECTS_DELETED.inc(len(rows))
    deleted = [row.id for row in rows if row.status == "deleted"]
    rejected = [row.id for row in rows if row.status == "rejected"]
    if deleted:
        session.execute(
            text("DELETE FROM attachments WHERE id = ANY(:ids)").bindparams(bindparam("ids")),
            {"ids": deleted},
        )
    if rejected:
        session.execute(
            text(
                "UPDATE attachments SET objects_deleted_at = clock_timestamp() WHERE id = ANY(:ids)"
            ).bindparams(bindparam("ids")),
            {"ids": rejected},
        )
    return len(rows)


_EXPIRE_UNSENT = text(
    """
    UPDATE attachments SET status = 'deleted', deleted_at = clock_timestamp()
    WHERE id IN (
        SELECT id FROM attachments
        WHERE message_id IS NULL AND status IN ('pending', 'ready') AND created_at < :cutoff
        ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)

_FORGET_OLD_REJECTED = text(
    """
    DELETE FROM attachments WHERE id IN (
        SELECT id FROM attachments
        WHERE status = 'rejected' AND objects_deleted_at IS NOT NULL AND created_at < :cutoff
        ORDER BY created_at LIMIT :limit FOR UPDATE SKIP LOCKED)
    """
)


def clean_up_batch(
    session: Session, store: ObjectStore | None, now: datetime, *, limit: int = CLEANUP_BATCH
) -> int:
    """One batch of the clean-attachments job: uploads unsent for `UNSENT_LIFETIME` are
    marked deleted, objects still to delete are deleted, and rejected attachments older
    than that are forgotten. Returns the rows it touched."""
    cutoff = now - UNSENT_LIFETIME
    expired = session.execute(_EXPIRE_UNSENT, {"cutoff": cutoff, "limit": limit}).rowcount or 0
    removed = delete_objects(session, store, limit=limit)
    forgotten = (
        session.execute(_FORGET_OLD_REJECTED, {"cutoff": cutoff, "limit": limit}).rowcount or 0
    )
    return int(expired) + removed + int(forgotten)
