"""JIT builds of quintet's C++ CPU extensions: cached on disk, safe with many processes, never hanging.

`load_extension(name, sources, extra_cflags, extra_ldflags)` compiles the sources with
`torch.utils.cpp_extension.load` (needs a C++ compiler and ninja), loads the library into this process
with `torch.ops.load_library` and returns its path. The cache, under `cache_root()`:

    {name}-{key}/{name}.so                         the library; key = cache_key(...)
    {name}-{key}.lock                              exists while a process builds it; names that process
    .{name}-{key}.build-{host}-{pid}-{random}/     one process's private build folder, removed afterwards

- Every build runs in its own private folder, so torch's lock file there (a FileBaton, which waits forever
  when its holder was killed) is never shared. The finished library is renamed into place: a reader sees
  no library or a whole one, and two processes that build at once both end with a working one.
- The lock only saves duplicate work. It is an `fcntl.flock`, which the OS drops when its holder dies
  (kill -9 included), so a killed build costs the next process nothing. A live holder is waited for at
  most $QUINTET_KERNEL_LOCK_TIMEOUT seconds (default 180: a build takes 10-60 s on two busy cores, and a
  shorter wait would build everything twice), with one line on stderr naming the lock file and its
  holder; then this process builds privately. Without fcntl (Windows) there is no lock.
- A cached library is checked before it is loaded (non-empty and, for ELF, not truncated: dlopen of a
  truncated library dies of SIGBUS instead of raising), and rebuilt once if it fails to load.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import re
import secrets
import shutil
import socket
import struct
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["KernelBuildError", "cache_key", "cache_root", "load_extension"]

EXTENSIONS_DIR_ENV = "QUINTET_EXTENSIONS_DIR"
LOCK_TIMEOUT_ENV = "QUINTET_KERNEL_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT_S = 180.0
_HEADER_SUFFIXES = (".h", ".hh", ".hpp", ".inc", ".inl", ".cuh")
_HOST = socket.gethostname()
_BUILD_FOLDER = re.compile(r"\..+\.build-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")
# ELF class -> (type of e_shoff, offset of e_shoff, offset of e_shentsize; e_shnum follows it)
_ELF_SECTION_TABLE = {1: ("I", 0x20, 0x2E), 2: ("Q", 0x28, 0x3A)}

log = logging.getLogger(__name__)

_loaded: dict[str, tuple[str, Path]] = {}  # name -> (key, path) of the libraries this process has loaded
_process_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """A C++ extension could not be built or loaded; the message's last line says why and what to do."""


def cache_root() -> Path:
    """$QUINTET_EXTENSIONS_DIR, else $XDG_CACHE_HOME/quintet/extensions, else ~/.cache/quintet/extensions."""
    root = os.environ.get(EXTENSIONS_DIR_ENV)
    if root:
        return Path(root).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "quintet" / "extensions"


def cache_key(
    name: str,
    sources: Sequence[str | os.PathLike[str]],
    extra_cflags: Sequence[str],
    extra_ldflags: Sequence[str] = (),
) -> str:
    """A 16-hex-digit hash of what the built library depends on: the bytes of the sources and of the headers
    in their folders, torch (version and commit), Python (implementation, major.minor, ABI flags), the flags,
    $CXX, the CPU's instruction-set flags and `sys.prefix` (each virtualenv keeps its own build). Where the
    sources lie does not count. Raises OSError for a source that cannot be read."""
    digest = hashlib.sha256()
    major, minor = sys.version_info[:2]
    python = f"{sys.implementation.name}-{major}.{minor}{getattr(sys, 'abiflags', '')}"
    setting = (
        name,
        torch.__version__,
        getattr(torch.version, "git_version", ""),
        python,
        list(extra_cflags),
        list(extra_ldflags),
        os.environ.get("CXX", ""),
        _cpu_features(),
        sys.prefix,
    )
    digest.update(repr(setting).encode())
    for path in _input_files(sources):
        data = path.read_bytes()
        digest.update(repr((path.name, len(data))).encode())
        digest.update(data)
    return digest.hexdigest()[:16]


def load_extension(
    name: str,
    sources: Sequence[str | os.PathLike[str]],
    extra_cflags: Sequence[str],
    extra_ldflags: Sequence[str] = (),
) -> Path:
    """Build (or take from the cache) the torch extension `name` from `sources` and load it into this process
    with torch.ops.load_library; return the .so path. Raises KernelBuildError on failure.

    A process loads one build per name: asking again with the same inputs returns the same path at once,
    with other inputs raises KernelBuildError (restart Python to load the new build).
    """
    paths = [Path(s).resolve() for s in sources]
    with _process_lock:
        try:
            key = cache_key(name, paths, extra_cflags, extra_ldflags)
        except OSError as err:
            raise KernelBuildError(f"cannot read the sources of the C++ extension {name!r}: {err}") from err
        if name in _loaded:
            loaded_key, loaded_path = _loaded[name]
            if loaded_key != key:
                raise KernelBuildError(
                    f"the C++ extension {name!r} is already loaded in this process from {loaded_path}, built "
                    "from other sources or flags; restart Python to load the new build"
                )
            return loaded_path
        root = cache_root()
        library = root / f"{name}-{key}" / f"{name}.so"
        if not _load_cached(library):
            library = _build_locked(name, paths, extra_cflags, extra_ldflags, root, key, library)
        _loaded[name] = (key, library)
        return library


