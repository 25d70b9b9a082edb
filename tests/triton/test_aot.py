"""Every Triton kernel of the package compiles ahead of time to PTX for sm_90 (no GPU needed).

Runs ``python -m svi_kernels.triton.aot`` in a fresh process without TRITON_INTERPRET: kernels
defined under the interpreter cannot be compiled.
"""
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _has_cuda_compiler() -> bool:
    try:
        from triton.backends import backends
    except Exception:
        return False
    return "nvidia" in backends


@pytest.mark.skipif(not _has_cuda_compiler(), reason="this triton build has no CUDA (nvidia) backend")
def test_every_kernel_compiles_to_sm90_ptx(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # a real compile, not a cache hit
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "svi_kernels.triton.aot", "--keep", str(tmp_path / "ptx")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert lines and all(line.startswith("ok") for line in lines), report
    compiled = {line.split()[1].split("[")[0] for line in lines}
    assert compiled == {"adam_step_kernel", "sgd_momentum_step_kernel", "adam_step_tensor_kernel",
                        "sgd_momentum_step_tensor_kernel", "ls_save_sgd_kernel", "ls_save_adam_kernel",
                        "ls_trial_sgd_kernel", "ls_trial_adam_kernel", "ls_final_adam_kernel",
                        "ls_final_adam_from_trial_kernel", "act_backward_kernel"}, report
    for dtype in ("fp32", "fp16", "bf16"):
        assert any(f"[{dtype}" in line for line in lines), dtype
    # The update kernels keep the header's rounding: IEEE sqrt/div, no FMA contraction, and the
    # 16-byte-aligned full blocks load with 128-bit vectors.
    ptx = (tmp_path / "ptx" / "adam_step_kernel.fp32,decoupled=True,wd=0.01,maximize=False.ptx").read_text()
    assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    assert "sqrt.approx" not in ptx and "div.full" not in ptx and "fma." not in ptx
    assert "ld.global.v4" in ptx and ".target sm_90" in ptx
    # int8 state (issue 24 phase 2): every state kernel compiles with int8 codes at the smallest, default and
    # largest block size, and its codec keeps IEEE sqrt/div and no FMA (bit-exact codes with the reference)
    int8 = [line for line in lines if "state=int8" in line]
    for kernel in ("adam_step_kernel", "adam_step_tensor_kernel", "sgd_momentum_step_kernel",
                   "sgd_momentum_step_tensor_kernel", "ls_save_adam_kernel", "ls_trial_adam_kernel",
                   "ls_final_adam_kernel", "ls_final_adam_from_trial_kernel"):
        for block in (32, 256, 4096):
            assert any(f"{kernel}[fp32,state=int8,block={block}]" in line for line in int8), (kernel, block, report)
    for block in (32, 256, 4096):
        ptx = (tmp_path / "ptx" / f"adam_step_kernel.fp32,state=int8,block={block}.ptx").read_text()
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx, block
        assert "sqrt.approx" not in ptx and "div.full" not in ptx and "fma." not in ptx, block
