"""The demo client (/demo) in a real Chromium, driven by Playwright, against the live
system: the Procfile's gunicorn web line and its Celery worker lines (direct and
broadcast queues), the test PostgreSQL, a Redis of these tests' own and the test S3 store.

Two browser contexts are two users, each in their own window. Every screen is
photographed into SWITCHBOARD_SCREENSHOT_DIR when set, else into the test's tmp folder.

Needs Chromium from the machine (`apt-get install chromium`; never `playwright install`,
which downloads a browser): without it, or without the playwright package, these tests
skip and say why.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from app.auth import mint_token
from app.embedded import RedisServer
from tests.conftest import JWT_SECRET, SERVICE_TOKEN
from tests.helpers import wait_for
from tests.live import LiveProcess, LiveSystem, http

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "browser tests skipped: no Chromium on this machine (apt-get install chromium)",
        allow_module_level=True,
    )
try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError:
    pytest.skip(
        "browser tests skipped: playwright is not installed (pip install -e '.[dev]')",
        allow_module_level=True,
    )

# Waiting for a condition, never a timed assertion: generous for a loaded 2-core machine.
expect.set_options(timeout=30_000)
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1200, "height": 800}


# ------------------------------------------------------------------ the live system


class DemoSystems:
    """One live system at a time, for the policy a test asks for: the policy is the
    processes' environment, so another policy means other processes. Tests are grouped
    by policy, so each starts once."""

    def __init__(self, database_url: str, log_root: Path) -> None:
        self.database_url = database_url
        self.log_root = log_root
        self.policy: str | None = None
        self.system: LiveSystem | None = None
        self.broadcasts: LiveProcess | None = None
        self.redis: RedisServer | None = None

    def get(self, policy: str) -> LiveSystem:
        if self.policy == policy and self.system is not None:
            return self.system
        self.stop()
        # A Redis of its own: the test fixtures flush the test Redis before every test,
        # which would take the Celery broker's bindings away from running processes.
        self.redis = RedisServer(self.log_root / f"redis-{policy}").start()
        env = {
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.redis.url,
            "SWITCHBOARD_SERVICE_TOKEN": SERVICE_TOKEN,
            "SWITCHBOARD_JWT_SECRET": JWT_SECRET,
            "SWITCHBOARD_POLICY": policy,
            "SWITCHBOARD_DEMO": "1",
            "SWITCHBOARD_LOG_LEVEL": os.environ.get("TEST_LIVE_LOG_LEVEL", "WARNING"),
            "SWITCHBOARD_RATE_LIMITS_ENABLED": "false",
        }
        system = LiveSystem(env, self.log_root / policy)
        self.system = system
        self.policy = policy
        system.start()
        # Broadcasts have a queue and a worker of their own (the Procfile's `broadcasts`).
        self.broadcasts = LiveProcess(
            "broadcasts",
            system.env(BROADCAST_CONCURRENCY="2"),
            system.log_dir / "broadcasts.log",
        ).start()
        return system

    def stop(self) -> None:
        if self.broadcasts is not None:
            self.broadcasts.stop()
            self.broadcasts = None
        if self.system is not None:
            self.system.stop()
            self.system = None
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        self.policy = None


@pytest.fixture(scope="session")
def demo_systems(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    systems = DemoSystems(database_url, tmp_path_factory.mktemp("browser-live"))
    yield systems
    systems.stop()


@pytest.fixture
def live(demo_systems: DemoSystems, policy_name: str, app) -> LiveSystem:
    return demo_systems.get(policy_name)


@pytest.fixture(scope="session")
def screenshot_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("SWITCHBOARD_SCREENSHOT_DIR")
    folder = Path(configured) if configured else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    print(f"browser screenshots in {folder}")
    return folder


# ------------------------------------------------------------------------ the browser


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        # Debian's Chromium; as root (CI containers) it needs --no-sandbox.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


class Window:
    """One user's browser context and page, with the page's errors collected."""

    def __init__(self, context: BrowserContext, page: Page, name: str, shots: Path) -> None:
        self.context, self.page, self.name, self.shots = context, page, name, shots
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(f"{name}: {error}"))
        # A CSP violation means something the page needs is blocked: a bug, not noise.
        page.on(
            "console",
            lambda message: (
                self.errors.append(f"{name}: {message.text}")
                if message.type == "error" and "Content Security Policy" in message.text
                else None
            ),
        )

    def shot(self, label: str) -> Path:
        path = self.shots / f"{label}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def open_demo(
    browser: Browser, live: LiveSystem, screenshot_dir: Path, app
) -> Iterator[Callable[..., Window]]:
    """Open /demo as a user, the token in the URL fragment as `switchboard up` prints it."""
    settings = app.extensions["switchboard.settings"]
    windows: list[Window] = []

    def open_as(user_id: str, peers: list[str], *, viewport: dict | None = None) -> Window:
        token = mint_token(settings, user_id, "demo", ttl=timedelta(hours=1))
        context = browser.new_context(viewport=viewport or DESKTOP)
        page = context.new_page()
        window = Window(context, page, user_id, screenshot_dir)
        windows.append(window)
        page.goto(f"{live.url()}/demo/#token={token}&peers={','.join(peers)}")
        expect(page.locator("body")).to_have_attribute("data-ready", "true")
        expect(page.locator("#connection")).to_have_text("Live")
        # The token left the address bar (it stays in this tab's sessionStorage).
        assert "token" not in page.url
        return window

    yield open_as
    errors = [error for window in windows for error in window.errors]
    for window in windows:
        window.context.close()
    assert errors == [], errors


@pytest.fixture
def demo_users(make_user) -> Callable[..., None]:
    def provision(*users: tuple[str, ...]) -> None:
        """(user id, role[, tier]) in tenant 'demo', named as `switchboard up` names them."""
        for user_id, role, *tier in users:
            make_user(
                user_id,
                tenant="demo",
                role=role,
                tier=tier[0] if tier else None,
                display_name=user_id.title(),
            )

    return provision


def token(app, user_id: str) -> str:
    settings = app.extensions["switchboard.settings"]
    return mint_token(settings, user_id, "demo", ttl=timedelta(minutes=30))


def send_over_http(live: LiveSystem, app, sender: str, conversation_id: str, body: str) -> str:
    status, answer = http(
        "POST",
        f"{live.url()}/v1/conversations/{conversation_id}/messages",
        token(app, sender),
        {"body": body, "client_id": uuid.uuid4().hex},
    )
    assert status == 202, answer
    return answer["id"]


def conversation_item(window: Window, name: str):
    return window.page.locator("#conversation-list .conversation", has_text=name)


def message(window: Window, text: str):
    return window.page.locator("#message-list .message", has_text=text)


def open_thread(window: Window, name: str, *, showing: str) -> None:
    """Click a conversation until its thread shows `showing`, as a person would before
    typing: on a loaded machine the list can re-render under the click (a block, a new
    message), the click then lands on a node already gone, and Enter with no open thread
    sends nothing (CI saw that once)."""
    for attempt in range(3):
        conversation_item(window, name).click()
        try:
            expect(message(window, showing)).to_be_visible(timeout=10_000)
            return
        except AssertionError:
            if attempt == 2:
                raise


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("policy_name", ["bookstore"])
def test_a_message_arrives_live_with_its_badge_its_receipt_and_nothing_lost_offline(
    live, app, demo_users, open_demo
):
    # alice is privileged (she may start); bob is free (he may only reply).
    demo_users(("alice", "member", "privileged"), ("bob", "member", "free"), ("carol", "manager"))
    alice = open_demo("alice", ["bob", "carol"])
    bob = open_demo("bob", ["alice", "carol"], viewport=PHONE)

    # "Why can't I message this person": bob, a free member, may not start with alice.
    why = bob.page.locator('[data-person="alice"] [data-testid="why-not"]')
    expect(why).to_contain_text("reply_only")
    expect(bob.page.locator('[data-person="alice"] button')).to_be_disabled()
    bob.shot("01-permissions-phone")

    # alice starts the conversation and sends; she sees it queued, then stored.
    alice.page.locator('[data-person="bob"] button', has_text="Message").click()
    expect(alice.page.locator("#thread-title")).to_contain_text("Bob")
    alice.page.get_by_label("Message", exact=True).fill("hello bob")
    alice.page.get_by_label("Message", exact=True).press("Enter")
    expect(message(alice, "hello bob").locator(".status")).to_have_attribute(
        "data-status", "stored"
    )

    # bob sees it live in his list, with the unread badge and the preview.
    item = conversation_item(bob, "Alice")
    expect(item.locator('[data-testid="unread"]')).to_have_text("1")
    expect(item.locator(".preview")).to_have_text("hello bob")
    expect(bob.page.locator("#unread-total")).to_have_text("1")
    bob.shot("02-conversation-list-unread-phone")

    # bob opens it (reading it); alice sees the receipt.
    item.click()
    expect(message(bob, "hello bob")).to_be_visible()
    expect(bob.page.locator("#list-pane")).to_be_hidden()  # a phone shows one pane
    expect(message(alice, "hello bob").locator('[data-testid="receipt"]')).to_be_visible()
    expect(bob.page.locator("#unread-total")).to_be_hidden()
    # alice types: bob sees it (the stream relays typing frames, never stores them).
    alice.page.get_by_label("Message", exact=True).press_sequentially("are")
    expect(bob.page.locator("#typing")).to_have_text("Alice is typing…")
    alice.page.get_by_label("Message", exact=True).fill("")
    bob.page.get_by_label("Message", exact=True).fill("hi alice")
    bob.page.get_by_role("button", name="Send").click()
    expect(message(alice, "hi alice")).to_be_visible()
    expect(conversation_item(alice, "Bob").locator(".preview")).to_have_text("hi alice")
    alice.shot("03-thread-receipt")
    bob.shot("04-thread-phone")

    # alice goes offline: the banner says so; bob's messages meanwhile all arrive
    # once she is back (resumed from her last event id), each once and in order.
    alice.context.set_offline(True)
    expect(alice.page.locator("#offline-banner")).to_be_visible()
    alice.shot("05-offline-banner")
    missed = [f"while you were away {n}" for n in range(1, 4)]
    for text in missed:
        bob.page.get_by_label("Message", exact=True).fill(text)
        bob.page.get_by_role("button", name="Send").click()
        expect(message(bob, text).locator(".status")).to_have_attribute("data-status", "stored")
    alice.context.set_offline(False)
    expect(alice.page.locator("#connection")).to_have_text("Live")
    expect(alice.page.locator("#offline-banner")).to_be_hidden()
    for text in missed:
        expect(message(alice, text)).to_have_count(1)
    bodies = alice.page.locator("#message-list .message .body").all_inner_texts()
    assert bodies[-3:] == missed, bodies


@pytest.mark.parametrize("policy_name", ["bookstore"])
def test_history_pages_on_scroll_and_a_block_rejects_with_its_reason(
    live, app, demo_users, open_demo
):
    demo_users(("alice", "manager"), ("bob", "member"))
    status, started = http(
        "POST", f"{live.url()}/v1/conversations", token(app, "alice"), {"participant_id": "bob"}
    )
    assert status == 201, started
    sent = [
        send_over_http(live, app, "alice", started["id"], f"history {n:02d}") for n in range(1, 46)
    ]
    # All stored before bob looks: history shows stored messages only, and any stored
    # later would arrive live and change the count of the first page.
    alice_token = token(app, "alice")
    for message_id in sent:
        wait_for(
            lambda message_id=message_id: (
                http("GET", f"{live.url()}/v1/messages/{message_id}", alice_token)[1]["status"]
                == "stored"
            )
        )
    bob = open_demo("bob", ["alice"])
    conversation_item(bob, "Alice").click()
    expect(message(bob, "history 45")).to_be_visible()
    expect(bob.page.locator("#message-list .message")).to_have_count(20)
    # Scrolling to the top loads the older pages, the oldest last.
    for expected in (40, 45):
        bob.page.locator("#messages").evaluate("box => { box.scrollTop = 0; }")
        expect(bob.page.locator("#message-list .message")).to_have_count(expected)
    expect(bob.page.locator("#message-list .message").first).to_contain_text("history 01")
    expect(bob.page.locator("#older")).to_be_hidden()

    # bob blocks alice: her send is refused at once with the rule that says no.
    alice = open_demo("alice", ["bob"])
    # exact=True: a role's name matches as a case-insensitive substring by default, and
    # "Block Alice" is in "Unblock Alice". Without it the wait for the unblock below passed
    # at once, and alice's "now?" raced bob's DELETE and was refused as blocked (CI, twice).
    block = bob.page.get_by_role("button", name="Block Alice", exact=True)
    unblock = bob.page.get_by_role("button", name="Unblock Alice", exact=True)
    block.click()
    expect(unblock).to_be_visible()
    open_thread(alice, "Bob", showing="history 45")
    alice.page.get_by_label("Message", exact=True).fill("are you there?")
    alice.page.get_by_label("Message", exact=True).press("Enter")
    status_line = message(alice, "are you there?").locator(".status")
    expect(status_line).to_have_attribute("data-status", "rejected")
    expect(status_line).to_contain_text("blocked")
    alice.shot("06-send-rejected")
    unblock.click()
    expect(block).to_be_visible()
    alice.page.get_by_label("Message", exact=True).fill("now?")
    alice.page.get_by_label("Message", exact=True).press("Enter")
    # Stored first (the sender's side), then on bob's socket: a failure says which.
    expect(message(alice, "now?").locator(".status")).to_have_attribute("data-status", "stored")
    expect(message(bob, "now?")).to_be_visible()


@pytest.mark.parametrize("policy_name", ["cardshow"])
def test_an_organizer_broadcasts_and_a_moderator_removes_a_reported_message(
    live, app, demo_users, open_demo
):
    demo_users(
        ("alice", "attendee"),
        ("bob", "mvp_dealer"),
        ("carol", "organizer"),
        ("erin", "dealer"),
        ("mo", "moderator"),
    )
    alice = open_demo("alice", ["bob", "carol", "erin", "mo"])
    carol = open_demo("carol", ["alice", "bob", "erin", "mo"])

    # An attendee may not cold-message a dealer: the button is disabled, with the rule.
    expect(alice.page.locator('[data-person="erin"] [data-testid="why-not"]')).to_be_visible()
    expect(alice.page.locator('[data-person="erin"] button')).to_be_disabled()
    expect(alice.page.locator('[data-person="bob"] button')).to_be_enabled()

    # The organizer broadcasts to attendees; alice sees it live, with a badge.
    carol.page.get_by_role("button", name="Broadcasts").click()
    expect(carol.page.locator("#quota")).to_contain_text("2 of 2 left")
    carol.page.get_by_label("Audience").select_option("attendee")
    carol.page.get_by_label("Broadcast", exact=True).fill("Doors open at 9")
    carol.page.get_by_role("button", name="Broadcast", exact=True).click()
    expect(carol.page.locator("#broadcast-result")).to_have_attribute("data-status", "stored")
    expect(carol.page.locator("#quota")).to_contain_text("1 of 2 left")
    carol.shot("07-broadcast-composer")
    expect(alice.page.locator("#broadcast-unread")).to_have_text("1")
    alice.page.get_by_role("button", name="Broadcasts").click()
    expect(alice.page.locator("#broadcast-list")).to_contain_text("Doors open at 9")
    expect(alice.page.locator("#broadcast-unread")).to_be_hidden()
    alice.shot("08-broadcast-inbox")

    # bob (an MVP dealer) messages alice; she reports it; the moderator removes it and
    # both of them see the placeholder.
    status, started = http(
        "POST", f"{live.url()}/v1/conversations", token(app, "bob"), {"participant_id": "alice"}
    )
    assert status == 201, started
    send_over_http(live, app, "bob", started["id"], "cheap PSA 10s, DM me")
    bob = open_demo("bob", ["alice"])
    alice.page.get_by_role("button", name="Conversations").click()
    conversation_item(alice, "Bob").click()
    conversation_item(bob, "Alice").click()
    reported = message(alice, "cheap PSA 10s")
    reported.get_by_role("button", name="Report").click()
    alice.page.get_by_label("Reason").select_option("scam")
    alice.page.get_by_label("Note (optional)").fill("fake slabs")
    alice.page.get_by_role("button", name="Send report").click()
    expect(reported.locator('[data-testid="reported"]')).to_be_visible()

    mo = open_demo("mo", ["alice", "bob"])
    mo.page.get_by_role("button", name="Moderation").click()
    queued = mo.page.locator("#report-list .report", has_text="cheap PSA 10s")
    expect(queued).to_contain_text("scam")
    mo.shot("09-moderation-queue")
    queued.get_by_role("button", name="Remove message").click()
    expect(mo.page.locator("#report-list")).to_contain_text("Removed.")
    for window in (alice, bob):
        placeholder = window.page.locator('#message-list [data-testid="placeholder"]')
        expect(placeholder).to_have_text("Message removed by a moderator")
    expect(message(alice, "cheap PSA 10s")).to_have_count(0)
    expect(conversation_item(alice, "Bob").locator(".preview")).to_have_text(
        "Message removed by a moderator"
    )
    alice.shot("10-removed-placeholder")


def png_bytes(width: int = 640, height: int = 480) -> bytes:
    from PIL import Image

    image = Image.new("RGB", (width, height), (31, 95, 191))
    for x in range(0, width, 40):
        for y in range(0, height, 40):
            if (x // 40 + y // 40) % 2:
                image.paste((245, 166, 35), (x, y, x + 40, y + 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("policy_name", ["marketplace"])
def test_an_image_goes_from_customer_to_artist(live, app, demo_users, open_demo):
    demo_users(("alice", "customer"), ("bob", "artist"))
    alice = open_demo("alice", ["bob"])
    bob = open_demo("bob", ["alice"])
    alice.page.locator('[data-person="bob"] button', has_text="Message").click()
    expect(alice.page.locator("#thread-title")).to_contain_text("Bob")

    alice.page.get_by_label("Attach an image").set_input_files(
        {"name": "design.png", "mimeType": "image/png", "buffer": png_bytes()}
    )
    expect(alice.page.locator("#upload-text")).to_contain_text("uploaded")
    expect(alice.page.locator("#upload-progress")).to_have_attribute("value", "100")
    alice.shot("11-upload-progress")
    alice.page.get_by_label("Message", exact=True).fill("my design")
    alice.page.get_by_role("button", name="Send").click()
    expect(message(alice, "my design").locator(".status")).to_have_attribute(
        "data-status", "stored"
    )

    conversation_item(bob, "Alice").click()
    thumbnail = message(bob, "my design").locator('[data-testid="thumbnail"]')
    expect(thumbnail).to_be_visible()
    # The thumbnail really loaded from the store (a signed URL), smaller than the photo.
    bob.page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=thumbnail.element_handle()
    )
    assert thumbnail.evaluate("img => img.naturalWidth") < 640
    bob.shot("12-thumbnail")
    message(bob, "my design").get_by_role("button", name="Open image design.png").click()
    full = bob.page.locator("#image-full")
    expect(bob.page.locator("#image-dialog")).to_be_visible()
    bob.page.wait_for_function(
        "img => img.complete && img.naturalWidth === 640", arg=full.element_handle()
    )
    bob.shot("13-full-image")
    bob.page.get_by_role("button", name="Close").click()
    expect(bob.page.locator("#image-dialog")).to_be_hidden()
