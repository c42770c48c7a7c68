"""The policy file's schema: pydantic models for its shape, then cross-reference checks.

Shape errors (unknown keys, wrong types, out-of-range numbers) come from pydantic; the
checks that need the whole document (a rule naming an undeclared role, retention days
missing for a tier) run afterwards in `cross_check`. Both end up as `PolicyError`
messages of the form ``<key path>: <reason>`` so an operator can find the wrong line.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

#: The audience that means "every role".
ALL_AUDIENCE = "all"

# Role, tier and subject names end up in URLs, JSON and SQL filters; keeping them plain
# snake_case avoids quoting surprises everywhere downstream.
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*$", max_length=64)]


class _Section(BaseModel):
    # strict: TOML is typed, so "10" where a number belongs is a mistake worth reporting,
    # not something to coerce silently. extra="forbid": a misspelt key must not be ignored.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StartRule(_Section):
    """Senders with one of `from_roles` (and, if given, one of `from_tiers`) may start a
    conversation with recipients whose role is one of `to_roles`."""

    from_roles: list[Name] = Field(min_length=1)
    # None means every tier; an explicit empty list would be a rule that never matches.
    from_tiers: list[Name] | None = Field(default=None, min_length=1)
    to_roles: list[Name] = Field(min_length=1)


class RepliesSection(_Section):
    """Roles that may reply in a conversation they already belong to."""

    roles: list[Name]


class MessagesSection(_Section):
    max_length: int = Field(gt=0, le=100_000)
    page_size: int = Field(gt=0, le=1_000)


class ConversationsSection(_Section):
    page_size: int = Field(default=20, gt=0, le=1_000)
    subject_types: list[Name] = Field(default_factory=list)
    subject_required: bool = False


_UTC_TIME_OF_DAY = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")


def _utc_time_of_day(value: Any) -> Any:
    """Accept "HH:MM" or a TOML local time on a whole minute, as "HH:MM"; refuse anything
    else with a reason showing the expected form (the error's path names the key)."""
    if isinstance(value, dt.time):
        if value.second or value.microsecond or value.tzinfo is not None:
            raise ValueError('must be a whole minute in UTC, like "01:00"')
        return value.strftime("%H:%M")
    if not isinstance(value, str) or not _UTC_TIME_OF_DAY.match(value):
        raise ValueError(f'must be a UTC time of day "HH:MM", like "01:00" (got {value!r})')
    return value


class RetentionSection(_Section):
    days: dict[Name, Annotated[int, Field(gt=0, le=36_500)]]
    downgrade_grace_days: int = Field(default=0, ge=0, le=3_650)
    purge_after_days: int = Field(default=0, ge=0, le=3_650)
    # When the daily soft delete and purge jobs run (UTC). Left out: every hour.
    soft_delete_at: str | None = None
    purge_at: str | None = None

    @field_validator("soft_delete_at", "purge_at", mode="before")
    @classmethod
    def _time_of_day(cls, value: Any) -> Any:
        return None if value is None else _utc_time_of_day(value)


class BroadcastRule(_Section):
    from_roles: list[Name] = Field(min_length=1)
    audiences: list[str] = Field(min_length=1)
    period: Literal["day", "none"]
    quota: int | None = Field(default=None, ge=1, le=1_000_000)


class BroadcastsSection(_Section):
    reset_at: Annotated[str, StringConstraints(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")] = (
        "00:00"
    )
    rules: list[BroadcastRule] = Field(default_factory=list)

    @field_validator("reset_at", mode="before")
    @classmethod
    def _accept_toml_time(cls, value: Any) -> Any:
        # TOML has a native local-time type; `reset_at = 02:00:00` is a natural thing to write.
        if isinstance(value, dt.time):
            if value.second or value.microsecond or value.tzinfo is not None:
                raise ValueError('must be a whole minute in UTC, like "02:00"')
            return value.strftime("%H:%M")
        return value


#: Report reasons every policy accepts; `[moderation] extra_reasons` adds to them.
REPORT_REASONS: tuple[str, ...] = ("spam", "harassment", "inappropriate", "scam", "other")


class ModerationSection(_Section):
    # Extra reasons a report may give (a card show's "counterfeit"); names, because they
    # become metric labels and API values.
    extra_reasons: list[Name] = Field(default_factory=list, max_length=50)


class RateLimit(_Section):
    """About `per_second` a second with bursts of `burst` (app/ratelimit.py)."""

    per_second: float = Field(gt=0, le=100_000)
    burst: int = Field(ge=1, le=1_000_000)


class RateLimitActions(_Section):
    """Per-action limits, each spent *as well as* the general one: only one tighter than
    it has any effect. An action left out has no limit of its own. (The API endpoints of
    each action: RATE_LIMITED_ACTIONS in app/web.py.)"""

    send: RateLimit | None = None
    start_conversation: RateLimit | None = None
    report: RateLimit | None = None
    attachment: RateLimit | None = None
    broadcast: RateLimit | None = None


class RateLimitSection(_Section):
    # The general limit: every /v1/* request and stream connect.
    per_second: float = Field(default=10.0, gt=0, le=100_000)
    burst: int = Field(default=20, ge=1, le=1_000_000)
    actions: RateLimitActions = Field(default_factory=RateLimitActions)
    # Client frames on /v1/stream (typing): a budget of their own, not the general one.
    frames: RateLimit = Field(default_factory=lambda: RateLimit(per_second=10.0, burst=20))


#: The image types the worker can verify by their bytes; a policy allows some of them.
ATTACHMENT_TYPES: tuple[str, ...] = ("image/jpeg", "image/png", "image/webp")
AttachmentType = Literal["image/jpeg", "image/png", "image/webp"]


class AttachmentsSection(_Section):
    """Image attachments on direct messages, kept in the deployment's S3 bucket."""

    enabled: bool = False
    allowed_types: list[AttachmentType] = Field(
        default_factory=lambda: list(ATTACHMENT_TYPES), min_length=1
    )
    # The store itself refuses a bigger upload (the presigned POST's content-length-range).
    max_bytes: int = Field(default=10 * 1024 * 1024, ge=1024, le=100 * 1024 * 1024)
    max_per_message: int = Field(default=4, ge=1, le=20)
    # Width times height; a decompression bomb is refused before it is decoded.
    max_pixels: int = Field(default=40_000_000, ge=10_000, le=200_000_000)
    # The thumbnail's longer side, in pixels.
    thumbnail_size: int = Field(default=320, ge=32, le=2048)


class RolloutSection(_Section):
    mode: Literal["on", "off", "percent"] = "on"
    percent: float | None = Field(default=None, ge=0, le=100)
    # Changing the salt picks a different cohort for the same percentage.
    salt: str = Field(default="", max_length=200)


class PolicyModel(_Section):
    """The whole policy file."""

    name: Name
    description: str = ""
    roles: list[Name] = Field(min_length=1)
    tiers: list[Name] = Field(min_length=1)
    default_tier: Name
    moderator_roles: list[Name] = Field(default_factory=list)
    start_rules: list[StartRule]
    # Absent means every role may reply where it already takes part.
    replies: RepliesSection | None = None
    messages: MessagesSection
    conversations: ConversationsSection = Field(default_factory=ConversationsSection)
    retention: RetentionSection
    broadcasts: BroadcastsSection = Field(default_factory=BroadcastsSection)
    moderation: ModerationSection = Field(default_factory=ModerationSection)
    rate_limit: RateLimitSection = Field(default_factory=RateLimitSection)
    rollout: RolloutSection = Field(default_factory=RolloutSection)
    attachments: AttachmentsSection = Field(default_factory=AttachmentsSection)


# --------------------------------------------------------------------------- errors

_REASONS = {
    "extra_forbidden": "unknown key",
    "missing": "required key missing",
    "model_type": "should be a table",
    "model_attributes_type": "should be a table",
    "dict_type": "should be a table",
}


def format_location(loc: Sequence[Any]) -> str:
    """("start_rules", 1, "to_roles") -> "start_rules[1].to_roles"."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            # pydantic marks a bad dict *key* this way; the key itself is the previous part.
            path += " (key)"
        else:
            path += f".{part}" if path else str(part)
    return path or "(top level)"


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One ``path: reason`` line per pydantic error."""
    problems = []
    for error in exc.errors(include_url=False):
        reason = _REASONS.get(error["type"], error["msg"])
        problems.append(f"{format_location(error['loc'])}: {reason.removeprefix('Value error, ')}")
    return problems


# --------------------------------------------------------------------------- cross-checks


def _duplicates(values: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    dupes: list[str] = []
    for value in values:
        if value in seen and value not in dupes:
            dupes.append(value)
        seen.add(value)
    return dupes


def cross_check(model: PolicyModel) -> list[str]:
    """Checks that need more than one key: every name used is declared, and so on."""
    problems: list[str] = []
    roles = set(model.roles)
    tiers = set(model.tiers)

    def check_names(path: str, values: Iterable[str], declared: set[str], kind: str) -> None:
        for value in values:
            if value not in declared:
                problems.append(f"{path}: unknown {kind} {value!r}")
        for value in _duplicates(values):
            problems.append(f"{path}: {kind} {value!r} listed twice")

    for dupe in _duplicates(model.roles):
        problems.append(f"roles: role {dupe!r} listed twice")
    if ALL_AUDIENCE in roles:
        # "all" is the broadcast audience meaning every role; a role of that name is ambiguous.
        problems.append(f"roles: {ALL_AUDIENCE!r} is reserved for broadcast audiences")
    for dupe in _duplicates(model.tiers):
        problems.append(f"tiers: tier {dupe!r} listed twice")
    if model.default_tier not in tiers:
        problems.append(f"default_tier: unknown tier {model.default_tier!r}")
    check_names("moderator_roles", model.moderator_roles, roles, "role")

    for index, rule in enumerate(model.start_rules):
        base = f"start_rules[{index}]"
        check_names(f"{base}.from_roles", rule.from_roles, roles, "role")
        if rule.from_tiers is not None:
            check_names(f"{base}.from_tiers", rule.from_tiers, tiers, "tier")
        check_names(f"{base}.to_roles", rule.to_roles, roles, "role")

    if model.replies is not None:
        check_names("replies.roles", model.replies.roles, roles, "role")

    conversations = model.conversations
    for dupe in _duplicates(conversations.subject_types):
        problems.append(f"conversations.subject_types: {dupe!r} listed twice")
    if conversations.subject_required and not conversations.subject_types:
        problems.append("conversations.subject_required: true but no subject_types are declared")

    for tier in model.retention.days:
        if tier not in tiers:
            problems.append(f"retention.days.{tier}: unknown tier {tier!r}")
    for tier in model.tiers:
        if tier not in model.retention.days:
            problems.append(f"retention.days: no retention given for tier {tier!r}")

    owner_of: dict[str, int] = {}
    for index, rule in enumerate(model.broadcasts.rules):
        base = f"broadcasts.rules[{index}]"
        check_names(f"{base}.from_roles", rule.from_roles, roles, "role")
        for role in rule.from_roles:
            # One rule per role keeps "how many may I still send" a single number.
            if role in owner_of and owner_of[role] != index:
                problems.append(
                    f"{base}.from_roles: role {role!r} already has a broadcast rule "
                    f"(broadcasts.rules[{owner_of[role]}])"
                )
            owner_of.setdefault(role, index)
        for audience in rule.audiences:
            if audience != ALL_AUDIENCE and audience not in roles:
                problems.append(
                    f"{base}.audiences: unknown audience {audience!r} "
                    f"(a declared role or {ALL_AUDIENCE!r})"
                )
        for dupe in _duplicates(rule.audiences):
            problems.append(f"{base}.audiences: {dupe!r} listed twice")
        if rule.period == "day" and rule.quota is None:
            problems.append(f"{base}.quota: required when period is 'day'")
        if rule.period == "none" and rule.quota is not None:
            problems.append(f"{base}.quota: must be left out when period is 'none' (no quota)")

    for reason in model.moderation.extra_reasons:
        if reason in REPORT_REASONS:
            problems.append(f"moderation.extra_reasons: {reason!r} is already a built-in reason")
    for dupe in _duplicates(model.moderation.extra_reasons):
        problems.append(f"moderation.extra_reasons: {dupe!r} listed twice")

    for dupe in _duplicates(model.attachments.allowed_types):
        problems.append(f"attachments.allowed_types: {dupe!r} listed twice")

    if model.rollout.mode == "percent" and model.rollout.percent is None:
        problems.append("rollout.percent: required when mode is 'percent'")

    return problems
