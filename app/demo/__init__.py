"""The browser client at /demo: static files (plain JavaScript modules, no build step,
nothing fetched from another site) that show the API and the stream working.

The routes always exist, so that the OpenAPI document (and its drift test) is the same
whatever the settings, but they answer the API's own 404 unless SWITCHBOARD_DEMO is on:
a production deployment shows nothing at /demo. The client takes its token from the URL
fragment (`/demo/#token=...`), which browsers never send to a server, so the token is in
no request line, log or Referer.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request, send_from_directory

from app.problems import NotFound

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Where S3 presigned POSTs and signed GETs go when no endpoint is configured (AWS).
AWS_S3_ORIGINS = "https://*.amazonaws.com"

blueprint = Blueprint("demo", __name__)


def _store_origin() -> str | None:
    """The S3 origin the browser uploads to and loads images from, for the page's CSP."""
    settings = current_app.extensions["switchboard.settings"]
    if not settings.s3_bucket:
        return None
    endpoint = settings.s3_public_endpoint_url or settings.s3_endpoint_url
    if not endpoint:
        return AWS_S3_ORIGINS
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc}"


def content_security_policy() -> str:
    """The app's default CSP forbids everything (it serves JSON); the demo page may run
    its own scripts and styles, call this origin's API and stream, and reach the
    attachments' store. Nothing else: no inline script, no other site."""
    host = request.host
    store = _store_origin()
    extra = f" {store}" if store else ""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"img-src 'self' blob: data:{extra}; "
        f"connect-src 'self' ws://{host} wss://{host}{extra}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def _serve(filename: str) -> Response:
    if not current_app.extensions["switchboard.settings"].demo:
        raise NotFound("No such page.", code="not_found")
    # send_from_directory refuses any path outside STATIC_DIR (a 404, in the error shape).
    response = send_from_directory(STATIC_DIR, filename, max_age=0)
    response.headers["Content-Security-Policy"] = content_security_policy()
    # Revalidate every load: a `git pull` shows at once, and no proxy keeps the page.
    response.headers["Cache-Control"] = "no-cache"
    return response


@blueprint.get("/demo/")
def index() -> Response:
    return _serve("index.html")


@blueprint.get("/demo/<path:filename>")
def asset(filename: str) -> Response:
    return _serve(filename)
