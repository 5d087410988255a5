"""quintet.kernels.build: real builds of a tiny torch op, each loaded in a fresh process."""

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quintet.kernels import build
from quintet.kernels.build import KernelBuildError, cache_key, cache_root, load_extension

NAME = "quintet_buildtest"
FLAGS = ["-O0"]  # the quickest build
SOURCE = """\
#include <ATen/core/Tensor.h>
#include <torch/library.h>

at::Tensor add_one(const at::Tensor& x) { return x.add(1); }

TORCH_LIBRARY(quintet_buildtest, m) { m.def("add_one(Tensor x) -> Tensor", &add_one); }
"""
# Builds (or loads) the op, checks it, prints the library's path.
DRIVER = """
import sys
import torch
from quintet.kernels.build import load_extension
so = load_extension(sys.argv[1], [sys.argv[2]], sys.argv[3:])
x = torch.arange(4.0)
assert torch.equal(torch.ops.quintet_buildtest.add_one(x), x + 1)
print(so)
"""
# Takes the build lock through the module's own function and keeps it until killed.
HOLDER = """
import sys, time
from pathlib import Path
from quintet.kernels import build
assert build._acquire_lock(Path(sys.argv[1]), 0, "test") is not None
print("held", flush=True)
time.sleep(600)
"""


def _source(folder: Path, text: str = SOURCE) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "add_one.cpp"
    path.write_text(text)
    return path


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != build.LOCK_TIMEOUT_ENV}
    return {**env, build.EXTENSIONS_DIR_ENV: str(cache), **extra}


