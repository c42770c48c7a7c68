"""The demo client's serving, without a browser: off unless SWITCHBOARD_DEMO is on, only
its own files, nothing from another site, and the token never in a query string.
(tests/test_browser.py drives it in Chromium.)"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from app.cli import DEMO_USERS, _print_welcome, demo_links
from app.demo import STATIC_DIR

STATIC_FILES = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())


@pytest.fixture
def demo_client(app_factory, clean_state):
    return app_factory(SWITCHBOARD_DEMO="1").test_client()


def test_the_demo_is_off_by_default(client):
    for path in ("/demo/", "/demo/js/app.js", "/demo/index.html"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert response.get_json()["error"]["code"] == "not_found"


def test_with_the_setting_it_serves_the_page_and_its_modules(demo_client):
    page = demo_client.get("/demo/")
    assert page.status_code == 200
    assert page.mimetype == "text/html"
    assert b'<script type="module" src="js/app.js">' in page.data
    script = demo_client.get("/demo/js/app.js")
    assert script.status_code == 200
    assert script.mimetype in ("text/javascript", "application/javascript")
    assert demo_client.get("/demo/app.css").mimetype == "text/css"
    # /demo (no slash) goes to the page, whose relative links need the slash.
    assert demo_client.get("/demo").status_code == 308


def test_its_policy_allows_its_own_scripts_and_the_store_and_nothing_else(demo_client, s3_env):
    policy = demo_client.get("/demo/").headers["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"  # no inline script, no other site
    assert directives["frame-ancestors"] == "'none'"
    store = s3_env.get("SWITCHBOARD_S3_ENDPOINT_URL")
    if store:
        assert store in directives["connect-src"] and store in directives["img-src"]
    # The API's own answers keep the API's policy.
    assert (
        demo_client.get("/health")
        .headers["Content-Security-Policy"]
        .startswith("default-src 'none'")
    )


def test_only_files_of_the_demo_folder_are_served(demo_client):
    for path in (
        "/demo/../__init__.py",
        "/demo/%2e%2e/__init__.py",
        "/demo/..%2f__init__.py",
        "/demo/js/../../__init__.py",
        "/demo/missing.js",
    ):
        assert demo_client.get(path).status_code == 404, path


@pytest.mark.parametrize("path", STATIC_FILES, ids=lambda p: str(p.relative_to(STATIC_DIR)))
def test_nothing_is_fetched_from_another_site(path: Path):
    """No CDN: every URL in the files is relative, or the page's own origin."""
    text = path.read_text()
    found = re.findall(r"""(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s"'`)]*""", text)
    assert found == [], found
    assert "@import" not in text
    if path.suffix == ".html":
        for reference in re.findall(r"""(?:src|href)="([^"]*)\"""", text):
            assert reference.startswith(("#", "data:")) or "://" not in reference, reference


def test_the_client_sends_its_token_in_a_header_never_in_a_page_url():
    api = (STATIC_DIR / "js" / "api.js").read_text()
    assert "Authorization: `Bearer ${this.token}`" in api
    app_js = (STATIC_DIR / "js" / "app.js").read_text()
    # The token is read from the fragment, then taken out of the address bar.
    assert "location.hash" in app_js and "history.replaceState" in app_js
    assert "location.search" not in app_js
    # The stream is the one place it goes as ?token=: browsers cannot set headers on a
    # WebSocket, and the API offers no other way to them.
    assert "?token" not in api + app_js
    assert "token: this.token" in (STATIC_DIR / "js" / "stream.js").read_text()


def test_up_links_carry_the_token_in_the_fragment_never_in_a_query_string():
    links = demo_links("http://127.0.0.1:8000", {"alice": "tok.en-a", "bob": "tok.en-b"})
    for user, link in links.items():
        parts = urlsplit(link)
        assert parts.path == "/demo/"
        assert parts.query == ""
        fragment = parse_qs(parts.fragment)
        assert fragment["token"] == [f"tok.en-{user[0]}"]
    assert parse_qs(urlsplit(links["alice"]).fragment)["peers"] == ["bob"]


@pytest.mark.parametrize(
    ("policy", "roles"),
    [
        ("cardshow", {"attendee", "dealer", "mvp_dealer", "organizer", "moderator"}),
        ("bookstore", {"member", "manager"}),
        ("marketplace", {"customer", "artist"}),
    ],
)
def test_up_provisions_the_demo_users_each_preset_needs(policy, roles):
    assert {role for _, role, _ in DEMO_USERS[policy]} == roles
    if policy == "bookstore":
        tiers = {tier for _, role, tier in DEMO_USERS[policy] if role == "member"}
        assert tiers == {"free", "privileged"}


def test_the_welcome_text_prints_one_demo_link_per_user(capsys, tmp_path):
    env = {
        "SWITCHBOARD_BIND_HOST": "127.0.0.1",
        "PORT": "8123",
        "SWITCHBOARD_POLICY": "cardshow",
        "SWITCHBOARD_SERVICE_TOKEN": "s" * 20,
    }
    tokens = {user: f"token-{user}" for user, _, _ in DEMO_USERS["cardshow"]}
    _print_welcome(env, tokens, tmp_path, demo=True)
    out = capsys.readouterr().out
    for user, token in tokens.items():
        assert re.search(rf"{user} \(\w+\): http://127\.0\.0\.1:8123/demo/#token={token}&", out)
    assert "?token=" not in out
    _print_welcome(env, tokens, tmp_path, demo=False)
    assert "/demo/" not in capsys.readouterr().out
