/* py_ops.h - CPython entry points with their own glue (the SW_GLUE entries of ops.def). The ops on
 * the generic call path need no declaration here: module.c wraps their sw_op in sw_call_op. */
#ifndef SEQWRAP_PY_OPS_H
#define SEQWRAP_PY_OPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define SW_GLUE(name, function, has_cuda, arg_names, writes, doc) \
    PyObject *function(PyObject *self, PyObject *args, PyObject *kwargs);
#include "ops.def"

#endif /* SEQWRAP_PY_OPS_H */
