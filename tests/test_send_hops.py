"""bench/send_hops.patch (the hop stamps, kept out of the product) still applies to the
tree and compiles, and bench/send_hops.py reads the stamps into the right hops."""

from __future__ import annotations

import importlib.util
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PATCH = REPO / "bench" / "send_hops.patch"


def load_send_hops():
    sys.path.insert(0, str(REPO / "bench"))  # it imports bench/common.py as `common`
    try:
        spec = importlib.util.spec_from_file_location("send_hops", REPO / "bench" / "send_hops.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(REPO / "bench"))


def test_the_stamps_patch_applies_to_the_tree_and_compiles(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    touched = sorted(set(re.findall(r"^\+\+\+ b/(\S+)$", PATCH.read_text(), re.MULTILINE)))
    assert "app/hop_trace.py" in touched and "workers/tasks.py" in touched
    for name in touched:  # a copy of the files it changes, not the working tree itself
        source = REPO / name
        if source.exists():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, tmp_path / name)
    applied = subprocess.run(
        ["git", "apply", str(PATCH)], cwd=tmp_path, capture_output=True, text=True
    )
    assert applied.returncode == 0, applied.stderr
    for name in touched:
        py_compile.compile(str(tmp_path / name), doraise=True)


def test_the_report_splits_each_send_into_its_hops(tmp_path):
    send_hops = load_send_hops()
    names = [name for name, _ in send_hops.HOPS]
    lines = []
    for index, message_id in enumerate(["m1", "m2"]):
        at = 100.0 + index
        for hop, name in enumerate(names):
            lines.append(f"{at + hop * 0.001 * (index + 1):.6f} {name} {message_id}")
    lines.append("100.000500 enqueue_end m1")
    lines.append("100.002000 view_start m3")  # a send not stamped at every hop
    (tmp_path / "1.log").write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    (tmp_path / "2.log").write_text("\n".join(lines[len(lines) // 2 :]) + "\n")

    sends = send_hops.read_stamps(tmp_path)
    report = send_hops.report(sends, slowest=2)

    assert report[0] == "2 sends stamped at every hop (of 3 seen)"
    first_hop = report[2]
    # m1 takes 1 ms a hop, m2 2 ms (nearest rank: the median of two is the lower one).
    assert first_hop.startswith(send_hops.HOPS[0][1])
    assert first_hop.split()[-4:] == ["1.00", "2.00", "2.00", "2.00"]
    delivery = next(line for line in report if line.startswith("delivery"))
    assert delivery.split()[-1] == f"{2 * (len(names) - 1):.2f}"
    assert report[-1].split()[-1] == f"{2 * (len(names) - 1):.1f}"  # the slowest is last
