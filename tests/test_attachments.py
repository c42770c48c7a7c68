"""Image attachments (seed 004's reference photos) against a real S3-compatible store (the
embedded SeaweedFS, or the one TEST_S3_* names), real PostgreSQL and Redis, and a real
Celery worker: the presigned POST the store enforces, the worker's check of the bytes,
signed URLs on every read, who may see a photo, and the objects going with their message."""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from app.auth import mint_token
from app.models import Attachment, Message, UserEvent
from app.services.attachments import (
    InvalidImage,
    inspect_image,
    object_key,
    sign_event_data,
    sniff_image_type,
    thumbnail_key,
)
from schedules.runner import run_job
from tests.helpers import error_code, fetch, image_bytes, post_to_store, wait_for
from tests.live import LiveSystem, Stream, http

ALLOWED = ("image/jpeg", "image/png", "image/webp")


@pytest.fixture
def policy_name() -> str:
    return "marketplace"


@pytest.fixture
def people(make_user):
    return {
        "customer": make_user("cust", role="customer"),
        "artist": make_user("art", role="artist"),
        "other_customer": make_user("cust2", role="customer"),
        "admin": make_user("admin", role="admin"),
        "stranger": make_user("far", tenant="t2", role="artist"),
    }


@pytest.fixture
def conversation(client, auth, people) -> str:
    response = client.post(
        "/v1/conversations",
        json={"participant_id": "art", "subject": {"type": "booking", "id": "b-1"}},
        headers=auth(people["customer"]),
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()["id"]


def request_upload(client, headers, *, filename="photo.jpg", content_type="image/jpeg", size):
    response = client.post(
        "/v1/attachments",
        json={"filename": filename, "content_type": content_type, "size": size},
        headers=headers,
    )
    assert response.status_code == 201, response.get_json()
    return response.get_json()


def uploaded(client, headers, data: bytes, content_type="image/jpeg", filename="photo.jpg"):
    """An attachment whose bytes are in the store, through the real presigned POST."""
    answer = request_upload(
        client, headers, filename=filename, content_type=content_type, size=len(data)
    )
    status, text = post_to_store(answer["upload"], data)
    assert status in (200, 201, 204), text
    return answer["id"]


def send(client, headers, conversation, *, body="", attachment_ids=(), client_id=None):
    return client.post(
        f"/v1/conversations/{conversation}/messages",
        json={
            "body": body,
            "client_id": client_id or uuid.uuid4().hex,
            "attachment_ids": list(attachment_ids),
        },
        headers=headers,
    )


def decided(client, headers, message_id: str) -> dict:
    def status():
        message = client.get(f"/v1/messages/{message_id}", headers=headers).get_json()
        return message if message["status"] != "queued" else None

    return wait_for(status)


def object_exists(s3_client, bucket: str, key: str) -> bool:
    try:
        s3_client.head_object(Bucket=bucket, Key=key)
    except s3_client.exceptions.ClientError:
        return False
    return True


@pytest.fixture
def bucket(app) -> str:
    return app.extensions["switchboard.settings"].s3_bucket


def count(app, model, *where) -> int:
    with app.extensions["switchboard.db"].sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where))


# --------------------------------------------------------------------------- the flow


