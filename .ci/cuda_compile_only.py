"""The CUDA kernels compile for sm_90: the proof that fits on a small disk.

.ci/cuda_build_check.sh runs this when the disk cannot hold the CUDA build of torch with its
nvidia-* libraries (~5.4 GB). It needs only torch's headers (~63 MB, taken from the torch 2.14.1
wheel, whose other files are not unpacked) and nvcc:

1. every csrc/cuda/*.cu compiles to an object with nvcc, with the flags torch's CUDAExtension passes
   (COMMON_NVCC_FLAGS, read from the torch of the venv that runs this) plus ours (build_spec.py);
2. each object holds sm_90 code (cuobjdump, shipped in triton's wheel);
3. the objects register a CUDA kernel for every op (the TORCH_LIBRARY_IMPL initialiser for the CUDA
   key, and each op's name among the names passed to m.impl).

Not proved here, and said so: the link against libtorch_cuda, the import, and the dispatcher's view
of the registration. The full check (.ci/cuda_build_check.sh with room on disk) proves those.

Usage: python .ci/cuda_compile_only.py OUT_DIR TORCH_VERSION OP [OP ...]
"""
from __future__ import annotations

import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
ARCH = "-gencode=arch=compute_90,code=sm_90"


def say(msg: str) -> None:
    print(f"[cuda-build-check] {msg}", flush=True)


def fail(msg: str) -> None:
    sys.exit(f"[cuda-build-check] FAIL: {msg}")


def torch_headers(out: str, version: str) -> str:
    """torch/include of the torch ``version`` wheel, unpacked once under ``out``."""
    dest = os.path.join(out, f"torch-{version}-include")
    inc = os.path.join(dest, "torch", "include")
    if os.path.isdir(os.path.join(inc, "ATen")):
        return inc
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        # The wheel is copied from the machine's local index (pip's config), not unpacked.
        got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"torch=={version}",
                              "-d", tmp], capture_output=True, text=True)
        if got.returncode != 0:
            sys.stderr.write(got.stdout + got.stderr)
            fail(f"pip could not fetch the torch=={version} wheel for its headers")
        wheels = glob.glob(os.path.join(tmp, "torch-*.whl"))
        if len(wheels) != 1:
            fail(f"pip download torch=={version} gave {wheels}")
        shutil.rmtree(dest, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as whl:
            whl.extractall(dest, [n for n in whl.namelist() if n.startswith("torch/include/")])
    return inc


def cuobjdump() -> str:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        path = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    fail("no cuobjdump (neither on PATH nor in triton's wheel)")


def main() -> None:
    out, version, ops = sys.argv[1], sys.argv[2], sys.argv[3:]
    os.makedirs(out, exist_ok=True)
    from torch.utils import cpp_extension  # flags only: this torch may be a CPU build

    from svi_kernels.backends import build_spec as spec  # the checkout's (editable install)

    inc = torch_headers(out, version)
    cuda_home = os.environ["CUDA_HOME"]
    flags = [*cpp_extension.COMMON_NVCC_FLAGS, ARCH, "--compiler-options", "-fPIC",
             "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1",
             *spec.NVCC_FLAGS, spec.version_define(version),
             *(f"-I{d}" for d in (*spec.include_dirs(CSRC), inc, os.path.join(inc, "torch", "csrc", "api", "include"),
                                 os.path.join(cuda_home, "include"), sysconfig.get_paths()["include"]))]
    units = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    if not units:
        fail("no csrc/cuda/*.cu")
    objs = []
    for unit in units:
        obj = os.path.join(out, "obj", os.path.basename(unit) + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        run = subprocess.run(["nvcc", "-c", unit, "-o", obj, *flags], capture_output=True, text=True)
        if run.returncode != 0:
            sys.stderr.write(run.stdout + run.stderr)
            fail(f"nvcc could not compile {os.path.relpath(unit, ROOT)}")
        objs.append(obj)
        say(f"compiled {os.path.relpath(unit, ROOT)} for sm_90 against torch {version}'s headers")

    tool = cuobjdump()
    for obj in objs:
        elfs = subprocess.run([tool, "--list-elf", obj], capture_output=True, text=True).stdout
        if "sm_90" not in elfs:
            fail(f"{os.path.basename(obj)} holds no sm_90 code:\n{elfs}")
    say(f"cuobjdump: sm_90 code in all {len(objs)} object(s)")

    blobs = {obj: open(obj, "rb").read() for obj in objs}
    # TORCH_LIBRARY_IMPL(svi_kernels, CUDA, m) defines a static initialiser named after the namespace and key.
    impl = [o for o, b in blobs.items() if re.search(rb"TORCH_LIBRARY_IMPL_\w*svi_kernels_CUDA_", b)]
    if not impl:
        fail("no object holds a TORCH_LIBRARY_IMPL(svi_kernels, CUDA, ...) initialiser")
    missing = [op for op in ops if not any(b"\0" + op.encode() + b"\0" in blobs[o] for o in impl)]
    if missing:
        fail(f"no CUDA registration names these ops: {missing}")
    say(f"CUDA registrations name all {len(ops)} ops ({len(impl)} TORCH_LIBRARY_IMPL block(s))")


if __name__ == "__main__":
    main()
