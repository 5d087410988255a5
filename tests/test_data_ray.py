"""The demo curation on datatrove's Ray executor, against a real local Ray cluster, equals the local run.

The test starts a Ray head node on 127.0.0.1 with 2 CPUs (`ray start --head --block`, in its own process
group and temp folder), runs the same config with `kind = "ray"` and with the local executor, and compares
the kept documents (every curated file, row by row) and every step's drop counts. It stops the cluster by
signalling that process group and checks that no process of it is left. Skipped without `ray`
(`pip install 'quintet[ray]'`).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quintet.data.commands import DEMO_CONFIG
from quintet.data.curation import curate, load_config
from quintet.data.demo_corpus import generate_demo_corpus

ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'quintet[ray]'")

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_mentioning(needle: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found


@pytest.fixture
def ray_cluster(tmp_path_factory):
    temp = Path(f"/tmp/qray-{os.getpid()}-{time.monotonic_ns() % 10**6}")  # short: Ray's socket paths
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the stop below reaches all its processes
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                [str(ray_bin), "status", f"--address={address}"], capture_output=True, text=True
            )
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                out = head.stdout.read().decode(errors="replace") if head.poll() is not None else ""
                pytest.fail(f"Ray head node did not start: {probe.stderr[-2000:]} {out[-2000:]}")
            time.sleep(1)
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            if head.poll() is None:
                os.killpg(head.pid, sig)
                try:
                    head.wait(wait)
                except subprocess.TimeoutExpired:
                    continue
        deadline = time.monotonic() + 30
        while _processes_mentioning(str(temp)) and time.monotonic() < deadline:
            time.sleep(1)
        left = _processes_mentioning(str(temp))
        for pid in left:  # only processes of this cluster: their command lines name its temp folder
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(temp)], check=False)
        assert not left, f"Ray processes left after stopping the head node: {left}"


def _kept(curated: Path) -> dict[str, list[dict]]:
    rows = {}
    for path in sorted(curated.rglob("*.jsonl")):
        rows[str(path.relative_to(curated))] = [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def _drops(stats: dict) -> list[tuple]:
    return [
        (s["step"], s["total"], s["kept"], s["dropped"], sorted(s["reasons"].items())) for s in stats["steps"]
    ]


def test_ray_executor_gives_the_local_output(ray_cluster, tmp_path):
    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus)

    local = load_config(DEMO_CONFIG, data_root=corpus)
    local.executor.tasks, local.executor.workers = 2, 1
    expected = curate(local, tmp_path / "local")

    on_ray = load_config(DEMO_CONFIG, data_root=corpus)
    on_ray.executor.kind, on_ray.executor.tasks, on_ray.executor.workers = "ray", 2, 2
    on_ray.executor.options = {"address": ray_cluster, "cpus_per_task": 1, "mem_per_cpu_gb": 0.5}
    got = curate(on_ray, tmp_path / "ray")

    assert not ray.is_initialized()  # the connection curate made is closed; the cluster still runs
    assert _drops(got.stats) == _drops(expected.stats)
    kept_local, kept_ray = _kept(expected.curated_dir), _kept(got.curated_dir)
    assert kept_ray == kept_local and sum(map(len, kept_local.values())) > 300
    assert got.stats["output"]["documents"] == expected.stats["output"]["documents"]


def test_ray_without_a_cluster_is_one_line_error(tmp_path, monkeypatch):
    from quintet.errors import ConfigError

    corpus = tmp_path / "corpus"
    generate_demo_corpus(corpus)
    config = load_config(DEMO_CONFIG, data_root=corpus)
    config.executor.kind = "ray"
    config.executor.options = {"address": f"127.0.0.1:{_free_port()}"}
    monkeypatch.setenv("RAY_ADDRESS", "")
    with pytest.raises(ConfigError, match="no Ray cluster at '127.0.0.1:"):
        curate(config, tmp_path / "out")
