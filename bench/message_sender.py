"""The direct messages of the stream benchmarks: planned round the pairs of members
(database.provision_pairs), sent over HTTP at a steady open-loop rate from sender threads,
and tallied against the frames the socket clients received."""

from __future__ import annotations

import http.client
import json
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from common import pace

NOT_ISSUED = -1  # status of a send the sender gave up on before issuing it


@dataclass
class Sends:
    scheduled: list[float]
    issued: list[float]
    done: list[float]
    status: list[int]  # HTTP status; 0: no answer; NOT_ISSUED
    errors: Counter[str] = field(default_factory=Counter)


def send_steady(
    port: int,
    jobs: list[tuple[str, str, str]],  # (token, conversation id, client id)
    rate: float,
    threads: int,
    body_prefix: str,
    grace: float = 30.0,
) -> Sends:
    """Issue `jobs` at `rate` per second (open loop: due on schedule, whether or not earlier
    ones have been answered), each over a keep-alive connection of one of `threads` sender
    threads. Sends still waiting for a free thread `grace` seconds after the last one was
    due are not issued at all (NOT_ISSUED), so nothing is left sending after it returns."""
    count = len(jobs)
    sends = Sends([0.0] * count, [0.0] * count, [0.0] * count, [0] * count)
    work: queue.Queue[int | None] = queue.Queue()
    give_up = threading.Event()

    def sender() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while (index := work.get()) is not None:
                if give_up.is_set():
                    sends.status[index] = NOT_ISSUED
                    continue
                token, conversation, client_id = jobs[index]
                body = json.dumps({"body": f"{body_prefix} {index}", "client_id": client_id})
                headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
                path = f"/v1/conversations/{conversation}/messages"
                for attempt in range(2):  # one retry on a dropped keep-alive (idempotent)
                    sends.issued[index] = sends.issued[index] or time.monotonic()
                    try:
                        connection.request("POST", path, body=body, headers=headers)
                        response = connection.getresponse()
                        response.read()
                        sends.status[index] = response.status
                        break
                    except (OSError, http.client.HTTPException) as exc:
                        connection.close()
                        if attempt:
                            sends.errors[exc.__class__.__name__] += 1
                sends.done[index] = time.monotonic()
        finally:
            connection.close()

    pool = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    for thread in pool:
        thread.start()

    def due(index: int, when: float) -> None:
        sends.scheduled[index] = when
        work.put(index)

    pace(count, rate, due)
    for _ in pool:
        work.put(None)
    deadline = time.monotonic() + grace
    for thread in pool:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    give_up.set()
    deadline = time.monotonic() + 40  # the requests in flight time out after 30 s
    for thread in pool:
        thread.join(timeout=max(0.1, deadline - time.monotonic()))
    return sends


def plan_sends(
    pairs: list[int], tokens: list[str], conversations: list[str], prefix: str, count: int
) -> list[tuple[str, str, str, int, int]]:
    """`count` sends (token, conversation id, client id, sender, recipient) round the pairs
    (conversation p is user 2p with 2p+1), each pair's two users taking turns to send."""
    plan = []
    for index in range(count):
        pair = pairs[index % len(pairs)]
        sender = 2 * pair + (index // len(pairs)) % 2
        plan.append((tokens[sender], conversations[pair], f"{prefix}-{index}", sender, sender ^ 1))
    return plan


def tally_sends(
    plan: list[tuple[str, str, str, int, int]], sends: Sends, frames: list[tuple[int, float, dict]]
) -> dict[str, Any]:
    """Match the frames to the planned sends: latencies (from the moment each send was
    issued; from its scheduled time too), accepted sends whose recipient (or sender's echo)
    frame is missing, duplicates, the sender's lag behind schedule and HTTP times."""
    count = len(plan)
    by_client_id = {p[2]: i for i, p in enumerate(plan)}
    accepted = [i for i in range(count) if sends.status[i] == 202]
    seen: Counter[tuple[int, int]] = Counter()
    recipient_latency, echo_latency, scheduled_latency = [], [], []
    other: Counter[str] = Counter()
    for idx, t, frame in frames:
        data = frame.get("data") or {}
        index = by_client_id.get(data.get("client_id")) if isinstance(data, dict) else None
        if frame.get("type") != "message.created" or index is None:
            other[str(frame.get("type"))] += 1
            continue
        seen[(index, idx)] += 1
        if seen[(index, idx)] > 1:
            continue
        if idx == plan[index][4]:
            recipient_latency.append(t - sends.issued[index])
            scheduled_latency.append(t - sends.scheduled[index])
        else:
            echo_latency.append(t - sends.issued[index])
    missing = sum(1 for i in accepted if (i, plan[i][4]) not in seen)
    missing_echo = sum(1 for i in accepted if (i, plan[i][3]) not in seen)
    duplicates = sum(n - 1 for n in seen.values() if n > 1)
    issued = [i for i in range(count) if sends.issued[i]]
    lag = [sends.issued[i] - sends.scheduled[i] for i in issued]
    http_time = [sends.done[i] - sends.issued[i] for i in accepted]
    return {
        "recipient_latency": recipient_latency,
        "echo_latency": echo_latency,
        "scheduled_latency": scheduled_latency,
        "other": other,
        "accepted": accepted,
        "missing": missing,
        "missing_echo": missing_echo,
        "duplicates": duplicates,
        "issued": issued,
        "lag": lag,
        "http_time": http_time,
        "statuses": Counter(sends.status),
        "sent_wall": max(sends.done or [0]) - min(sends.scheduled or [0]),
        "not_issued": sum(1 for status in sends.status if status == NOT_ISSUED),
    }