def test_seed_004_photo_from_customer_to_artist(
    app, client, auth, people, conversation, celery_worker, s3_client, bucket
):
    """Upload, send, the artist sees the photo and its thumbnail; another customer and
    another tenant get the same 404 as an id that does not exist."""
    photo = image_bytes("JPEG", (1200, 900), noise=True)
    customer, artist = auth(people["customer"]), auth(people["artist"])
    attachment_id = uploaded(client, customer, photo)
    pending = client.get(f"/v1/attachments/{attachment_id}", headers=customer).get_json()
    assert pending["status"] == "pending" and pending["url"] is None

    response = send(
        client, customer, conversation, body="Like this?", attachment_ids=[attachment_id]
    )
    assert response.status_code == 202, response.get_json()
    message_id = response.get_json()["id"]
    assert decided(client, customer, message_id)["status"] == "stored"

    listed = client.get("/v1/conversations", headers=artist).get_json()["items"][0]
    assert listed["last_message"]["attachment_count"] == 1
    history = client.get(f"/v1/conversations/{conversation}/messages", headers=artist).get_json()
    [shown] = history["items"][0]["attachments"]
    assert shown["id"] == attachment_id and shown["status"] == "ready"
    assert (shown["content_type"], shown["width"], shown["height"]) == ("image/jpeg", 1200, 900)
    assert shown["size"] == len(photo) and shown["filename"] == "photo.jpg"
    status, data, content_type = fetch(shown["url"])
    assert (status, data, content_type) == (200, photo, "image/jpeg")
    status, data, _ = fetch(shown["thumbnail_url"])
    assert status == 200
    with Image.open(io.BytesIO(data)) as thumbnail:
        assert max(thumbnail.size) == 320 and thumbnail.format == "JPEG"
    assert object_exists(s3_client, bucket, thumbnail_key(attachment_id))

    # The same on GET /v1/messages/<id> and GET /v1/attachments/<id>, for both members.
    for headers in (customer, artist):
        message = client.get(f"/v1/messages/{message_id}", headers=headers).get_json()
        assert message["attachments"][0]["url"]
        one = client.get(f"/v1/attachments/{attachment_id}", headers=headers)
        assert one.status_code == 200 and one.get_json()["thumbnail_url"]

    missing = client.get(f"/v1/attachments/{uuid.uuid4()}", headers=customer)
    for outsider in ("other_customer", "stranger"):
        refused = client.get(f"/v1/attachments/{attachment_id}", headers=auth(people[outsider]))
        assert refused.status_code == 404
        assert refused.get_json()["error"] == missing.get_json()["error"]
    assert error_code(client.get("/v1/attachments/not-an-id", headers=customer)) == (
        404,
        "attachment_not_found",
    )

    # The event log keeps no URL (they are signed when a socket is written to).
    with app.extensions["switchboard.db"].sessions() as session:
        event = session.scalars(
            select(UserEvent).where(UserEvent.user_id == "art", UserEvent.type == "message.created")
        ).one()
    [logged] = event.payload["attachments"]
    assert logged["id"] == attachment_id and "url" not in logged
    signed = sign_event_data(app.extensions["switchboard.storage"], event.type, event.payload)
    assert fetch(signed["attachments"][0]["url"])[0] == 200


def test_a_text_file_declared_as_png_is_rejected(
    app, client, auth, people, conversation, celery_worker, s3_client, bucket
):
    customer = auth(people["customer"])
    attachment_id = uploaded(
        client, customer, b"hello, I am not an image at all", "image/png", "notes.png"
    )
    response = send(
        client, customer, conversation, body="see attached", attachment_ids=[attachment_id]
    )
    assert response.status_code == 202
    message = decided(client, customer, response.get_json()["id"])
    assert (message["status"], message["reason"]) == ("rejected", "attachment_invalid")
    [refused] = message["attachments"]
    assert refused["status"] == "rejected" and "is not a" in refused["reason"]

    with app.extensions["switchboard.db"].sessions() as session:
        event = session.scalars(
            select(UserEvent).where(
                UserEvent.user_id == "cust", UserEvent.type == "message.rejected"
            )
        ).one()
    assert event.payload["reason"] == "attachment_invalid"
    assert event.payload["attachments"][0]["id"] == attachment_id
    # The artist never sees it, and the bad bytes leave the store.
    assert (
        client.get(f"/v1/attachments/{attachment_id}", headers=auth(people["artist"])).status_code
        == 404
    )
    wait_for(lambda: not object_exists(s3_client, bucket, object_key(attachment_id)))