def _build_locked(
    name: str,
    sources: list[Path],
    extra_cflags: Sequence[str],
    extra_ldflags: Sequence[str],
    root: Path,
    key: str,
    library: Path,
) -> Path:
    """Builds `library` under the lock, unless the process that held the lock before us has just built it."""
    rejected = _file_id(library)  # the missing or broken cached library that brought us here
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _build_lock(root / f"{name}-{key}.lock", name):
            now = _file_id(library)
            if now is not None and now != rejected and _load_cached(library):
                return library
            return _build(name, sources, extra_cflags, extra_ldflags, root, key, library)
    except OSError as err:
        raise KernelBuildError(
            f"cannot use the kernel cache {root} ({err}); set {EXTENSIONS_DIR_ENV} to a writable folder"
        ) from err


def _build(
    name: str,
    sources: list[Path],
    extra_cflags: Sequence[str],
    extra_ldflags: Sequence[str],
    root: Path,
    key: str,
    library: Path,
) -> Path:
    """Compiles in a private folder, loads the library from there and renames it to `library` (one file
    system, so the rename is atomic). Returns where the library now is."""
    _remove_dead_builds(root)
    private = root / f".{name}-{key}.build-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    log.info("quintet: compiling the C++ extension %r into %s (first use only)", name, library.parent)
    saved = True
    try:
        built = _compile(name, sources, extra_cflags, extra_ldflags, private)
        try:
            library.parent.mkdir(exist_ok=True)
            os.replace(built, library)
        except OSError as err:  # built and loaded: only saving it failed, so leave it where it is
            log.warning("quintet: could not save the C++ extension %r as %s (%s)", name, library, err)
            saved = False
            return built
        return library
    finally:
        if saved:
            shutil.rmtree(private, ignore_errors=True)


def _compile(
    name: str, sources: list[Path], extra_cflags: Sequence[str], extra_ldflags: Sequence[str], folder: Path
) -> Path:
    """torch's JIT build in `folder`, which also loads the library; returns its path."""
    from torch.utils.cpp_extension import load

    try:
        folder.mkdir()
        with _ninja_on_path():
            built = load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=list(extra_cflags),
                extra_ldflags=list(extra_ldflags),
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
    except Exception as err:
        raise KernelBuildError(
            f"{str(err).strip()}\nquintet: could not build the C++ extension {name!r} from "
            f"{', '.join(s.name for s in sources)} ({type(err).__name__}, details above); it needs a C++ "
            "compiler (`c++`, or the one $CXX names) and ninja (`pip install ninja`)"
        ) from err
    return Path(built)


def _load_cached(library: Path) -> bool:
    """Loads a cached library; False (with a warning if it exists) when it is missing, broken or fails."""
    if not library.exists():
        return False
    if not _is_complete(library):
        log.warning("quintet: the cached %s is empty or truncated; rebuilding it", library)
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError) as err:
        log.warning("quintet: the cached %s failed to load (%s); rebuilding it", library, err)
        return False
    return True


