"""Entry point for `celery -A workers.main worker|beat`: the one place a worker
process builds its Flask app, as the Procfile's worker and beat lines do."""

from app import create_app

flask_app = create_app()
celery = flask_app.extensions["celery"]
