"""What an operator meets: `switchboard up` on a laptop, the CLI from a new shell, and
start-up of every Procfile line with a bad variable or policy file."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest

from app.cli import cli_command, read_state_env, write_state_env
from app.embedded import free_port
from tests.live import procfile_command

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PRESETS = ROOT / "app" / "policy" / "presets"
# Variables of this test run that must not reach the processes under test.
NOT_INHERITED = (
    "DATABASE_URL",
    "REDIS_URL",
    "PORT",
    "WEB_CONCURRENCY",
    "PROMETHEUS_MULTIPROC_DIR",
    "CELERY_BEAT_SCHEDULE",
    # The S3 store comes from the test (or `switchboard up`'s embedded one), never the shell.
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
)
VALID_SECRETS = {
    "SWITCHBOARD_SERVICE_TOKEN": "operator-service-token-0123456789",
    "SWITCHBOARD_JWT_SECRET": "operator-jwt-secret-0123456789abcdefghijklm",
    "SWITCHBOARD_LOG_LEVEL": "WARNING",
}


def process_env(tmp_path: Path, **settings: str) -> dict[str, str]:
    """This machine's environment without any Switchboard setting, plus `settings`; the
    venv's bin dir first (the Procfile names gunicorn and celery bare) and a temp dir of
    the test's own, so what a process leaves there can be seen."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in NOT_INHERITED and not name.startswith(("SWITCHBOARD_", "TEST_"))
    }
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "/usr/bin:/bin")])
    temp = tmp_path / "tmp"
    temp.mkdir(exist_ok=True)
    env["TMPDIR"] = str(temp)
    env.update(settings)
    return env


def new_shell_env() -> dict[str, str]:
    """What a fresh terminal has: no venv on PATH, no Switchboard variable."""
    return {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}


def bad_policy_file(tmp_path: Path) -> Path:
    text = (PRESETS / "bookstore.toml").read_text()
    path = tmp_path / "policy.toml"
    path.write_text(text.replace('name = "bookstore"', 'name = "bookstore"\ncolour = "blue"', 1))
    return path


