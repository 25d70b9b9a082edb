"""The CUDA multi-tensor launch plan, checked on the host (no GPU, no torch needed).

csrc/cuda/launch_plan.h is plain C++, so this compiles tests/backends/cuda_launch_plan_check.cpp
with the system C++ compiler and runs it: every chunk of every tensor is visited exactly once
(zero-size tensors first/middle/last, empty lists, tensors spanning launches, >2^31 elements),
and every launch but the last is full.
"""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_launch_plan_covers_every_chunk_once(tmp_path):
    exe = tmp_path / "launch_plan_check"
    subprocess.run(
        [CXX, "-std=c++20", "-O1", "-Wall", "-Werror", "-I", os.path.join(ROOT, "csrc", "cuda"),
         os.path.join(HERE, "cuda_launch_plan_check.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all launch plans ok" in run.stdout
