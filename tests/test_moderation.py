"""Moderation end to end on the cardshow preset: reports of messages, the moderators'
queue, removal (a placeholder for everyone) and dismissal, with audit rows and metrics."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from app.models import AuditLog, Message, Participant, Report
from app.policy import PolicyError, parse_policy
from app.services.moderation import NOTE_MAX_LENGTH, resolve_report
from tests.helpers import error_code, events_of, queue_send, run_threads, wait_for
from workers.tasks import send_message


@pytest.fixture
def policy_name() -> str:
    return "cardshow"


@pytest.fixture
def cast(client, make_user, auth):
    """An attendee in a conversation with an MVP dealer (seed 001: attendees may reach MVP
    dealers, not plain dealers), a moderator and an organizer (both moderator roles)."""
    attendee = make_user("att", role="attendee")
    dealer = make_user("mvp", role="mvp_dealer")
    moderator = make_user("mod", role="moderator")
    organizer = make_user("org", role="organizer")
    created = client.post(
        "/v1/conversations", json={"participant_id": dealer.id}, headers=auth(attendee)
    )
    assert created.status_code == 201
    return attendee, dealer, moderator, organizer, created.json["id"]


def stored_message(app, sender_id: str, conversation_id: str, body: str) -> str:
    """A message recorded as the API does and stored by the send task's own code."""
    message_id = queue_send(app, sender_id, conversation_id, body, uuid.uuid4().hex)
    assert send_message.apply(args=[message_id]).get() == "stored"
    return message_id


def report(client, auth, user, message_id, reason="spam", **extra):
    return client.post(
        f"/v1/messages/{message_id}/reports", json={"reason": reason, **extra}, headers=auth(user)
    )


def resolve(client, auth, user, report_id, action, **extra):
    return client.post(
        f"/v1/moderation/reports/{report_id}", json={"action": action, **extra}, headers=auth(user)
    )


def queue(client, auth, user, query="status=pending"):
    return client.get(f"/v1/moderation/reports?{query}", headers=auth(user))


# Provisioning users writes audit rows too; these tests look at messages and reports.
_MODERATION_AUDIT = AuditLog.target_type.in_(["message", "report"])


def counts(app) -> tuple[int, int]:
    """(reports, audit rows about messages and reports)."""
    with app.extensions["switchboard.db"].sessions() as session:
        return (
            session.scalar(select(func.count()).select_from(Report)),
            session.scalar(select(func.count()).select_from(AuditLog).where(_MODERATION_AUDIT)),
        )


def audit_rows(app) -> list[AuditLog]:
    with app.extensions["switchboard.db"].sessions() as session:
        return list(
            session.scalars(select(AuditLog).where(_MODERATION_AUDIT).order_by(AuditLog.id))
        )


