"""The int8-state CUDA kernel's work split, checked on the host (no GPU, no torch needed).

csrc/cuda/int8_tiles.h (which thread holds which elements and quantisation block, the shuffle
width, the warp group of the shared-memory step, which thread writes a block's scale) is plain C++.
tests/backends/cuda_int8_tiles_check.cpp replays int8_apply.cuh's phases thread by thread with the
real launch plan and compares codes, scales and params bit for bit with a per-tensor blockwise
reference (int8_state.h's codec, update_math.h's Adam formula), for every block size 32..4096, tails,
empty tensors, tensors continued across launches and more tensors than one launch holds.
The same check built against mutated copies of the header must fail, so it can catch a wrong split.
"""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
HEADER = os.path.join(ROOT, "csrc", "cuda", "int8_tiles.h")

# (what the mutation breaks, original text, mutated text)
MUTATIONS = [
    ("shuffle width", "group < 32 ? group : 32", "group < 16 ? group : 16"),
    ("warp group", "return warp - warp % (group / 32);", "return warp;"),
    ("scale writer", "return s.cnt > 0 && ", "return "),
    ("thread's elements", "s.off = tile + thread * kInt8PerThread;",
     "s.off = tile + thread * kInt8PerThread + (thread == 5);"),
]


def _build_and_run(tmp_path, cuda_dir):
    exe = tmp_path / "int8_tiles_check"
    subprocess.run(
        [CXX, "-std=c++20", "-O1", "-Wall", "-Werror", "-I", cuda_dir,
         "-I", os.path.join(ROOT, "csrc", "include"),
         os.path.join(HERE, "cuda_int8_tiles_check.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True)
    return subprocess.run([str(exe)], capture_output=True, text=True)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
def test_int8_tiles_match_blockwise_reference(tmp_path):
    run = _build_and_run(tmp_path, os.path.join(ROOT, "csrc", "cuda"))
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("OK:") and " 0 failures" in run.stdout, run.stdout


@pytest.mark.skipif(CXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("what,old,new", MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_check_catches_a_mutated_split(tmp_path, what, old, new):
    cuda_dir = tmp_path / "cuda"
    shutil.copytree(os.path.join(ROOT, "csrc", "cuda"), cuda_dir)
    text = open(HEADER).read()
    assert text.count(old) == 1, f"mutation '{what}' no longer applies to int8_tiles.h"
    (cuda_dir / "int8_tiles.h").write_text(text.replace(old, new))
    run = _build_and_run(tmp_path, str(cuda_dir))
    assert run.returncode != 0 and "OK:" not in run.stdout, f"mutated {what} passed: {run.stdout}"
