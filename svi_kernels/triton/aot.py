"""Ahead-of-time proof that every Triton kernel of the package lowers to PTX for sm_90.

No GPU is needed: each op is called on small CPU tensors with launches *captured* instead of run
(runtime.capture), so the kernels are compiled with exactly the argument types and constexprs a
real call passes, via ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))``.
Each captured launch is then also compiled through ``triton.jit``'s own argument binder
(``kernel.run(..., warmup=True)``) with a stand-in driver that reports the target and launches
nothing: the same path ``kernel[grid](...)`` takes on a GPU, argument specialisation included.
Variants: fp32, fp16 and bf16 for every kernel (and every constexpr mode of Adam/SGD and of their
AMP / capturable tensor variants in fp32; AMSGrad in every dtype), every activation of the SVI backward,
and every kernel that touches optimizer state with the state in its other allowed dtypes (bf16 state
stochastically rounded from a seed) and as int8 codes with block scales (block size 256 in every dtype; 32 and
4096, the smallest and largest, in fp32).

    python -m svi_kernels.triton.aot [--arch 90] [--dtypes fp32,fp16,bf16] [--keep DIR]

prints one line per compiled variant and exits non-zero if any fails. Kernels defined under
TRITON_INTERPRET=1 are interpreter objects, so the CLI turns the interpreter off for itself.
"""
import os
import sys

if __name__ == "__main__":  # before triton is imported: compile real kernels, not interpreted ones
    os.environ["TRITON_INTERPRET"] = "0"

import argparse
import contextlib
import time
from typing import Dict, Iterable, List, Tuple

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "tanh", "sigmoid", "silu")


def _tensors(dtype, sizes=(5, 3000)):
    return [torch.rand(n, dtype=dtype) + 0.5 for n in sizes]