def metric(client, line_start: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


# --- Seed 001: a reported message removed by a moderator ---------------------------------


def test_attendee_reports_a_dealers_message_and_a_moderator_removes_it(
    app, client, auth, cast, celery_worker
):
    attendee, dealer, moderator, _, conversation_id = cast
    filed_before = metric(client, 'switchboard_reports_filed_total{reason="harassment"}')
    removed_before = metric(client, 'switchboard_reports_resolved_total{action="remove"}')

    ids = []
    for body in ("PSA 10 Charizard, DM me", "buy now or you'll regret it, idiot"):
        sent = client.post(
            f"/v1/conversations/{conversation_id}/messages",
            json={"body": body, "client_id": uuid.uuid4().hex},
            headers=auth(dealer),
        )
        assert sent.status_code == 202
        ids.append(sent.json["id"])
    for message_id in ids:
        wait_for(
            lambda m=message_id: (
                client.get(f"/v1/messages/{m}", headers=auth(dealer)).json["status"] == "stored"
            )
        )
    assert client.get("/v1/unread", headers=auth(attendee)).json["total"] == 2
    offending = ids[1]

    filed = report(client, auth, attendee, offending, "harassment", note="insulted me")
    assert filed.status_code == 201
    assert filed.json["status"] == "pending" and filed.json["message_id"] == offending
    assert metric(client, "switchboard_reports_pending ") == 1

    pending = queue(client, auth, moderator)
    assert pending.status_code == 200
    [item] = pending.json["items"]
    assert item["id"] == filed.json["id"] and item["status"] == "pending"
    assert (item["reason"], item["note"]) == ("harassment", "insulted me")
    assert item["reporter"]["id"] == "att" and item["sender"]["id"] == "mvp"
    # Moderators see the body they are asked to judge, though not in the conversation.
    assert item["message"]["body"] == "buy now or you'll regret it, idiot"
    assert item["resolution"] is None

    removed = resolve(client, auth, moderator, filed.json["id"], "remove", note="abusive")
    assert removed.status_code == 200
    assert removed.json["status"] == "removed"
    assert removed.json["resolution"]["action"] == "remove"
    assert removed.json["resolution"]["by"] == "mod"
    assert removed.json["resolution"]["note"] == "abusive"
    assert removed.json["message"]["body"] is None
    assert removed.json["message"]["deleted"]["reason"] == "removed_by_moderator"

    # Both participants see the placeholder with its reason, and were told.
    for user in (attendee, dealer):
        history = client.get(
            f"/v1/conversations/{conversation_id}/messages", headers=auth(user)
        ).json["items"]
        assert [m["id"] for m in history] == [ids[1], ids[0]]
        assert history[0]["body"] is None
        assert history[0]["deleted"]["reason"] == "removed_by_moderator"
        assert history[1]["body"] == "PSA 10 Charizard, DM me"
        deleted = [e for e in events_of(app, user.id) if e.type == "message.deleted"]
        assert [e.payload["id"] for e in deleted] == [offending]
        assert deleted[0].payload["deleted"]["reason"] == "removed_by_moderator"
    # The removed message no longer counts as unread.
    assert client.get("/v1/unread", headers=auth(attendee)).json["total"] == 1

    # Who, what, when and why.
    rows = audit_rows(app)
    assert [(r.action, r.actor_id, r.target_type) for r in rows] == [
        ("message.deleted", "mod", "message"),
        ("report.removed", "mod", "report"),
    ]
    assert rows[0].target_id == offending
    assert rows[0].detail == {
        "reason": "removed_by_moderator",
        "report_id": filed.json["id"],
        "note": "abusive",
    }
    assert rows[1].detail["note"] == "abusive" and rows[1].created_at is not None

    assert queue(client, auth, moderator).json["items"] == []
    resolved = queue(client, auth, moderator, "status=resolved").json["items"]
    assert [r["id"] for r in resolved] == [filed.json["id"]]
    assert metric(client, "switchboard_reports_pending ") == 0
    assert (
        metric(client, 'switchboard_reports_filed_total{reason="harassment"}') == filed_before + 1
    )
    assert (
        metric(client, 'switchboard_reports_resolved_total{action="remove"}') == removed_before + 1
    )

    # The reporter sees where their report stands; repeating the removal is harmless.
    again = report(client, auth, attendee, offending, "harassment")
    assert again.status_code == 200 and again.json["status"] == "removed"
    repeat = resolve(client, auth, moderator, filed.json["id"], "remove")
    assert repeat.status_code == 200 and repeat.json == removed.json
    assert len(audit_rows(app)) == 2
    assert error_code(resolve(client, auth, moderator, filed.json["id"], "dismiss")) == (
        409,
        "report_resolved",
    )


def test_dismiss_keeps_the_message_and_resolves_that_report_only(app, client, auth, cast):
    attendee, _, _, organizer, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "mint condition, honest")
    filed = report(client, auth, attendee, message_id, "counterfeit").json

    # A report of another message, which the dismissal leaves alone.
    other = stored_message(app, "mvp", conversation_id, "another")
    second = report(client, auth, attendee, other, "scam").json

    dismissed = resolve(client, auth, organizer, filed["id"], "dismiss", note="genuine card")
    assert dismissed.status_code == 200
    assert dismissed.json["status"] == "dismissed"
    assert dismissed.json["resolution"] == {
        "action": "dismiss",
        "by": "org",
        "at": dismissed.json["resolved_at"],
        "note": "genuine card",
    }
    assert dismissed.json["message"]["body"] == "mint condition, honest"
    history = client.get(
        f"/v1/conversations/{conversation_id}/messages", headers=auth(attendee)
    ).json["items"]
    assert all(m["deleted"] is None for m in history)
    assert not [e for e in events_of(app, "att") if e.type == "message.deleted"]
    [row] = audit_rows(app)
    assert (row.action, row.actor_id, row.target_id) == ("report.dismissed", "org", filed["id"])
    assert row.detail == {
        "message_id": message_id,
        "note": "genuine card",
        "reports": [filed["id"]],
    }

    # The other report is still waiting.
    assert [r["id"] for r in queue(client, auth, organizer).json["items"]] == [second["id"]]
    # Idempotent: the same again changes nothing; the other action is a conflict.
    assert resolve(client, auth, organizer, filed["id"], "dismiss").json == dismissed.json
    assert error_code(resolve(client, auth, organizer, filed["id"], "remove")) == (
        409,
        "report_resolved",
    )
    assert len(audit_rows(app)) == 1
    # A dismissal is final for its reporter: reporting again shows it.
    again = report(client, auth, attendee, message_id, "spam")
    assert again.status_code == 200
    assert (again.json["id"], again.json["status"], again.json["reason"]) == (
        filed["id"],
        "dismissed",
        "counterfeit",
    )


