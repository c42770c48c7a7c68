"""`append_event_groups`: a batch of stored sends' events in one statement, on the real
database. The groups travel as one JSON document, so these tests check what the log
holds afterwards: the numbering per user in the order of the groups, each payload
exactly as given (quotes, backslashes, non-ASCII), and nothing for an empty group."""

from __future__ import annotations

from sqlalchemy import select

from app.events import PUBLISHER_KEY, EventGroup, append_event_groups
from app.models import User, UserEvent


def _log_of(app, user_id: str) -> list[tuple[int, str, dict]]:
    with app.extensions["switchboard.db"].sessions() as session:
        rows = session.execute(
            select(UserEvent.seq, UserEvent.type, UserEvent.payload)
            .where(UserEvent.user_id == user_id)
            .order_by(UserEvent.seq)
        )
        return [(row.seq, row.type, row.payload) for row in rows]


def _append(app, groups: list[EventGroup]):
    with app.extensions["switchboard.db"].transaction() as session:
        session.info.pop(PUBLISHER_KEY, None)  # the log is what is tested, not the announcement
        return append_event_groups(session, groups)


def test_each_users_events_are_numbered_in_the_order_of_the_groups(app, make_user):
    alice, bob, carol = make_user("alice"), make_user("bob"), make_user("carol")
    groups = [
        EventGroup([bob.id, alice.id], "message.created", {"n": 1}),
        EventGroup([carol.id], "message.created", {"n": 2}),
        EventGroup([alice.id, alice.id, bob.id], "message.created", {"n": 3}),  # alice twice
        EventGroup([], "message.created", {"n": 4}),  # nobody: no row, no number
        EventGroup([alice.id], "message.rejected", {"n": 5}),
    ]

    events = _append(app, groups)

    assert _log_of(app, alice.id) == [
        (1, "message.created", {"n": 1}),
        (2, "message.created", {"n": 3}),
        (3, "message.rejected", {"n": 5}),
    ]
    assert _log_of(app, bob.id) == [
        (1, "message.created", {"n": 1}),
        (2, "message.created", {"n": 3}),
    ]
    assert _log_of(app, carol.id) == [(1, "message.created", {"n": 2})]
    # What the caller announces matches the log, group by group.
    assert [(event.user_id, event.seq, event.data["n"]) for event in events] == [
        (alice.id, 1, 1), (bob.id, 1, 1), (carol.id, 1, 2),
        (alice.id, 2, 3), (bob.id, 2, 3), (alice.id, 3, 5),
    ]  # fmt: skip
    with app.extensions["switchboard.db"].sessions() as session:
        sequences = dict(session.execute(select(User.id, User.last_event_seq)).all())
    assert (sequences[alice.id], sequences[bob.id], sequences[carol.id]) == (3, 2, 1)


def test_a_second_batch_continues_each_users_numbering(app, make_user):
    alice, bob = make_user("alice"), make_user("bob")
    _append(app, [EventGroup([alice.id], "message.created", {"n": 1})])

    _append(app, [EventGroup([alice.id, bob.id], "message.created", {"n": 2})])

    assert [seq for seq, _, _ in _log_of(app, alice.id)] == [1, 2]
    assert [seq for seq, _, _ in _log_of(app, bob.id)] == [1]


def test_payloads_are_stored_exactly_as_given(app, make_user):
    alice = make_user("alice")
    data = {
        "body": 'she said "hi" \\ then left\n\ttab, caf\u00e9, \u65e5\u672c, \U0001f600',
        "nested": {"list": [1, 2.5, None, True], "empty": {}},
        'quote_key"': "'single'",
    }

    _append(app, [EventGroup([alice.id], "message.created", data)])

    assert _log_of(app, alice.id) == [(1, "message.created", data)]


def test_groups_without_any_recipient_write_nothing(app, make_user):
    alice = make_user("alice")

    assert _append(app, [EventGroup([], "message.created", {"n": 1})]) == []
    assert _append(app, []) == []

    assert _log_of(app, alice.id) == []