def _scenarios(dtype: torch.dtype, all_modes: bool) -> Iterable[Tuple[str, callable]]:
    """(label, call) pairs; each call runs one op and so records one launch."""
    from . import adam, line_search, sgd
    from .svi_backward_kernel import act_backward_triton
    L = lambda: _tensors(dtype)  # noqa: E731
    adam_modes = [(True, 0.01, False), (False, 0.01, False), (True, 0.0, False), (True, 0.01, True)]
    for decoupled, wd, maximize in adam_modes if all_modes else adam_modes[:1]:
        yield (f"decoupled={decoupled},wd={wd},maximize={maximize}",
               lambda d=decoupled, w=wd, mx=maximize: adam.adam_step(
                   L(), L(), L(), L(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=w, decoupled=d,
                   bias_correction1=0.1, bias_correction2_sqrt=0.05, maximize=mx))
    yield ("amsgrad", lambda: adam.adam_step(
        L(), L(), L(), L(), lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True,
        bias_correction1=0.1, bias_correction2_sqrt=0.05, max_exp_avg_sqs=L()))
    sgd_modes = [(True, 0.0, False), (False, 0.01, False), (True, 0.01, True)]
    for nesterov, wd, maximize in sgd_modes if all_modes else sgd_modes[:1]:
        yield (f"nesterov={nesterov},wd={wd},maximize={maximize}",
               lambda n=nesterov, w=wd, mx=maximize: sgd.sgd_momentum_step(
                   L(), L(), L(), lr=0.1, momentum=0.9, nesterov=n, weight_decay=w, maximize=mx))
    # AMP / capturable variants: (lr read from a tensor, loss scale + skip flag, bias correction)
    one = lambda: torch.ones((), dtype=torch.float32)  # noqa: E731
    steps = lambda: [torch.full((), 3.0) for _ in range(2)]  # noqa: E731
    tensor_modes = [(True, True, True), (False, False, True), (True, False, False)]
    for lr_tensor, amp, correct_bias in tensor_modes if all_modes else tensor_modes[:1]:
        yield (f"lr_tensor={lr_tensor},amp={amp},correct_bias={correct_bias}",
               lambda lt=lr_tensor, a=amp, cb=correct_bias: adam.adam_step_tensor(
                   L(), L(), L(), L(), steps(), lr=one() * 1e-3 if lt else 1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                   weight_decay=0.01, decoupled=True, correct_bias=cb, grad_scale=one() if a else None,
                   found_inf=one() * 0 if a else None))
    yield ("amsgrad,lr_tensor=True,amp=True", lambda: adam.adam_step_tensor(
        L(), L(), L(), L(), steps(), lr=one() * 1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01,
        decoupled=True, correct_bias=True, grad_scale=one(), found_inf=one() * 0, max_exp_avg_sqs=L()))
    for lr_tensor, amp, _ in tensor_modes[:2] if all_modes else tensor_modes[:1]:
        yield (f"lr_tensor={lr_tensor},amp={amp}",
               lambda lt=lr_tensor, a=amp: sgd.sgd_momentum_step_tensor(
                   L(), L(), L(), lr=one() * 0.1 if lt else 0.1, momentum=0.9, nesterov=True, weight_decay=0.0,
                   grad_scale=one() if a else None, found_inf=one() * 0 if a else None))
    for w0 in (True, False):
        yield f"w0={w0}", lambda w=w0: line_search.ls_save_sgd(L(), L(), L() if w else [])
    for w0, dirs in ((False, False), (True, False), (True, True)):
        yield f"w0={w0},dirs={dirs}", lambda w=w0, d=dirs: line_search.ls_save_adam(
            L(), L(), L(), L(), L() if w else [], L() if d else [], beta1=0.9, beta2=0.999, eps=1e-8,
            bias_correction2_sqrt=0.05)
    yield "", lambda: line_search.ls_trial_sgd(L(), L(), L(), [0.1, 0.2])
    yield "", lambda: line_search.ls_trial_adam(L(), L(), L(), L(), [0.1, 0.2], eps=1e-8, bias_correction2_sqrt=0.05)
    yield "", lambda: line_search.ls_final_adam(L(), L(), L(), L(), [0.1, 0.2], eps=1e-8, bias_correction1=0.1,
                                                bias_correction2_sqrt=0.05)
    yield "", lambda: line_search.ls_final_adam_from_trial(L(), L(), L(), L(), [0.1, 0.2], trial_eta=0.3, eps=1e-8,
                                                           bias_correction1=0.1, bias_correction2_sqrt=0.05)
    yield from _state_scenarios(dtype, L, one, steps)
    yield from _int8_scenarios(dtype, L, one, steps, (256, 32, 4096) if all_modes else (256,))
    for act in ACTIVATIONS:
        yield f"activation={act}", lambda a=act: act_backward_triton(_tensors(dtype, (3000,))[0],
                                                                      _tensors(dtype, (3000,))[0], a)


# The other state dtype each param dtype may have (issue 24), and whether its stores round stochastically.
STATE_VARIANTS = {torch.float32: [(torch.bfloat16, True)], torch.float16: [(torch.float32, False)],
                  torch.bfloat16: [(torch.float32, False), (torch.bfloat16, True)]}


def _state_scenarios(dtype, L, one, steps) -> Iterable[Tuple[str, callable]]:
    """Every kernel that reads or writes optimizer state, with the state in each other allowed dtype
    (bf16 stored with stochastic rounding from a seed)."""
    from . import adam, line_search, sgd
    for state_dtype, sr in STATE_VARIANTS.get(dtype, ()):
        S = lambda sd=state_dtype: _tensors(sd)  # noqa: E731
        seed = 12345 if sr else None
        label = f"state={str(state_dtype)[6:]}{',sr' if sr else ''}"
        adam_kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True, state_seed=seed)
        yield label, lambda: adam.adam_step(L(), L(), S(), S(), lr=1e-3, bias_correction1=0.1,
                                            bias_correction2_sqrt=0.05, max_exp_avg_sqs=S(), **adam_kw)
        yield label, lambda: adam.adam_step_tensor(L(), L(), S(), S(), steps(), lr=one() * 1e-3, correct_bias=True,
                                                   grad_scale=one(), found_inf=one() * 0, **adam_kw)
        sgd_kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, state_seed=seed)
        yield label, lambda: sgd.sgd_momentum_step(L(), L(), S(), **sgd_kw)
        yield label, lambda: sgd.sgd_momentum_step_tensor(L(), L(), S(), grad_scale=one(), found_inf=one() * 0,
                                                          **sgd_kw)
        yield label, lambda: line_search.ls_save_adam(L(), L(), S(), S(), L(), L(), beta1=0.9, beta2=0.999, eps=1e-8,
                                                      bias_correction2_sqrt=0.05, state_seed=seed)
        if state_dtype == dtype:  # the readers' kernels are the plain dtype's (no seed)
            continue
        label = f"state={str(state_dtype)[6:]}"
        yield label, lambda: line_search.ls_trial_adam(L(), L(), L(), S(), [0.1, 0.2], eps=1e-8,
                                                       bias_correction2_sqrt=0.05)
        yield label, lambda: line_search.ls_final_adam(L(), L(), S(), S(), [0.1, 0.2], eps=1e-8, bias_correction1=0.1,
                                                       bias_correction2_sqrt=0.05)
        yield label, lambda: line_search.ls_final_adam_from_trial(L(), L(), S(), S(), [0.1, 0.2], trial_eta=0.3,
                                                                  eps=1e-8, bias_correction1=0.1,
                                                                  bias_correction2_sqrt=0.05)


