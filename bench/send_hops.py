"""Where one direct message's time goes, hop by hop: from the sender's request to the
recipient's frame, through the web process, the broker, the worker and the hub.

bench/throughput.py prints only the ends (delivery, the 202, insert -> stored). This one
reads stamps that every process on the path writes with the same clock (CLOCK_MONOTONIC
is one clock for the whole machine), so each hop of each send is measured on its own.
The stamps are not in the product: bench/send_hops.patch adds them (`app/hop_trace.py`
and one line or two where each hop begins or ends), and they write nothing unless
SWITCHBOARD_HOP_TRACE_DIR is set. tests/test_send_hops.py checks that the patch still
applies.

    git apply bench/send_hops.patch
    mkdir -p /tmp/hops && export SWITCHBOARD_HOP_TRACE_DIR=/tmp/hops
    .venv/bin/python bench/throughput.py --duration 15 --fixed-rates 20 --rates 20 \\
        --no-confirm --warmup-sends 0
    .venv/bin/python bench/send_hops.py /tmp/hops
    git apply -R bench/send_hops.patch
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path

from common import percentile

# The stamps in the order a send passes them, and what lies between two neighbours.
HOPS = [
    ("issued", "the sender's request, gunicorn, Flask, until the send view"),
    ("view_start", "the send view: token, body, pre-check and insert"),
    ("view_end", "the 202 written, until the batcher's greenlet runs"),
    ("enqueue_start", "Celery's publish, the worker's BRPOP, to a pool thread"),
    ("task_start", "Celery's task set-up and the app context"),
    ("store_start", "store_sends: decide, store, commit"),
    ("announce", "the events' PUBLISH, Redis pub/sub, the web's hub"),
    ("hub_received", "the hub and the socket's writer, until the frame"),
    ("frame", ""),
]
# Spans that overlap the chain's: the web's publish call (the worker may start before it
# returns) and what the task does after the announcement.
SIDE_SPANS = [
    ("enqueue_start", "enqueue_end", "(the web's publish call itself)"),
    ("announce", "task_end", "(the task, from the announcement to its end)"),
    ("issued", "answered", "(the 202: issued -> answered)"),
]


def read_stamps(directory: Path) -> dict[str, dict[str, float]]:
    """message id -> hop -> seconds (the first stamp of each hop: a send stored again
    after a redelivery keeps its first)."""
    sends: dict[str, dict[str, float]] = defaultdict(dict)
    for path in sorted(directory.glob("*.log")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                sends[parts[2]].setdefault(parts[1], float(parts[0]))
    return sends


def report(sends: dict[str, dict[str, float]], slowest: int) -> list[str]:
    names = [name for name, _ in HOPS]
    complete = [stamps for stamps in sends.values() if all(n in stamps for n in names)]
    lines = [f"{len(complete)} sends stamped at every hop (of {len(sends)} seen)"]
    if not complete:
        return lines

    def row(what: str, spans: list[float]) -> str:
        quantiles = " ".join(f"{percentile(spans, q):6.2f}" for q in (50, 90, 99))
        return f"{what:<60} {quantiles} {max(spans):6.2f}"

    lines.append(f"{'hop (ms)':<60} {'p50':>6} {'p90':>6} {'p99':>6} {'max':>6}")
    for (start, what), (end, _) in itertools.pairwise(HOPS):
        lines.append(row(what, [(s[end] - s[start]) * 1000 for s in complete]))
    lines.append(
        row("delivery: issued -> frame", [(s["frame"] - s["issued"]) * 1000 for s in complete])
    )
    for start, end, what in SIDE_SPANS:
        spans = [(s[end] - s[start]) * 1000 for s in complete if end in s and start in s]
        if spans:
            lines.append(row(what, spans))
    lines.append(f"\nthe {slowest} slowest deliveries, ms per hop in the order above:")
    for stamps in sorted(complete, key=lambda s: s["frame"] - s["issued"])[-slowest:]:
        hops = [(stamps[b] - stamps[a]) * 1000 for a, b in itertools.pairwise(names)]
        total = (stamps["frame"] - stamps["issued"]) * 1000
        lines.append("  " + " ".join(f"{h:5.1f}" for h in hops) + f"  = {total:.1f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="$SWITCHBOARD_HOP_TRACE_DIR of the run")
    parser.add_argument("--slowest", type=int, default=8)
    args = parser.parse_args()
    print("\n".join(report(read_stamps(args.directory), args.slowest)))


if __name__ == "__main__":
    main()
