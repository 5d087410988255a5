import contextlib
import os
import signal
import time

import pytest
import torch

# Test models are tiny: one thread is as fast as two and cannot oversubscribe a shared 2-core machine.
torch.set_num_threads(1)

# Helpers the interpreter itself keeps for its lifetime (started by an in-process `curate` with workers):
# they exit when pytest does. Their own children (pool workers) are not excused.
INTERPRETER_HELPERS = ("forkserver import main", "resource_tracker import main")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command line)} of every live process (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    found = {}
    if psutil is not None:
        for p in psutil.process_iter(["ppid", "cmdline", "status"]):
            if p.info["status"] != psutil.STATUS_ZOMBIE:
                found[p.pid] = (p.info["ppid"], " ".join(p.info["cmdline"] or []))
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state != "Z":
            found[int(name)] = (int(ppid), cmdline)
    return found


def leftover_children(root: int) -> list[tuple[int, str]]:
    """Descendants of `root` still alive, except the interpreter's own helpers (direct children only)."""
    table = _processes()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    left, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        ppid, cmdline = table[pid]
        if ppid == root and any(h in cmdline for h in INTERPRETER_HELPERS):
            continue
        left.append((pid, cmdline))
    return sorted(left)


@pytest.fixture(scope="session", autouse=True)
def _no_process_left_behind():
    """The suite fails if a test leaves a process running (listed, then killed)."""
    yield
    deadline = time.time() + 5  # a process told to stop may take a moment
    while (left := leftover_children(os.getpid())) and time.time() < deadline:
        time.sleep(0.1)
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        listing = "; ".join(f"PID {pid}: {cmd[:160]}" for pid, cmd in left)
        pytest.fail(f"the tests left {len(left)} process(es) running: {listing}", pytrace=False)
