"""Per-user rate limits from the policy's `[rate_limit]`, held in Redis so every web
process shares them.

The `limits` library's moving window (exact, one Lua script per hit) expresses "about
`per_second` requests a second with bursts of `burst`" as `burst` requests in any window
of `burst / per_second` seconds: the marketplace's 10/s with bursts of 20 is 20 per 2 s.
A window is whole seconds, so it is rounded up and the amount raised to keep the
sustained rate (3/s with bursts of 20: 21 per 7 s). The window stores one entry per
request, so its memory per user is bounded by the amount.

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

import redis
import redis.exceptions
from limits import RateLimitItemPerSecond
from limits.storage import RedisStorage
from limits.strategies import MovingWindowRateLimiter

from monitoring.metrics import RATE_LIMITED

log = logging.getLogger(__name__)

KEY_PREFIX = "switchboard:ratelimit"
SKIP_AFTER_FAILURE_SECONDS = 5.0


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    retry_after: int = 0  # whole seconds, at least 1 when refused


def window_for(per_second: float, burst: int) -> tuple[int, int]:
    """(amount, seconds): the moving window standing for `per_second` with `burst`."""
    seconds = max(1, math.ceil(burst / per_second))
    return max(burst, math.ceil(per_second * seconds)), seconds


class UserRateLimiter:
    """`hit(tenant_id, user_id, surface)` records one request and says whether it may go on."""

    def __init__(self, client: redis.Redis, per_second: float, burst: int) -> None:
        # The app's own connection pool: no second set of connections to Redis.
        storage = RedisStorage(
            "redis://", connection_pool=client.connection_pool, key_prefix=KEY_PREFIX
        )
        self._limiter = MovingWindowRateLimiter(storage)
        amount, seconds = window_for(per_second, burst)
        self.item = RateLimitItemPerSecond(amount, seconds)
        self._skip_until = 0.0
        self._lock = threading.Lock()

    def hit(self, tenant_id: str, user_id: str, surface: str) -> Verdict:
        if time.monotonic() < self._skip_until:
            return Verdict(True)
        try:
            if self._limiter.hit(self.item, tenant_id, user_id):
                return Verdict(True)
            reset_at = self._limiter.get_window_stats(self.item, tenant_id, user_id).reset_time
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            with self._lock:
                self._skip_until = time.monotonic() + SKIP_AFTER_FAILURE_SECONDS
            log.warning("rate limiter cannot reach Redis; not limiting for now: %r", exc)
            return Verdict(True)
        RATE_LIMITED.labels(surface).inc()
        return Verdict(False, max(1, math.ceil(reset_at - time.time())))
