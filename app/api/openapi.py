"""`GET /openapi.json`: the API described (see app/openapi.py)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify
from flask.typing import ResponseReturnValue

from app.openapi import build_document

blueprint = Blueprint("openapi", __name__)

_KEY = "switchboard.openapi"


@blueprint.get("/openapi.json")
def document() -> ResponseReturnValue:
    # Built on first use, once every blueprint is registered, then kept: the routes and
    # models cannot change while the process runs.
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if _KEY not in app.extensions:
        app.extensions[_KEY] = build_document(app)
    response = jsonify(app.extensions[_KEY])
    # Public and the same for everyone: let browsers and proxies keep it a while.
    response.headers["Cache-Control"] = "public, max-age=300"
    return response
