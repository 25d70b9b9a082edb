"""The cache of the library built on first use (svi_kernels/backends/build_cache.py), in this process, with a
text file standing in for the library: the lock, the publication by rename and the refusals are the real ones.
tests/backends/test_jit.py runs the same machinery in real processes (kill -9, several at once)."""
import fcntl
import os
import socket
import time

import pytest

from svi_kernels.backends import build_cache


def _entry(tmp_path):
    return str(tmp_path / "cache" / "tag")


def _builder(calls, content="library"):
    def build(attempt):
        calls.append(attempt)
        assert os.path.isdir(attempt) and os.path.basename(attempt).startswith(build_cache.ATTEMPT_PREFIX)
        path = os.path.join(attempt, "_C.so")
        with open(path, "w") as fh:
            fh.write(content)
        return "built", path
    return build


def _read(path):
    with open(path) as fh:
        return fh.read()


def test_first_call_builds_in_private_dirs_and_publishes_whole(tmp_path):
    entry, calls = _entry(tmp_path), []
    assert build_cache.obtain(entry, "_C.so", _read, _builder(calls)) == "built"
    assert len(calls) == 1 and not os.path.exists(calls[0])  # the attempt directory is gone
    assert sorted(os.listdir(entry)) == ["_C.so", build_cache.LOCK]
    for path in (os.path.dirname(entry), entry):
        assert os.stat(path).st_mode & 0o777 == 0o700, path
    assert os.stat(os.path.join(entry, build_cache.LOCK)).st_size == 0  # released cleanly: no holder record
    assert build_cache.obtain(entry, "_C.so", _read, _builder(calls)) == "library"  # later: loaded, not built
    assert len(calls) == 1


def test_failed_build_leaves_nothing_and_the_next_call_builds(tmp_path, capsys):
    entry = _entry(tmp_path)

    def fails(attempt):
        open(os.path.join(attempt, "lock"), "w").close()  # torch's baton, left by the failed build
        raise RuntimeError("c++ not found")
    with pytest.raises(RuntimeError, match="c\\+\\+ not found"):
        build_cache.obtain(entry, "_C.so", _read, fails)
    assert os.listdir(entry) == [build_cache.LOCK]
    calls = []
    assert build_cache.obtain(entry, "_C.so", _read, _builder(calls)) == "built"
    assert "did not finish" not in capsys.readouterr().err  # a failure is not a death


def test_dead_holder_is_reported_once_and_its_attempt_removed(tmp_path, capsys):
    """What a kill -9 leaves: the holder's record in the lock file (the OS lock itself died with it) and a
    half-done attempt directory holding torch's `lock` baton."""
    entry = _entry(tmp_path)
    os.makedirs(os.path.join(entry, "build-dead"), mode=0o700)
    open(os.path.join(entry, "build-dead", "lock"), "w").close()
    with open(os.path.join(entry, build_cache.LOCK), "w") as fh:
        fh.write(f"4242 otherhost {time.time() - 95:.3f}\n")
    calls = []
    assert build_cache.obtain(entry, "_C.so", _read, _builder(calls)) == "built"
    err = capsys.readouterr().err
    assert err.count("did not finish") == 1, err
    assert "pid 4242 on host otherhost" in err and "started 95 s ago" in err and entry in err, err
    assert sorted(os.listdir(entry)) == ["_C.so", build_cache.LOCK]


