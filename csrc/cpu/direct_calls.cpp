// Direct calls of the CPU step ops from Python (svi_kernels._C._adam_step / _sgd_momentum_step),
// for the eager CPU path only.
//
// Why: through torch.ops, every tensor of every list goes through pybind11's tensor caster, a
// Python list -> IValue list -> std::vector<at::Tensor> copy, a refcount pair and the autograd
// fallback's requires_grad scan: on 4 lists of 10,000 small tensors that is about half of an
// AdamW step (docs/benchmarks.md). Here the tensors are borrowed from the Python lists (no
// refcounts) and the same kernel function is called. Anything the dispatcher would treat
// specially returns NotImplemented, and the caller (svi_kernels/backends/compiled.py) goes
// through torch.ops instead: grad mode on, a tensor that is not a plain dense CPU tensor
// (subclass, wrapper, conj/neg view, other device: any dispatch key a torch.empty(1) lacks),
// thread-local dispatch keys (dispatch modes, functorch), profiler callbacks, and calls of more
// than kMaxDirectElems elements per list: those are bandwidth-bound, so the dispatcher's cost does
// not matter there, and torch.ops releases the GIL for them. The direct call keeps the GIL (the
// tensors are borrowed, so the lists must not change under it), which for a host-bound call of a
// few milliseconds is what a Python-side loop would do too.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/record_function.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/util/MaybeOwned.h>
#include <torch/csrc/autograd/python_variable.h>

#include <optional>
#include <vector>

#include "direct_calls.h"
#include "ops.h"
#include "svi_kernels/int8_state.h"

namespace svi_kernels::cpu {

namespace {

constexpr int64_t kMaxDirectElems = int64_t{1} << 22;

// The direct calls take float state only: int8 state (its scales lists) goes through torch.ops.
const std::optional<at::TensorList> kNoScales;

// The dispatch keys of a plain dense CPU tensor (requires_grad or not).
c10::DispatchKeySet plain_cpu_keys() {
  static const c10::DispatchKeySet keys = at::empty({1}).unsafeGetTensorImpl()->key_set();
  return keys;
}

bool dispatcher_needed() {
  if (c10::GradMode::is_enabled() || at::hasCallbacks()) return true;
  // Every thread includes these two by default; a dispatch mode or functorch adds others.
  static const c10::DispatchKeySet usual({c10::DispatchKey::BackendSelect, c10::DispatchKey::ADInplaceOrView});
  return !(c10::impl::tls_local_dispatch_key_set().included_ - usual).empty();
}

// Tensors borrowed from a Python list: at::Tensor handles that own no reference.
class BorrowedList {
 public:
  ~BorrowedList() {
    for (at::Tensor& t : tensors_) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }

  // False when obj is not a list or tuple of plain CPU tensors of at most kMaxDirectElems
  // elements in all (what was borrowed is given back by the destructor).
  bool borrow(PyObject* obj) {
    if (!PyList_CheckExact(obj) && !PyTuple_CheckExact(obj)) return false;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    tensors_.reserve(n);
    const c10::DispatchKeySet keys = plain_cpu_keys();
    int64_t elems = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (!THPVariable_Check(items[i])) return false;
      const at::Tensor& t = THPVariable_Unpack(items[i]);
      if (!t.defined() || t.unsafeGetTensorImpl()->key_set() != keys) return false;
      elems += t.unsafeGetTensorImpl()->numel();
      if (elems > kMaxDirectElems) return false;
      tensors_.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
    }
    return true;
  }

  at::TensorList list() const { return tensors_; }

 private:
  std::vector<at::Tensor> tensors_;
};

PyObject* not_implemented() { Py_RETURN_NOTIMPLEMENTED; }

// The RuntimeError torch.ops raises for the op's c10::Error (the ops raise no other kind): its
// message without the C++ backtrace.
void set_python_error(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  PyErr_SetString(PyExc_RuntimeError, c10_error != nullptr ? c10_error->what_without_backtrace() : e.what());
}

// The state_seed argument (None or an int; optional, None when left out); false when it is neither
// (torch.ops then takes the call).
bool read_seed(PyObject* obj, std::optional<int64_t>& seed) {
  if (obj == Py_None) return true;
  if (!PyLong_CheckExact(obj)) return false;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  seed = v;
  return true;
}

// The per-tensor step sizes of the line-search ops (a list of floats; compiled.py makes it one).
bool read_etas(PyObject* obj, std::vector<double>& etas) {
  if (!PyList_CheckExact(obj)) return false;
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  etas.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* e = PyList_GET_ITEM(obj, i);
    if (!PyFloat_CheckExact(e)) return false;
    etas[i] = PyFloat_AS_DOUBLE(e);
  }
  return true;
}

