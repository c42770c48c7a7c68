"""The Celery app and its tasks. Tasks are thin: they call the services."""
