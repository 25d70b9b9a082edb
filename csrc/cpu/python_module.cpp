// The Python module svi_kernels._C. Importing it loads the library, which registers the ops
// (torch.ops.svi_kernels.*); cpu_isa() tells which instruction-set build the CPU kernels use.
#include <Python.h>

#include <cstddef>

#include "direct_calls.h"
#include "kernel_table.h"
#include "stream_policy.h"

// The torch version this library is built for (setup.py / svi_kernels/backends/jit.py pass it as
// -DSVI_KERNELS_TORCH_VERSION=<torch.__version__>). svi_kernels/backends/build_spec.py reads it from
// the file before loading it: a library built for another torch is rebuilt, not loaded.
#define SVI_KERNELS_STR2(x) #x
#define SVI_KERNELS_STR(x) SVI_KERNELS_STR2(x)
#ifndef SVI_KERNELS_TORCH_VERSION
#define SVI_KERNELS_TORCH_VERSION unknown
#endif
extern "C" __attribute__((used, visibility("default"))) const char svi_kernels_build_marker[] =
    "svi_kernels-built-for-torch=" SVI_KERNELS_STR(SVI_KERNELS_TORCH_VERSION) ";";

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(svi_kernels::cpu::cpu_kernels().isa);
}

// _stream_min_bytes() -> threshold; _stream_min_bytes(n) sets it to n and returns the old one.
PyObject* stream_min_bytes(PyObject*, PyObject* args) {
  long long bytes = -1;
  if (!PyArg_ParseTuple(args, "|L", &bytes)) return nullptr;
  if (bytes < 0) return PyLong_FromLongLong(svi_kernels::cpu::stream_min_bytes());
  return PyLong_FromLongLong(svi_kernels::cpu::set_stream_min_bytes(bytes));
}

PyObject* torch_version(PyObject*, PyObject*) {
  constexpr std::size_t prefix = sizeof("svi_kernels-built-for-torch=") - 1;
  const std::size_t n = sizeof(svi_kernels_build_marker) - 1 - prefix - 1;  // without the ';'
  return PyUnicode_FromStringAndSize(svi_kernels_build_marker + prefix, static_cast<Py_ssize_t>(n));
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'default' (ATEN_CPU_CAPABILITY lowers it)."},
    {"_stream_min_bytes", stream_min_bytes, METH_VARARGS,
     "Bytes a line-search call must touch before its write-only outputs use streaming stores "
     "(csrc/cpu/stream_policy.h); with an argument, sets it and returns the old value (for tests)."},
    {"torch_version", torch_version, METH_NOARGS, "The torch version this library was built for."},
    {"_adam_step", svi_kernels::cpu::direct_adam_step, METH_VARARGS,
     "adam_step on plain CPU tensors without torch.ops; NotImplemented when torch.ops must run it."},
    {"_sgd_momentum_step", svi_kernels::cpu::direct_sgd_momentum_step, METH_VARARGS,
     "sgd_momentum_step on plain CPU tensors without torch.ops; NotImplemented when torch.ops must run it."},
    {"_ls_save_sgd", svi_kernels::cpu::direct_ls_save_sgd, METH_VARARGS, "ls_save_sgd, as _adam_step."},
    {"_ls_save_adam", svi_kernels::cpu::direct_ls_save_adam, METH_VARARGS, "ls_save_adam, as _adam_step."},
    {"_ls_trial_sgd", svi_kernels::cpu::direct_ls_trial_sgd, METH_VARARGS, "ls_trial_sgd, as _adam_step."},
    {"_ls_trial_adam", svi_kernels::cpu::direct_ls_trial_adam, METH_VARARGS, "ls_trial_adam, as _adam_step."},
    {"_ls_final_adam", svi_kernels::cpu::direct_ls_final_adam, METH_VARARGS, "ls_final_adam, as _adam_step."},
    {"_ls_final_adam_from_trial", svi_kernels::cpu::direct_ls_final_adam_from_trial, METH_VARARGS,
     "ls_final_adam_from_trial, as _adam_step."},
    {"_increment_steps", svi_kernels::cpu::direct_increment_steps, METH_VARARGS, "increment_steps, as _adam_step."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of svi_kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