def test_remove_resolves_every_pending_report_of_the_message(app, client, auth, cast, make_user):
    attendee, _, moderator, _, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "fake slabs for sale")
    first = report(client, auth, attendee, message_id, "scam").json
    # Conversations have two members, so a second reporter of one message is written
    # directly, as a group conversation would let one file it.
    make_user("witness", role="attendee")
    with app.extensions["switchboard.db"].transaction() as session:
        session.add(
            Report(
                tenant_id="t1",
                message_id=uuid.UUID(message_id),
                reporter_id="witness",
                reason="scam",
            )
        )
    with app.extensions["switchboard.db"].sessions() as session:
        second_id = str(session.scalar(select(Report.id).where(Report.reporter_id == "witness")))

    removed = resolve(client, auth, moderator, first["id"], "remove")
    assert removed.status_code == 200
    assert queue(client, auth, moderator).json["items"] == []
    other = client.get(f"/v1/moderation/reports/{second_id}", headers=auth(moderator)).json
    assert other["status"] == "removed" and other["resolution"]["by"] == "mod"
    audit = [r for r in audit_rows(app) if r.action == "report.removed"]
    assert sorted(audit[0].detail["reports"]) == sorted([first["id"], second_id])
    # Either report answers a repeated removal the same way; a dismissal is too late.
    assert resolve(client, auth, moderator, second_id, "remove").status_code == 200
    assert error_code(resolve(client, auth, moderator, second_id, "dismiss")) == (
        409,
        "report_resolved",
    )


def test_two_moderators_at_once_resolve_once(app, cast, client, auth):
    attendee, _, _, _, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "contested")
    report_id = report(client, auth, attendee, message_id).json["id"]
    policy = app.extensions["switchboard.policy"]
    outcomes: list[str] = []

    def act(moderator_id: str, action: str):
        def run():
            from app.models import User
            from app.problems import Conflict

            with app.extensions["switchboard.db"].transaction() as session:
                try:
                    resolve_report(
                        session, policy, session.get_one(User, moderator_id), report_id, action
                    )
                    outcomes.append(action)
                except Conflict:
                    outcomes.append("conflict")

        return run

    run_threads(act("mod", "remove"), act("org", "dismiss"), act("mod", "remove"))
    # Whichever came first decides; a later remove repeats it or conflicts with it.
    winner = "dismiss" if "dismiss" in outcomes else "remove"
    if winner == "remove":
        assert sorted(outcomes) == ["conflict", "remove", "remove"]
    else:
        assert sorted(outcomes) == ["conflict", "conflict", "dismiss"]
    # One resolution, one audit row for it (plus the message's own if it was removed).
    actions = [r.action for r in audit_rows(app)]
    assert actions.count("report.removed") + actions.count("report.dismissed") == 1
    with app.extensions["switchboard.db"].sessions() as session:
        message = session.get_one(Message, uuid.UUID(message_id))
        assert (message.deleted_at is not None) == (winner == "remove")


# --- Reporting ---------------------------------------------------------------------------


def test_a_repeat_report_is_the_same_report(app, client, auth, cast):
    attendee, _, _, _, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "hello")
    first = report(client, auth, attendee, message_id, "spam", note="again and again")
    assert first.status_code == 201
    second = report(client, auth, attendee, message_id, "scam")
    assert second.status_code == 200 and second.json == first.json
    assert counts(app) == (1, 0)

    # Concurrent repeats file one report: one 201, the rest 200 with its id.
    other = stored_message(app, "mvp", conversation_id, "hello again")
    answers: list[tuple[int, str]] = []

    def file():
        response = report(app.test_client(), auth, attendee, other, "spam")
        answers.append((response.status_code, response.json["id"]))

    run_threads(*[file] * 6)
    assert sorted(status for status, _ in answers) == [200] * 5 + [201]
    assert len({report_id for _, report_id in answers}) == 1
    assert counts(app) == (2, 0)


