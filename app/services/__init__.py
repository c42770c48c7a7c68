"""The rules. Plain functions that take a session and data; no Flask, no Celery.
The API, the workers and the tests all call these."""
