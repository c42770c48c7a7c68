"""Unit tests for the policy engine (app/policy): presets, decisions, loading errors.

Pure logic: no database, no Redis, no clock. Each preset's whole start matrix is written
out below as a table, so a change to a preset file shows up as a failing row.
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError
from datetime import UTC, datetime, timedelta, timezone
from importlib import resources
from pathlib import Path

import pytest

from app.policy import (
    ALLOW,
    PRESETS,
    Actor,
    Decision,
    Policy,
    PolicyError,
    load_policy,
    parse_policy,
)

OK = "ok"


@pytest.fixture(scope="module")
def bookstore() -> Policy:
    return load_policy("bookstore")


@pytest.fixture(scope="module")
def cardshow() -> Policy:
    return load_policy("cardshow")


@pytest.fixture(scope="module")
def marketplace() -> Policy:
    return load_policy("marketplace")


def actor(role: str, tier: str = "standard", *, id: str | None = None, tenant: str = "t1") -> Actor:
    return Actor(id=id or f"{role}-{tier}", tenant_id=tenant, role=role, tier=tier)


def preset_text(name: str) -> str:
    return resources.files("app.policy").joinpath("presets", f"{name}.toml").read_text("utf-8")


def outcome(decision: Decision) -> str:
    return OK if decision.allowed else str(decision.rule)


# ------------------------------------------------------------------ expected start matrices
# (sender role, sender tier) -> recipient role -> "ok" or the refusal code.
# One row per line on purpose, so the tables read like the matrix they are.

# fmt: off

_BS_ALL = {"member": OK, "manager": OK, "owner": OK}
BOOKSTORE_START = {
    ("member", "free"): dict.fromkeys(("member", "manager", "owner"), "reply_only"),
    ("member", "privileged"): _BS_ALL,
    ("member", "privileged_plus"): _BS_ALL,
    ("manager", "free"): _BS_ALL,
    ("manager", "privileged"): _BS_ALL,
    ("manager", "privileged_plus"): _BS_ALL,
    ("owner", "free"): _BS_ALL,
    ("owner", "privileged"): _BS_ALL,
    ("owner", "privileged_plus"): _BS_ALL,
}

_NO = "role_not_allowed"
CARDSHOW_START = {
    ("attendee", "standard"): {
        "attendee": _NO, "dealer": _NO, "mvp_dealer": OK, "organizer": OK, "moderator": OK,
    },
    ("dealer", "standard"): {
        "attendee": _NO, "dealer": OK, "mvp_dealer": OK, "organizer": OK, "moderator": OK,
    },
    ("mvp_dealer", "standard"): {
        "attendee": OK, "dealer": OK, "mvp_dealer": OK, "organizer": OK, "moderator": OK,
    },
    ("organizer", "standard"): {
        "attendee": OK, "dealer": OK, "mvp_dealer": OK, "organizer": OK, "moderator": OK,
    },
    ("moderator", "standard"): {
        "attendee": OK, "dealer": OK, "mvp_dealer": OK, "organizer": OK, "moderator": OK,
    },
}

MARKETPLACE_START = {
    ("customer", "standard"): {"customer": _NO, "artist": OK, "admin": _NO},
    ("artist", "standard"): {"customer": OK, "artist": _NO, "admin": _NO},
    ("admin", "standard"): {"customer": OK, "artist": OK, "admin": OK},
}

START_TABLES = {
    "bookstore": BOOKSTORE_START,
    "cardshow": CARDSHOW_START,
    "marketplace": MARKETPLACE_START,
}

# sender role -> audience -> "ok" or refusal code (with nothing sent yet this period).
_BNA = "broadcast_not_allowed"
_ANA = "audience_not_allowed"
CARDSHOW_BROADCAST = {
    "attendee": dict.fromkeys(
        ("all", "attendee", "dealer", "mvp_dealer", "organizer", "moderator"), _BNA
    ),
    "dealer": dict.fromkeys(
        ("all", "attendee", "dealer", "mvp_dealer", "organizer", "moderator"), _BNA
    ),
    "mvp_dealer": {
        "all": _ANA, "attendee": OK, "dealer": _ANA, "mvp_dealer": _ANA, "organizer": _ANA,
        "moderator": _ANA,
    },
    "organizer": {
        "all": OK, "attendee": OK, "dealer": OK, "mvp_dealer": OK, "organizer": _ANA,
        "moderator": _ANA,
    },
    "moderator": dict.fromkeys(
        ("all", "attendee", "dealer", "mvp_dealer", "organizer", "moderator"), _BNA
    ),
}


# fmt: on


def _start_cases() -> list[tuple[str, str, str, str, str]]:
    cases = []
    for preset, table in START_TABLES.items():
        for (role, tier), row in table.items():
            for recipient_role, expected in row.items():
                cases.append((preset, role, tier, recipient_role, expected))
    return cases


# ------------------------------------------------------------------ presets as a whole


def test_presets_list_matches_shipped_files() -> None:
    shipped = {
        entry.name.removesuffix(".toml")
        for entry in resources.files("app.policy").joinpath("presets").iterdir()
        if entry.name.endswith(".toml")
    }
    assert shipped == set(PRESETS) == {"bookstore", "cardshow", "marketplace"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_is_named_after_its_file(name: str) -> None:
    policy = load_policy(name)
    assert policy.name == name
    assert policy.message_page_size == 50
    assert policy.conversation_page_size == 20
    assert policy.max_message_length == 1000


@pytest.mark.parametrize("name", PRESETS)
def test_expected_table_covers_every_role_tier_and_recipient(name: str) -> None:
    policy = load_policy(name)
    table = START_TABLES[name]
    assert set(table) == {(role, tier) for role in policy.roles for tier in policy.tiers}
    for row in table.values():
        assert set(row) == set(policy.roles)


@pytest.mark.parametrize(("preset", "role", "tier", "recipient_role", "expected"), _start_cases())
def test_start_matrix(
    preset: str, role: str, tier: str, recipient_role: str, expected: str
) -> None:
    policy = load_policy(preset)
    decision = policy.may_start(
        actor(role, tier, id="sender"), actor(recipient_role, id="recipient")
    )
    assert outcome(decision) == expected
    if not decision:
        assert decision.reason  # a sentence for a person


@pytest.mark.parametrize(("preset", "role", "tier", "recipient_role", "_"), _start_cases())
def test_everyone_may_reply_where_they_take_part(
    preset: str, role: str, tier: str, recipient_role: str, _: str
) -> None:
    policy = load_policy(preset)
    decision = policy.may_reply(actor(role, tier, id="sender"), actor(recipient_role, id="other"))
    assert decision == ALLOW


@pytest.mark.parametrize(
    ("role", "audience", "expected"),
    [(role, aud, exp) for role, row in CARDSHOW_BROADCAST.items() for aud, exp in row.items()],
)
def test_cardshow_broadcast_matrix(
    cardshow: Policy, role: str, audience: str, expected: str
) -> None:
    assert set(CARDSHOW_BROADCAST) == set(cardshow.roles)
    assert outcome(cardshow.may_broadcast(actor(role), audience)) == expected


@pytest.mark.parametrize("preset", ["bookstore", "marketplace"])
def test_presets_without_broadcasts_refuse_every_role(preset: str) -> None:
    policy = load_policy(preset)
    for role in policy.roles:
        for audience in ("all", *policy.roles):
            decision = policy.may_broadcast(actor(role, policy.default_tier), audience)
            assert decision.rule == "broadcast_not_allowed"


def test_bookstore_settings(bookstore: Policy) -> None:
    assert bookstore.roles == ("member", "manager", "owner")
    assert bookstore.tiers == ("free", "privileged", "privileged_plus")
    assert bookstore.default_tier == "free"
    assert bookstore.moderator_roles == frozenset({"manager", "owner"})
    assert [bookstore.retention_days(t) for t in bookstore.tiers] == [30, 180, 365]
    assert bookstore.downgrade_grace_days == 30
    assert bookstore.subject_types == ()
    assert bookstore.subject_required is False


def test_cardshow_settings(cardshow: Policy) -> None:
    assert cardshow.tiers == ("standard",)
    assert cardshow.retention_days("standard") == 365
    assert cardshow.messaging_enabled_for("anyone")  # rollout "on" by default
    assert cardshow.may_moderate(actor("moderator"))
    assert cardshow.may_moderate(actor("organizer"))
    assert not cardshow.may_moderate(actor("dealer"))


def test_marketplace_settings(marketplace: Policy) -> None:
    assert marketplace.roles == ("customer", "artist", "admin")
    assert marketplace.subject_types == ("booking",)
    assert marketplace.subject_required is False
    assert marketplace.rate_limit_per_second == 10.0
    assert marketplace.rate_limit_burst == 20
    assert marketplace.retention_days("standard") == 365
    assert marketplace.moderator_roles == frozenset({"admin"})


# ------------------------------------------------------------------ seed scenarios by name


def test_cardshow_attendee_may_message_mvp_dealer(cardshow: Policy) -> None:
    assert cardshow.may_start(actor("attendee", id="a1"), actor("mvp_dealer", id="m1"))


def test_cardshow_attendee_may_not_message_dealer(cardshow: Policy) -> None:
    decision = cardshow.may_start(actor("attendee", id="a1"), actor("dealer", id="d1"))
    assert not decision
    assert decision.rule == "role_not_allowed"


def test_cardshow_dealer_may_still_reply_to_attendee(cardshow: Policy) -> None:
    dealer, attendee = actor("dealer", id="d1"), actor("attendee", id="a1")
    assert cardshow.may_start(dealer, attendee).rule == "role_not_allowed"
    assert cardshow.may_reply(dealer, attendee)


def test_cardshow_organizer_quota_is_two_per_show_and_the_third_is_refused(
    cardshow: Policy,
) -> None:
    organizer = actor("organizer")
    assert cardshow.broadcast_quota("organizer", "all") == 2
    assert cardshow.may_broadcast(organizer, "all", sent_in_period=0)
    assert cardshow.may_broadcast(organizer, "all", sent_in_period=1)
    third = cardshow.may_broadcast(organizer, "all", sent_in_period=2)
    assert third.rule == "quota_exceeded"


def test_cardshow_mvp_dealer_broadcasts_to_attendees_not_dealers(cardshow: Policy) -> None:
    mvp = actor("mvp_dealer")
    assert cardshow.may_broadcast(mvp, "attendee")
    assert cardshow.may_broadcast(mvp, "dealer").rule == "audience_not_allowed"
    assert cardshow.broadcast_quota("mvp_dealer", "attendee") == 1
    assert cardshow.broadcast_quota("mvp_dealer", "dealer") == 0
    assert cardshow.broadcast_audiences("mvp_dealer") == ("attendee",)


def test_cardshow_unknown_audience(cardshow: Policy) -> None:
    assert cardshow.may_broadcast(actor("organizer"), "vendors").rule == "unknown_audience"


def test_bookstore_free_member_may_only_reply(bookstore: Policy) -> None:
    free, other = actor("member", "free", id="f1"), actor("member", "free", id="f2")
    decision = bookstore.may_start(free, other)
    assert decision.rule == "reply_only"
    assert "reply" in decision.reason
    assert bookstore.may_reply(free, other)


@pytest.mark.parametrize("tier", ["privileged", "privileged_plus"])
def test_bookstore_privileged_member_may_start(bookstore: Policy, tier: str) -> None:
    assert bookstore.may_start(actor("member", tier, id="p1"), actor("member", "free", id="f1"))


def test_bookstore_manager_may_start_whatever_tier(bookstore: Policy) -> None:
    assert bookstore.may_start(actor("manager", "free", id="m1"), actor("member", "free", id="f1"))


def test_nobody_reaches_another_store(bookstore: Policy) -> None:
    owner = actor("owner", "privileged_plus", id="o1", tenant="store-a")
    member = actor("member", "free", id="f1", tenant="store-b")
    assert bookstore.may_start(owner, member).rule == "other_tenant"
    assert bookstore.may_reply(owner, member).rule == "other_tenant"


def test_marketplace_customer_and_artist_reach_each_other(marketplace: Policy) -> None:
    customer, artist = actor("customer", id="c1"), actor("artist", id="a1")
    assert marketplace.may_start(customer, artist)
    assert marketplace.may_start(artist, customer)
    assert marketplace.may_start(actor("admin", id="x1"), customer)
    assert marketplace.may_start(customer, actor("customer", id="c2")).rule == "role_not_allowed"


def test_marketplace_subject(marketplace: Policy, bookstore: Policy) -> None:
    assert marketplace.check_subject("booking")
    assert marketplace.check_subject(None)
    assert marketplace.check_subject("invoice").rule == "unknown_subject_type"
    assert bookstore.check_subject("booking").rule == "unknown_subject_type"


# ------------------------------------------------------------------ order of refusals


def test_blocked(cardshow: Policy) -> None:
    sender, recipient = actor("organizer", id="o1"), actor("attendee", id="a1")
    assert cardshow.may_start(sender, recipient, blocked_by_recipient=True).rule == "blocked"
    assert cardshow.may_reply(sender, recipient, blocked_by_recipient=True).rule == "blocked"


def test_self_conversation(cardshow: Policy) -> None:
    me = actor("organizer", id="o1")
    assert cardshow.may_start(me, me).rule == "self_conversation"
    assert cardshow.may_reply(me, me).rule == "self_conversation"


def test_refusals_are_checked_in_documented_order(bookstore: Policy) -> None:
    free = actor("member", "free", id="same")
    assert bookstore.may_start(free, actor("member", "free", id="same", tenant="t2")).rule == (
        "other_tenant"
    )
    assert bookstore.may_start(free, free, blocked_by_recipient=True).rule == "self_conversation"
    # Blocked is reported before the matrix, so the UI says "blocked", not "upgrade".
    other = actor("member", "free", id="other")
    assert bookstore.may_start(free, other, blocked_by_recipient=True).rule == "blocked"
    off = parse_policy(preset_text("bookstore").replace('mode = "on"\n', 'mode = "off"\n'))
    assert off.may_start(free, other, blocked_by_recipient=True).rule == "messaging_disabled"


def test_unknown_role_or_tier_at_runtime_is_refused_not_raised(bookstore: Policy) -> None:
    member = actor("member", "privileged", id="m1")
    assert bookstore.may_start(actor("dealer", "free", id="x"), member).rule == "unknown_role"
    assert bookstore.may_start(member, actor("dealer", "free", id="x")).rule == "unknown_role"
    assert bookstore.may_start(actor("member", "gold", id="x"), member).rule == "unknown_tier"
    assert bookstore.may_reply(actor("dealer", "free", id="x"), member).rule == "unknown_role"


_CUSTOM = """
name = "custom"
roles = ["guest", "member", "staff", "readonly"]
tiers = ["basic", "gold"]
default_tier = "basic"

