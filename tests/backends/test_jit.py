"""The build on first use (svi_kernels/backends/jit.py and its cache, build_cache.py): each case runs in
fresh processes (the ops register once per process) with the installed library hidden. The compile of the
real kernels is replaced by a copy of the installed library (a real build takes minutes: CI runs one in
.ci/wheel_check.sh), or made on a tiny source tree; the lock, the rename and the checks are the real ones."""
import glob
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from svi_kernels.backends import compiled

pytestmark = pytest.mark.skipif(not compiled.load()[0], reason="needs the compiled library to copy")

# Hides the installed svi_kernels._C, and makes any compile attempt fail loudly.
PRELUDE = textwrap.dedent("""
    import sys, warnings, torch
    from svi_kernels.backends import jit
    jit.installed_status = lambda: (None, "svi_kernels._C hidden by the test")
    def no_build(*args, **kwargs):
        print("BUILD CALLED", flush=True)
        raise RuntimeError("Error building extension '_C': c++ not found")
    import torch.utils.cpp_extension as cpp_extension
    cpp_extension.load = no_build
    import svi_kernels as sk
""")


def _run(script, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k != "SVI_KERNELS_NO_JIT"}
    full.update(SVI_KERNELS_CACHE_DIR=str(tmp_path / "cache"), **env)
    return subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(script)], env=full, capture_output=True,
                          text=True, timeout=120)


