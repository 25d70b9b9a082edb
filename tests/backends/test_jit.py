"""The build on first use (svi_kernels/backends/jit.py), without compiling: each case runs in a fresh
process (the ops register once per process) with the installed library hidden. A real build runs
in CI (.ci/run, "JIT"): it takes minutes."""
import os
import subprocess
import sys
import textwrap

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
    shutil.copy(importlib.util.find_spec("svi_kernels._C").origin, os.path.join(directory, "_C.so"))
    open(os.path.join(directory, jit.DONE), "w").close()
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