def _start(code: str, *args: object, env: dict[str, str]) -> subprocess.Popen:
    """A Python subprocess in its own process group, so killing it also kills its ninja and compiler."""
    command = [sys.executable, "-c", code, *map(str, args)]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _kill(proc: subprocess.Popen) -> str:
    """Kills the subprocess and its group if it still runs; returns its stderr then."""
    if proc.poll() is not None:
        return ""
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.communicate()[1]


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """Waits for the driver; fails the test if it runs past `timeout` or fails."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the build did not finish within {timeout} s:\n{_kill(proc)}")
    assert proc.returncode == 0, f"the driver failed (rc {proc.returncode}):\n{err}"
    return out, err


def _drive(cache: Path, src: Path, timeout: float = 120, **env: str) -> tuple[Path, str]:
    proc = _start(DRIVER, NAME, src, *FLAGS, env=_env(cache, **env))
    try:
        out, err = _finish(proc, timeout)
    finally:
        _kill(proc)
    return Path(out.strip().splitlines()[-1]), err


def _library(cache: Path, src: Path) -> Path:
    return cache / f"{NAME}-{cache_key(NAME, [src], FLAGS)}" / f"{NAME}.so"


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path, Path]:
    """One build shared by the tests that only read it or copy it: (cache, source, library)."""
    root = tmp_path_factory.mktemp("built")
    cache, src = root / "cache", _source(root / "csrc")
    library, _ = _drive(cache, src)
    return cache, src, library


def test_build_lands_in_the_keyed_folder_and_is_reused(built):
    cache, src, library = built
    assert library == _library(cache, src)
    assert sorted(p.name for p in cache.iterdir()) == [library.parent.name]  # no lock, no build folder left
    before = library.stat()
    again, _ = _drive(cache, src)
    assert again == library
    after = library.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # loaded, not rebuilt


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_cached_library_is_rebuilt(built, tmp_path, damage):
    cache = tmp_path / "cache"
    shutil.copytree(built[0], cache)
    library = cache / built[2].relative_to(built[0])
    size = library.stat().st_size
    if damage == "truncated":  # the tail cut off: dlopen of it would die of SIGBUS, so it must not be tried
        os.truncate(library, size // 2)
    else:  # not a library at all: dlopen raises, and the cache rebuilds it once
        library.write_bytes(b"not a shared library\n" * 100)
    again, err = _drive(cache, built[1])
    assert again == library
    assert str(library) in err and "rebuilding" in err
    assert build._is_complete(library) and library.stat().st_size > size // 2


def test_build_killed_midway_leaves_no_lock_that_blocks(tmp_path):
    cache, src = tmp_path / "cache", _source(tmp_path / "csrc")
    lock = cache / f"{NAME}-{cache_key(NAME, [src], FLAGS)}.lock"
    first = _start(DRIVER, NAME, src, *FLAGS, env=_env(cache))
    try:
        building = lambda: list(cache.glob(f".{NAME}-*.build-*-{first.pid}-*"))  # noqa: E731
        _wait_for(lambda: building() and lock.exists(), 120, "the first build to start compiling")
        assert first.poll() is None, "the first build ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)  # kill -9 of it, its ninja and its compiler
        first.communicate()
    finally:
        _kill(first)
    assert lock.read_text().split()[0] == str(first.pid)  # left behind, naming a dead process
    assert building()

    library, _ = _drive(cache, src, timeout=60)
    assert library == _library(cache, src)
    assert not lock.exists() and not building()  # taken over and released; the dead build folder removed


def test_live_lock_holder_is_waited_for_a_bounded_time(tmp_path):
    cache, src = tmp_path / "cache", _source(tmp_path / "csrc")
    cache.mkdir()
    lock = cache / f"{NAME}-{cache_key(NAME, [src], FLAGS)}.lock"
    holder = _start(HOLDER, lock, env=_env(cache))
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        if not (ready and holder.stdout.readline().strip() == "held"):
            pytest.fail(f"the lock holder did not start:\n{_kill(holder)}")
        library, err = _drive(cache, src, timeout=60, **{build.LOCK_TIMEOUT_ENV: "2"})
        assert library == _library(cache, src)
        assert str(lock) in err and f"PID {holder.pid} (running)" in err
        assert "privately" in err
        assert lock.read_text().split()[0] == str(holder.pid)  # still the holder's: not taken from it
    finally:
        _kill(holder)


@pytest.mark.parametrize("lock_timeout", [None, "0"], ids=["one-waits", "both-build"])
def test_two_processes_building_at_once_both_work(tmp_path, lock_timeout):
    cache, src = tmp_path / "cache", _source(tmp_path / "csrc")
    env = _env(cache, **({} if lock_timeout is None else {build.LOCK_TIMEOUT_ENV: lock_timeout}))
    procs = [_start(DRIVER, NAME, src, *FLAGS, env=env) for _ in range(2)]
    try:
        paths = {Path(_finish(p, 180)[0].strip()) for p in procs}  # each driver checks the op itself
    finally:
        for p in procs:
            _kill(p)
    assert paths == {_library(cache, src)}
    assert sorted(p.name for p in cache.iterdir()) == [_library(cache, src).parent.name]


def test_cache_key_follows_what_changes_the_binary(tmp_path, monkeypatch):
    src = _source(tmp_path / "a")
    key = cache_key(NAME, [src], FLAGS)
    assert len(key) == 16 and int(key, 16) >= 0
    assert cache_key(NAME, [src], list(FLAGS)) == key
    assert cache_key(NAME, [_source(tmp_path / "b")], FLAGS) == key  # where the source lies does not count

    assert cache_key(NAME, [src], ["-O1"]) != key
    assert cache_key(NAME, [src], FLAGS, ["-fopenmp"]) != key
    assert cache_key("other", [src], FLAGS) != key
    with monkeypatch.context() as m:
        m.setattr(sys, "prefix", str(tmp_path / "another-venv"))
        assert cache_key(NAME, [src], FLAGS) != key
    (src.parent / "helpers.h").write_text("#pragma once\n")
    with_header = cache_key(NAME, [src], FLAGS)
    assert with_header != key
    src.write_text(SOURCE + "// edited\n")
    assert cache_key(NAME, [src], FLAGS) not in (key, with_header)


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(build.EXTENSIONS_DIR_ENV, str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x"
    monkeypatch.delenv(build.EXTENSIONS_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "quintet" / "extensions"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "quintet" / "extensions"


def test_failed_build_raises_an_actionable_error_and_cleans_up(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv(build.EXTENSIONS_DIR_ENV, str(cache))
    src = _source(tmp_path / "csrc", "this is not C++;\n" + SOURCE)
    with pytest.raises(KernelBuildError) as info:
        load_extension("quintet_buildtest_broken", [src], FLAGS)
    message = str(info.value)
    assert "this is not C++" in message  # the compiler's output
    last = message.splitlines()[-1]
    assert "'quintet_buildtest_broken'" in last and "add_one.cpp" in last and "compiler" in last
    assert list(cache.iterdir()) == []  # no lock file, no build folder

    with pytest.raises(KernelBuildError, match="cannot read the sources"):
        load_extension("quintet_buildtest_missing", [tmp_path / "missing.cpp"], FLAGS)


def test_invalid_lock_timeout_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(build.EXTENSIONS_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(build.LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(KernelBuildError, match=f"{build.LOCK_TIMEOUT_ENV} = 'soon'"):
        load_extension("quintet_buildtest_env", [_source(tmp_path / "csrc")], FLAGS)


def test_only_dead_local_build_folders_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folders = {
        "dead": f".x-0123.build-{build._HOST}-{dead.pid}-0badcafe",
        "alive": f".x-0123.build-{build._HOST}-{os.getpid()}-0badcafe",
        "other host": f".x-0123.build-{build._HOST}.elsewhere-{dead.pid}-0badcafe",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
    build._remove_dead_builds(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folders["alive"], folders["other host"]])
