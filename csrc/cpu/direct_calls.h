#pragma once
// Direct calls of the CPU ops from Python, bypassing torch.ops for host-bound eager calls
// (see direct_calls.cpp). Each returns None when it ran, NotImplemented when the caller must use
// torch.ops, or raises the op's error.
#include <Python.h>

namespace svi_kernels::cpu {

// (params, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay, decoupled,
//  bias_correction1, bias_correction2_sqrt, maximize, max_exp_avg_sqs or None[, state_seed or None])
PyObject* direct_adam_step(PyObject* self, PyObject* args);

// (params, grads, momentum_buffers, lr, momentum, nesterov, weight_decay, maximize, dampening[, state_seed or None])
PyObject* direct_sgd_momentum_step(PyObject* self, PyObject* args);

// The line-search ops and increment_steps, with torch.ops' argument order (etas: a list of floats;
// ls_save_adam's optional state_seed: None or an int).
PyObject* direct_ls_save_sgd(PyObject* self, PyObject* args);
PyObject* direct_ls_save_adam(PyObject* self, PyObject* args);
PyObject* direct_ls_trial_sgd(PyObject* self, PyObject* args);
PyObject* direct_ls_trial_adam(PyObject* self, PyObject* args);
PyObject* direct_ls_final_adam(PyObject* self, PyObject* args);
PyObject* direct_ls_final_adam_from_trial(PyObject* self, PyObject* args);
PyObject* direct_increment_steps(PyObject* self, PyObject* args);

}  // namespace svi_kernels::cpu
