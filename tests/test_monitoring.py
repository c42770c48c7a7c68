"""The dashboard and alert rules only name metrics the code exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import REGISTRY

import monitoring.metrics  # noqa: F401 - registers the metrics

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported(name: str) -> bool:
    """Whether `name` is a series of a registered family (a counter `x` exports `x_total`,
    a histogram `x` exports `x_bucket`, ...), labelled children or not."""
    families = {family.name for family in REGISTRY.collect()}
    # Collected at scrape time, from the broker and from PostgreSQL.
    families |= {
        "switchboard_queue_depth",
        "switchboard_sends_queued",
        "switchboard_sends_queued_oldest_age_seconds",
        "switchboard_job_period_seconds",
        "switchboard_job_last_success_timestamp_seconds",
        "switchboard_job_last_rows",
        "switchboard_job_last_duration_seconds",
        "switchboard_reports_pending",
        "switchboard_reports_pending_oldest_age_seconds",
    }
    return any(name.removesuffix(suffix) in families for suffix in (*SUFFIXES, ""))


def referenced(text: str) -> set[str]:
    return set(re.findall(r"\bswitchboard_[a-z_]+", text))


def test_dashboard_is_valid_json_naming_real_metrics():
    dashboard = json.loads((MONITORING / "grafana" / "switchboard.json").read_text())
    expressions = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
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
