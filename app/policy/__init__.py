"""The policy engine: who may message whom, retention, broadcast quotas and rollout,
read from a TOML file (a shipped preset or a deployment's own) and checked at start-up.

Pure logic: no Flask, no database, no Celery. Services ask it questions and get a
`Decision` whose `rule` is the snake_case code the API reports on a refusal.

Refusal codes for direct messages, in the order they are checked:
``other_tenant``, ``self_conversation``, ``messaging_disabled``, ``blocked``,
``unknown_role`` / ``unknown_tier`` (a user whose role or tier the policy does not
declare), ``reply_only``, ``tier_not_allowed``, ``role_not_allowed`` (starting),
``reply_not_allowed`` (replying). Broadcasts: ``messaging_disabled``,
``unknown_audience``, ``broadcast_not_allowed``, ``audience_not_allowed``,
``quota_exceeded``. Message shape: ``empty_message``, ``message_too_long``,
``subject_required``, ``unknown_subject_type``.
"""

from app.policy.engine import ALLOW, Actor, Decision, Policy
from app.policy.loader import PRESETS, PolicyError, load_policy, parse_policy
from app.policy.schema import ALL_AUDIENCE

__all__ = [
    "ALLOW",
    "ALL_AUDIENCE",
    "PRESETS",
    "Actor",
    "Decision",
    "Policy",
    "PolicyError",
    "load_policy",
    "parse_policy",
]