def test_a_jpeg_declared_as_png_is_served_as_jpeg(
    client, auth, people, conversation, celery_worker, s3_client, bucket
):
    customer = auth(people["customer"])
    attachment_id = uploaded(client, customer, image_bytes("JPEG"), "image/png", "photo.png")
    response = send(client, customer, conversation, attachment_ids=[attachment_id])
    assert decided(client, customer, response.get_json()["id"])["status"] == "stored"
    shown = client.get(f"/v1/attachments/{attachment_id}", headers=customer).get_json()
    assert shown["content_type"] == "image/jpeg"
    assert s3_client.head_object(Bucket=bucket, Key=object_key(attachment_id))["ContentType"] == (
        "image/jpeg"
    )


def test_the_store_refuses_what_the_presigned_post_does_not_allow(client, auth, people, app):
    """Oversize, another type, another key and an expired policy: refused by the store
    itself, whatever the client does."""
    customer = auth(people["customer"])
    answer = request_upload(client, customer, size=1000)
    status, text = post_to_store(answer["upload"], b"\xff\xd8\xff" + b"x" * 2000)
    assert status == 400 and "EntityTooLarge" in text
    status, text = post_to_store(answer["upload"], b"x" * 10, fields={"Content-Type": "text/html"})
    assert status == 403
    status, text = post_to_store(answer["upload"], b"x" * 10, fields={"key": "attachments/mine"})
    assert status == 403

    store = app.extensions["switchboard.storage"]
    ttl, store.upload_ttl_seconds = store.upload_ttl_seconds, 1
    try:
        expiring = request_upload(client, customer, size=100)
    finally:
        store.upload_ttl_seconds = ttl
    wait_for(
        lambda: (
            datetime.now(UTC)
            > datetime.fromisoformat(expiring["expires_at"]) + timedelta(seconds=1.5)
        ),
        timeout=10,
    )
    status, text = post_to_store(expiring["upload"], b"x" * 10)
    assert status == 403 and "expired" in text.lower()


def test_upload_requests_are_checked(client, auth, people, app):
    customer = auth(people["customer"])
    max_bytes = app.extensions["switchboard.policy"].attachments.max_bytes
    cases = [
        (
            {"filename": "a.gif", "content_type": "image/gif", "size": 10},
            400,
            "unsupported_attachment_type",
        ),
        (
            {"filename": "a.jpg", "content_type": "image/jpeg", "size": max_bytes + 1},
            413,
            "attachment_too_large",
        ),
        (
            {"filename": "../a.jpg", "content_type": "image/jpeg", "size": 10},
            400,
            "invalid_filename",
        ),
        (
            {"filename": "a\x01.jpg", "content_type": "image/jpeg", "size": 10},
            400,
            "invalid_filename",
        ),
        ({"filename": "a.jpg", "content_type": "image/jpeg", "size": 0}, 400, "invalid_request"),
        ({"filename": "a.jpg", "content_type": "image/jpeg", "size": "10"}, 400, "invalid_request"),
        ({"filename": "a.jpg", "content_type": "image/jpeg"}, 400, "invalid_request"),
        (
            {"filename": "a.jpg", "content_type": "image/jpeg", "size": 1, "key": "x"},
            400,
            "invalid_request",
        ),
    ]
    for body, status, code in cases:
        response = client.post("/v1/attachments", json=body, headers=customer)
        assert error_code(response) == (status, code), (body, response.get_json())
    assert count(app, Attachment) == 0
    assert error_code(client.post("/v1/attachments", json={})) == (401, "missing_token")


def test_a_policy_with_attachments_needs_a_bucket(database_url, redis_url):
    from app import create_app
    from app.settings import SettingsError
    from tests.conftest import settings_for

    settings = settings_for(
        database_url, redis_url, SWITCHBOARD_POLICY="marketplace", SWITCHBOARD_S3_BUCKET=""
    )
    with pytest.raises(SettingsError, match="SWITCHBOARD_S3_BUCKET: is required"):
        create_app(settings)


