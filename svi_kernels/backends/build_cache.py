"""The on-disk cache of a library compiled on first use: built once, published whole, loaded only from a safe place.

- One builder per cache entry at a time: an OS file lock (``fcntl.flock`` on ``<entry>/build.lock``), which
  the kernel releases when its holder dies (kill -9, an OOM kill, a pre-emption), so no later process can
  wedge on it. The holder writes its pid, host and start time into the lock file for the others' messages
  and clears them when it is done; a record found by the next holder means that the last build died, and
  the next holder says so and builds again.
- Each build runs in a fresh private directory (``<entry>/build-XXXX``: torch's own ``lock`` file lives
  there and goes with it), and the finished library appears in the entry by one atomic rename, so no
  process ever loads a half-written one.
- A process waiting for another's build says who builds and for how long every 30 s, and gives up after
  ``SVI_KERNELS_BUILD_TIMEOUT`` seconds (default 3600; ``inf`` waits for ever) with an error that names
  the directory and the way out.
- Nothing is loaded from a directory or file that another user owns or that is group- or world-writable
  (ssh and pip refuse such places too): anyone who can write there could plant a library.
"""
from __future__ import annotations

import fcntl
import glob
import os
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple, Optional, Tuple, TypeVar

LOCK = "build.lock"
ATTEMPT_PREFIX = "build-"
TIMEOUT_ENV = "SVI_KERNELS_BUILD_TIMEOUT"
DEFAULT_TIMEOUT_S = 3600.0  # a CUDA build on a few cores takes tens of minutes
REPORT_EVERY_S = 30.0
POLL_S = 0.2

T = TypeVar("T")


class CacheError(RuntimeError):
    """The cache cannot be used here (unsafe, unlockable, or another build did not finish in time); says the fix."""


class Holder(NamedTuple):
    """Who holds (or held) an entry's build lock, as written in the lock file."""
    pid: int
    host: str
    started: float  # time.time() on the holder's host

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}"

    def age_s(self) -> float:
        return max(0.0, time.time() - self.started)


def say(message: str) -> None:
    print(f"svi_kernels: {message}", file=sys.stderr, flush=True)


def check_safe(path: str) -> None:
    """Raise CacheError unless ``path`` is owned by this user (or root) and not group- or world-writable."""
    st = os.stat(path)
    kind = "directory" if os.path.isdir(path) else "file"
    if st.st_uid not in (os.getuid(), 0):
        raise CacheError(
            f"refusing to load the compiled kernels from {path}: that {kind} is owned by uid {st.st_uid}, not by you "
            f"(uid {os.getuid()}), so its owner can replace the library. Point SVI_KERNELS_CACHE_DIR at a directory "
            "of your own")
    if st.st_mode & 0o022:
        who = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "world")) if st.st_mode & bit)
        raise CacheError(
            f"refusing to load the compiled kernels from {path}: that {kind} is {who}-writable (mode "
            f"{st.st_mode & 0o777:o}), so others could plant a library there. Fix: `chmod go-w {path}` and delete "
            "what you did not build there, or point SVI_KERNELS_CACHE_DIR at a directory only you can write")


def published(entry: str, name: str) -> Optional[str]:
    """The complete library ``entry/name``, or None when none is published; CacheError when the place is unsafe."""
    library = os.path.join(entry, name)
    if not os.path.exists(library):
        return None
    for path in (os.path.dirname(entry), entry, library):
        check_safe(path)
    return library


def timeout_s() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise CacheError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds (`inf` waits for ever)")
    return value


def obtain(entry: str, name: str, load: Callable[[str], T], build: Callable[[str], Tuple[T, str]],
           what: str = "building") -> T:
    """``load(path)`` of the library ``entry/name``; when there is none, one process ``build(attempt)``s it.

    ``build`` gets a fresh private directory and returns (its result, the path of the file it made there);
    that file is then renamed to ``entry/name``. Processes that find another's build under way wait for it
    (``what`` says what it does, for the messages) and then load its library.
    """
    library = published(entry, name)
    if library:
        return load(library)
    for path in (os.path.dirname(entry), entry):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the cache directory {path} ({exc}); point SVI_KERNELS_CACHE_DIR at "
                             "a directory of your own that you can write") from exc
        check_safe(path)
    with _exclusive(entry, what) as dead:
        library = published(entry, name)
        if library:  # built by the process this one waited for
            return load(library)
        if dead is not None:
            say(f"the last build in {entry} ({dead}, started {dead.age_s():.0f} s ago) did not finish: "
                "its process is gone; building again")
        for stale in glob.glob(os.path.join(entry, ATTEMPT_PREFIX + "*")):  # only lock holders make these
            shutil.rmtree(stale, ignore_errors=True)
        attempt = tempfile.mkdtemp(prefix=ATTEMPT_PREFIX, dir=entry)
        try:
            result, built = build(attempt)
            _publish(built, os.path.join(entry, name))
        finally:
            shutil.rmtree(attempt, ignore_errors=True)
        return result


def _publish(built: str, library: str) -> None:
    """Make ``built`` durable, then put it at ``library`` in one rename (readers see all of it or nothing)."""
    os.chmod(built, 0o755)
    with open(built, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(built, library)
    folder = os.open(os.path.dirname(library), os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _read_holder(fd: int) -> Optional[Holder]:
    fields = os.pread(fd, 512, 0).decode(errors="replace").split()
    try:
        return Holder(int(fields[0]), fields[1], float(fields[2]))
    except (IndexError, ValueError):
        return None


@contextmanager
def _exclusive(entry: str, what: str) -> Iterator[Optional[Holder]]:
    """Hold ``entry``'s build lock; yields the record a holder that died left behind (None after clean releases)."""
    path = os.path.join(entry, LOCK)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise CacheError(f"cannot open the build lock {path} ({exc}); point SVI_KERNELS_CACHE_DIR at a directory "
                         "of your own that you can write") from exc
    try:
        _acquire(fd, path, entry, what)
        dead = _read_holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()} {time.time():.3f}\n".encode(), 0)
        try:
            yield dead
        finally:
            os.ftruncate(fd, 0)  # released cleanly, built or failed: nothing for the next holder to report
    finally:
        os.close(fd)  # releases the lock (the kernel does the same when this process dies)


def _acquire(fd: int, path: str, entry: str, what: str) -> None:
    """Take the lock on ``fd``, reporting who holds it every REPORT_EVERY_S; CacheError after the time-out."""
    limit = timeout_s()
    start = time.monotonic()
    report_at = start
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        except OSError as exc:
            raise CacheError(f"cannot lock {path} ({exc}): the file system under the cache does not support file "
                             "locks; point SVI_KERNELS_CACHE_DIR at a local directory") from exc
        holder = _read_holder(fd)
        doing = (f"{holder}, which has been {what} into {entry} for {holder.age_s():.0f} s" if holder
                 else f"another process, which is {what} into {entry}")
        now = time.monotonic()
        if now - start >= limit:
            stop = f"`kill {holder.pid}` on {holder.host}" if holder else "stop it"
            raise CacheError(
                f"gave up after {now - start:.0f} s waiting for {doing} (it holds {path}). If that build is "
                f"still working, wait for it (raise {TIMEOUT_ENV}, now {limit:g} s; `inf` waits for ever); if it "
                f"is stuck, {stop} and the next process builds again; if no such process exists, delete {entry}")
        if now >= report_at:
            say(f"waiting for {doing} (waited {now - start:.0f} s; gives up after {limit:g} s: {TIMEOUT_ENV})")
            report_at = now + REPORT_EVERY_S
        time.sleep(POLL_S)
