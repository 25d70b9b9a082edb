"""Packaging: what the wheel must hold, and the torch version recorded in the built library."""
import glob
import os

import pytest
import torch

import svi_kernels
from svi_kernels.backends import build_spec, compiled, jit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_installed_where_ci_expects():
    """CI runs the suite against the wheel installed in a fresh venv and sets this variable: the
    package under test must come from there, not from the checkout."""
    prefix = os.environ.get("SVI_KERNELS_EXPECT_INSTALLED_IN")
    if not prefix:
        pytest.skip("SVI_KERNELS_EXPECT_INSTALLED_IN not set (only the CI stage for the wheel sets it)")
    assert os.path.realpath(svi_kernels.__file__).startswith(os.path.realpath(prefix)), svi_kernels.__file__


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages by name; a new subpackage left out would be missing from the wheel."""
    import tomllib

    path = os.path.join(ROOT, "pyproject.toml")
    if not os.path.isfile(path):
        pytest.skip("not a checkout")
    with open(path, "rb") as fh:
        tool = tomllib.load(fh)["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapped = {v: k for k, v in tool["package-dir"].items()}
    found = set()
    for top in ("svi_kernels", *mapped):
        for init in glob.glob(os.path.join(ROOT, top, "**", "*.py"), recursive=True):
            rel = os.path.relpath(os.path.dirname(init), ROOT).replace(os.sep, ".")
            head, _, rest = rel.partition(".")
            found.add(mapped.get(head, head) + ("." + rest if rest else ""))
    assert found - listed == set(), "packages missing from pyproject.toml [tool.setuptools] packages"


def test_sources_for_the_build_on_first_use_are_shipped():
    csrc = jit.source_dir()
    files = build_spec.source_files(csrc)
    for needed in ("ops_schema.cpp", os.path.join("cpu", "python_module.cpp"), os.path.join("cuda", "adam.cu"),
                   os.path.join("include", "svi_kernels", "update_math.h")):
        assert needed in files, needed
    assert all(os.path.isfile(p) for p in build_spec.sources(csrc, with_cuda=True))


@pytest.mark.skipif(not compiled.load()[0], reason="svi_kernels._C is not available")
def test_library_records_the_torch_it_was_built_for():
    import importlib.util
    import svi_kernels._C as C
    assert C.torch_version() == torch.__version__
    origin = getattr(C, "__file__", None) or importlib.util.find_spec("svi_kernels._C").origin
    assert build_spec.built_for(origin) == torch.__version__


def test_built_for_reads_the_marker_without_loading(tmp_path):
    lib = tmp_path / "lib.so"
    lib.write_bytes(b"\0" * 1000 + build_spec.MARKER + b"2.99.0+cu999;" + b"\0" * 10)
    assert build_spec.built_for(str(lib)) == "2.99.0+cu999"
    lib.write_bytes(b"\0" * 1000)
    assert build_spec.built_for(str(lib)) == ""


def test_library_for_another_torch_is_not_used(monkeypatch):
    monkeypatch.setattr(build_spec, "built_for", lambda path: "1.0.0")
    path, why = jit.installed_status()
    if why.startswith("svi_kernels._C is not installed"):
        pytest.skip(why)
    assert path is None and f"built for torch 1.0.0, this is torch {torch.__version__}" in why


def test_cache_dir_keyed_by_torch_flavour_and_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("SVI_KERNELS_CACHE_DIR", str(tmp_path))
    csrc = jit.source_dir()
    cpu, cuda = jit.build_dir(csrc, False), jit.build_dir(csrc, True)
    assert cpu.startswith(str(tmp_path)) and cpu != cuda
    assert torch.__version__.replace("+", "_") in cpu and "-cpu-" in cpu
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert jit.build_dir(csrc, False) != cpu
    monkeypatch.delenv("SVI_KERNELS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_root() == str(tmp_path / "xdg" / "svi_kernels" / "extensions")
