"""Worker processes that die with the process that started them, even when it is killed with SIGKILL.

A killed parent cannot clean up, and Python's worker machinery (multiprocess's Manager server, the pool
workers datatrove's local executor forks from a forkserver) lives on for as long as it waits on a pipe,
which can be many minutes. Linux has a kernel answer: `prctl(PR_SET_PDEATHSIG)` asks for a signal when the
parent dies. It is set per process and cleared by `fork`, so it has to be set in every child:

- `children_die_with_this_process()` registers a fork hook: every process forked from this one (the
  Manager, pool workers under the "fork" start method) gets SIGKILL when this process dies. Every quintet
  command calls it (`quintet.commands.run_command`), and so does `quintet.data.curation.curate`.
- A forkserver, started with fork + exec, runs no fork hook; the module it preloads
  (`quintet.data.curation.preload`) calls `die_with_parent()` for itself and registers the hook for the
  workers it forks.

The signal follows the parent *thread* that forked the child; quintet forks its workers from the main
thread. On other systems these functions do nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
_forking_parent: int | None = None
_registered = False


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; if the parent (`parent`, the
    PID that forked us) is already gone, exit now. Returns whether the request took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:  # it died before the request was made
        os._exit(1)
    return True


def _remember_parent() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _child_after_fork() -> None:
    die_with_parent(_forking_parent)


def children_die_with_this_process() -> None:
    """Every process forked from this one from now on gets SIGKILL when this one dies (idempotent)."""
    global _registered
    if _registered or not sys.platform.startswith("linux"):
        return
    os.register_at_fork(before=_remember_parent, after_in_child=_child_after_fork)
    _registered = True
