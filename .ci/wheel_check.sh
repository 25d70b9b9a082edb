#!/usr/bin/env bash
# The package as a user installs it, outside the checkout (CI stage "wheel" of .ci/run):
#
# 1. a wheel built from the checkout's files (tracked or not ignored; no build outputs) against the
#    CI venv's torch (CPU 2.13.0);
# 2. a fresh venv (not editable, outside the checkout) with torch==2.13.0 (pinned: the CPU wheel, not
#    a multi-GB CUDA build), the wheel and its test extras; the whole test suite runs from a copy of
#    tests/ there, where the checkout's svi_kernels/ is not importable, so a file missing from the
#    wheel fails; `sk.backends()["cpu"]["available"]` must hold without any build step;
# 3. the JIT path: the same install with its compiled library deleted builds it on first use (the
#    one-line message shown), passes the CPU parity tests, and a later process reuses the cache
#    without building.
#
# Usage: .ci/wheel_check.sh [WORKDIR]   (default: a new directory under /tmp, removed on success)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="${1:-$(mktemp -d /tmp/svi-wheel-check.XXXXXX)}"
mkdir -p "$W"
W="$(cd "$W" && pwd)"
t0=$(date +%s)
say() { echo "[wheel-check] $* ($(( $(date +%s) - t0 )) s)"; }
die() { echo "[wheel-check] FAIL: $*" >&2; exit 1; }
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
case "$W" in "$ROOT"|"$ROOT"/*) die "WORKDIR must be outside the checkout";; esac

# ---- 1. wheel from a copy of the checkout's own files
rm -rf "$W/src" "$W/dist"
mkdir -p "$W/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard -- . ':!:.venv' ':!:.venv-*' \
   | xargs -0 cp --parents -t "$W/src")
say "building the wheel (compiles svi_kernels._C against torch $("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__)'))"
(cd "$W/src" && MAX_JOBS="${MAX_JOBS:-2}" nice "$ROOT/.venv/bin/pip" wheel -q --no-build-isolation --no-deps \
   -w "$W/dist" . 2>&1 | quiet)
whl="$(ls "$W"/dist/svi_kernels-*.whl)"
say "built $(basename "$whl")"
"$ROOT/.venv/bin/python" - "$whl" <<'EOF' || die "the wheel lacks files"
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["svi_kernels/backends/jit.py", "svi_kernels/_csrc/ops_schema.cpp", "svi_kernels/_csrc/include/svi_kernels/update_math.h",
        "svi_kernels/_csrc/cuda/adam.cu", "svi_kernels/_benchmarks/microbench.py"]
missing = [n for n in need if n not in names]
missing += [] if any(n.startswith("svi_kernels/_C.") and n.endswith(".so") for n in names) else ["svi_kernels/_C*.so"]
sys.exit(f"missing from the wheel: {missing}" if missing else 0)
EOF

# ---- 2. fresh venv with the wheel; the suite against the installed package
rm -rf "$W/venv" "$W/t"
python3 -m venv "$W/venv"
VPY="$W/venv/bin/python"
say "installing torch==2.13.0 and the wheel with its test extras into a fresh venv"
"$W/venv/bin/pip" install -q --no-compile --disable-pip-version-check torch==2.13.0 "$whl[test,bench]" 2>&1 | quiet
mkdir -p "$W/t"
cp -r "$ROOT/tests" "$ROOT/csrc" "$W/t/"  # csrc/: tests/backends/test_cuda_launch_plan.py compiles a header check
cd "$W/t"
"$VPY" - "$W/venv" <<'EOF' || die "the installed wheel does not work without a build step"
import os, sys
import svi_kernels as sk
assert os.path.realpath(sk.__file__).startswith(os.path.realpath(sys.argv[1])), sk.__file__
st = sk.backends()["cpu"]
assert st["available"] and st["reason"] == "compiled extension svi_kernels._C", st
print(f"[wheel-check] installed at {os.path.dirname(sk.__file__)}; cpu backend: {st['reason']}")
EOF
say "the test suite against the installed wheel"
SVI_KERNELS_EXPECT_INSTALLED_IN="$W/venv" SVI_KERNELS_NO_JIT=1 "$VPY" -m pytest -q -p no:cacheprovider tests

# ---- 3. the JIT path: the extension removed, built on first use, then reused
site="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])')"
rm -f "$site"/svi_kernels/_C.*.so
export SVI_KERNELS_CACHE_DIR="$W/jit-cache"
rm -rf "$SVI_KERNELS_CACHE_DIR"
STEP='import torch, svi_kernels as sk
p = torch.nn.Parameter(torch.randn(1000)); p.grad = torch.randn(1000)
sk.AdamW([p], lr=1e-3).step()
st = sk.backends()["cpu"]
assert st["available"] and "compiled on first use" in st["reason"], st
print(st["reason"])'
say "JIT: first sk.AdamW(...).step() without the compiled library (builds it)"
MAX_JOBS="${MAX_JOBS:-2}" nice "$VPY" -W error::RuntimeWarning -c "$STEP" 2>"$W/jit-first.err" \
  || { cat "$W/jit-first.err" >&2; die "the first step did not build the extension"; }
cat "$W/jit-first.err"
grep -q "svi_kernels: .*compiling the CPU kernels for torch" "$W/jit-first.err" || die "no build message on first use"
say "JIT: a later process reuses the cache"
t1=$(date +%s)
"$VPY" -W error::RuntimeWarning -c "$STEP" 2>"$W/jit-second.err" || { cat "$W/jit-second.err" >&2; die "second process failed"; }
! grep -q "compiling" "$W/jit-second.err" || die "the second process compiled again: $(cat "$W/jit-second.err")"
[ $(( $(date +%s) - t1 )) -lt 60 ] || die "the second process took $(( $(date +%s) - t1 )) s"
say "JIT: the CPU parity tests on the library built on first use"
out="$(SVI_KERNELS_NO_JIT=1 "$VPY" -m pytest -q -rs -p no:cacheprovider tests/backends/test_ops_parity.py \
       tests/backends/test_tensor_scalar_ops.py -k cpu 2>&1)" || { echo "$out"; die "parity tests failed on the JIT-built library"; }
echo "$out" | tail -n 3
! grep -q "SKIPPED.*cpu: " <<<"$out" || die "CPU parity tests were skipped: the cached library was not found"

cd /
[ $# -ge 1 ] || rm -rf "$W"
say "wheel check done"