@pytest.mark.parametrize("policy_name", ["bookstore"])
def test_presets_without_attachments_refuse_them(client, auth, make_user):
    alice, bob = make_user("alice", role="manager"), make_user("bob", role="member")
    upload = client.post(
        "/v1/attachments",
        json={"filename": "a.jpg", "content_type": "image/jpeg", "size": 10},
        headers=auth(alice),
    )
    assert error_code(upload) == (403, "attachments_disabled")
    conversation = client.post(
        "/v1/conversations", json={"participant_id": "bob"}, headers=auth(alice)
    ).get_json()["id"]
    response = send(
        client, auth(alice), conversation, body="hi", attachment_ids=[str(uuid.uuid4())]
    )
    assert error_code(response) == (403, "attachments_disabled")
    assert bob is not None


def test_sends_claim_only_the_senders_own_uploaded_unsent_attachments(
    app, client, auth, people, conversation, celery_worker
):
    customer, artist = auth(people["customer"]), auth(people["artist"])
    jpeg = image_bytes("JPEG")
    mine = uploaded(client, customer, jpeg)
    theirs = uploaded(client, artist, jpeg)
    not_uploaded = request_upload(client, customer, size=100)["id"]
    messages_before = count(app, Message)

    assert error_code(send(client, customer, conversation, attachment_ids=[theirs])) == (
        404,
        "attachment_not_found",
    )
    assert error_code(send(client, customer, conversation, attachment_ids=[str(uuid.uuid4())])) == (
        404,
        "attachment_not_found",
    )
    assert error_code(send(client, customer, conversation, attachment_ids=["nope"])) == (
        404,
        "attachment_not_found",
    )
    assert error_code(send(client, customer, conversation, attachment_ids=[not_uploaded])) == (
        400,
        "attachment_not_uploaded",
    )
    assert error_code(send(client, customer, conversation, attachment_ids=[mine, mine])) == (
        400,
        "invalid_request",
    )
    five = [mine] + [str(uuid.uuid4()) for _ in range(4)]
    assert error_code(send(client, customer, conversation, attachment_ids=five)) == (
        400,
        "too_many_attachments",
    )
    # A refused send wrote nothing and claimed nothing.
    assert count(app, Message) == messages_before
    assert count(app, Attachment, Attachment.message_id.is_not(None)) == 0
    assert error_code(send(client, customer, conversation, body="")) == (400, "empty_message")

    # A photo alone (empty body) is a message; the same client_id and attachments give the
    # same id, other attachments with that client_id are a 409, and it is used only once.
    first = send(client, customer, conversation, attachment_ids=[mine], client_id="c-1")
    again = send(client, customer, conversation, attachment_ids=[mine], client_id="c-1")
    assert first.status_code == again.status_code == 202
    assert first.get_json()["id"] == again.get_json()["id"]
    other = uploaded(client, customer, jpeg)
    assert error_code(
        send(client, customer, conversation, attachment_ids=[other], client_id="c-1")
    ) == (
        409,
        "client_id_reused",
    )
    assert error_code(send(client, customer, conversation, attachment_ids=[mine])) == (
        409,
        "attachment_in_use",
    )
    assert decided(client, customer, first.get_json()["id"])["status"] == "stored"


