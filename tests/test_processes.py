"""Killing a command kills its workers; the suite's own check for processes left behind can fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import _processes

ROOT = Path(__file__).resolve().parents[1]


def _session(sid: int) -> list[tuple[int, str]]:
    """Live processes of the session `sid` (kept by the children of a killed leader)."""
    found = []
    for pid in _processes():
        try:
            if os.getsid(pid) == sid:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    found.append((pid, f.read().replace(b"\0", b" ").decode(errors="replace")))
        except OSError:
            continue
    return found


def test_kill_9_of_curate_leaves_no_worker(tmp_path):
    from quintet.data.demo_corpus import DemoCorpusConfig, generate_demo_corpus

    generate_demo_corpus(tmp_path / "corpus", DemoCorpusConfig(seed=0))
    text = (ROOT / "configs" / "curation-demo.toml").read_text()
    config = tmp_path / "curation.toml"
    config.write_text(text.replace("tasks = 1", "tasks = 2").replace("workers = 1", "workers = 2"))
    argv = ["-m", "quintet", "data", "curate", str(config), "--data-root", str(tmp_path / "corpus")]
    proc = subprocess.Popen(
        [sys.executable, *argv, "--out", str(tmp_path / "out")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its session id finds its children after it is gone
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            members = _session(proc.pid)
            if any("forkserver" in cmd for _, cmd in members) and len(members) >= 4:
                break  # the Manager, the forkserver and pool workers are running
            time.sleep(0.05)
        assert proc.poll() is None, "curation finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 5
        while (left := _session(proc.pid)) and time.time() < deadline:
            time.sleep(0.1)
        assert left == [], left
    finally:
        for pid, _ in _session(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_suite_fails_when_a_test_leaves_a_process(tmp_path):
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_leak.py").write_text(
        "import subprocess\n\ndef test_leaks():\n    subprocess.Popen(['sleep', '30'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode != 0 and "left 1 process(es) running" in result.stdout, result.stdout
    assert "sleep 30" in result.stdout