def _int8_scenarios(dtype, L, one, steps, block_sizes) -> Iterable[Tuple[str, callable]]:
    """Every kernel that reads or writes optimizer state, with int8 state (int8 m, uint8 v, float32 scales)."""
    from . import adam, line_search, sgd
    sizes = (5, 3000)
    for B in block_sizes:
        M = lambda: [torch.zeros(n, dtype=torch.int8) for n in sizes]  # noqa: E731
        V = lambda: [torch.zeros(n, dtype=torch.uint8) for n in sizes]  # noqa: E731
        S = lambda b=B: [torch.zeros(-(-n // b)) for n in sizes]  # noqa: E731
        mv = lambda b=B: dict(exp_avg_scales=S(b), exp_avg_sq_scales=S(b), block_size=b)  # noqa: E731
        label = f"state=int8,block={B}"
        adam_kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True)
        yield label, lambda b=B: adam.adam_step(L(), L(), M(), V(), lr=1e-3, bias_correction1=0.1,
                                                bias_correction2_sqrt=0.05, max_exp_avg_sqs=V(),
                                                max_exp_avg_sq_scales=S(b), **mv(b), **adam_kw)
        yield label, lambda b=B: adam.adam_step_tensor(L(), L(), M(), V(), steps(), lr=one() * 1e-3, correct_bias=True,
                                                       grad_scale=one(), found_inf=one() * 0, **mv(b), **adam_kw)
        sgd_kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0)
        yield label, lambda b=B: sgd.sgd_momentum_step(L(), L(), M(), momentum_buffer_scales=S(b), block_size=b,
                                                       **sgd_kw)
        yield label, lambda b=B: sgd.sgd_momentum_step_tensor(L(), L(), M(), grad_scale=one(), found_inf=one() * 0,
                                                              momentum_buffer_scales=S(b), block_size=b, **sgd_kw)
        yield label, lambda b=B: line_search.ls_save_adam(L(), L(), M(), V(), L(), L(), beta1=0.9, beta2=0.999,
                                                          eps=1e-8, bias_correction2_sqrt=0.05, **mv(b))
        yield label, lambda b=B: line_search.ls_trial_adam(L(), L(), L(), V(), [0.1, 0.2], eps=1e-8,
                                                           bias_correction2_sqrt=0.05, exp_avg_sq_scales=S(b),
                                                           block_size=b)
        yield label, lambda b=B: line_search.ls_final_adam(L(), L(), M(), V(), [0.1, 0.2], eps=1e-8,
                                                           bias_correction1=0.1, bias_correction2_sqrt=0.05, **mv(b))
        yield label, lambda b=B: line_search.ls_final_adam_from_trial(L(), L(), M(), V(), [0.1, 0.2], trial_eta=0.3,
                                                                      eps=1e-8, bias_correction1=0.1,
                                                                      bias_correction2_sqrt=0.05, **mv(b))


def _signature(kernel, args: tuple, constexprs: dict) -> Tuple[Dict[str, str], dict]:
    """Kernel argument types as the JIT would specialise them (annotations win, as in triton.jit)."""
    from triton.runtime.jit import mangle_type
    names = kernel.arg_names
    signature, values = {}, dict(zip(names, args))
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        elif param.annotation_type:
            signature[param.name] = param.annotation_type
        else:
            signature[param.name] = mangle_type(values[param.name])
    return signature, dict(constexprs)


class _TargetOnlyDriver:
    """What JITFunction.run asks of the driver before launching: a device, a stream, a target."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def _jit_binder_for(target, kernels):
    from triton.runtime import driver
    previous = driver._active  # reset_active() would probe for a GPU
    driver.set_active(_TargetOnlyDriver(target))
    try:
        yield
    finally:
        driver._active = previous
        for kernel in kernels:  # drop binders and kernels made for the stand-in target
            kernel.device_caches.clear()


def _compile_through_jit(kernel, args, constexprs, target, options):
    with _jit_binder_for(target, [kernel]):
        compiled = kernel.run(*args, grid=(1,), warmup=True, **constexprs, **options)
    if compiled is None or "ptx" not in compiled.asm:
        raise RuntimeError("triton.jit produced no PTX")
    return compiled


def all_kernel_names() -> List[str]:
    """Names of every @triton.jit kernel (launchable, not helper) defined in the package."""
    from . import adam, line_search, sgd, svi_backward_kernel
    names = []
    for mod in (adam, sgd, line_search, svi_backward_kernel):
        names += [name for name, obj in vars(mod).items() if name.endswith("_kernel") and hasattr(obj, "fn")]
    return sorted(names)


def compile_all(arch: int = 90, dtypes: Iterable[str] = ("fp32", "fp16", "bf16"), keep: str = None,
                out=sys.stdout) -> List[str]:
    """Compile every kernel variant to PTX for sm_<arch>; returns the failures (empty when all pass)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import runtime
    if runtime.interpreting():
        raise RuntimeError("kernels were defined under TRITON_INTERPRET=1; run `python -m svi_kernels.triton.aot` "
                           "in a process without it")
    target = GPUTarget("cuda", arch, 32)
    failures, compiled = [], set()
    for dtype_name in dtypes:
        for label, call in _scenarios(DTYPES[dtype_name], all_modes=(dtype_name == "fp32")):
            with runtime.capture() as launches:
                call()
            for kernel, args, constexprs in launches:
                name = f"{kernel.__name__}[{dtype_name}{',' + label if label else ''}]"
                start = time.perf_counter()
                try:
                    options = {"num_warps": runtime.NUM_WARPS, "enable_fp_fusion": False}
                    signature, consts = _signature(kernel, args, constexprs)
                    binary = triton.compile(ASTSource(kernel, signature, consts), target=target, options=options)
                    ptx = binary.asm["ptx"]
                    _compile_through_jit(kernel, args, constexprs, target, options)
                    if f".target sm_{arch}" not in ptx:
                        raise RuntimeError(f"PTX does not target sm_{arch}")
                    if keep:
                        os.makedirs(keep, exist_ok=True)
                        with open(os.path.join(keep, name.replace("[", ".").replace("]", "") + ".ptx"), "w") as f:
                            f.write(ptx)
                    compiled.add(kernel.__name__)
                    print(f"ok    {name:70s} sm_{arch} ptx {len(ptx):7d} B  "
                          f"{binary.metadata.num_warps} warps, also via triton.jit  {time.perf_counter() - start:5.2f} s", file=out)
                except Exception as exc:  # report every failure, not just the first
                    failures.append(name)
                    print(f"FAIL  {name:70s} {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          file=out)
    for missing in sorted(set(all_kernel_names()) - compiled):
        failures.append(missing)
        print(f"FAIL  {missing:70s} no scenario compiled it", file=out)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (sm_90), 80")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16", help="comma list of fp32,fp16,bf16,fp64")
    parser.add_argument("--keep", default=None, help="directory to write the PTX files to")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    failures = compile_all(args.arch, [d.strip() for d in args.dtypes.split(",") if d.strip()], args.keep)
    print(f"{'FAILED' if failures else 'passed'}: {len(failures)} failures, {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
