"""Small helpers shared by the API tests."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select

from app.models import UserEvent

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll until `predicate` returns something truthy (a worker runs in another thread)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def events_of(app, user_id: str) -> list[UserEvent]:
    with app.extensions["switchboard.db"].sessions() as session:
        return list(
            session.scalars(
                select(UserEvent).where(UserEvent.user_id == user_id).order_by(UserEvent.seq)
            )
        )


def error_code(response) -> tuple[int, str | None]:
    body: Any = response.get_json(silent=True) or {}
    return response.status_code, (body.get("error") or {}).get("code")


def run_threads(*targets: Callable[[], object]) -> None:
    """Run each target in a thread of its own and fail if any of them raised: a test
    must see a failure in its own threads, not pass while one died."""
    import threading

    errors: list[BaseException] = []

    def guarded(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise AssertionError(f"{len(errors)} of {len(threads)} threads failed") from errors[0]


def queue_send(app, sender_id: str, conversation_id: str, body: str, client_id: str) -> str:
    """Record a send as the API does (status queued) without enqueueing its task."""
    from app.models import User
    from app.services.sends import accept_send

    with app.extensions["switchboard.db"].transaction() as session:
        accepted = accept_send(
            session,
            app.extensions["switchboard.policy"],
            session.get_one(User, sender_id),
            conversation_id,
            body,
            client_id,
            enqueue=lambda _message_id: None,
        )
    return str(accepted.message_id)


def image_bytes(
    format: str = "JPEG",
    size: tuple[int, int] = (64, 48),
    *,
    mode: str = "RGB",
    noise: bool = False,
) -> bytes:
    """An image made by Pillow; `noise` makes it hard to compress (a realistic photo size)."""
    import io
    import os as _os

    from PIL import Image

    if noise:
        image = Image.frombytes("RGB", size, _os.urandom(size[0] * size[1] * 3)).convert(mode)
    else:
        image = Image.new(mode, size, (200, 30, 90, 128)[: len(mode)] if mode != "1" else 1)
    out = io.BytesIO()
    image.save(out, format=format, **({"quality": 90} if format == "JPEG" else {}))
    return out.getvalue()


def post_to_store(upload: dict, data: bytes, *, fields: dict | None = None) -> tuple[int, str]:
    """Send `data` to a presigned POST as a browser form would (multipart/form-data, the
    file last); `fields` overrides some of the signed fields (to see the store refuse)."""
    import urllib.error
    import urllib.request
    import uuid as _uuid

    boundary = f"----switchboard{_uuid.uuid4().hex}"
    parts = []
    for name, value in (upload["fields"] | (fields or {})).items():
        header = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
        parts.append(f"{header}{value}\r\n".encode())
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="upload"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        upload["url"],
        data=b"".join(parts),
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def fetch(url: str) -> tuple[int, bytes, str | None]:
    """GET a (signed) URL: status, bytes and Content-Type."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read(), response.headers.get("Content-Type")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers.get("Content-Type")