// Runs f, which returns the op's tensor, turning a C++ exception into a RuntimeError.
template <typename F>
PyObject* guarded_tensor(const F& f) {
  try {
    return THPVariable_Wrap(f());
  } catch (const std::exception& e) {
    set_python_error(e);
    return nullptr;
  }
}

// Runs f, turning a C++ exception into the Python RuntimeError torch.ops would raise.
template <typename F>
PyObject* guarded(const F& f) {
  try {
    f();
  } catch (const std::exception& e) {
    set_python_error(e);
    return nullptr;
  }
  Py_RETURN_NONE;
}

}  // namespace

PyObject* direct_adam_step(PyObject*, PyObject* args) {
  PyObject *p, *g, *m, *v, *maxv, *seed_obj = Py_None;
  double lr, beta1, beta2, eps, wd, bc1, bc2_sqrt;
  int decoupled, maximize;
  if (!PyArg_ParseTuple(args, "OOOOdddddpddpO|O", &p, &g, &m, &v, &lr, &beta1, &beta2, &eps, &wd, &decoupled, &bc1,
                        &bc2_sqrt, &maximize, &maxv, &seed_obj)) {
    return nullptr;
  }
  std::optional<int64_t> seed;
  if (dispatcher_needed() || !read_seed(seed_obj, seed)) return not_implemented();
  BorrowedList lp, lg, lm, lv, lmax;
  if (!lp.borrow(p) || !lg.borrow(g) || !lm.borrow(m) || !lv.borrow(v)) return not_implemented();
  const bool amsgrad = maxv != Py_None;
  if (amsgrad && !lmax.borrow(maxv)) return not_implemented();
  return guarded([&] {
    adam_step(lp.list(), lg.list(), lm.list(), lv.list(), lr, beta1, beta2, eps, wd, decoupled != 0, bc1, bc2_sqrt,
              maximize != 0, amsgrad ? std::optional<at::TensorList>(lmax.list()) : std::nullopt, seed, kNoScales,
              kNoScales, kNoScales, kInt8BlockDefault);
  });
}

PyObject* direct_sgd_momentum_step(PyObject*, PyObject* args) {
  PyObject *p, *g, *b, *seed_obj = Py_None;
  double lr, momentum, wd, dampening;
  int nesterov, maximize;
  if (!PyArg_ParseTuple(args, "OOOddpdpd|O", &p, &g, &b, &lr, &momentum, &nesterov, &wd, &maximize, &dampening,
                        &seed_obj)) {
    return nullptr;
  }
  std::optional<int64_t> seed;
  if (dispatcher_needed() || !read_seed(seed_obj, seed)) return not_implemented();
  BorrowedList lp, lg, lb;
  if (!lp.borrow(p) || !lg.borrow(g) || !lb.borrow(b)) return not_implemented();
  return guarded([&] {
    sgd_momentum_step(lp.list(), lg.list(), lb.list(), lr, momentum, nesterov != 0, wd, maximize != 0, dampening,
                      seed, kNoScales, kInt8BlockDefault);
  });
}


PyObject* direct_ls_save_sgd(PyObject*, PyObject* args) {
  PyObject *p, *g, *w0;
  if (!PyArg_ParseTuple(args, "OOO", &p, &g, &w0)) return nullptr;
  if (dispatcher_needed()) return not_implemented();
  BorrowedList lp, lg, lw;
  if (!lp.borrow(p) || !lg.borrow(g) || !lw.borrow(w0)) return not_implemented();
  return guarded_tensor([&] { return ls_save_sgd(lp.list(), lg.list(), lw.list()); });
}

PyObject* direct_ls_save_adam(PyObject*, PyObject* args) {
  PyObject *p, *g, *m, *v, *w0, *d, *seed_obj = Py_None;
  double beta1, beta2, eps, bc2_sqrt;
  if (!PyArg_ParseTuple(args, "OOOOOOdddd|O", &p, &g, &m, &v, &w0, &d, &beta1, &beta2, &eps, &bc2_sqrt, &seed_obj)) {
    return nullptr;
  }
  std::optional<int64_t> seed;
  if (dispatcher_needed() || !read_seed(seed_obj, seed)) return not_implemented();
  BorrowedList lp, lg, lm, lv, lw, ld;
  if (!lp.borrow(p) || !lg.borrow(g) || !lm.borrow(m) || !lv.borrow(v) || !lw.borrow(w0) || !ld.borrow(d)) {
    return not_implemented();
  }
  return guarded_tensor([&] {
    return ls_save_adam(lp.list(), lg.list(), lm.list(), lv.list(), lw.list(), ld.list(), beta1, beta2, eps,
                        bc2_sqrt, seed, kNoScales, kNoScales, kInt8BlockDefault);
  });
}