def test_who_may_report(app, client, auth, cast, make_user):
    attendee, dealer, moderator, _, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "hi")
    # Not in the conversation (a moderator too), or in another tenant: as if it did not exist.
    outsider = make_user("outsider", role="attendee")
    elsewhere = make_user("elsewhere", role="attendee", tenant="t2")
    missing = str(uuid.uuid4())
    for user, target in (
        (outsider, message_id),
        (moderator, message_id),
        (elsewhere, message_id),
        (attendee, missing),
        (attendee, "not-a-uuid"),
        (attendee, message_id.upper() + "x"),
    ):
        response = report(client, auth, user, target)
        assert error_code(response) == (404, "message_not_found")
        assert response.json["error"]["message"]
    # Your own message: delete it instead.
    assert error_code(report(client, auth, dealer, message_id)) == (403, "own_message")
    # A send not yet stored is its sender's alone.
    queued = queue_send(app, "mvp", conversation_id, "pending", "q-1")
    assert error_code(report(client, auth, attendee, queued)) == (404, "message_not_found")
    assert error_code(report(client, auth, dealer, queued)) == (403, "own_message")
    # Nothing left to report once deleted.
    client.delete(f"/v1/messages/{message_id}", headers=auth(dealer))
    assert error_code(report(client, auth, attendee, message_id)) == (409, "message_deleted")
    assert counts(app)[0] == 0


