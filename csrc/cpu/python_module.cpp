// The Python module svi_kernels._C. Importing it loads the library, which registers the ops
// (torch.ops.svi_kernels.*); cpu_isa() tells which instruction-set build the CPU kernels use.
#include <Python.h>

#include "kernel_table.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(svi_kernels::cpu::cpu_kernels().isa);
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS,
     "Instruction set of the CPU kernels in use: 'avx512', 'avx2' or 'default' (ATEN_CPU_CAPABILITY lowers it)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "Compiled kernels of svi_kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
