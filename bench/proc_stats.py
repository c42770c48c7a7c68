"""What the benchmarks read from /proc (Linux): a process's memory, threads, descriptors and
CPU, the whole machine's busy time, and the two CPU meters built on them: `cpu_breakdown`
by role over every process between two samples, `CpuMeter` over the benchmark's own
processes for a phase."""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metrics import HealthProbe


def _pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...); the name
    is cut off first, as it may hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def proc_rss_kb(pid: int) -> int:
    return _status(pid, "VmRSS")


def proc_threads(pid: int) -> int:
    return _status(pid, "Threads")


def proc_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (all its threads)."""
    try:
        fields = _stat(pid)
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    """The processor's name and clock (/proc/cpuinfo), for a benchmark's heading: the
    hosts this project's 2-core machine has run on have measured the same code at up to
    twice the CPU a message, and this line tells their runs apart."""
    name = mhz = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "cpu MHz" and not mhz:
                mhz = f" at {float(value):.0f} MHz"
    return (name or "processor unknown") + mhz


def own_cpu_seconds() -> float:
    """User + system CPU of this process so far (all its threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return float(sum(parts) - idle), float(sum(parts))


def machine_busy_share(seconds: float) -> float:
    """The share of all cores busy over the next `seconds` (0 to 1)."""
    busy0, total0 = machine_cpu()
    time.sleep(seconds)
    busy1, total1 = machine_cpu()
    return (busy1 - busy0) / (total1 - total0) if total1 > total0 else 0.0


def wait_quiet(timeout: float, threshold: float = 0.15) -> None:
    """Wait up to `timeout` seconds for the machine to be under `threshold` busy (other
    work on it skews every figure), and print how busy it was."""
    deadline = time.monotonic() + timeout
    while True:
        busy_share = machine_busy_share(1.0)
        if busy_share < threshold or time.monotonic() >= deadline:
            break
    state = "quiet" if busy_share < threshold else "NOT quiet (figures below are skewed)"
    print(f"\nmachine before the measured phases: {busy_share:.0%} busy: {state}")


def children_of(pid: int) -> list[int]:
    found = []
    for child in _pids():
        with contextlib.suppress(OSError):
            if int(_stat(child)[1]) == pid:
                found.append(child)
    return sorted(found)


def postgres_backends(database: str) -> list[int]:
    """PostgreSQL's backend processes connected to `database` (read from /proc only)."""
    found = []
    for pid in _pids():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if command.startswith(b"postgres: ") and f" {database} ".encode() in command:
            found.append(pid)
    return found


def reaped_children_cpu_seconds(pid: int) -> float:
    """User + system CPU of the children `pid` has waited for (a postmaster's ended
    backends): a process's own counters vanish with it, its parent's keep them."""
    try:
        fields = _stat(pid)
    except OSError:
        return float("nan")
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def parent_of(pid: int) -> int | None:
    try:
        return int(_stat(pid)[1])
    except OSError:
        return None


def pid_of(command_name: str) -> int | None:
    for pid in _pids():
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == command_name:
                return pid
    return None


@dataclass(frozen=True, slots=True)
class ProcSample:
    ppid: int
    ticks: int  # user + system clock ticks so far
    command: str


def process_cpu() -> dict[int, ProcSample]:
    """CPU ticks used so far by every process on the machine, from /proc (Linux only)."""
    samples: dict[int, ProcSample] = {}
    try:
        pids = _pids()
    except OSError:
        return samples
    for pid in pids:
        try:
            fields = _stat(pid)
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        samples[pid] = ProcSample(int(fields[1]), int(fields[11]) + int(fields[12]), command)
    return samples


def cpu_breakdown(
    before: dict[int, ProcSample],
    after: dict[int, ProcSample],
    busy_ticks: float,
    seconds: float,
    roles: dict[int, str],
    db_name: str,
) -> tuple[str, dict[str, float]]:
    """Percent of one core used in the window by each part: ours, PostgreSQL serving our
    database, and the rest of the machine's busy time (other people's work included,
    and processes that came and went during the window)."""
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    used: Counter[str] = Counter()
    web_workers: list[float] = []
    for pid, sample in after.items():
        base = before.get(pid)
        ticks = sample.ticks - (base.ticks if base and base.command == sample.command else 0)
        role = roles.get(pid) or roles.get(sample.ppid)
        if role is None and sample.command.startswith("postgres:"):
            # Backends are titled "postgres: <cluster>: <user> <database> <client> <state>";
            # the WAL writer, checkpointer and background writer work for every database.
            if f" {db_name} " in sample.command:
                role = "postgres for the bench db"
            elif "writer" in sample.command or "checkpointer" in sample.command:
                role = "postgres background"
        elif role is None and sample.command.startswith("redis-server"):
            role = "redis (shared)"
        if ticks <= 0 or role is None:
            continue
        used[role] += ticks
        if role == "web" and pid not in roles:
            web_workers.append(ticks)
    scale = 100.0 / (ticks_per_second * seconds)
    parts = []
    roles_shown = ("web", "worker", "generator", "postgres for the bench db")
    for role in (*roles_shown, "postgres background", "redis (shared)"):
        if role not in roles_shown and not used[role]:
            continue
        part = f"{role} {used[role] * scale:.0f}%"
        if role == "web" and len(web_workers) > 1:
            shares = ", ".join(f"{t * scale:.0f}%" for t in sorted(web_workers, reverse=True))
            part += f" (gunicorn workers {shares})"
        parts.append(part)
    rest = max(0, busy_ticks - sum(used.values()))
    parts.append(f"everything else {rest * scale:.0f}%")
    heading = f"CPU during the load, % of one core (the machine has {os.cpu_count()}): "
    seconds_by_role = {role: ticks / ticks_per_second for role, ticks in used.items()}
    return heading + "; ".join(parts), seconds_by_role


@dataclass
class CpuMeter:
    """CPU used over a phase by each process of the benchmark (this one with its sender
    threads, the clients, the web worker, the Celery worker, PostgreSQL's backends of the
    benchmark's database, Redis) and by the machine as a whole."""

    pids: dict[str, list[int]]
    database: str
    probe: HealthProbe | None = None
    # The benchmark's Redis server (BenchRun.redis_pid); None when it runs on another
    # machine (or could not be found): Redis is then not counted, rather than counting
    # some other redis-server of this machine.
    redis_pid: int | None = None
    start: dict[str, Any] = field(default_factory=dict)
    postmaster: int | None = None

    def sample(self) -> dict[str, Any]:
        busy, total = machine_cpu()
        per_pid = {
            name: {pid: proc_cpu_seconds(pid) for pid in pids} for name, pids in self.pids.items()
        }
        backends = postgres_backends(self.database)
        per_pid["postgres"] = {pid: proc_cpu_seconds(pid) for pid in backends}
        if self.postmaster is None and backends:
            self.postmaster = parent_of(backends[0])
        # A backend that ends during the phase (a connection closed, an autovacuum
        # worker) takes its counters with it; the postmaster keeps them, for every
        # database: counted under "postgres" (see measure()).
        reaped = reaped_children_cpu_seconds(self.postmaster) if self.postmaster else 0.0
        redis = self.redis_pid
        per_pid["redis-server"] = {redis: proc_cpu_seconds(redis)} if redis else {}
        per_pid["bench+sender"] = {0: own_cpu_seconds()}
        return {
            "per_pid": per_pid,
            "reaped": reaped,
            "busy": busy,
            "total": total,
            "wall": time.monotonic(),
        }

    def begin(self) -> None:
        if self.probe is not None:
            self.probe.mark()
        self.start = self.sample()

    def measure(self) -> dict[str, Any]:
        """Since `begin()`: CPU seconds of each process group ("used"), the machine's busy
        CPU seconds ("busy", all cores) and the wall seconds ("wall").

        "postgres" counts the backends that ended in between too, by what the postmaster
        reaped (less what they had used before `begin()`): any database's, so another
        database's short connections or an autovacuum worker count as well."""
        end = self.sample()
        used = {}
        for name, now in end["per_pid"].items():
            then = self.start["per_pid"].get(name, {})
            used[name] = sum(
                value - then.get(pid, 0.0) for pid, value in now.items() if value == value
            )
        backends_then, backends_now = self.start["per_pid"]["postgres"], end["per_pid"]["postgres"]
        ended = [pid for pid in backends_then if pid not in backends_now]
        reaped = end["reaped"] - self.start["reaped"]
        if reaped == reaped:
            used["postgres"] += max(0.0, reaped - sum(backends_then[pid] for pid in ended))
        busy = (end["busy"] - self.start["busy"]) / os.sysconf("SC_CLK_TCK")
        return {"used": used, "busy": busy, "wall": max(1e-9, end["wall"] - self.start["wall"])}

    def report(self, measured: dict[str, Any] | None = None) -> str:
        measured = measured or self.measure()
        used, busy, wall = measured["used"], measured["busy"], measured["wall"]
        cores = os.cpu_count() or 1
        other = busy - sum(used.values())
        parts = [f"{name} {cpu:.1f}s ({cpu / wall:.0%})" for name, cpu in used.items()]
        text = (
            f"CPU over {wall:.1f}s (share of one core): "
            + ", ".join(parts)
            + f"; machine {busy / wall / cores:.0%} of {cores} cores busy, of which "
            f"{max(0.0, other) / wall:.0%} of a core outside these processes"
        )
        if self.probe is not None:
            text += "\n  web event loop: " + self.probe.summary(self.start["wall"])
            text += "\n  web garbage " + self.probe.collector_summary()
        return text
