"""HTTP blueprints. Thin: authenticate, validate the shape, call a service, answer."""

from __future__ import annotations

from flask import Flask


def register_blueprints(app: Flask) -> None:
    from app.api.admin import blueprint as admin
    from app.api.attachments import blueprint as attachments
    from app.api.broadcasts import blueprint as broadcasts
    from app.api.conversations import blueprint as conversations
    from app.api.health import blueprint as health
    from app.api.me import blueprint as me
    from app.api.messages import blueprint as messages
    from app.api.moderation import blueprint as moderation
    from app.api.openapi import blueprint as openapi
    from app.api.people import blueprint as people
    from app.api.stream import blueprint as stream

    app.register_blueprint(health)
    app.register_blueprint(openapi)
    app.register_blueprint(admin)
    app.register_blueprint(me)
    app.register_blueprint(conversations)
    app.register_blueprint(messages)
    app.register_blueprint(broadcasts)
    app.register_blueprint(moderation)
    app.register_blueprint(attachments)
    app.register_blueprint(people)
    app.register_blueprint(stream)
