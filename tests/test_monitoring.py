"""The dashboard and alert rules only name metrics the code exports, the dashboard is
importable as it is, and the alert rules pass promtool's checks and unit tests."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

import monitoring.metrics  # noqa: F401 - registers the metrics
from monitoring.metrics import (
    JobStateCollector,
    QueueDepthCollector,
    pending_reports_collector,
    queued_broadcasts_collector,
    queued_sends_collector,
)
from schedules.runner import JobStatus

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _scrape_time_families() -> set[str]:
    """The families the web's collectors read at scrape time, from the collectors
    themselves (fed made-up readings), so a renamed gauge fails here too."""
    now = datetime.now(UTC)
    collectors = [
        QueueDepthCollector(lambda: {"direct": 0}),
        queued_sends_collector(lambda: (0, 0.0)),
        queued_broadcasts_collector(lambda: (0, 0.0)),
        pending_reports_collector(lambda: (0, 0.0)),
        JobStateCollector(lambda: [JobStatus("a-job", 60.0, now, 1, 0.1)]),
    ]
    return {family.name for collector in collectors for family in collector.collect()}


def exported(name: str) -> bool:
    """Whether `name` is a series of a registered family (a counter `x` exports `x_total`,
    a histogram `x` exports `x_bucket`, ...), labelled children or not."""
    families = {family.name for family in REGISTRY.collect()} | _scrape_time_families()
    return any(name.removesuffix(suffix) in families for suffix in (*SUFFIXES, ""))


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bswitchboard_[a-z_]+", text))


def test_dashboard_is_valid_json_naming_real_metrics():
    dashboard = json.loads((MONITORING / "grafana" / "switchboard.json").read_text())
    expressions = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    missing = {name for name in referenced(expressions) if not exported(name)}
    assert not missing, missing


def test_alert_rules_name_real_metrics():
    names = referenced((MONITORING / "alerts.yml").read_text())
    assert names
    missing = {name for name in names if not exported(name)}
    assert not missing, missing


def test_a_rate_limit_spike_alerts():
    alerts = (MONITORING / "alerts.yml").read_text()
    assert "SwitchboardRateLimitSpike" in alerts
    assert "switchboard_rate_limited_total" in alerts


def _dashboard() -> dict:
    return json.loads((MONITORING / "grafana" / "switchboard.json").read_text())


def test_dashboard_is_importable_as_it_is():
    """What Grafana's import needs: a schema version, unique panel ids, panels inside the
    24-column grid and not on top of each other, a data source and distinct refIds."""
    dashboard = _dashboard()
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"] and dashboard["title"]
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps panel {cells[(x, y)]}"
                cells[(x, y)] = panel["id"]
        if panel["type"] == "row":
            assert "targets" not in panel
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_the_dashboard_watches_every_part():
    """Issue 11's panels: jobs (age, duration, rows), broadcasts (lag, throughput), the
    moderation queue, attachments and 429s by surface."""
    expressions = " ".join(
        target["expr"] for panel in _dashboard()["panels"] for target in panel.get("targets", [])
    )
    for name in (
        "switchboard_job_last_success_timestamp_seconds",
        "switchboard_job_last_duration_seconds",
        "switchboard_job_duration_seconds_bucket",
        "switchboard_job_last_rows",
        "switchboard_job_runs_total",
        "switchboard_broadcasts_queued_oldest_age_seconds",
        "switchboard_broadcast_recipients_total",
        "switchboard_reports_pending",
        "switchboard_attachment_uploads_total",
        "switchboard_attachment_checks_total",
    ):
        assert name in referenced(expressions), name
    assert "sum by (surface) (rate(switchboard_rate_limited_total" in expressions


def _promtool() -> str:
    found = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not found:
        pytest.skip(
            "promtool is not installed: `apt-get install prometheus` (Debian; .ci/run does it)"
            " or set PROMTOOL to its path, to check monitoring/alerts.yml with it"
        )
    return found


def test_promtool_checks_the_alert_rules():
    result = subprocess.run(
        [_promtool(), "check", "rules", "alerts.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_runs_the_alert_unit_tests():
    """monitoring/alerts_test.yml: when the job, fan-out, rate-limit and attachment alerts
    fire, and when they must not."""
    result = subprocess.run(
        [_promtool(), "test", "rules", "alerts_test.yml"],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_watching_alerts_have_unit_tests():
    """New rules about jobs, broadcasts, rate limits and attachments come with a case in
    alerts_test.yml (the others are plain thresholds)."""
    rules = set(re.findall(r"- alert: (\w+)", (MONITORING / "alerts.yml").read_text()))
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts_test.yml").read_text()))
    assert tested <= rules, tested - rules
    for name in rules:
        if re.search(r"Job|BroadcastFanoutLagging|RateLimit|AttachmentsRejected", name):
            assert name in tested, name
