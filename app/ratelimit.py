"""Per-user rate limits from the policy's `[rate_limit]`, held in Redis so every web
process shares them.

The `limits` library's moving window (exact, one Lua script per hit) expresses "about
`per_second` requests a second with bursts of `burst`" as `burst` requests in any window
of `burst / per_second` seconds: the marketplace's 10/s with bursts of 20 is 20 per 2 s.
A window is whole seconds, so it is rounded up and the amount raised to keep the
sustained rate (3/s with bursts of 20: 21 per 7 s). The window stores one entry per
request, so its memory per user is bounded by the amount.

A user has up to three kinds of window:

* the general one (`per_second`, `burst`), which every `/v1/*` request and stream
  connect spends;
* an action's own (`[rate_limit.actions.<action>]`), which a request of that action (a
  send, a conversation start, ...) spends as well;
* the stream frames' own (`[rate_limit.frames]`), which client frames spend instead of
  the general one.

A request with an action limit is checked against the general window first, then the
action's, as flask-limiter checks stacked limits: a request refused by the general limit
spends nothing of its action's, and one refused by its action's still counted as a
request against the general one (it was one). A request without an action limit costs one
Redis round trip, one with an action limit two; a refusal costs one more, to read when
the window frees up (`Retry-After`).

A Redis that cannot be reached does not fail requests here: the limiter is a guard, not
the service, so it logs and lets the request through (any handler that needs Redis
answers its own 503). After a failure the limiter is skipped for a few seconds, so an
outage does not add Redis's connect timeout to every request.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from functools import lru_cache

import redis
import redis.exceptions
from limits import RateLimitItem, RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from app.policy.schema import RateLimit
from monitoring.metrics import RATE_LIMITED

log = logging.getLogger(__name__)

KEY_PREFIX = "switchboard:ratelimit"
SKIP_AFTER_FAILURE_SECONDS = 5.0
#: The general window's name in its key; actions' windows are named after the action.
GENERAL = "general"
FRAMES = "frames"


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds, at least 1 when refused
    # When refused: the window that said no (GENERAL, an action's name or FRAMES), and the
    # seconds until a hit could pass again.
    refused_by: str | None = None
    wait: float = 0.0


def window_for(per_second: float, burst: int) -> tuple[int, int]:
    """(amount, seconds): the moving window standing for `per_second` with `burst`."""
    seconds = max(1, math.ceil(burst / per_second))
    return max(burst, math.ceil(per_second * seconds)), seconds


def wall_clock() -> float:
    """The clock the `limits` library stamps hits with (the tests move both)."""
    return time.time()


@lru_cache(maxsize=64)
def _item(per_second: float, burst: int) -> RateLimitItem:
    amount, seconds = window_for(per_second, burst)
    return RateLimitItemPerSecond(amount, seconds)


class UserRateLimiter:
    """`hit(tenant_id, user_id, surface)` records one request and says whether it may go on;
    `surface` is the metric label of a refusal (`api`, `stream`, `stream_frame`)."""

    def __init__(self, client: redis.Redis, per_second: float, burst: int) -> None:
        # The app's own connection pool: no second set of connections to Redis.
        storage = RedisStorage(
            "redis://", connection_pool=client.connection_pool, key_prefix=KEY_PREFIX
        )
        self._limiter = MovingWindowRateLimiter(storage)
        self.item = _item(float(per_second), burst)
        self._skip_until = 0.0
        self._lock = threading.Lock()

    def hit(
        self,
        tenant_id: str,
        user_id: str,
        surface: str,
        action: tuple[str, RateLimit] | None = None,
    ) -> Verdict:
        """One request against the general limit and, when `action` is (name, limit), that
        action's limit too (see the module's note on the order). A refusal by the action's
        limit is counted under the surface `action:<name>`."""
        windows = [(GENERAL, self.item, surface)]
        if action is not None:
            name, limit = action
            windows.append((name, _item(limit.per_second, limit.burst), f"action:{name}"))
        return self._hit(tenant_id, user_id, windows)

    def hit_frame(self, tenant_id: str, user_id: str, limit: RateLimit) -> Verdict:
        """One client stream frame, against the frames' own limit only (surface
        `stream_frame`)."""
        item = _item(limit.per_second, limit.burst)
        return self._hit(tenant_id, user_id, [(FRAMES, item, "stream_frame")])

    def _hit(
        self, tenant_id: str, user_id: str, windows: list[tuple[str, RateLimitItem, str]]
    ) -> Verdict:
        if time.monotonic() < self._skip_until:
            return Verdict(True)
        try:
            for name, item, surface in windows:
                # The general window keeps the key it had before actions existed.
                keys = (tenant_id, user_id) if name == GENERAL else (tenant_id, user_id, name)
                if self._limiter.hit(item, *keys):
                    continue
                reset_at = self._limiter.get_window_stats(item, *keys).reset_time
                RATE_LIMITED.labels(surface).inc()
                # The library's script reports the window's start with 14 significant
                # digits (about 0.1 ms today): round that noise off before rounding up.
                wait = max(0.0, round(reset_at - wall_clock(), 3))
                return Verdict(False, max(1, math.ceil(wait)), refused_by=name, wait=wait)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            with self._lock:
                self._skip_until = time.monotonic() + SKIP_AFTER_FAILURE_SECONDS
            log.warning("rate limiter cannot reach Redis; not limiting for now: %r", exc)
        return Verdict(True)
