"""Broadcasts (cardshow, seed 001): quota spent atomically per period key, the durable
202, chunked idempotent fan-out on the broadcast queue with one announcement per chunk,
the recipients' inbox, the reset and redispatch jobs; and, against live Procfile
processes, the staging flow on real sockets and a direct message that a 5,000-recipient
fan-out does not hold up."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
import redis
import sqlalchemy
from sqlalchemy import func, select, text

from app.auth import mint_token
from app.events import events_channel, redis_db_of
from app.models import Broadcast, BroadcastQuotaUsage, BroadcastRecipient, User, UserEvent
from app.problems import ApiError
from app.services.broadcasts import (
    accept_broadcast,
    audience_after,
    deliver_chunk,
    fan_out_chunk,
    period_key,
    quota_status,
    redispatch_stale_broadcasts,
    reset_broadcast_quotas,
)
from app.stream.connection import StreamConnection
from app.stream.hub import Hub
from schedules.runner import run_job
from tests.helpers import error_code, events_of, run_threads, wait_for
from tests.live import LiveProcess, LiveSystem, Stream, http
from tests.test_stream import live_env, separate_redis_db

pytestmark = pytest.mark.parametrize("policy_name", ["cardshow"])


def post(client, auth, sender, audience, body="Doors open at 9", client_id=None, scope=None):
    payload = {"audience": audience, "body": body, "client_id": client_id or uuid.uuid4().hex}
    if scope is not None:
        payload["scope"] = scope
    return client.post("/v1/broadcasts", json=payload, headers=auth(sender))


def db(app):
    return app.extensions["switchboard.db"]


def policy(app):
    return app.extensions["switchboard.policy"]


def accept(app, sender_id, audience="attendee", *, now=None, scope="show-1", client_id=None):
    """Accept a broadcast through the service, as the API does, without enqueueing."""
    with db(app).transaction() as session:
        accepted = accept_broadcast(
            session,
            policy(app),
            session.get_one(User, sender_id),
            audience=audience,
            scope=scope,
            body="hello",
            client_id=client_id or uuid.uuid4().hex,
            enqueue=lambda _id: None,
            now=now,
        )
    return accepted.broadcast_id


def fan_out_all(app, broadcast_id, chunk_size=1000) -> list[str]:
    outcomes = []
    while not outcomes or outcomes[-1] == "delivered":
        with db(app).transaction() as session:
            outcomes.append(
                fan_out_chunk(
                    session,
                    policy(app),
                    broadcast_id,
                    enqueue=lambda _id: None,
                    chunk_size=chunk_size,
                ).outcome
            )
    return outcomes


def used(app, sender_id) -> int:
    with db(app).sessions() as session:
        return session.scalar(
            select(func.coalesce(func.sum(BroadcastQuotaUsage.used), 0)).where(
                BroadcastQuotaUsage.sender_id == sender_id
            )
        )


def inbox_rows(app) -> int:
    with db(app).sessions() as session:
        return session.scalar(select(func.count()).select_from(BroadcastRecipient))


@pytest.fixture
def show(make_user):
    """An organizer, an MVP dealer, a dealer and three attendees of one show."""
    return SimpleNamespace(
        organizer=make_user("org", role="organizer"),
        mvp=make_user("mvp", role="mvp_dealer"),
        dealer=make_user("dealer", role="dealer"),
        attendees=[make_user(f"att{i}", role="attendee") for i in range(3)],
    )


# --- accepting: policy, quota, idempotency ----------------------------------------------


def test_quota_and_audience_rules_of_seed_001(client, auth, show, celery_worker):
    first = post(client, auth, show.organizer, "attendee", scope="show-1")
    second = post(client, auth, show.organizer, "all", scope="show-1")
    third = post(client, auth, show.organizer, "attendee", scope="show-1")
    assert (first.status_code, first.json["status"]) == (202, "queued")
    assert second.status_code == 202
    status, code = error_code(third)
    assert status == 403 and "quota" in code
    # Quotas count per show: another show's quota is untouched.
    assert post(client, auth, show.organizer, "attendee", scope="show-2").status_code == 202
    assert post(client, auth, show.mvp, "attendee", scope="show-1").status_code == 202
    assert error_code(post(client, auth, show.mvp, "dealer", scope="show-2")) == (
        403,
        "audience_not_allowed",
    )
    assert error_code(post(client, auth, show.dealer, "attendee")) == (
        403,
        "broadcast_not_allowed",
    )
    quota = client.get("/v1/broadcasts/quota?scope=show-1", headers=auth(show.organizer)).json
    [rule] = quota["rules"]
    assert (rule["quota"], rule["used"], rule["left"]) == (2, 2, 0)
    assert "attendee" in rule["audiences"] and rule["resets_at"].endswith("02:00:00+00:00")
    mvp_quota = client.get("/v1/broadcasts/quota?scope=show-2", headers=auth(show.mvp)).json
    assert (mvp_quota["rules"][0]["used"], mvp_quota["rules"][0]["left"]) == (0, 1)
    assert client.get("/v1/broadcasts/quota", headers=auth(show.dealer)).json["rules"] == []

    # Every accepted broadcast is fanned out by the worker; the attendees get all four,
    # the dealer only the organizer's broadcast to "all".
    for response in (first, second):
        wait_for(
            lambda r=response: (
                client.get(f"/v1/broadcasts/{r.json['id']}", headers=auth(show.organizer)).json[
                    "status"
                ]
                == "stored"
            )
        )
    attendee = show.attendees[0]
    wait_for(lambda: len(client.get("/v1/broadcasts", headers=auth(attendee)).json["items"]) == 4)
    dealer_items = client.get("/v1/broadcasts", headers=auth(show.dealer)).json["items"]
    assert [item["id"] for item in dealer_items] == [second.json["id"]]
    sender_view = client.get(f"/v1/broadcasts/{second.json['id']}", headers=auth(show.organizer))
    # "all": everyone in the tenant but the sender.
    assert sender_view.json["recipient_count"] == 5


def test_twenty_concurrent_requests_against_a_quota_of_two(app, client, auth, show):
    statuses: list[tuple[int, str | None]] = []

    def one() -> None:
        response = app.test_client().post(
            "/v1/broadcasts",
            json={
                "audience": "attendee",
                "scope": "show-9",
                "body": "x",
                "client_id": uuid.uuid4().hex,
            },
            headers=auth(show.organizer),
        )
        result = error_code(response) if response.status_code != 202 else (202, None)
        assert result[0] == 202 or (result[0] == 403 and "quota" in (result[1] or "")), result
        statuses.append(result)

    run_threads(*[one for _ in range(20)])
    assert sorted(s for s, _ in statuses) == [202, 202] + [403] * 18
    assert used(app, show.organizer.id) == 2
    with db(app).sessions() as session:
        assert session.scalar(select(func.count()).select_from(Broadcast)) == 2


def test_a_retry_spends_once_and_a_refusal_spends_nothing(app, client, auth, show):
    first = post(client, auth, show.mvp, "attendee", client_id="b-1", scope="s")
    again = post(client, auth, show.mvp, "attendee", client_id="b-1", scope="s")
    assert (first.status_code, again.status_code) == (202, 202)
    assert first.json["id"] == again.json["id"]
    assert used(app, show.mvp.id) == 1
    assert error_code(
        post(client, auth, show.mvp, "attendee", body="other", client_id="b-1", scope="s")
    ) == (409, "client_id_reused")
    # Refused by the audience rule and by the exhausted quota: neither spends or writes.
    assert post(client, auth, show.mvp, "dealer", scope="t").status_code == 403
    assert post(client, auth, show.mvp, "attendee", scope="s").status_code == 403
    assert used(app, show.mvp.id) == 1
    with db(app).sessions() as session:
        assert session.scalar(select(func.count()).select_from(Broadcast)) == 1


def test_bad_input_is_a_clear_4xx(app, client, auth, show):
    organizer = show.organizer
    cases = [
        ({"audience": "attendee", "body": "x"}, 400),  # no client_id
        ({"audience": "attendee", "body": "x", "client_id": "c", "extra": 1}, 400),
        ({"audience": "Not A Role", "body": "x", "client_id": "c"}, 400),
        ({"audience": "attendee", "body": 5, "client_id": "c"}, 400),
        ({"audience": "attendee", "body": "x", "client_id": "c", "scope": "a b"}, 400),
        ({"audience": "attendee", "body": "", "client_id": "c"}, 400),
        ({"audience": "attendee", "body": "x" * 1001, "client_id": "c"}, 413),
    ]
    for payload, expected in cases:
        response = client.post("/v1/broadcasts", json=payload, headers=auth(organizer))
        assert response.status_code == expected, (payload, response.json)
        assert response.json["error"]["code"]
    assert error_code(post(client, auth, organizer, "wizard")) == (400, "unknown_audience")
    assert client.post("/v1/broadcasts", json={}).status_code == 401
    assert client.get("/v1/broadcasts?cursor=nope", headers=auth(organizer)).status_code == 400
    assert client.get("/v1/broadcasts?limit=0", headers=auth(organizer)).status_code == 400
    assert (
        client.get("/v1/broadcasts/quota?scope=a%20b", headers=auth(organizer)).status_code == 400
    )
    for path in ("/v1/broadcasts/not-a-uuid", f"/v1/broadcasts/{uuid.uuid4()}"):
        assert error_code(client.get(path, headers=auth(organizer))) == (
            404,
            "broadcast_not_found",
        )
        assert client.post(path + "/read", headers=auth(organizer)).status_code == 404
    assert used(app, organizer.id) == 0


# --- the quota period and its reset job -------------------------------------------------


def test_the_period_turns_at_0200_utc_and_the_reset_job_never_gives_more(app, show):
    organizer = show.organizer.id
    before = datetime(2026, 11, 23, 1, 59, tzinfo=UTC)
    at_reset = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    accept(app, organizer, now=before - timedelta(hours=20))  # 2026-11-22 05:59
    accept(app, organizer, now=before)
    with pytest.raises(ApiError) as refused:
        accept(app, organizer, now=before)
    assert "quota" in refused.value.code
    with db(app).sessions() as session:
        status = quota_status(session, policy(app), show.organizer, "show-1", before)
        assert (status["rules"][0]["left"], status["rules"][0]["resets_at"]) == (
            0,
            at_reset.isoformat(),
        )
        assert (
            quota_status(session, policy(app), show.organizer, "show-1", at_reset)["rules"][0][
                "left"
            ]
            == 2
        )

    # The reset job, run at any time, twice, or (below) not at all, changes nothing about
    # the period still running: 01:59 stays refused.
    for moment in (before, before, at_reset):
        with db(app).transaction() as session:
            reset_broadcast_quotas(session, policy(app), moment)
    with pytest.raises(ApiError):
        accept(app, organizer, now=before)

    # From 02:00 the new period counts from zero, whether or not the job ran.
    accept(app, organizer, now=at_reset)
    accept(app, organizer, now=at_reset + timedelta(hours=23, minutes=59))
    with pytest.raises(ApiError):
        accept(app, organizer, now=at_reset + timedelta(hours=12))
    keys = {period_key(policy(app), before), period_key(policy(app), at_reset)}
    assert keys == {"2026-11-22T02:00Z", "2026-11-23T02:00Z"}

    # Through the runner, with the clock passed in: the ended period goes, the current stays.
    with db(app).transaction() as session:
        run = run_job(
            session,
            policy(app),
            "reset-broadcast-quotas",
            enqueue_send=lambda _id: None,
            now=at_reset + timedelta(hours=2),
        )
    assert (run.outcome, run.rows) == ("succeeded", 1)
    with db(app).sessions() as session:
        periods = session.scalars(select(BroadcastQuotaUsage.period)).all()
    assert periods == ["2026-11-23T02:00Z"]


# --- fan-out ----------------------------------------------------------------------------


def test_chunks_are_idempotent_and_each_is_one_announcement(app, make_user, show, redis_url):
    for i in range(3, 7):
        make_user(f"att{i}", role="attendee")  # 7 attendees: chunks of 3, 3 and 1
    broadcast_id = accept(app, show.organizer.id)
    subscriber = redis.Redis.from_url(redis_url).pubsub()
    subscriber.subscribe(events_channel(redis_db_of(redis.Redis.from_url(redis_url))))
    wait_for(lambda: subscriber.get_message(timeout=0.1))  # the subscribe confirmation
    try:
        assert fan_out_all(app, broadcast_id, chunk_size=3) == ["delivered", "delivered", "stored"]
        announcements = []

        def read() -> bool:
            message = subscriber.get_message(timeout=0.1)
            if message and message["type"] == "message":
                announcements.append(json.loads(message["data"]))
            return len(announcements) >= 3

        wait_for(read)
    finally:
        subscriber.close()
    assert [len(a["recipients"]) for a in announcements] == [3, 3, 1]
    assert {a["type"] for a in announcements} == {"broadcast.created"}
    recipients = [user_id for a in announcements for user_id, _seq in a["recipients"]]
    assert recipients == sorted(f"att{i}" for i in range(7))

    # Running a chunk again, or the whole task again, writes nothing twice.
    with db(app).transaction() as session:
        broadcast = session.get_one(Broadcast, broadcast_id)
        ids = audience_after(session, policy(app), broadcast, "", 3)
        assert deliver_chunk(session, broadcast, ids) == 0
    assert fan_out_all(app, broadcast_id, chunk_size=3) == ["duplicate"]
    assert inbox_rows(app) == 7
    for i in range(7):
        assert [e.type for e in events_of(app, f"att{i}")] == ["broadcast.created"]
    with db(app).sessions() as session:
        broadcast = session.get_one(Broadcast, broadcast_id)
        assert (broadcast.status, broadcast.recipient_count) == ("stored", 7)


def test_a_chunk_rerun_after_the_cursor_is_lost_delivers_only_the_rest(app, show, make_user):
    broadcast_id = accept(app, show.organizer.id)
    with db(app).transaction() as session:
        fan_out_chunk(session, policy(app), broadcast_id, enqueue=lambda _id: None, chunk_size=2)
    # As if the chunk's task ran again from the start: the two reached are skipped.
    with db(app).transaction() as session:
        session.execute(
            text("UPDATE broadcasts SET fanout_cursor = '' WHERE id = :id"), {"id": broadcast_id}
        )
    fan_out_all(app, broadcast_id, chunk_size=2)
    assert inbox_rows(app) == 3
    assert all(len(events_of(app, f"att{i}")) == 1 for i in range(3))


def test_the_inbox_lists_newest_first_with_read_state_and_isolation(
    app, client, auth, show, make_user, celery_worker
):
    ids = []
    for audience in ("attendee", "all"):
        response = post(client, auth, show.organizer, audience)
        assert response.status_code == 202
        ids.append(response.json["id"])
    attendee = show.attendees[1]
    wait_for(lambda: len(client.get("/v1/broadcasts", headers=auth(attendee)).json["items"]) == 2)
    page = client.get("/v1/broadcasts?limit=1", headers=auth(attendee)).json
    assert [item["id"] for item in page["items"]] == [ids[1]]
    assert page["items"][0]["read"] is False and page["items"][0]["body"] == "Doors open at 9"
    rest = client.get(
        f"/v1/broadcasts?limit=1&cursor={page['next_cursor']}", headers=auth(attendee)
    )
    assert [item["id"] for item in rest.json["items"]] == [ids[0]]
    assert rest.json["next_cursor"] is None

    marked = client.post(f"/v1/broadcasts/{ids[0]}/read", headers=auth(attendee))
    assert marked.status_code == 200 and marked.json["read"] is True
    again = client.post(f"/v1/broadcasts/{ids[0]}/read", headers=auth(attendee)).json
    assert again["read_at"] == marked.json["read_at"]  # the first read counts
    items = client.get("/v1/broadcasts", headers=auth(attendee)).json["items"]
    assert [(item["id"], item["read"]) for item in items] == [(ids[1], False), (ids[0], True)]
    [event] = [e for e in events_of(app, attendee.id) if e.payload["id"] == ids[0]]
    assert event.type == "broadcast.created" and event.payload["body"] == "Doors open at 9"

    # Not a recipient, or another tenant: the same 404 as a broadcast that does not exist.
    outsider = make_user("outsider", tenant="t2", role="attendee")
    for user in (outsider, show.mvp):
        assert error_code(client.get(f"/v1/broadcasts/{ids[0]}", headers=auth(user))) == (
            404,
            "broadcast_not_found",
        )
        assert client.post(f"/v1/broadcasts/{ids[0]}/read", headers=auth(user)).status_code == 404
    assert client.get("/v1/broadcasts", headers=auth(outsider)).json["items"] == []
    assert client.get("/v1/broadcasts", headers=auth(show.organizer)).json["items"] == []


def test_a_stalled_broadcast_is_redispatched_and_finished(app, show, celery_worker):
    from workers.tasks import run_periodic_job

    lost = accept(app, show.organizer.id)  # committed, but its task never reached a worker
    fresh = accept(app, show.organizer.id, scope="show-2")
    with db(app).transaction() as session:
        session.execute(
            text(
                "UPDATE broadcasts SET created_at = created_at - make_interval(secs => 30)"
                " WHERE id = :id"
            ),
            {"id": lost},
        )
        # Under a threshold it has not reached, nothing is claimed.
        assert redispatch_stale_broadcasts(session, print, stale_after=timedelta(minutes=5)) == 0

    assert run_periodic_job.apply(args=["redispatch-broadcasts"]).get() == 1

    def status(broadcast_id) -> str:
        with db(app).sessions() as session:
            return session.scalar(select(Broadcast.status).where(Broadcast.id == broadcast_id))

    wait_for(lambda: status(lost) == "stored")
    assert status(fresh) == "queued"  # accepted a moment ago: left to its own task
    assert inbox_rows(app) == 3


def test_the_worker_rejects_and_refunds_when_the_sender_lost_the_right(app, show):
    broadcast_id = accept(app, show.mvp.id)
    with db(app).transaction() as session:
        session.get_one(User, show.mvp.id).role = "dealer"
    assert fan_out_all(app, broadcast_id) == ["rejected"]
    assert used(app, show.mvp.id) == 0 and inbox_rows(app) == 0


# --- the hub ----------------------------------------------------------------------------


class FakeSocket:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.offered: list = []

    def offer(self, item) -> None:
        self.offered.append(item)


def test_the_hub_fans_a_batch_out_to_its_local_sockets_and_single_events_still_work(app):
    hub = Hub("redis://unused")
    phone, laptop, other = FakeSocket("a"), FakeSocket("a"), FakeSocket("c")
    for socket in (phone, laptop, other):
        hub.register(socket)  # type: ignore[arg-type]
    data = {"id": "b1", "body": "hi"}
    offered = hub.dispatch_batch(
        {
            "type": "broadcast.created",
            "data": data,
            "recipients": [["a", 7], ["b", 3], ["x", "bad"]],
        }
    )
    assert offered == 2 and other.offered == []
    for socket in (phone, laptop):
        [item] = socket.offered
        assert (item["user_id"], item["id"], item["type"], item["data"]) == (
            "a",
            7,
            "broadcast.created",
            data,
        )
        assert json.loads(item["encoded"]) == data
    hub.dispatch({"user_id": "c", "id": 1, "type": "message.created", "data": {}})
    assert [item["id"] for item in other.offered] == [1]

    # The connection writes the batch's pre-encoded data as the same frame json would.
    sent: list[str] = []
    connection = StreamConnection(
        SimpleNamespace(send=sent.append),
        "a",
        None,
        last_event_id=None,
        seq_at_connect=6,
        queue_size=4,  # type: ignore[arg-type]
    )
    connection.last_seq = 6
    connection._deliver(phone.offered[0])
    assert json.loads(sent[0]) == {"id": 7, "type": "broadcast.created", "data": data}


# --- live: the Procfile's web, worker and broadcasts processes ----------------------------


@pytest.fixture(scope="module")
def live_cardshow(database_url, redis_url, tmp_path_factory):
    # A Redis database of its own: neither the in-process test workers nor the stream
    # tests' live system (another offset) may take its tasks.
    live_redis = separate_redis_db(redis_url, 4)
    redis.Redis.from_url(live_redis).flushdb()
    env = live_env(database_url, live_redis) | {"SWITCHBOARD_POLICY": "cardshow"}
    logs = tmp_path_factory.mktemp("live-broadcasts")
    system = LiveSystem(env, logs, web_count=1).start()
    broadcasts = LiveProcess(
        "broadcasts", system.env(BROADCAST_CONCURRENCY="2"), logs / "broadcasts.log"
    ).start()
    try:
        yield system
    finally:
        broadcasts.stop()
        system.stop()


@pytest.fixture
def tokens(app):
    settings = app.extensions["switchboard.settings"]
    return lambda user_id, tenant="t1": mint_token(
        settings, user_id, tenant, ttl=timedelta(minutes=10)
    )


def test_seed_001_staging_flow_on_live_sockets(live_cardshow, app, show, tokens):
    url = live_cardshow.url()
    attendee, dealer = (
        Stream(live_cardshow.ws_url(), tokens("att0"), last_event_id=0),
        Stream(live_cardshow.ws_url(), tokens("dealer"), last_event_id=0),
    )
    try:
        accepted = []
        for n in (1, 2):
            status, body = http(
                "POST",
                url + "/v1/broadcasts",
                tokens("org"),
                {
                    "audience": "attendee",
                    "scope": "show-1",
                    "body": f"pre-show {n}",
                    "client_id": f"o{n}",
                },
            )
            assert status == 202, body
            accepted.append(body["id"])
        status, body = http(
            "POST",
            url + "/v1/broadcasts",
            tokens("org"),
            {"audience": "attendee", "scope": "show-1", "body": "pre-show 3", "client_id": "o3"},
        )
        assert status == 403 and "quota" in body["error"]["code"]
        status, body = http(
            "POST",
            url + "/v1/broadcasts",
            tokens("mvp"),
            {"audience": "attendee", "scope": "show-1", "body": "booth 12", "client_id": "m1"},
        )
        assert status == 202
        accepted.append(body["id"])
        status, body = http(
            "POST",
            url + "/v1/broadcasts",
            tokens("mvp"),
            {"audience": "dealer", "scope": "show-1", "body": "to dealers", "client_id": "m2"},
        )
        assert (status, body["error"]["code"]) == (403, "audience_not_allowed")

        frames = attendee.events(3)
        assert {f["type"] for f in frames} == {"broadcast.created"}
        assert sorted(f["data"]["id"] for f in frames) == sorted(accepted)
        assert [f["id"] for f in frames] == [1, 2, 3]
        status, inbox = http("GET", url + "/v1/broadcasts", tokens("att0"))
        assert sorted(item["id"] for item in inbox["items"]) == sorted(accepted)

        # The dealer got none: once every broadcast is stored, the first frame on the
        # dealer's socket is a direct message sent after them.
        for broadcast_id in accepted:
            sender = "mvp" if broadcast_id == accepted[2] else "org"
            wait_for(
                lambda b=broadcast_id, s=sender: (
                    http("GET", f"{url}/v1/broadcasts/{b}", tokens(s))[1]["status"] == "stored"
                )
            )
        assert http("GET", url + "/v1/broadcasts", tokens("dealer"))[1]["items"] == []
        status, conversation = http(
            "POST", url + "/v1/conversations", tokens("org"), {"participant_id": "dealer"}
        )
        status, _ = http(
            "POST",
            f"{url}/v1/conversations/{conversation['id']}/messages",
            tokens("org"),
            {"body": "sentinel", "client_id": "s1"},
        )
        assert status == 202
        [frame] = dealer.events(1)
        assert (frame["type"], frame["data"]["body"]) == ("message.created", "sentinel")
    finally:
        attendee.close()
        dealer.close()


def test_a_direct_message_is_not_held_up_by_a_5000_recipient_fan_out(
    live_cardshow, app, make_user, tokens
):
    make_user("org", role="organizer")
    with db(app).transaction() as session:
        session.execute(
            text(
                "INSERT INTO users (id, tenant_id, role, tier, display_name) "
                "SELECT 'a' || lpad(n::text, 5, '0'), 't1', 'attendee', 'standard', 'A' "
                "FROM generate_series(0, 4999) AS n"
            )
        )
    url = live_cardshow.url()
    status, conversation = http(
        "POST", url + "/v1/conversations", tokens("org"), {"participant_id": "a00000"}
    )
    assert status == 201, conversation
    stream = Stream(live_cardshow.ws_url(), tokens("a00000"), last_event_id=0)
    # Hold the last recipient's row: the fan-out reaches 4,000 recipients, then its last
    # chunk waits here. Whatever happens meanwhile happens during the fan-out, for sure.
    holder = sqlalchemy.create_engine(db(app).engine.url).connect()
    try:
        holder.execute(text("SELECT id FROM users WHERE id = 'a04999' FOR UPDATE"))
        status, body = http(
            "POST",
            url + "/v1/broadcasts",
            tokens("org"),
            {"audience": "attendee", "scope": "big", "body": "everyone!", "client_id": "big"},
        )
        assert status == 202, body
        broadcast_id = uuid.UUID(body["id"])

        def progress() -> tuple[str, int]:
            with db(app).sessions() as session:
                row = session.execute(
                    select(Broadcast.status, Broadcast.recipient_count).where(
                        Broadcast.id == broadcast_id
                    )
                ).one()
            return row.status, row.recipient_count

        wait_for(lambda: progress()[1] >= 4000, timeout=60)
        status, message = http(
            "POST",
            f"{url}/v1/conversations/{conversation['id']}/messages",
            tokens("org"),
            {"body": "meet at booth 3", "client_id": "dm-1"},
        )
        assert status == 202
        frames = stream.events(2, timeout=30)
        assert {f["type"] for f in frames} == {"broadcast.created", "message.created"}
        status, stored = http("GET", f"{url}/v1/messages/{message['id']}", tokens("org"))
        assert stored["status"] == "stored"
        assert progress() == ("queued", 4000)  # the fan-out was still under way
    finally:
        holder.rollback()
        holder.close()
        stream.close()
    wait_for(lambda: progress() == ("stored", 5000), timeout=60)
    with db(app).sessions() as session:
        assert (
            session.scalar(
                select(func.count())
                .select_from(UserEvent)
                .where(UserEvent.type == "broadcast.created")
            )
            == 5000
        )