def test_a_rejected_send_lets_its_good_attachments_go(
    app, client, auth, people, conversation, celery_worker
):
    """Blocked after the API accepted the send: the photo may be sent again."""
    customer, artist = auth(people["customer"]), auth(people["artist"])
    photo = uploaded(client, customer, image_bytes("PNG", mode="RGBA"), "image/png", "a.png")
    queued_id = None
    with app.extensions["switchboard.db"].transaction() as session:
        from app.models import User
        from app.services.sends import accept_send

        queued_id = accept_send(
            session,
            app.extensions["switchboard.policy"],
            session.get_one(User, "cust"),
            conversation,
            "",
            "held",
            enqueue=lambda _message_id: None,
            attachment_ids=[photo],
            store=app.extensions["switchboard.storage"],
        ).message_id
    assert client.put("/v1/blocks/cust", headers=artist).status_code in (200, 201, 204)
    from workers.tasks import send_message

    send_message.apply_async(args=[str(queued_id)])
    message = decided(client, customer, str(queued_id))
    assert (message["status"], message["reason"]) == ("rejected", "blocked")
    assert client.get(f"/v1/attachments/{photo}", headers=customer).get_json()["status"] == "ready"
    client.delete("/v1/blocks/cust", headers=artist)
    resent = send(client, customer, conversation, attachment_ids=[photo])
    assert resent.status_code == 202
    assert decided(client, customer, resent.get_json()["id"])["status"] == "stored"


# --------------------------------------------------------------------------- lifecycle


def stored_photo(client, headers, conversation) -> tuple[str, str]:
    attachment_id = uploaded(client, headers, image_bytes("WEBP"), "image/webp", "ref.webp")
    response = send(client, headers, conversation, body="ref", attachment_ids=[attachment_id])
    message_id = response.get_json()["id"]
    assert decided(client, headers, message_id)["status"] == "stored"
    return message_id, attachment_id


def test_sender_delete_takes_the_objects_with_it(
    app, client, auth, people, conversation, celery_worker, s3_client, bucket
):
    customer, artist = auth(people["customer"]), auth(people["artist"])
    message_id, attachment_id = stored_photo(client, customer, conversation)
    deleted = client.delete(f"/v1/messages/{message_id}", headers=customer)
    assert deleted.status_code == 200 and deleted.get_json()["attachments"] == []
    for headers in (customer, artist):
        assert client.get(f"/v1/attachments/{attachment_id}", headers=headers).status_code == 404
    wait_for(lambda: count(app, Attachment) == 0)
    for key in (object_key(attachment_id), thumbnail_key(attachment_id)):
        assert not object_exists(s3_client, bucket, key)


def test_moderator_sees_the_reported_photo_and_removal_deletes_it(
    app, client, auth, people, conversation, celery_worker, s3_client, bucket
):
    customer, artist, admin = (auth(people[name]) for name in ("customer", "artist", "admin"))
    message_id, attachment_id = stored_photo(client, customer, conversation)
    report = client.post(
        f"/v1/messages/{message_id}/reports", json={"reason": "inappropriate"}, headers=artist
    )
    assert report.status_code == 201, report.get_json()
    queue = client.get("/v1/moderation/reports?status=pending", headers=admin).get_json()
    [shown] = queue["items"][0]["message"]["attachments"]
    assert fetch(shown["url"])[0] == 200
    # Not in the conversation: the attachment itself stays hidden from the admin.
    assert client.get(f"/v1/attachments/{attachment_id}", headers=admin).status_code == 404

    removed = client.post(
        f"/v1/moderation/reports/{report.get_json()['id']}",
        json={"action": "remove"},
        headers=admin,
    )
    assert removed.status_code == 200
    assert removed.get_json()["message"]["attachments"] == []
    wait_for(lambda: not object_exists(s3_client, bucket, object_key(attachment_id)))


def test_retention_soft_delete_and_purge_leave_no_object(
    app, client, auth, people, conversation, celery_worker, s3_client, bucket
):
    customer = auth(people["customer"])
    message_id, attachment_id = stored_photo(client, customer, conversation)
    later = datetime.now(UTC) + timedelta(days=400)
    policy, store = app.extensions["switchboard.policy"], app.extensions["switchboard.storage"]
    with app.extensions["switchboard.db"].transaction() as session:
        # No task (as if the enqueue were lost): the clean-up job deletes the objects.
        session.info.pop("switchboard.attachment_object_remover", None)
        for job in ("soft-delete-expired", "purge-deleted", "clean-attachments"):
            run = run_job(
                session,
                policy,
                job,
                enqueue_send=lambda _id: None,
                store=store,
                now=later,
                force=True,
            )
            assert run.outcome == "succeeded", run
    assert count(app, Message, Message.id == uuid.UUID(message_id)) == 0
    assert count(app, Attachment) == 0
    for key in (object_key(attachment_id), thumbnail_key(attachment_id)):
        assert not object_exists(s3_client, bucket, key)