def test_cached_library_reused_without_building(tmp_path, monkeypatch):
    """A complete cache entry for this torch is imported as is: no compiler call, no message."""
    import importlib.util
    import shutil

    from svi_kernels.backends import jit
    monkeypatch.setenv("SVI_KERNELS_CACHE_DIR", str(tmp_path / "cache"))
    directory = jit.build_dir(jit.source_dir(), jit._want_cuda())
    os.makedirs(directory)
    shutil.copy(importlib.util.find_spec("svi_kernels._C").origin, os.path.join(directory, jit.LIBRARY))
    out = _run("""
        ok, why = sk.backends()["cpu"]["available"], sk.backends()["cpu"]["reason"]
        assert ok and "compiled on first use" in why, why
        import svi_kernels._C as C
        assert C.torch_version() == torch.__version__
        p = [torch.nn.Parameter(torch.randn(37, dtype=torch.float64)) for _ in range(3)]
        q = [torch.nn.Parameter(t.detach().clone()) for t in p]
        for a, b in zip(p, q):
            a.grad = torch.randn_like(a); b.grad = a.grad.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sk.AdamW(p, lr=0.1).step()
        sk.AdamW(q, lr=0.1, backend="reference").step()
        for a, b in zip(p, q):
            torch.testing.assert_close(a, b)
        print("OK")
    """, tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout + out.stderr
    assert "compiling" not in out.stderr, out.stderr


def test_failed_build_says_why_and_reference_warns_once(tmp_path):
    out = _run("""
        st = sk.backends()["cpu"]
        assert not st["available"]
        assert "compiling it on first use failed" in st["reason"] and "C++ compiler" in st["reason"], st["reason"]
        p = torch.nn.Parameter(torch.randn(5))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = sk.AdamW([p], lr=0.1)
            for _ in range(3):
                p.grad = torch.randn(5)
                opt.step()
        msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(msgs) == 1, msgs
        assert "'reference' backend for cpu tensors" in msgs[0] and "To fix" in msgs[0], msgs[0]
        try:
            sk.AdamW([p], backend="cpu")
        except RuntimeError as exc:
            assert "backend 'cpu' is not available" in str(exc), exc
        else:
            raise AssertionError("backend='cpu' accepted without a library")
        print("OK")
    """, tmp_path)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    assert out.stdout.count("BUILD CALLED") == 1, out.stdout  # tried once per process, not per step
    assert "compiling the CPU kernels for torch" in out.stderr, out.stderr


def test_no_jit_env_turns_the_build_off(tmp_path):
    out = _run("""
        st = sk.backends()["cpu"]
        assert not st["available"] and "SVI_KERNELS_NO_JIT=1" in st["reason"], st["reason"]
        print("OK")
    """, tmp_path, SVI_KERNELS_NO_JIT="1")
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stdout + out.stderr
    assert "BUILD CALLED" not in out.stdout and "compiling" not in out.stderr


# The compile replaced by a copy of the installed library, written in two halves BUILD_S seconds apart
# (a process that loaded from the build directory could see half of it); each build appends its pid to
# BUILD_LOG. Then the step is checked against the reference backend on the library it loaded.
FAKE_BUILD = textwrap.dedent("""
    import os, sys, time, warnings, torch
    from svi_kernels.backends import jit
    jit.installed_status = lambda: (None, "svi_kernels._C hidden by the test")
    def fake_compile(attempt, csrc, with_cuda):
        open(os.path.join(attempt, "lock"), "w").close()  # torch's baton, as a killed build leaves it
        with open(os.environ["BUILD_LOG"], "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        with open(os.environ["INSTALLED_LIB"], "rb") as fh:
            data = fh.read()
        path = os.path.join(attempt, "_C.so")
        with open(path, "wb") as out:
            out.write(data[: len(data) // 2]); out.flush()
            time.sleep(float(os.environ["BUILD_S"]))
            out.write(data[len(data) // 2:])
        return jit._import_from(path)
    jit._compile = fake_compile
    import svi_kernels as sk
    st = sk.backends()["cpu"]
    assert st["available"] and "compiled on first use" in st["reason"], st["reason"]
    import svi_kernels._C as C
    p = torch.nn.Parameter(torch.randn(37, dtype=torch.float64)); p.grad = torch.randn_like(p)
    q = torch.nn.Parameter(p.detach().clone()); q.grad = p.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.AdamW([p], lr=0.1).step()
    sk.AdamW([q], lr=0.1, backend="reference").step()
    torch.testing.assert_close(p, q)
    print("LOADED", C.__file__, flush=True)
""")


def _installed_library():
    import importlib.util
    return importlib.util.find_spec("svi_kernels._C").origin


def _start(tmp_path, tag, build_s):
    env = {k: v for k, v in os.environ.items() if k != "SVI_KERNELS_NO_JIT"}
    env.update(SVI_KERNELS_CACHE_DIR=str(tmp_path / "cache"), BUILD_LOG=str(tmp_path / "builds.log"),
               INSTALLED_LIB=_installed_library(), BUILD_S=str(build_s), SVI_KERNELS_BUILD_TIMEOUT="300")
    err = open(tmp_path / f"{tag}.err", "w")
    proc = subprocess.Popen([sys.executable, "-c", FAKE_BUILD], env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    proc.err_path = tmp_path / f"{tag}.err"
    return proc


def _finish(proc, timeout=180):
    out, _ = proc.communicate(timeout=timeout)
    err = proc.err_path.read_text()
    assert proc.returncode == 0 and out.startswith("LOADED "), out + err
    return out.split()[1], err


def _builders(tmp_path):
    path = tmp_path / "builds.log"
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _wait_for(condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.parametrize("next_starts", ["while it builds", "after the kill"])
def test_build_killed_with_sigkill_is_taken_over(tmp_path, next_starts):
    """kill -9 during the build (an OOM kill, a pre-emption): the next process, whether it was already waiting
    or starts later, says the last build did not finish, builds, and loads a working library; no hang."""
    first = _start(tmp_path, "first", build_s=600)
    try:
        _wait_for(lambda: _builders(tmp_path) == [first.pid], "the first process to start its build")
        (entry,) = glob.glob(str(tmp_path / "cache" / "*"))
        assert glob.glob(os.path.join(entry, "build-*", "lock")), "no baton in the build: nothing tested"
        if next_starts == "while it builds":
            second = _start(tmp_path, "second", build_s=0.5)
            _wait_for(lambda: f"waiting for pid {first.pid} on host" in second.err_path.read_text(),
                      "the second process to report the first one's build")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        if next_starts == "after the kill":
            second = _start(tmp_path, "second", build_s=0.5)
        library, err = _finish(second)
    finally:
        first.kill()
    assert first.returncode == -signal.SIGKILL
    assert f"(pid {first.pid} on host" in err and "did not finish: its process is gone; building again" in err, err
    assert _builders(tmp_path) == [first.pid, second.pid]
    assert library == os.path.join(entry, "_C.so")
    assert sorted(os.listdir(entry)) == ["_C.so", "build.lock"]  # the dead attempt and its baton are gone
    library_again, err = _finish(_start(tmp_path, "third", build_s=0.5))
    assert library_again == library and "compiling" not in err and _builders(tmp_path) == [first.pid, second.pid]


def test_three_processes_on_an_empty_cache_build_once(tmp_path):
    """As torchrun starts ranks: one builds, the others wait and load the same library, none a half-written one."""
    procs = [_start(tmp_path, f"rank{i}", build_s=3) for i in range(3)]
    try:
        results = [_finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    (builder,) = _builders(tmp_path)
    assert builder in [p.pid for p in procs]
    libraries = {library for library, _ in results}
    assert len(libraries) == 1, libraries
    (entry,) = glob.glob(str(tmp_path / "cache" / "*"))
    assert libraries == {os.path.join(entry, "_C.so")}
    with open(_installed_library(), "rb") as a, open(os.path.join(entry, "_C.so"), "rb") as b:
        assert a.read() == b.read()
    assert sum("compiling the CPU kernels" in err for _, err in results) == 1
    assert sorted(os.listdir(entry)) == ["_C.so", "build.lock"]


def test_planted_library_in_a_world_writable_cache_is_refused(tmp_path, monkeypatch):
    """A library someone else could have put there is not loaded: the reason names the place and the fix."""
    import shutil

    from svi_kernels.backends import jit
    root = tmp_path / "cache"
    monkeypatch.setenv("SVI_KERNELS_CACHE_DIR", str(root))
    entry = jit.build_dir(jit.source_dir(), jit._want_cuda())
    os.makedirs(entry)
    shutil.copy(_installed_library(), os.path.join(entry, "_C.so"))
    os.chmod(root, 0o777)
    out = _run("""
        st = sk.backends()["cpu"]
        assert not st["available"], st
        assert "svi_kernels._C" not in sys.modules and not hasattr(sk, "_C")
        print(st["reason"])
    """, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "BUILD CALLED" not in out.stdout
    reason = out.stdout.strip()
    assert f"refusing to load the compiled kernels from {root}:" in reason and "world-writable" in reason, reason
    assert f"`chmod go-w {root}`" in reason and "SVI_KERNELS_CACHE_DIR" in reason, reason


def test_real_build_of_a_tiny_source_tree(tmp_path):
    """The real compile path (torch's ninja build in the attempt directory, the rename, the import), on a
    one-function module instead of the kernels (seconds instead of minutes)."""
    from torch.utils import cpp_extension
    if not cpp_extension.is_ninja_available():
        pytest.skip("ninja is not installed")
    csrc = tmp_path / "csrc"
    (csrc / "cpu").mkdir(parents=True)
    (csrc / "ops_schema.cpp").write_text(textwrap.dedent("""
        #include <Python.h>
        static PyObject* answer(PyObject*, PyObject*) { return PyLong_FromLong(42); }
        static PyMethodDef methods[] = {{"answer", answer, METH_NOARGS, nullptr}, {nullptr, nullptr, 0, nullptr}};
        static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
        PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
    """))
    script = textwrap.dedent(f"""
        import os, sys
        from svi_kernels.backends import jit
        jit.installed_status = lambda: (None, "svi_kernels._C hidden by the test")
        jit.source_dir = lambda: {str(csrc)!r}
        import svi_kernels
        print(jit.load())
        import svi_kernels._C as C
        assert C.answer() == 42
        print("FILE", C.__file__)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SVI_KERNELS_NO_JIT"}
    env.update(SVI_KERNELS_CACHE_DIR=str(tmp_path / "cache"), MAX_JOBS="1")
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stdout + run.stderr
    (entry,) = glob.glob(str(tmp_path / "cache" / "*"))
    assert f"FILE {os.path.join(entry, '_C.so')}" in runs[0].stdout
    assert "compiling the CPU kernels" in runs[0].stderr and "compiled in" in runs[0].stderr, runs[0].stderr
    assert "compiling" not in runs[1].stderr, runs[1].stderr
    assert sorted(os.listdir(entry)) == ["_C.so", "build.lock"]
