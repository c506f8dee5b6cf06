/* py_ops.h - the CPython entry points of seqwrap._C, one glue file per op. */
#ifndef SEQWRAP_PY_OPS_H
#define SEQWRAP_PY_OPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyObject *sw_py_kahan_accumulate(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_cross_entropy_chunk(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_round_to_half(PyObject *self, PyObject *args);
PyObject *sw_py_lse_merge(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_sample_chunks(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_selective_scan_fwd(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_selective_scan_bwd(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_ssd_scan_fwd(PyObject *self, PyObject *args, PyObject *kwargs);
PyObject *sw_py_ssd_scan_bwd(PyObject *self, PyObject *args, PyObject *kwargs);

#endif /* SEQWRAP_PY_OPS_H */