def test_uploads_never_sent_are_deleted_after_a_day(app, client, auth, people, s3_client, bucket):
    customer = auth(people["customer"])
    attachment_id = uploaded(client, customer, image_bytes("PNG"), "image/png", "x.png")
    fresh = uploaded(client, customer, image_bytes("PNG"), "image/png", "y.png")
    policy, store = app.extensions["switchboard.policy"], app.extensions["switchboard.storage"]
    with app.extensions["switchboard.db"].transaction() as session:
        session.execute(
            Attachment.__table__.update()
            .where(Attachment.id == uuid.UUID(attachment_id))
            .values(created_at=func.now() - timedelta(hours=25))
        )
    with app.extensions["switchboard.db"].transaction() as session:
        run = run_job(
            session,
            policy,
            "clean-attachments",
            enqueue_send=lambda _id: None,
            store=store,
            force=True,
        )
    assert run.rows >= 2  # marked deleted, then its objects and row gone
    assert client.get(f"/v1/attachments/{attachment_id}", headers=customer).status_code == 404
    assert not object_exists(s3_client, bucket, object_key(attachment_id))
    assert (
        client.get(f"/v1/attachments/{fresh}", headers=customer).get_json()["status"] == "pending"
    )
    assert object_exists(s3_client, bucket, object_key(fresh))


def test_readiness_names_the_store(client):
    checks = client.get("/health/ready").get_json()["checks"]
    assert checks["storage"] == "ok"


# --------------------------------------------------------------------------- pure logic


def test_sniffing_goes_by_the_bytes():
    assert sniff_image_type(image_bytes("JPEG")[:16]) == "image/jpeg"
    assert sniff_image_type(image_bytes("PNG")[:16]) == "image/png"
    assert sniff_image_type(image_bytes("WEBP")[:16]) == "image/webp"
    assert sniff_image_type(image_bytes("GIF")[:16]) is None
    assert sniff_image_type(b"<html><script>") is None
    assert sniff_image_type(b"RIFF\x00\x00\x00\x00WAVE") is None


def check(data: bytes, **limits):
    options = {"allowed_types": ALLOWED, "max_pixels": 40_000_000, "thumbnail_size": 64}
    return inspect_image(data, **(options | limits))


def test_inspect_image_makes_thumbnails_that_keep_transparency():
    facts = check(image_bytes("PNG", (400, 100), mode="RGBA"))
    assert (facts.content_type, facts.width, facts.height) == ("image/png", 400, 100)
    assert facts.thumbnail_type == "image/png"
    with Image.open(io.BytesIO(facts.thumbnail)) as thumbnail:
        assert thumbnail.size == (64, 16) and thumbnail.mode == "RGBA"
    jpeg = check(image_bytes("JPEG", (100, 400)))
    assert jpeg.thumbnail_type == "image/jpeg"
    with Image.open(io.BytesIO(jpeg.thumbnail)) as thumbnail:
        assert thumbnail.size == (16, 64)


