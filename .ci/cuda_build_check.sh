#!/usr/bin/env bash
# Proves the CUDA kernels (csrc/cuda) compile and register, on a machine without a GPU.
#
# Full check (when .venv-cuda exists or the disk has room for it):
# 1. A separate venv .venv-cuda with the CUDA build of torch (2.14.1+cu130, matching nvcc 13.0;
#    ~5.4 GB with its nvidia-* libraries, created once and reused).
# 2. CUDA_HOME = the real toolkit root that nvcc reports (the nvcc on PATH may be a wrapper),
#    TORCH_CUDA_ARCH_LIST=9.0 (H100).
# 3. The real CUDAExtension build of setup.py (SVI_KERNELS_FORCE_CUDA=1) into build/cuda-check
#    (never in place, so the CPU-only svi_kernels/_C*.so of the main venv is left alone), then
#    import of the built module in that venv, a check that all 9 ops have a CUDA kernel, and a
#    check that the binary holds sm_90 code.
# Compile-only check (no venv and less than NEED_GB free on disk, as CI machines sometimes have, or
# the venv's install failed): .ci/cuda_compile_only.py compiles every .cu against torch 2.14.1's
# headers alone (~63 MB) and checks the sm_90 code and the CUDA registrations in the objects; it says
# what it did not prove (link, import). SVI_CUDA_CHECK=full or =compile-only forces a tier.
# Nothing here runs a kernel: there is no GPU. Exits non-zero on any failure.
#
# Usage: .ci/cuda_build_check.sh [--remove-venv]   (MAX_JOBS=N to change build parallelism; default 2)
#   --remove-venv: delete .venv-cuda at the end when this run created it (CI: later stages need the disk)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-cuda"
OUT="$ROOT/build/cuda-check"
TORCH_PIN="2.14.1"
NEED_GB="${SVI_CUDA_CHECK_NEED_GB:-8}"  # GB free: the venv (~5.4 GB), the build, room for the CI stages after it
OPS=(adam_step sgd_momentum_step adam_step_tensor sgd_momentum_step_tensor ls_save_sgd ls_save_adam ls_trial_sgd ls_trial_adam ls_final_adam ls_final_adam_from_trial)
t_start=$(date +%s)
REMOVE_VENV=0
case "${1:-}" in --remove-venv) REMOVE_VENV=1;; "") ;; *) echo "usage: $0 [--remove-venv]" >&2; exit 2;; esac

say() { echo "[cuda-build-check] $*"; }
die() { echo "[cuda-build-check] FAIL: $*" >&2; exit 1; }

command -v nvcc >/dev/null || die "nvcc not found on PATH"

toolchain() {  # CUDA_HOME = the real toolkit root (the nvcc on PATH may be a wrapper)
  local top
  top="$(nvcc --dryrun -c -x cu /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n1)"
  [ -n "$top" ] || die "could not read the CUDA root from 'nvcc --dryrun'"
  CUDA_HOME="$(cd "$top" && pwd -P)"
  export CUDA_HOME
  export PATH="$CUDA_HOME/bin:$PATH"
}
free_gb() { df -Pk "$ROOT" | awk 'NR==2 {print int($4 / 1048576)}'; }
compile_only() {
  say "COMPILE-ONLY: $1"
  say "COMPILE-ONLY: not proved in this run: the link against libtorch_cuda, the import, the dispatcher's registrations"
  toolchain
  local py="$ROOT/.venv/bin/python"
  [ -x "$py" ] || die "the compile-only check needs the main venv (.ci/setup): torch's nvcc flags, triton's cuobjdump"
  nice "$py" "$ROOT/.ci/cuda_compile_only.py" "$OUT/compile-only" "$TORCH_PIN" "${OPS[@]}" \
    || die "the compile-only check failed"
  say "OK (compile-only) in $(( $(date +%s) - t_start )) s (every .cu compiled for sm_90; nothing linked, imported or run)"
  exit 0
}

# ---- 1. venv with the CUDA torch (reused when it already has it), or the compile-only tier
venv_ok() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_PIN" <<'EOF' 2>/dev/null
import sys, torch, numpy, ninja, setuptools  # noqa: F401
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}
mode="${SVI_CUDA_CHECK:-auto}"
case "$mode" in auto|full|compile-only) ;; *) die "SVI_CUDA_CHECK must be auto, full or compile-only (got '$mode')";; esac
mkdir -p "$OUT"
[ "$mode" = compile-only ] && compile_only "SVI_CUDA_CHECK=compile-only"
created=0
if venv_ok; then
  say "reusing $VENV"