PyObject* direct_ls_trial_sgd(PyObject*, PyObject* args) {
  PyObject *p, *w0, *g, *e;
  if (!PyArg_ParseTuple(args, "OOOO", &p, &w0, &g, &e)) return nullptr;
  if (dispatcher_needed()) return not_implemented();
  BorrowedList lp, lw, lg;
  std::vector<double> etas;
  if (!lp.borrow(p) || !lw.borrow(w0) || !lg.borrow(g) || !read_etas(e, etas)) return not_implemented();
  return guarded([&] { ls_trial_sgd(lp.list(), lw.list(), lg.list(), etas); });
}

PyObject* direct_ls_trial_adam(PyObject*, PyObject* args) {
  PyObject *p, *w0, *g, *v, *e;
  double eps, bc2_sqrt;
  if (!PyArg_ParseTuple(args, "OOOOOdd", &p, &w0, &g, &v, &e, &eps, &bc2_sqrt)) return nullptr;
  if (dispatcher_needed()) return not_implemented();
  BorrowedList lp, lw, lg, lv;
  std::vector<double> etas;
  if (!lp.borrow(p) || !lw.borrow(w0) || !lg.borrow(g) || !lv.borrow(v) || !read_etas(e, etas)) {
    return not_implemented();
  }
  return guarded([&] {
    ls_trial_adam(lp.list(), lw.list(), lg.list(), lv.list(), etas, eps, bc2_sqrt, kNoScales, kInt8BlockDefault);
  });
}

PyObject* direct_ls_final_adam(PyObject*, PyObject* args) {
  PyObject *p, *w0, *m, *v, *e;
  double eps, bc1, bc2_sqrt;
  if (!PyArg_ParseTuple(args, "OOOOOddd", &p, &w0, &m, &v, &e, &eps, &bc1, &bc2_sqrt)) return nullptr;
  if (dispatcher_needed()) return not_implemented();
  BorrowedList lp, lw, lm, lv;
  std::vector<double> etas;
  if (!lp.borrow(p) || !lw.borrow(w0) || !lm.borrow(m) || !lv.borrow(v) || !read_etas(e, etas)) {
    return not_implemented();
  }
  return guarded([&] {
    ls_final_adam(lp.list(), lw.list(), lm.list(), lv.list(), etas, eps, bc1, bc2_sqrt, kNoScales, kNoScales,
                  kInt8BlockDefault);
  });
}

PyObject* direct_ls_final_adam_from_trial(PyObject*, PyObject* args) {
  PyObject *p, *g, *m, *v, *e;
  double trial_eta, eps, bc1, bc2_sqrt;
  if (!PyArg_ParseTuple(args, "OOOOOdddd", &p, &g, &m, &v, &e, &trial_eta, &eps, &bc1, &bc2_sqrt)) return nullptr;
  if (dispatcher_needed()) return not_implemented();
  BorrowedList lp, lg, lm, lv;
  std::vector<double> etas;
  if (!lp.borrow(p) || !lg.borrow(g) || !lm.borrow(m) || !lv.borrow(v) || !read_etas(e, etas)) {
    return not_implemented();
  }
  return guarded([&] {
    ls_final_adam_from_trial(lp.list(), lg.list(), lm.list(), lv.list(), etas, trial_eta, eps, bc1, bc2_sqrt,
                             kNoScales, kNoScales, kInt8BlockDefault);
  });
}

PyObject* direct_increment_steps(PyObject*, PyObject* args) {
  PyObject* s;
  if (!PyArg_ParseTuple(args, "O", &s)) return nullptr;
  if (dispatcher_needed()) return not_implemented();
  BorrowedList ls;
  if (!ls.borrow(s)) return not_implemented();
  std::vector<double> values;
  try {
    values = increment_steps(ls.list());
  } catch (const std::exception& e) {
    set_python_error(e);
    return nullptr;
  }
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(values.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < values.size(); ++i) {
    PyObject* f = PyFloat_FromDouble(values[i]);
    if (f == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, static_cast<Py_ssize_t>(i), f);
  }
  return out;
}

}  // namespace svi_kernels::cpu