def test_inspect_image_refuses_bombs_truncation_and_other_types():
    # 20,000 x 20,000 one-bit pixels: a 60 KB file that would decode to 400 megapixels.
    bomb = image_bytes("PNG", (20_000, 20_000), mode="1")
    assert len(bomb) < 200_000
    with pytest.raises(InvalidImage, match="more than the 40000000 pixels allowed"):
        check(bomb, max_pixels=40_000_000)
    # Under Pillow's own guard, ours: the header's size is checked before decoding.
    with pytest.raises(InvalidImage, match="is 2000x2000 pixels, more than the 1000000"):
        check(image_bytes("PNG", (2000, 2000), mode="1"), max_pixels=1_000_000)
    photo = image_bytes("JPEG", (300, 300), noise=True)
    with pytest.raises(InvalidImage, match="could not be read"):
        check(photo[: len(photo) // 2])
    with pytest.raises(InvalidImage, match="is a WebP image"):
        check(image_bytes("WEBP"), allowed_types=("image/jpeg",))
    with pytest.raises(InvalidImage, match="is not a"):
        check(b"GIF89a" + b"\x00" * 100)


# --------------------------------------------------------------------------- on the socket


@pytest.fixture(scope="module")
def live_marketplace(database_url, redis_url, tmp_path_factory):
    """The Procfile's web and worker lines with the marketplace policy and the run's store."""
    from tests.test_stream import live_env, separate_redis_db

    live_redis = separate_redis_db(redis_url, 3)
    redis.Redis.from_url(live_redis).flushdb()
    env = live_env(database_url, live_redis) | {"SWITCHBOARD_POLICY": "marketplace"}
    system = LiveSystem(env, tmp_path_factory.mktemp("live-marketplace"), web_count=1).start()
    yield system
    system.stop()


def test_the_artist_sees_the_photo_on_the_socket(
    live_marketplace, app, client, auth, people, conversation
):
    """Through the real processes: upload, send, and the recipient's socket gets the
    message with URLs signed as the frame was written, which fetch the photo."""
    settings = app.extensions["switchboard.settings"]
    artist_token = mint_token(settings, "art", "t1", ttl=timedelta(minutes=10))
    customer_token = mint_token(settings, "cust", "t1", ttl=timedelta(minutes=10))
    base = live_marketplace.url()
    photo = image_bytes("JPEG", (800, 600), noise=True)
    status, answer = http(
        "POST",
        base + "/v1/attachments",
        customer_token,
        {"filename": "ref.jpg", "content_type": "image/jpeg", "size": len(photo)},
    )
    assert status == 201, answer
    assert post_to_store(answer["upload"], photo)[0] in (200, 201, 204)
    stream = Stream(live_marketplace.ws_url(), artist_token, last_event_id=0)
    try:
        status, sent = http(
            "POST",
            f"{base}/v1/conversations/{conversation}/messages",
            customer_token,
            {"body": "this one", "client_id": "live-1", "attachment_ids": [answer["id"]]},
        )
        assert status == 202, sent
        [frame] = stream.events(1)
    finally:
        stream.close()
    assert frame["type"] == "message.created" and frame["data"]["id"] == sent["id"]
    [shown] = frame["data"]["attachments"]
    assert (shown["id"], shown["width"], shown["height"]) == (answer["id"], 800, 600)
    assert fetch(shown["url"])[:2] == (200, photo)
    assert fetch(shown["thumbnail_url"])[0] == 200


def test_upload_requests_have_their_own_rate_limit(app_factory, clean_state, make_user, auth):
    """The marketplace's `[rate_limit.actions] attachment`: 8 at once, then 1 a second;
    the 9th is a 429 that records nothing."""
    limited = app_factory(SWITCHBOARD_POLICY="marketplace", SWITCHBOARD_RATE_LIMITS_ENABLED="true")
    client = limited.test_client()
    headers = auth(make_user("cust", role="customer"))
    body = {"filename": "a.jpg", "content_type": "image/jpeg", "size": 100}
    for _ in range(8):
        assert client.post("/v1/attachments", json=body, headers=headers).status_code == 201
    refused = client.post("/v1/attachments", json=body, headers=headers)
    assert error_code(refused) == (429, "rate_limited") and refused.headers["Retry-After"]
    assert "attachment uploads" in refused.get_json()["error"]["message"]
    assert count(limited, Attachment) == 8