else
  free=$(free_gb)
  if [ "$mode" = auto ] && [ "$free" -lt "$NEED_GB" ]; then
    compile_only "$free GB free on disk; the CUDA build of torch needs $NEED_GB GB"
  fi
  say "creating $VENV (torch==$TORCH_PIN, CUDA build; mostly from local wheels, ~1 min; $free GB free)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  created=1
  { "$VENV/bin/pip" install -q --no-cache-dir "torch==$TORCH_PIN" numpy ninja setuptools wheel 2>&1 || true; } \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  if ! venv_ok; then
    rm -rf "$VENV"
    [ "$mode" = auto ] || die "torch==$TORCH_PIN with CUDA is not importable in $VENV"
    compile_only "the CUDA build of torch did not install ($(free_gb) GB free after removing the attempt)"
  fi
fi
if [ "$REMOVE_VENV" = 1 ] && [ "$created" = 1 ]; then
  trap 'rm -rf "$VENV"; say "removed $VENV (--remove-venv)"' EXIT
fi
PY="$VENV/bin/python"

# ---- 2. toolchain environment
toolchain
export PATH="$VENV/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="9.0"
export MAX_JOBS="${MAX_JOBS:-2}"
# cuBLAS/cuSPARSE/cuSOLVER headers come with torch's nvidia-* wheels, not with this toolkit;
# only ATen/cuda/CUDAContext.h needs them (our kernels do not include it), so this is a safety net.
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
for inc in "$site"/nvidia/cu13/include "$site"/nvidia/*/include; do
  [ -d "$inc" ] && export CPATH="$inc${CPATH:+:$CPATH}"
done
say "CUDA_HOME=$CUDA_HOME ($(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')), torch $("$PY" -c 'import torch; print(torch.__version__)')"

# ---- 3. build (incremental: build/cuda-check/temp keeps ninja's objects between runs)
log="$OUT/build.log"
say "building the CUDAExtension (log: ${log#$ROOT/})"
t_build=$(date +%s)
if ! (cd "$ROOT" && SVI_KERNELS_FORCE_CUDA=1 nice "$PY" setup.py build_ext \
        --build-lib "$OUT/lib" --build-temp "$OUT/temp" >"$log" 2>&1); then
  tail -n 60 "$log" >&2
  die "the CUDA build failed"
fi
grep -q "CUDA kernels ON" "$log" || die "setup.py did not enable the CUDA kernels"
so="$(ls "$OUT"/lib/svi_kernels/_C*.so 2>/dev/null | head -n1)"
[ -n "$so" ] || die "no svi_kernels/_C*.so under ${OUT#$ROOT/}/lib"
say "built ${so#$ROOT/} in $(( $(date +%s) - t_build )) s"

# ---- 4. sm_90 code in the binary. The toolkit here has no cuobjdump; triton's wheel ships one.
cuobjdump="$(command -v cuobjdump || true)"
[ -n "$cuobjdump" ] || cuobjdump="$(ls "$site"/triton/backends/nvidia/bin/cuobjdump 2>/dev/null | head -n1)"
[ -n "$cuobjdump" ] || die "no cuobjdump (neither in the toolkit nor in triton's wheel)"
elfs="$("$cuobjdump" --list-elf "$so")" || die "cuobjdump could not read $so"
n_sm90=$(grep -c "sm_90" <<<"$elfs" || true)
n_cu=$(ls "$ROOT"/csrc/cuda/*.cu | wc -l)
[ "$n_sm90" -ge "$n_cu" ] || die "expected an sm_90 cubin per .cu file ($n_cu), found $n_sm90:\n$elfs"
say "cuobjdump: $n_sm90 sm_90 cubin(s) for $n_cu .cu file(s)"
grep -q "code=sm_90" "$OUT/temp/build.ninja" && say "nvcc rule: $(grep -o -- '-gencode=arch=compute_90,code=sm_90' "$OUT/temp/build.ninja" | head -n1)"

# ---- 5. import and registration
"$PY" - "$so" "${OPS[@]}" <<'EOF' || die "import/registration check failed"
import importlib.util, sys
import torch

so, ops = sys.argv[1], sys.argv[2:]
spec = importlib.util.spec_from_file_location("svi_kernels._C", so)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)  # loads the library, which registers torch.ops.svi_kernels.*
missing = [op for op in ops
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"svi_kernels::{op}", "CUDA")]
no_cpu = [op for op in ops
          if not torch._C._dispatch_has_kernel_for_dispatch_key(f"svi_kernels::{op}", "CPU")]
print(f"[cuda-build-check] imported {so.rsplit('/', 1)[-1]}; CUDA kernels for {len(ops) - len(missing)}/{len(ops)} ops;"
      f" CPU kernels for {len(ops) - len(no_cpu)}/{len(ops)}; torch.cuda.is_available()={torch.cuda.is_available()}")
if missing:
    sys.exit(f"no CUDA kernel registered for: {missing}")
EOF

say "OK in $(( $(date +%s) - t_start )) s (compiled and registered for sm_90; nothing was run on a GPU)"
