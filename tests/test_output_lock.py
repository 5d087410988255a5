"""One process at a time in an output folder: a second is refused naming the holder's PID; the lock of a
process that died is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from quintet.errors import OutputInUseError
from quintet.io import LOCK_NAME, output_lock

HOLD = """
import sys, time
from quintet.io import output_lock
with output_lock(sys.argv[1], "training run"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / "run")
    try:
        refused = pytest.raises(OutputInUseError, match=rf"in use by another curation \(PID {proc.pid}\b")
        with refused, output_lock(tmp_path / "run", "curation"):
            pass
    finally:
        proc.kill()
        proc.wait()


def test_stale_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    proc = _holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_NAME).read_text().split()[0] == str(proc.pid)  # left behind
    with output_lock(tmp_path / "run") as path:
        assert path.read_text().split()[0] == str(os.getpid())
    assert f"taking over the lock of PID {proc.pid}" in caplog.text
    with output_lock(tmp_path / "run"):  # released cleanly: taken again, no warning
        pass


def test_two_quintet_train_lm_on_one_out_dir(tmp_path):
    """The real command: a second `quintet train lm` into a held folder exits 2 naming the PID."""
    proc = _holder(tmp_path / "run")
    try:
        config = tmp_path / "train.toml"
        config.write_text(
            f'[model]\npreset = "jamba-tiny"\n[data]\nshards = "{tmp_path}"\n'
            f'[run]\nout_dir = "{tmp_path / "run"}"\n'
            '[[stages]]\nname = "A"\ntokens = 100\nmixture = { en = 1.0 }\nlr = 1e-3\n'
        )
        start = time.time()
        result = subprocess.run(
            [sys.executable, "-m", "quintet", "train", "lm", str(config)], capture_output=True, text=True
        )
        err = result.stderr.strip().splitlines()[-1]
        assert result.returncode == 2 and f"PID {proc.pid}" in err and "Traceback" not in result.stderr, err
        assert time.time() - start < 120
    finally:
        proc.kill()
        proc.wait()