def _hold(entry, pid=4242, host="builder", age=40.0):
    """Take the entry's lock through another open file (flock excludes it like another process)."""
    os.makedirs(entry, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(entry, build_cache.LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.pwrite(fd, f"{pid} {host} {time.time() - age:.3f}\n".encode(), 0)
    return fd


def test_waiter_reports_the_live_holder_then_times_out_naming_the_way_out(tmp_path, monkeypatch, capsys):
    entry = _entry(tmp_path)
    fd = _hold(entry)
    monkeypatch.setattr(build_cache, "REPORT_EVERY_S", 0.3)
    monkeypatch.setenv(build_cache.TIMEOUT_ENV, "1")
    calls = []
    try:
        t0 = time.monotonic()
        with pytest.raises(build_cache.CacheError) as info:
            build_cache.obtain(entry, "_C.so", _read, _builder(calls), what="compiling the kernels")
        assert 1 <= time.monotonic() - t0 < 30
    finally:
        os.close(fd)
    assert calls == []
    msg = str(info.value)
    for part in ("gave up after 1 s", "pid 4242 on host builder", "compiling the kernels into " + entry,
                 "`kill 4242` on builder", f"delete {entry}", build_cache.TIMEOUT_ENV):
        assert part in msg, (part, msg)
    reports = [line for line in capsys.readouterr().err.splitlines() if "waiting for pid 4242 on host builder" in line]
    assert 2 <= len(reports) <= 5, reports  # one at once, then one per REPORT_EVERY_S
    assert "which has been compiling the kernels into" in reports[0] and "for 40 s" in reports[0], reports[0]


def test_waiter_loads_what_the_holder_published(tmp_path, monkeypatch):
    """The holder publishes and releases while the other waits: the waiter loads that library, builds nothing."""
    import threading

    entry = _entry(tmp_path)
    fd = _hold(entry)

    def finish():
        time.sleep(0.5)
        with open(os.path.join(entry, "_C.so"), "w") as fh:
            fh.write("from the holder")
        os.ftruncate(fd, 0)
        os.close(fd)
    thread = threading.Thread(target=finish)
    thread.start()
    calls = []
    try:
        assert build_cache.obtain(entry, "_C.so", _read, _builder(calls)) == "from the holder"
    finally:
        thread.join()
    assert calls == []


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_bad_timeout_is_refused(monkeypatch, value):
    monkeypatch.setenv(build_cache.TIMEOUT_ENV, value)
    with pytest.raises(build_cache.CacheError, match=f"{build_cache.TIMEOUT_ENV}='{value}' is not a positive"):
        build_cache.timeout_s()


def test_timeout_default_and_inf(monkeypatch):
    monkeypatch.delenv(build_cache.TIMEOUT_ENV, raising=False)
    assert build_cache.timeout_s() == build_cache.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(build_cache.TIMEOUT_ENV, "inf")
    assert build_cache.timeout_s() == float("inf")


def _published(tmp_path):
    entry, calls = _entry(tmp_path), []
    build_cache.obtain(entry, "_C.so", _read, _builder(calls))
    return entry, os.path.join(entry, "_C.so")


@pytest.mark.parametrize("which", ["root", "entry", "library"])
@pytest.mark.parametrize("bits, word", [(0o002, "world-writable"), (0o020, "group-writable")])
def test_writable_by_others_is_refused(tmp_path, which, bits, word):
    entry, library = _published(tmp_path)
    path = {"root": os.path.dirname(entry), "entry": entry, "library": library}[which]
    os.chmod(path, os.stat(path).st_mode | bits)
    loaded = []
    with pytest.raises(build_cache.CacheError) as info:
        build_cache.obtain(entry, "_C.so", loaded.append, _builder([]))
    assert loaded == []
    msg = str(info.value)
    assert f"from {path}:" in msg and word in msg and f"`chmod go-w {path}`" in msg, msg
    assert "SVI_KERNELS_CACHE_DIR" in msg


def test_world_writable_root_refused_before_building(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    calls = []
    with pytest.raises(build_cache.CacheError, match="world-writable"):
        build_cache.obtain(str(root / "tag"), "_C.so", _read, _builder(calls))
    assert calls == [] and not os.path.exists(root / "tag" / "_C.so")


def test_owned_by_another_user_is_refused(tmp_path, monkeypatch):
    entry, library = _published(tmp_path)
    if os.getuid() == 0:
        os.chown(library, 65534, 65534)  # nobody
    else:  # files this user owns, seen by a process of another user
        real = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: real + 1)
    loaded = []
    with pytest.raises(build_cache.CacheError) as info:
        build_cache.obtain(entry, "_C.so", loaded.append, _builder([]))
    assert loaded == []
    msg = str(info.value)
    assert "is owned by uid" in msg and "not by you" in msg and "SVI_KERNELS_CACHE_DIR" in msg, msg


def test_holder_record_names_this_process(tmp_path):
    entry, seen = _entry(tmp_path), []

    def build(attempt):
        with open(os.path.join(entry, build_cache.LOCK)) as fh:
            seen.append(fh.read().split())
        return _builder([])(attempt)
    build_cache.obtain(entry, "_C.so", _read, build)
    pid, host, started = seen[0]
    assert int(pid) == os.getpid() and host == socket.gethostname() and abs(float(started) - time.time()) < 60


def test_unwritable_cache_place_says_so(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    calls = []
    with pytest.raises(build_cache.CacheError) as info:
        build_cache.obtain(str(tmp_path / "file" / "cache" / "tag"), "_C.so", _read, _builder(calls))
    assert calls == []
    msg = str(info.value)
    assert f"cannot create the cache directory {tmp_path / 'file' / 'cache'}" in msg and "SVI_KERNELS_CACHE_DIR" in msg