def test_bad_input_is_refused_and_writes_nothing(app, client, auth, cast):
    attendee, _, moderator, _, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "hi")
    url = f"/v1/messages/{message_id}/reports"
    headers = auth(attendee)
    cases = [
        (client.post(url, json={"reason": "boring"}, headers=headers), 400, "unknown_reason"),
        (client.post(url, json={"reason": "SPAM"}, headers=headers), 400, "unknown_reason"),
        (
            client.post(
                url, json={"reason": "spam", "note": "x" * (NOTE_MAX_LENGTH + 1)}, headers=headers
            ),
            413,
            "note_too_long",
        ),
        (client.post(url, json={"reason": 3}, headers=headers), 400, "invalid_request"),
        (client.post(url, json={}, headers=headers), 400, "invalid_request"),
        (
            client.post(url, json={"reason": "spam", "x": 1}, headers=headers),
            400,
            "invalid_request",
        ),
        (client.post(url, json=["spam"], headers=headers), 400, "invalid_json"),
        (client.post(url, data="reason=spam", headers=headers), 400, "invalid_json"),
        (
            client.post(url, json={"reason": "spam", "note": "a\x00b"}, headers=headers),
            400,
            "invalid_text",
        ),
        (client.post(url, json={"reason": "spam"}), 401, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.json
        assert response.json["error"]["message"]
        if code:
            assert response.json["error"]["code"] == code
    assert counts(app) == (0, 0)

    # A bounded note is kept, and the policy's extra reason works here.
    filed = report(client, auth, attendee, message_id, "counterfeit", note="x" * NOTE_MAX_LENGTH)
    assert filed.status_code == 201
    report_id = filed.json["id"]
    for body, status, code in (
        ({"action": "delete"}, 400, "invalid_request"),
        ({}, 400, "invalid_request"),
        ({"action": "remove", "note": "n" * (NOTE_MAX_LENGTH + 1)}, 413, "note_too_long"),
        ({"action": "remove", "extra": True}, 400, "invalid_request"),
        ({"action": ["remove"]}, 400, "invalid_request"),
    ):
        response = client.post(
            f"/v1/moderation/reports/{report_id}", json=body, headers=auth(moderator)
        )
        assert error_code(response) == (status, code)
    for bad_id in ("nope", "0" * 36, str(uuid.uuid4())):
        assert error_code(resolve(client, auth, moderator, bad_id, "remove")) == (
            404,
            "report_not_found",
        )
    for query in ("status=open", "limit=0", "limit=101", "limit=x", "cursor=%%%", "cursor=abc"):
        response = queue(client, auth, moderator, query)
        assert response.status_code == 400 and response.json["error"]["code"], query
    assert error_code(queue(client, auth, moderator, "cursor=abc")) == (400, "invalid_cursor")
    assert counts(app) == (1, 0)
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.get_one(Message, uuid.UUID(message_id)).deleted_at is None
        assert session.scalar(select(Report.status)) == "pending"


def test_policy_extra_reasons(app_factory, client, auth, make_user):
    # Built-in reasons only where the policy adds none (the bookstore).
    bookstore = app_factory(SWITCHBOARD_POLICY="bookstore").extensions["switchboard.policy"]
    assert bookstore.report_reasons() == ("spam", "harassment", "inappropriate", "scam", "other")
    cardshow = app_factory(SWITCHBOARD_POLICY="cardshow").extensions["switchboard.policy"]
    assert cardshow.report_reasons()[-1] == "counterfeit"

    base = (
        'name = "x"\nroles = ["a"]\ntiers = ["t"]\ndefault_tier = "t"\n'
        '[[start_rules]]\nfrom_roles = ["a"]\nto_roles = ["a"]\n'
        "[messages]\nmax_length = 10\npage_size = 10\n[retention]\ndays = { t = 1 }\n"
    )
    assert parse_policy(base + '[moderation]\nextra_reasons = ["fake"]\n').report_reasons()[-1] == (
        "fake"
    )
    for section, expected in (
        ('[moderation]\nextra_reason = ["fake"]\n', "moderation.extra_reason: unknown key"),
        ('[moderation]\nextra_reasons = ["spam"]\n', "moderation.extra_reasons: 'spam'"),
        ('[moderation]\nextra_reasons = ["x", "x"]\n', "moderation.extra_reasons: 'x' listed"),
        ('[moderation]\nextra_reasons = ["Bad Name"]\n', "moderation.extra_reasons[0]"),
        ('[moderation]\nextra_reasons = "fake"\n', "moderation.extra_reasons"),
    ):
        with pytest.raises(PolicyError) as caught:
            parse_policy(base + section, "custom.toml")
        assert expected in str(caught.value), str(caught.value)


# --- The queue ---------------------------------------------------------------------------


def test_only_the_tenants_moderators_see_and_touch_reports(app, client, auth, cast, make_user):
    attendee, dealer, _, organizer, conversation_id = cast
    message_id = stored_message(app, "mvp", conversation_id, "hi")
    report_id = report(client, auth, attendee, message_id).json["id"]

    for user in (attendee, dealer):
        assert error_code(queue(client, auth, user)) == (403, "not_moderator")
        assert error_code(resolve(client, auth, user, report_id, "remove")) == (
            403,
            "not_moderator",
        )
        assert error_code(
            client.get(f"/v1/moderation/reports/{report_id}", headers=auth(user))
        ) == (403, "not_moderator")
    # The organizer is a moderator role in the cardshow preset.
    assert len(queue(client, auth, organizer).json["items"]) == 1

    foreign = make_user("foreign-mod", role="moderator", tenant="t2")
    assert queue(client, auth, foreign).json == {"items": [], "next_cursor": None}
    assert queue(client, auth, foreign, "status=resolved").json["items"] == []
    not_yours = resolve(client, auth, foreign, report_id, "remove")
    missing = resolve(client, auth, foreign, str(uuid.uuid4()), "remove")
    assert error_code(not_yours) == (404, "report_not_found")
    assert not_yours.json == missing.json
    assert error_code(client.get(f"/v1/moderation/reports/{report_id}", headers=auth(foreign))) == (
        404,
        "report_not_found",
    )
    assert counts(app) == (1, 0)
    with app.extensions["switchboard.db"].sessions() as session:
        assert session.scalar(select(Report.status)) == "pending"
        assert session.get_one(Message, uuid.UUID(message_id)).deleted_at is None
        unread = session.get_one(Participant, (uuid.UUID(conversation_id), "att")).unread_count
        assert unread == 1


def test_queue_pages_oldest_first(app, client, auth, cast):
    attendee, _, moderator, _, conversation_id = cast
    message_ids = [stored_message(app, "mvp", conversation_id, f"m{i}") for i in range(5)]
    report_ids = [report(client, auth, attendee, m).json["id"] for m in message_ids]

    first = queue(client, auth, moderator, "status=pending&limit=2").json
    assert [r["id"] for r in first["items"]] == report_ids[:2]
    assert [r["message"]["body"] for r in first["items"]] == ["m0", "m1"]
    # A report filed between pages lands at the end, not in the middle.
    late = report(client, auth, attendee, stored_message(app, "mvp", conversation_id, "m5"))
    second = queue(client, auth, moderator, f"limit=2&cursor={first['next_cursor']}").json
    third = queue(client, auth, moderator, f"limit=2&cursor={second['next_cursor']}").json
    assert [r["id"] for r in second["items"] + third["items"]] == [
        *report_ids[2:],
        late.json["id"],
    ]
    assert third["next_cursor"] is None

    for report_id in report_ids[:3]:
        assert resolve(client, auth, moderator, report_id, "dismiss").status_code == 200
    resolved = queue(client, auth, moderator, "status=resolved&limit=2").json
    rest = queue(
        client, auth, moderator, f"status=resolved&limit=2&cursor={resolved['next_cursor']}"
    ).json
    assert [r["id"] for r in resolved["items"] + rest["items"]] == report_ids[:3]
    assert rest["next_cursor"] is None
    pending = queue(client, auth, moderator).json["items"]
    assert [r["id"] for r in pending] == [*report_ids[3:], late.json["id"]]
