"""Start `quintet serve` as a child process and stop it again: for tests, the demo and the benchmark.

    with running_server("runs/demo/fp4", "--max-batch", "4") as url:   # http://127.0.0.1:PORT
        ...

The child runs in a process group of its own on a free loopback port; on exit it gets SIGTERM, then
SIGKILL after `stop_timeout` seconds, so nothing outlives the block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    model_dir: str | os.PathLike,
    *args: str,
    port: int | None = None,
    start_timeout: float = 120,
    stop_timeout: float = 10,
    log: str | os.PathLike | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Yield the base URL of a `quintet serve MODEL_DIR ARGS` child that answers /health."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "quintet", "serve", str(model_dir), "--port", str(port), *args]
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"quintet serve exited with {proc.returncode} before answering ({cmd})")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"quintet serve did not answer /health within {start_timeout} s")
            time.sleep(0.1)
        yield url
    finally:
        _stop(proc, stop_timeout)
        if log:
            out.close()


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything left in its group
    proc.wait()
