"""Celery tasks. Each is thin: it takes ids and calls one service function."""