def stop_group(process: subprocess.Popen, signum: int = signal.SIGTERM) -> int:
    """Stop a process started with start_new_session=True and all its children."""
    if process.poll() is None:
        os.killpg(process.pid, signum)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def wait_for_http(url: str, process: subprocess.Popen, log: Path, **headers: str) -> int:
    """The status of the first answer from `url`; fails if `process` exits first."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"exited with {process.returncode} before answering:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2):
                return 200
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    pytest.fail(f"{url} never answered:\n{log.read_text()}")


def http_get(url: str, **headers: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def port_answers(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def tcp_listeners(port: int) -> list[str]:
    """Local addresses listening on `port`, from the kernel's own table."""
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        if not Path(table).exists():
            continue
        for row in Path(table).read_text().splitlines()[1:]:
            fields = row.split()
            address, _, port_hex = fields[1].partition(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            found.append(socket.inet_ntop(family, words))
    return found


# --- one line naming the key, for every entry point ------------------------------------


ENTRY_POINTS = {
    "switchboard token": lambda tmp: [str(BIN / "switchboard"), "token", "dave"],
    "switchboard up": lambda tmp: [
        str(BIN / "switchboard"),
        "up",
        "--port",
        str(free_port()),
        "--state-dir",
        str(tmp / "state"),
    ],
    "web": lambda tmp: ["bash", "-c", "exec " + procfile_command("web")],
    "worker": lambda tmp: ["bash", "-c", "exec " + procfile_command("worker")],
    "beat": lambda tmp: ["bash", "-c", "exec " + procfile_command("beat")],
}


# Never reached by a start-up that is refused before it connects to anything.
UNREACHABLE_SERVERS = {
    "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/never",
    "REDIS_URL": "redis://127.0.0.1:1/0",
}


def start_refused(
    entry_point: str, tmp_path: Path, settings: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run `entry_point` with `settings` until it exits (it is expected to refuse)."""
    return subprocess.run(
        ENTRY_POINTS[entry_point](tmp_path),
        cwd=tmp_path,
        env=process_env(tmp_path, **settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("entry_point", list(ENTRY_POINTS))
@pytest.mark.parametrize("problem", ["policy file", "variable"])
def test_bad_configuration_stops_start_up_with_one_line_naming_the_key(
    entry_point: str, problem: str, tmp_path: Path
) -> None:
    settings = {**UNREACHABLE_SERVERS, "PORT": str(free_port()), **VALID_SECRETS}
    if problem == "policy file":
        settings["SWITCHBOARD_POLICY"] = str(bad_policy_file(tmp_path))
        key = "colour"
    else:
        settings["SWITCHBOARD_LOG_LEVEL"] = "LOUD"
        key = "SWITCHBOARD_LOG_LEVEL"
    finished = start_refused(entry_point, tmp_path, settings)
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode != 0, finished.stderr
    assert len(lines) == 1, finished.stderr
    assert key in lines[0]
    if problem == "policy file":
        assert "colour: unknown key" in lines[0]


def test_a_worker_running_more_tasks_than_its_pool_holds_is_refused(tmp_path: Path) -> None:
    settings = {
        **UNREACHABLE_SERVERS,
        "WORKER_CONCURRENCY": "6",
        "SWITCHBOARD_DB_POOL_SIZE": "4",
        **VALID_SECRETS,
    }
    finished = start_refused("worker", tmp_path, settings)
    lines = finished.stderr.strip().splitlines()
    assert finished.returncode == 2, finished.stderr
    assert lines[-1].startswith("switchboard: SWITCHBOARD_DB_POOL_SIZE=4 is below"), lines
    assert "--concurrency 6" in lines[-1]


# --- switchboard up ----------------------------------------------------------------------


def remove_weed_sockets(state: Path) -> None:
    """The unix sockets a SIGKILLed `weed` leaves in /tmp, named by the ports `up` saved."""
    try:
        ports = json.loads((state / "s3" / "ports.json").read_text()).values()
    except (OSError, ValueError):
        return
    for port in ports:
        for leftover in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
            leftover.unlink(missing_ok=True)


@pytest.fixture
def switchboard_up(
    tmp_path: Path, database_url: str, redis_url: str, clean_state: None
) -> Iterator[tuple[subprocess.Popen, Path, Path, int]]:
    """`switchboard up` run from the checkout (as scripts/up does) with a state dir of
    this test's own and the test's PostgreSQL and Redis; no S3 bucket, so it starts its
    embedded SeaweedFS, in its process group: the SIGKILL of the group stops that too."""
    port = free_port()
    state = tmp_path / "state"
    log = tmp_path / "up.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [str(BIN / "switchboard"), "up", "--port", str(port), "--state-dir", str(state)],
            cwd=ROOT,
            env=process_env(tmp_path, DATABASE_URL=database_url, REDIS_URL=redis_url),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield process, state, log, port
    finally:
        if process.poll() is None:
            stop_group(process, signal.SIGKILL)
            remove_weed_sockets(state)


def test_up_saves_its_settings_for_the_cli_and_listens_on_loopback(
    switchboard_up: tuple[subprocess.Popen, Path, Path, int], tmp_path: Path, database_url: str
) -> None:
    process, state, log, port = switchboard_up
    base = f"http://127.0.0.1:{port}"
    assert wait_for_http(f"{base}/health", process, log) == 200

    env_file = state / "env"
    assert env_file.stat().st_mode & 0o777 == 0o600
    saved = read_state_env(env_file)
    assert saved["DATABASE_URL"] == database_url
    assert saved["SWITCHBOARD_BIND_HOST"] == "127.0.0.1"
    assert len(saved["SWITCHBOARD_JWT_SECRET"]) >= 32
    if Path("/proc/net/tcp").exists():
        assert tcp_listeners(port) == ["127.0.0.1"]

    # No bucket configured: an embedded SeaweedFS on loopback, its settings saved too.
    s3_endpoint = saved["SWITCHBOARD_S3_ENDPOINT_URL"]
    s3_port = int(s3_endpoint.rsplit(":", 1)[1])
    assert saved["SWITCHBOARD_S3_BUCKET"] == "switchboard"
    assert (saved["AWS_ACCESS_KEY_ID"], saved["AWS_REGION"]) == (
        json.loads((state / "secrets.json").read_text())["embedded_s3"]["access_key"],
        "us-east-1",
    )
    assert (
        "SWITCHBOARD_S3_BUCKET not set: started embedded SeaweedFS (S3) at "
        f"{s3_endpoint}, bucket switchboard"
    ) in log.read_text()
    assert http_get(s3_endpoint + "/switchboard/")[0] == 403  # no anonymous listing
    if Path("/proc/net/tcp").exists():
        assert tcp_listeners(s3_port) == ["127.0.0.1"]

    request = urllib.request.Request(
        f"{base}/v1/admin/users/dave",
        method="PUT",
        data=json.dumps({"tenant": "demo", "role": "member", "display_name": "Dave"}).encode(),
        headers={
            "Authorization": f"Bearer {saved['SWITCHBOARD_SERVICE_TOKEN']}",
            "Content-Type": "application/json",
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status in (200, 201)

    # The command the welcome text prints, run as printed from a fresh terminal.
    welcome = log.read_text()
    match = re.search(r"^\s+(\S.*\btoken dave)$", welcome, re.MULTILINE)
    assert match, welcome
    command = match.group(1)
    minted = subprocess.run(
        ["bash", "-c", command], cwd=ROOT, env=new_shell_env(), capture_output=True, text=True
    )
    assert minted.returncode == 0, minted.stderr
    claims = jwt.decode(minted.stdout.strip(), saved["SWITCHBOARD_JWT_SECRET"], ["HS256"])
    assert (claims["sub"], claims["tenant"]) == ("dave", "demo")

    # A variable set in the environment wins over the saved one.
    other_secret = "another-jwt-secret-0123456789abcdefghijklmn"
    minted = subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env={**new_shell_env(), "SWITCHBOARD_JWT_SECRET": other_secret},
        capture_output=True,
        text=True,
    )
    assert minted.returncode == 0, minted.stderr
    assert jwt.decode(minted.stdout.strip(), other_secret, ["HS256"])["sub"] == "dave"

    current = subprocess.run(
        ["bash", "-c", command.replace("token dave", "db current")],
        cwd=ROOT,
        env=new_shell_env(),
        capture_output=True,
        text=True,
    )
    assert current.returncode == 0, current.stderr
    assert "(head)" in current.stdout

    # Metrics files and the beat schedule live in the state dir, not the shared temp dir.
    assert (state / "web-metrics").is_dir()
    assert process.poll() is None, log.read_text()  # honcho stops all if any one fails

    process.send_signal(signal.SIGINT)  # what Ctrl-C does
    # 130: honcho stopped everything on our signal, not because one of its processes died.
    assert process.wait(timeout=120) == 130, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()
    assert not (state / "web-metrics").exists()
    assert list(state.glob("celerybeat-schedule*"))
    assert list((tmp_path / "tmp").iterdir()) == []
    # The embedded SeaweedFS stopped with it, and left no socket behind.
    assert not port_answers(s3_port)
    for name, weed_port in json.loads((state / "s3" / "ports.json").read_text()).items():
        assert not list(Path("/tmp").glob(f"seaweedfs-*-{weed_port}.sock")), name


# --- the web and worker lines on their own --------------------------------------------


def test_web_removes_the_metrics_dir_it_made_in_the_temp_dir(
    tmp_path: Path, database_url: str, redis_url: str, s3_env: dict[str, str], clean_state: None
) -> None:
    port = free_port()
    env = process_env(
        tmp_path,
        **s3_env,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        PORT=str(port),
        WEB_CONCURRENCY="1",
        SWITCHBOARD_BIND_HOST="127.0.0.1",
        **VALID_SECRETS,
    )
    log = tmp_path / "web.log"
    with log.open("w") as output:
        web = subprocess.Popen(
            ["bash", "-c", "exec " + procfile_command("web")],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert wait_for_http(f"http://127.0.0.1:{port}/health", web, log) == 200
        made = list((tmp_path / "tmp").glob("switchboard-metrics-*"))
        assert len(made) == 1
        assert web.poll() is None, log.read_text()
    finally:
        returncode = stop_group(web)
    assert returncode == 0, log.read_text()
    assert not made[0].exists()


@pytest.mark.parametrize(
    ("host", "bind"),
    [(None, "0.0.0.0:8123"), ("127.0.0.1", "127.0.0.1:8123"), ("::1", "[::1]:8123")],
)
def test_web_binds_all_interfaces_for_production_unless_told(
    tmp_path: Path, host: str | None, bind: str
) -> None:
    settings = {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/never",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PORT": "8123",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        **VALID_SECRETS,
    }
    if host:
        settings["SWITCHBOARD_BIND_HOST"] = host
    read = subprocess.run(
        [sys.executable, "-c", "import app.gunicorn_conf as conf; print(conf.bind)"],
        cwd=ROOT,
        env=process_env(tmp_path, **settings),
        capture_output=True,
        text=True,
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == bind


def test_worker_metrics_need_the_metrics_token_when_one_is_set(
    tmp_path: Path, database_url: str, redis_url: str, s3_env: dict[str, str], clean_state: None
) -> None:
    port = free_port()
    token = "worker-metrics-token-0123456789"
    env = process_env(
        tmp_path,
        **s3_env,
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        WORKER_CONCURRENCY="2",
        SWITCHBOARD_WORKER_METRICS_PORT=str(port),
        SWITCHBOARD_WORKER_METRICS_HOST="127.0.0.1",
        SWITCHBOARD_METRICS_TOKEN=token,
        **VALID_SECRETS,
    )
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        worker = subprocess.Popen(
            ["bash", "-c", "exec " + procfile_command("worker")],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        assert wait_for_http(url, worker, log) == 401
        status, body = http_get(url, Authorization="Bearer not-the-token-at-all-0123")
        assert status == 401
        assert json.loads(body)["error"]["code"] == "unauthorized"
        status, body = http_get(url, Authorization=f"Bearer {token}")
        assert status == 200
        assert b"switchboard_tasks_total" in body
        if Path("/proc/net/tcp").exists():
            assert tcp_listeners(port) == ["127.0.0.1"]
        assert worker.poll() is None, log.read_text()
    finally:
        returncode = stop_group(worker)
    assert returncode == 0, log.read_text()


# --- the saved settings and the printed command ----------------------------------------


def test_saved_settings_are_private_and_read_back_exactly(tmp_path: Path) -> None:
    path = tmp_path / "env"
    path.write_text("stale")
    path.chmod(0o644)
    pem = "-----BEGIN PUBLIC KEY-----\nMFkw'EwYH\n-----END PUBLIC KEY-----\n"
    env = {
        "DATABASE_URL": "postgresql://u:p%40ss@db/x",
        "REDIS_URL": "redis://127.0.0.1:6379/0",
        "SWITCHBOARD_JWT_PUBLIC_KEY": pem,
        "SWITCHBOARD_SERVICE_TOKEN": 'with "quotes" and $dollars',
        "HOME": "/not/saved",
    }
    write_state_env(path, env)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_state_env(path) == {k: v for k, v in env.items() if k != "HOME"}
    assert read_state_env(tmp_path / "missing") == {}


def test_the_printed_command_works_without_the_venv_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "checkout" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "switchboard").touch()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.chdir(tmp_path / "checkout")
    assert cli_command(Path(".switchboard")) == ".venv/bin/switchboard"
    elsewhere = tmp_path / "state"
    assert cli_command(elsewhere) == f"SWITCHBOARD_STATE_DIR={elsewhere} .venv/bin/switchboard"
    (tmp_path / "sibling").mkdir()
    monkeypatch.chdir(tmp_path / "sibling")
    assert cli_command(tmp_path / "sibling" / ".switchboard") == str(bin_dir / "switchboard")


def test_web_greenlets_keep_no_spawning_tree(tmp_path: Path) -> None:
    """Every open socket is a greenlet: gevent's record of who spawned it (with ten
    frames of the spawner's stack) is memory on each, so the web config turns it off."""
    settings = {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/never",
        "REDIS_URL": "redis://127.0.0.1:1/0",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
        **VALID_SECRETS,
    }
    env = process_env(tmp_path, **settings)
    env.pop("GEVENT_TRACK_GREENLET_TREE", None)
    probe = (
        "import app.gunicorn_conf, gevent\n"
        "greenlet = gevent.spawn(lambda: None)\n"
        "print(greenlet.spawning_stack is None and greenlet.spawning_greenlet is None)\n"
    )
    read = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert read.returncode == 0, read.stderr
    assert read.stdout.strip() == "True"