def _is_complete(library: Path) -> bool:
    """Non-empty and, when it is ELF, as long as its section table (written last) says it is."""
    try:
        size = library.stat().st_size
        with library.open("rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if size == 0:
        return False
    if head[:4] != b"\x7fELF":
        return True  # not ELF (macOS, Windows): loading it is the check
    if len(head) < 64 or head[4] not in _ELF_SECTION_TABLE:
        return False
    kind, at_offset, at_entry_size = _ELF_SECTION_TABLE[head[4]]
    order = "<" if head[5] == 1 else ">"
    (offset,) = struct.unpack_from(order + kind, head, at_offset)
    entry_size, count = struct.unpack_from(order + "HH", head, at_entry_size)
    return offset + entry_size * count <= size


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _input_files(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The sources in their order, then the headers next to them, sorted."""
    files = [Path(s) for s in sources]
    for folder in dict.fromkeys(f.parent for f in files):
        headers = (p for p in folder.iterdir() if p.suffix in _HEADER_SUFFIXES and p.is_file())
        files += sorted(p for p in headers if p not in files)
    return files


def _cpu_features() -> str:
    """The machine type and the first CPU's instruction-set flags ("flags" on x86, "Features" on ARM)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return f"{platform.machine()} {line.partition(':')[2].strip()}"
    return platform.machine()


def _lock_timeout() -> float:
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise KernelBuildError(
            f"{LOCK_TIMEOUT_ENV} = {raw!r}: must be a number of seconds >= 0 (how long to wait for another "
            f"process building the same kernel; default {DEFAULT_LOCK_TIMEOUT_S:g})"
        )
    return seconds


@contextlib.contextmanager
def _build_lock(path: Path, name: str) -> Iterator[None]:
    """Holds the lock file `path` while this process builds `name`; goes on without it after the timeout."""
    fd = None if fcntl is None else _acquire_lock(path, _lock_timeout(), name)
    try:
        yield
    finally:
        if fd is not None:
            _release_lock(path, fd)


def _acquire_lock(path: Path, timeout: float, name: str) -> int | None:
    """flock on `path` with this process's PID written in it; None after `timeout` seconds of a live holder
    (logged once when the wait starts and once when it ends), or where the file system has no locks."""
    deadline = time.monotonic() + timeout
    waiting = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if not waiting:
                waiting = True
                log.warning(
                    "quintet: waiting up to %g s for %s, held by %s, which is building the C++ extension %r "
                    "(%s sets the wait)", timeout, path, _describe_holder(path), name, LOCK_TIMEOUT_ENV,
                )  # fmt: skip
            if time.monotonic() >= deadline:
                log.warning(
                    "quintet: %s is still held by %s after %g s; building %r privately",
                    path, _describe_holder(path), timeout, name,
                )  # fmt: skip
                return None
            time.sleep(0.2)
            continue
        except OSError as err:  # e.g. ENOLCK on some network file systems
            os.close(fd)
            log.info("quintet: cannot lock %s (%s); building %r without the lock", path, err)
            return None
        if _same_file(fd, path):
            if os.fstat(fd).st_size:  # a clean release deletes the file: its holder was killed
                log.info("quintet: taking over %s from %s", path, _describe_holder(path))
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_HOST}\n".encode())
            return fd
        os.close(fd)  # its holder finished and deleted it between our open and flock: lock the new file


def _release_lock(path: Path, fd: int) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)  # before unlocking: a waiter that locks the deleted file notices and retries
    os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def _describe_holder(path: Path) -> str:
    try:
        pid_text, _, host = path.read_text().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return "a process that has not written its PID yet"
    host = host.strip()
    if host and host != _HOST:
        return f"PID {pid} on host {host}"
    return f"PID {pid} ({'running' if _pid_alive(pid) else 'not running'})"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill there would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _remove_dead_builds(root: Path) -> None:
    """Deletes the private build folders that processes on this host left when they were killed mid-build."""
    for folder in root.glob(".*.build-*"):
        match = _BUILD_FOLDER.fullmatch(folder.name)
        if match and match["host"] == _HOST and not _pid_alive(int(match["pid"])):
            log.info("quintet: removing %s, left by a killed build", folder)
            shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _ninja_on_path() -> Iterator[None]:
    """torch's JIT build runs `ninja` from PATH; a venv used without activation has it only in its bin."""
    old = os.environ.get("PATH", "")
    extra = [str(Path(sys.executable).parent)]
    with contextlib.suppress(ImportError):
        import ninja  # the PyPI package ships the binary

        extra.insert(0, ninja.BIN_DIR)
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.pathsep.join([*extra, old])
    try:
        yield
    finally:
        os.environ["PATH"] = old


class LazyExtension:
    """One extension, built and loaded on first use, once per process; remembers why it could not be.

    `get()` returns its `torch.ops` namespace, or None (then `reason` says why, and `warn_fallback` warns
    once that the PyTorch path runs instead). `disable_env` set to anything but "" or "0" turns it off.
    """

    def __init__(
        self,
        name: str,
        namespace: str,
        sources: Sequence[str | os.PathLike[str]],
        extra_cflags: Sequence[str],
        extra_ldflags: Sequence[str],
        disable_env: str,
        what: str,
    ) -> None:
        self.name, self.namespace, self.what = name, namespace, what
        self.sources, self.cflags, self.ldflags = list(sources), list(extra_cflags), list(extra_ldflags)
        self.disable_env = disable_env
        self.tried = False
        self.ops: Any = None
        self.reason = ""
        self.warned = False

    def get(self) -> Any:
        if os.environ.get(self.disable_env, "").strip() not in ("", "0"):
            self.reason = f"{self.disable_env} is set"
            return None
        if not self.tried:
            self.tried = True
            try:
                load_extension(self.name, self.sources, self.cflags, self.ldflags)
                self.ops = getattr(torch.ops, self.namespace)
                self.loaded(self.ops)
            except Exception as err:  # no compiler or ninja, a failed build: fall back, never crash
                lines = str(err).strip().splitlines() or [""]
                self.reason = f"{type(err).__name__}: {lines[-1][:300]}"
                log.debug("building %s failed:\n%s", self.what, err)
                self.ops = None
        return self.ops

    def loaded(self, ops: Any) -> None:
        """Called once the library is loaded (subclasses register fake kernels, read constants)."""

    def warn_fallback(self, instead: str) -> None:
        if not self.warned:
            self.warned = True
            warnings.warn(
                f"quintet: {self.what} is unavailable ({self.reason}); {instead}",
                RuntimeWarning,
                stacklevel=4,
            )