[[start_rules]]
from_roles = ["member"]
to_roles = ["staff"]

[[start_rules]]
from_roles = ["member"]
from_tiers = ["gold"]
to_roles = ["member"]

[replies]
roles = ["guest", "member", "staff"]

[messages]
max_length = 10
page_size = 5

[retention]
days = { basic = 1, gold = 2 }

[broadcasts]
reset_at = "00:30"

[[broadcasts.rules]]
from_roles = ["staff"]
audiences = ["all"]
period = "none"
"""


def test_tier_not_allowed_and_reply_not_allowed() -> None:
    policy = parse_policy(_CUSTOM)
    basic, gold = actor("member", "basic", id="b"), actor("member", "gold", id="g")
    assert policy.may_start(basic, actor("staff", "basic", id="s"))
    assert policy.may_start(basic, gold).rule == "tier_not_allowed"
    assert policy.may_start(gold, basic)
    assert policy.may_start(basic, actor("guest", "basic", id="x")).rule == "role_not_allowed"
    assert policy.may_start(actor("guest", "basic", id="x"), basic).rule == "reply_only"
    readonly = actor("readonly", "basic", id="r")
    assert policy.may_start(readonly, basic).rule == "role_not_allowed"
    assert policy.may_reply(readonly, basic).rule == "reply_not_allowed"
    assert policy.startable_roles("member", "gold") == frozenset({"staff", "member"})


def test_unlimited_broadcast_and_defaults() -> None:
    policy = parse_policy(_CUSTOM)
    staff = actor("staff", "basic")
    assert policy.broadcast_quota("staff", "all") is None
    assert policy.may_broadcast(staff, "all", sent_in_period=10_000)
    assert policy.audience_roles("all") == ("guest", "member", "staff", "readonly")
    assert policy.audience_roles("guest") == ("guest",)
    with pytest.raises(ValueError, match="unknown audience"):
        policy.audience_roles("nobody")
    # Sections left out take their defaults.
    assert policy.conversation_page_size == 20
    assert policy.rate_limit_per_second == 10.0
    assert policy.rate_limit_burst == 20
    assert policy.moderator_roles == frozenset()
    assert policy.messaging_enabled_for("u1")


def test_message_body_checks(bookstore: Policy) -> None:
    assert bookstore.check_body("x" * 1000)
    assert bookstore.check_body("x" * 1001).rule == "message_too_long"
    assert bookstore.check_body("   ").rule == "empty_message"


def test_decision_and_policy_are_frozen(bookstore: Policy) -> None:
    assert not Decision(False, "blocked", "no")
    assert ALLOW and ALLOW.rule is None
    with pytest.raises(FrozenInstanceError):
        bookstore.max_message_length = 5  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        ALLOW.allowed = False  # type: ignore[misc]


# ------------------------------------------------------------------ rollout


def _rollout(mode: str, percent: float | None = None, salt: str = "") -> Policy:
    lines = f'mode = "{mode}"\n'
    if percent is not None:
        lines += f"percent = {percent}\n"
    if salt:
        lines += f'salt = "{salt}"\n'
    return parse_policy(
        preset_text("cardshow").replace('[rollout]\nmode = "on"\n', f"[rollout]\n{lines}")
    )


IDS = [f"user-{n}" for n in range(10_000)]


def test_rollout_off_disables_everyone() -> None:
    policy = _rollout("off")
    assert not any(policy.messaging_enabled_for(user_id) for user_id in IDS[:100])
    decision = policy.may_start(actor("organizer", id="o1"), actor("attendee", id="a1"))
    assert decision.rule == "messaging_disabled"
    assert policy.may_reply(actor("organizer", id="o1"), actor("attendee", id="a1")).rule == (
        "messaging_disabled"
    )
    assert policy.may_broadcast(actor("organizer", id="o1"), "all").rule == "messaging_disabled"


def test_rollout_percent_edges() -> None:
    assert not any(_rollout("percent", 0).messaging_enabled_for(u) for u in IDS[:500])
    assert all(_rollout("percent", 100).messaging_enabled_for(u) for u in IDS[:500])


def test_rollout_percent_share_is_roughly_right() -> None:
    policy = _rollout("percent", 25)
    share = sum(policy.messaging_enabled_for(u) for u in IDS) / len(IDS)
    assert 0.23 < share < 0.27


def test_rollout_is_stable_and_only_grows() -> None:
    first, again = _rollout("percent", 30), _rollout("percent", 30)
    chosen = {u for u in IDS if first.messaging_enabled_for(u)}
    assert chosen == {u for u in IDS if again.messaging_enabled_for(u)}
    smaller = {u for u in IDS if _rollout("percent", 10).messaging_enabled_for(u)}
    assert smaller < chosen
    # Pinned values: the bucket is sha256 based, so it is the same in every process
    # (Python's hash() of a str changes with PYTHONHASHSEED).
    assert first.rollout_bucket("user-1") == 821
    assert first.rollout_bucket("u-42") == 4854


def test_rollout_salt_changes_the_cohort() -> None:
    plain, salted = _rollout("percent", 50), _rollout("percent", 50, salt="wave-2")
    assert {u for u in IDS[:1000] if plain.messaging_enabled_for(u)} != {
        u for u in IDS[:1000] if salted.messaging_enabled_for(u)
    }


# ------------------------------------------------------------------ quota periods


@pytest.mark.parametrize(
    ("now", "key"),
    [
        (datetime(2026, 11, 23, 1, 59, tzinfo=UTC), "2026-11-22"),
        (datetime(2026, 11, 23, 1, 59, 59, 999999, tzinfo=UTC), "2026-11-22"),
        (datetime(2026, 11, 23, 2, 0, tzinfo=UTC), "2026-11-23"),
        (datetime(2026, 11, 23, 23, 59, tzinfo=UTC), "2026-11-23"),
        (datetime(2026, 11, 24, 0, 30, tzinfo=UTC), "2026-11-23"),
        (datetime(2027, 1, 1, 1, 0, tzinfo=UTC), "2026-12-31"),
        # 03:30 at UTC+2 is 01:30 UTC: still the previous period.
        (datetime(2026, 11, 23, 3, 30, tzinfo=timezone(timedelta(hours=2))), "2026-11-22"),
        # Naive datetimes are taken as UTC.
        (datetime(2026, 11, 23, 2, 0), "2026-11-23"),
    ],
)
def test_quota_period_key_around_0200_utc(cardshow: Policy, now: datetime, key: str) -> None:
    assert cardshow.quota_period_key(now) == key


def test_quota_period_bounds(cardshow: Policy) -> None:
    now = datetime(2026, 11, 23, 1, 59, tzinfo=UTC)
    assert cardshow.quota_period_start(now) == datetime(2026, 11, 22, 2, 0, tzinfo=UTC)
    assert cardshow.next_quota_reset(now) == datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    at_reset = datetime(2026, 11, 23, 2, 0, tzinfo=UTC)
    assert cardshow.quota_period_start(at_reset) == at_reset


def test_quota_reset_minutes() -> None:
    policy = parse_policy(_CUSTOM)  # reset_at = "00:30"
    assert policy.quota_period_key(datetime(2026, 3, 2, 0, 29, tzinfo=UTC)) == "2026-03-01"
    assert policy.quota_period_key(datetime(2026, 3, 2, 0, 30, tzinfo=UTC)) == "2026-03-02"


def test_reset_at_accepts_a_toml_time() -> None:
    text = preset_text("cardshow").replace('reset_at = "02:00"', "reset_at = 02:00:00")
    assert parse_policy(text).quota_period_key(datetime(2026, 1, 2, 1, 0, tzinfo=UTC)) == (
        "2026-01-01"
    )


# ------------------------------------------------------------------ retention

SENT = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("tier", "days"), [("free", 30), ("privileged", 180), ("privileged_plus", 365)]
)
def test_message_expiry_by_tier(bookstore: Policy, tier: str, days: int) -> None:
    assert bookstore.message_expiry(SENT, tier) == SENT + timedelta(days=days)


def test_retention_for_unknown_tier_raises_value_error(bookstore: Policy) -> None:
    with pytest.raises(ValueError, match="gold"):
        bookstore.retention_days("gold")


def test_downgrade_keeps_longer_expiry_until_grace_ends(bookstore: Policy) -> None:
    change = SENT + timedelta(days=10)
    # privileged_plus -> free, message 10 days old: free expiry (day 30) is before the end
    # of grace (day 40), so the message lives until grace ends.
    assert bookstore.expiry_after_tier_change(SENT, "privileged_plus", "free", change) == (
        change + timedelta(days=30)
    )
    # Message 1 day old, downgrade to privileged: 180 days is past the grace, so it applies.
    change = SENT + timedelta(days=1)
    assert bookstore.expiry_after_tier_change(SENT, "privileged_plus", "privileged", change) == (
        SENT + timedelta(days=180)
    )
    # Old expiry comes before grace ends: never extended beyond what the old tier gave.
    change = SENT + timedelta(days=170)
    assert bookstore.expiry_after_tier_change(SENT, "privileged", "free", change) == (
        SENT + timedelta(days=180)
    )
    assert bookstore.grace_ends_at(change) == change + timedelta(days=30)


def test_upgrade_applies_longer_retention_at_once(bookstore: Policy) -> None:
    change = SENT + timedelta(days=5)
    assert bookstore.expiry_after_tier_change(SENT, "free", "privileged", change) == (
        SENT + timedelta(days=180)
    )


def test_purge_after_soft_delete(bookstore: Policy, marketplace: Policy) -> None:
    assert bookstore.purge_at(SENT) == SENT + timedelta(days=7)
    assert marketplace.purge_at(SENT) == SENT


# ------------------------------------------------------------------ bad files


def _bad(old: str, new: str, preset: str = "bookstore") -> str:
    text = preset_text(preset)
    assert old in text, f"test setup: {old!r} not in {preset} preset"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text.replace(old, new, 1), source="bad.toml")
    return str(caught.value)


def test_unknown_top_level_key() -> None:
    message = _bad('\nname = "bookstore"', '\ncolour = "red"\nname = "bookstore"')
    assert message == "bad.toml: colour: unknown key"


def test_unknown_nested_key() -> None:
    message = _bad("[messages]\nmax_length", "[messages]\nmax_lenght")
    assert "messages.max_lenght: unknown key" in message
    assert "messages.max_length: required key missing" in message


def test_unknown_key_in_array_of_tables() -> None:
    assert "start_rules[0].from_tier: unknown key" in _bad("from_tiers =", "from_tier =")


def test_unknown_role_in_rule() -> None:
    message = _bad(
        'to_roles = ["mvp_dealer", "organizer"',
        'to_roles = ["mvp_dealr", "organizer"',
        preset="cardshow",
    )
    assert "start_rules[0].to_roles: unknown role 'mvp_dealr'" in message


def test_unknown_tier_in_rule() -> None:
    message = _bad('from_tiers = ["privileged",', 'from_tiers = ["gold",')
    assert "start_rules[0].from_tiers: unknown tier 'gold'" in message


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            "max_length = 1000",
            'max_length = "1000"',
            "messages.max_length: Input should be a valid integer",
        ),
        (
            "max_length = 1000",
            "max_length = true",
            "messages.max_length: Input should be a valid integer",
        ),
        (
            "max_length = 1000",
            "max_length = 0",
            "messages.max_length: Input should be greater than 0",
        ),
        (
            'roles = ["member", "manager", "owner"]\ntiers',
            'roles = "member"\ntiers',
            "roles: Input should be a valid list",
        ),
        (
            "subject_required = false",
            'subject_required = "no"',
            "conversations.subject_required: Input should be a valid boolean",
        ),
        (
            "[rate_limit]\nper_second = 10",
            '[rate_limit]\nper_second = "fast"',
            "rate_limit.per_second: Input should be a valid number",
        ),
    ],
)
def test_wrong_type_names_the_key(old: str, new: str, expected: str) -> None:
    assert expected in _bad(old, new)


@pytest.mark.parametrize(
    ("old", "new", "expected", "preset"),
    [
        (
            'default_tier = "free"',
            'default_tier = "gold"',
            "default_tier: unknown tier 'gold'",
            "bookstore",
        ),
        (
            "privileged_plus = 365 }",
            "privileged_plus = 365, gold = 1 }",
            "retention.days.gold: unknown tier 'gold'",
            "bookstore",
        ),
        (
            ", privileged_plus = 365 }",
            " }",
            "retention.days: no retention given for tier 'privileged_plus'",
            "bookstore",
        ),
        (
            'moderator_roles = ["manager", "owner"]',
            'moderator_roles = ["boss"]',
            "moderator_roles: unknown role 'boss'",
            "bookstore",
        ),
        (
            'roles = ["member", "manager", "owner"]\n',
            'roles = ["member", "manager", "all"]\n',
            "roles: 'all' is reserved",
            "bookstore",
        ),
        (
            'audiences = ["attendee"]',
            'audiences = ["attendees"]',
            "broadcasts.rules[1].audiences: unknown audience 'attendees'",
            "cardshow",
        ),
        ("quota = 2\n", "", "broadcasts.rules[0].quota: required when period is 'day'", "cardshow"),
        (
            'from_roles = ["mvp_dealer"]\naudiences',
            'from_roles = ["organizer"]\naudiences',
            "broadcasts.rules[1].from_roles: role 'organizer' already has a broadcast rule",
            "cardshow",
        ),
        (
            'period = "day"\nquota = 1',
            'period = "week"\nquota = 1',
            "broadcasts.rules[1].period: Input should be 'day' or 'none'",
            "cardshow",
        ),
        (
            'reset_at = "02:00"',
            'reset_at = "2am"',
            "broadcasts.reset_at: String should match",
            "cardshow",
        ),
        (
            '[rollout]\nmode = "on"',
            '[rollout]\nmode = "percent"',
            "rollout.percent: required when mode is 'percent'",
            "cardshow",
        ),
        (
            '[rollout]\nmode = "on"',
            '[rollout]\nmode = "percent"\npercent = 150',
            "rollout.percent: Input should be less than or equal to 100",
            "cardshow",
        ),
        (
            "subject_required = false",
            "subject_required = true",
            "conversations.subject_required: true but no subject_types",
            "bookstore",
        ),
        ('name = "bookstore"', 'name = "Book Store"', "name: String should match", "bookstore"),
        (
            "[messages]\nmax_length = 1000\npage_size = 50\n",
            "",
            "messages: required key missing",
            "bookstore",
        ),
    ],
)
def test_cross_reference_and_range_errors_name_the_key(
    old: str, new: str, expected: str, preset: str
) -> None:
    assert expected in _bad(old, new, preset)


def test_section_of_the_wrong_type() -> None:
    text = "messages = 5\n" + preset_text("bookstore").replace(
        "[messages]\nmax_length = 1000\npage_size = 50\n", ""
    )
    with pytest.raises(PolicyError, match=r"messages: should be a table"):
        parse_policy(text)


def test_every_problem_is_reported_at_once() -> None:
    text = preset_text("bookstore").replace("max_length = 1000", "max_length = -1")
    text = text.replace("\nname =", "\ncolour = 1\nname =", 1)
    with pytest.raises(PolicyError) as caught:
        parse_policy(text)
    assert "colour: unknown key" in str(caught.value)
    assert "messages.max_length" in str(caught.value)
    assert len(caught.value.problems) == 2


def test_toml_syntax_error_names_the_line() -> None:
    message = _bad("[messages]", "[messages")
    assert "invalid TOML" in message
    assert "line " in message


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.toml"
    with pytest.raises(PolicyError, match="file not found") as caught:
        load_policy(str(missing))
    assert str(missing) in str(caught.value)


def test_unknown_preset() -> None:
    with pytest.raises(PolicyError, match="unknown preset") as caught:
        load_policy("bookshop")
    assert "'bookshop'" in str(caught.value)
    assert "bookstore, cardshow, marketplace" in str(caught.value)


def test_directory_and_binary_files_are_policy_errors(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read file"):
        load_policy(str(tmp_path) + "/")
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(str(binary))


def test_load_from_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(preset_text("marketplace").replace('name = "marketplace"', 'name = "mine"'))
    policy = load_policy(str(path))
    assert policy.name == "mine"
    assert policy.source == str(path)
    # Errors from a file name the file.
    # Appended after the last table, so the key lands inside [rollout].
    path.write_text(preset_text("marketplace") + "\nextra = 1\n")
    with pytest.raises(PolicyError, match=r"mine\.toml: rollout\.extra: unknown key"):
        load_policy(str(path))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "roles = 5",
        "start_rules = { a = 1 }",
        "[retention]\ndays = { Free = 1 }",
        "[retention]\ndays = [1, 2]",
        'name = "x"\nroles = [1, [2]]\ntiers = [{}]\ndefault_tier = 3',
        "[[start_rules]]\nfrom_roles = []\nto_roles = []",
        "messages.max_length = 1e400",
        "\x00",
        "a = 1\na = 2",
    ],
)
def test_garbage_only_ever_raises_policy_error(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


def test_non_string_text_is_a_policy_error() -> None:
    with pytest.raises(PolicyError):
        parse_policy(b"name = 'x'")  # type: ignore[arg-type]


# ------------------------------------------------------------------ rate limits


def test_preset_rate_limits(bookstore: Policy, cardshow: Policy, marketplace: Policy) -> None:
    for policy in (bookstore, cardshow, marketplace):
        assert (policy.rate_limit_per_second, policy.rate_limit_burst) == (10.0, 20)
        send = policy.rate_limit_actions["send"]
        assert (send.per_second, send.burst) == (2.0, 10)
        start = policy.rate_limit_actions["start_conversation"]
        assert (start.per_second, start.burst) == (1.0, 5)
        assert policy.rate_limit_actions["report"].burst == 5
        frames = policy.rate_limit_frames
        assert (frames.per_second, frames.burst) == (10.0, 20)
    assert marketplace.rate_limit_actions["attachment"].burst == 8
    assert cardshow.rate_limit_actions["broadcast"].burst == 3
    assert "broadcast" not in bookstore.rate_limit_actions  # nobody may broadcast there


def test_rate_limit_defaults_have_no_action_limits() -> None:
    policy = parse_policy(_CUSTOM)
    assert dict(policy.rate_limit_actions) == {}
    assert (policy.rate_limit_frames.per_second, policy.rate_limit_frames.burst) == (10.0, 20)


SEND_LIMIT = "send = { per_second = 2, burst = 10 }"


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        ("sned = { per_second = 2, burst = 10 }", "rate_limit.actions.sned: unknown key"),
        ("send = { per_second = 2 }", "rate_limit.actions.send.burst: required key missing"),
        (
            "send = { per_second = 0, burst = 10 }",
            "rate_limit.actions.send.per_second: Input should be greater than 0",
        ),
        (
            'send = { per_second = 2, burst = "10" }',
            "rate_limit.actions.send.burst: Input should be a valid integer",
        ),
        (
            "send = { per_second = 2, burst = 10, window = 3 }",
            "rate_limit.actions.send.window: unknown key",
        ),
        ("send = 2", "rate_limit.actions.send: should be a table"),
    ],
)
def test_a_bad_action_limit_names_its_key(new: str, expected: str) -> None:
    assert expected in _bad(SEND_LIMIT, new)


def test_a_bad_frame_limit_names_its_key() -> None:
    old = "frames = { per_second = 10, burst = 20 }"
    assert "rate_limit.frames.burst: Input should be greater than or equal to 1" in _bad(
        old, "frames = { per_second = 10, burst = 0 }"
    )
    assert "rate_limit.frame_burst: unknown key" in _bad(old, "frame_burst = 20")
