#!/usr/bin/env bash
# What a session lent a GPU machine runs there (CI has no GPU and never runs this).
#
# Builds the extension in place with its CUDA kernels, then runs the test suite with the real GPU
# (CUDA kernels, Triton compiled rather than interpreted, CUDA-graph capture, GradScaler("cuda"))
# and the microbenchmark on the GPU. Uses the machine's own python3 (it already has torch with
# CUDA, triton, pytest, hypothesis, transformers): nothing is downloaded.
#
# Usage: bash .ci/gpu_session.sh OUTDIR [build|test|bench ...]   (default: build test bench)
#   SVI_GPU_PYTEST_ARGS   extra pytest arguments (e.g. a test selection)
#   SVI_GPU_BENCH_ARGS    extra svi-bench arguments
#   SVI_GPU_BENCH_WORKLOADS  svi-bench workloads (default: minilm,many-small,huge,host-10k; host-10k,
#                         10,000 tensors of 64 elements, measures the host work per step)
# Logs and results land in OUTDIR: build.log, pytest.log, junit.xml, bench.log/json/png.
set -uo pipefail

OUTDIR="${1:?usage: gpu_session.sh OUTDIR [build|test|bench ...]}"
shift
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build test bench)
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
unset TRITON_INTERPRET
rc=0

for step in "${steps[@]}"; do
  case "$step" in
    build)
      t0=$(date +%s)
      "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))' \
        | tee "$OUTDIR/build.log"
      SVI_KERNELS_FORCE_CUDA=1 "$PY" setup.py -q build_ext --inplace >>"$OUTDIR/build.log" 2>&1 \
        || { echo "BUILD FAILED"; tail -40 "$OUTDIR/build.log"; exit 1; }
      "$PY" -c 'import svi_kernels as sk; print(sk.backends())' | tee -a "$OUTDIR/build.log"
      echo "build: $(( $(date +%s) - t0 )) s"
      ;;
    test)
      # shellcheck disable=SC2086
      "$PY" -m pytest -q -p no:cacheprovider --timeout 300 -rfEs --junitxml "$OUTDIR/junit.xml" \
        ${SVI_GPU_PYTEST_ARGS:-tests} >"$OUTDIR/pytest.log" 2>&1 || rc=1
      grep -E "^(FAILED|ERROR)" "$OUTDIR/pytest.log" | head -60
      tail -3 "$OUTDIR/pytest.log"
      ;;
    bench)
      # shellcheck disable=SC2086
      "$PY" -m svi_kernels.bench --device cuda --no-progress --json "$OUTDIR/bench.json" \
        --workload "${SVI_GPU_BENCH_WORKLOADS:-minilm,many-small,huge,host-10k}" \
        --plot "$OUTDIR/bench.png" --markdown "$OUTDIR/bench.md" ${SVI_GPU_BENCH_ARGS:-} \
        >"$OUTDIR/bench.log" 2>&1 || rc=1
      cat "$OUTDIR/bench.log" | tail -80
      ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
exit $rc
