"""The task base class: a transient error is retried with backoff, and the work is stored once."""

from __future__ import annotations

import time

from sqlalchemy import select

from app.db import after_commit
from app.models import AuditLog, Tenant
from monitoring.metrics import TASKS
from tests.helpers import wait_for
from workers.celery_app import PermanentError, RetryableError, celery, enqueue_after_commit

ATTEMPTS: dict[str, int] = {}


@celery.task(bind=True, name="tests.record_audit_flaky")
def record_audit_flaky(task, key: str, failures: int) -> None:
    """Writes a row, then fails `failures` times after writing: only the last write survives."""
    task.session.add(
        AuditLog(
            tenant_id="t1",
            action="test.flaky",
            target_type="test",
            target_id=key,
            detail={"attempt": ATTEMPTS.get(key, 0)},
        )
    )
    task.session.flush()
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    if ATTEMPTS[key] <= failures:
        raise RetryableError("the database went away (simulated)")


@celery.task(bind=True, name="tests.record_audit_broken")
def record_audit_broken(task, key: str) -> None:
    ATTEMPTS[key] = ATTEMPTS.get(key, 0) + 1
    task.session.add(
        AuditLog(tenant_id="t1", action="test.broken", target_type="test", target_id=key)
    )
    task.session.flush()
    raise PermanentError("this can never work")


@celery.task(bind=True, name="tests.record_request_id")
def record_request_id(task, key: str) -> None:
    from monitoring.logging import request_id_var

    task.session.add(
        AuditLog(
            tenant_id="t1",
            action="test.request_id",
            target_type="test",
            target_id=key,
            detail={"request_id": request_id_var.get()},
        )
    )


def audit_rows(app, key):
    with app.extensions["switchboard.db"].sessions() as session:
        return session.scalars(select(AuditLog).where(AuditLog.target_id == key)).all()


def seed_tenant(app):
    with app.extensions["switchboard.db"].transaction() as session:
        session.add(Tenant(id="t1"))


def test_transient_error_is_retried_and_stored_once(app, celery_worker):
    seed_tenant(app)
    retried_before = TASKS.labels("tests.record_audit_flaky", "retried")._value.get()
    record_audit_flaky.delay("flaky-1", 2)
    rows = wait_for(lambda: audit_rows(app, "flaky-1"))
    wait_for(lambda: ATTEMPTS["flaky-1"] == 3)
    time.sleep(0.2)
    rows = audit_rows(app, "flaky-1")
    assert len(rows) == 1, "the failed attempts' writes were rolled back"
    assert rows[0].detail == {"attempt": 2}
    assert TASKS.labels("tests.record_audit_flaky", "retried")._value.get() - retried_before == 2


def test_permanent_error_is_not_retried(app, celery_worker):
    seed_tenant(app)
    failed_before = TASKS.labels("tests.record_audit_broken", "failed")._value.get()
    record_audit_broken.delay("broken-1")
    wait_for(
        lambda: TASKS.labels("tests.record_audit_broken", "failed")._value.get() > failed_before
    )
    time.sleep(0.5)
    assert ATTEMPTS["broken-1"] == 1
    assert audit_rows(app, "broken-1") == []


def test_enqueue_happens_only_after_commit(app, celery_worker):
    seed_tenant(app)
    database = app.extensions["switchboard.db"]
    sent: list[str] = []
    with database.sessions() as session:
        session.begin()
        enqueue_after_commit(session, record_audit_flaky, "rolled-back", 0)
        after_commit(session, lambda: sent.append("rolled-back"))
        session.rollback()
    with database.transaction() as session:
        enqueue_after_commit(session, record_audit_flaky, "committed", 0)
        after_commit(session, lambda: sent.append("committed"))
    assert sent == ["committed"]
    wait_for(lambda: audit_rows(app, "committed"))
    time.sleep(0.3)
    assert audit_rows(app, "rolled-back") == []


def test_request_id_travels_with_the_task(app, celery_worker):
    from monitoring.logging import request_id_var

    seed_tenant(app)
    token = request_id_var.set("req-abc")
    try:
        record_request_id.delay("rid-1")
    finally:
        request_id_var.reset(token)
    rows = wait_for(lambda: audit_rows(app, "rid-1"))
    assert rows[0].detail == {"request_id": "req-abc"}
