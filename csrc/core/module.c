/* module.c - seqwrap._C: module definition, build facts and bridge controls.
 *
 * The ops' methods are generated from ops.def: a call-path op (SW_OP) becomes a method that hands
 * its sw_op to sw_call_op (call.h).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "bridge.h"
#include "call.h"
#include "sw_cuda.h"

#ifndef SEQWRAP_CUDA_ARCHS
#define SEQWRAP_CUDA_ARCHS ""
#endif

static PyObject *py_build_info(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    sw_cuda_info info;
    sw_cuda_query(&info);
#ifdef _OPENMP
    const int openmp = _OPENMP;
#else
    const int openmp = 0;
#endif
#ifdef SEQWRAP_SANITIZE
    PyObject *sanitize = Py_True;
#else
    PyObject *sanitize = Py_False;
#endif
    return Py_BuildValue("{s:O,s:s,s:i,s:i,s:O,s:O}",
                         "cuda", info.built ? Py_True : Py_False,
                         "cuda_archs", SEQWRAP_CUDA_ARCHS,
                         "cuda_runtime_version", info.runtime_version,
                         "openmp", openmp,
                         "sanitize", sanitize,
                         "dlpack_fast_path", sw_bridge_has_fast_path() ? Py_True : Py_False);
}

static PyObject *py_cuda_info(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    sw_cuda_info info;
    sw_cuda_query(&info);
    PyObject *caps = PyList_New(0);
    if (!caps) return NULL;
    for (int d = 0; d < info.device_count; ++d) {
        PyObject *c = PyLong_FromLong(sw_cuda_device_capability(d));
        if (!c || PyList_Append(caps, c) < 0) {
            Py_XDECREF(c);
            Py_DECREF(caps);
            return NULL;
        }
        Py_DECREF(c);
    }
    return Py_BuildValue("{s:O,s:i,s:i,s:i,s:N,s:s}",
                         "built", info.built ? Py_True : Py_False,
                         "runtime_version", info.runtime_version,
                         "driver_version", info.driver_version,
                         "device_count", info.device_count,
                         "capabilities", caps,
                         "error", info.query_error_text);
}

static PyObject *py_set_bridge_mode(PyObject *self, PyObject *arg) {
    (void)self;
    const char *mode = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    if (!mode) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "bridge mode must be 'auto' or 'capsule'");
        return NULL;
    }
    if (strcmp(mode, "auto") == 0) sw_bridge_set_mode(SW_BRIDGE_AUTO);
    else if (strcmp(mode, "capsule") == 0) sw_bridge_set_mode(SW_BRIDGE_CAPSULE);
    else {
        PyErr_Format(PyExc_ValueError, "bridge mode must be 'auto' or 'capsule', not '%s'", mode);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_bridge_mode(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    if (sw_bridge_get_mode() == SW_BRIDGE_CAPSULE || !sw_bridge_has_fast_path()) return PyUnicode_FromString("capsule");
    return PyUnicode_FromString("fast");
}

/* _bridge_import(tensors) -> int: imports every tensor and releases it again.
 * Measures the bridge's own cost per tensor (benchmarks/bench_bridge.py). */
static PyObject *py_bridge_import(PyObject *self, PyObject *arg) {
    (void)self;
    PyObject *seq = PySequence_Tuple(arg);  /* owns its items: a hook may mutate the caller's list */
    if (!seq) return NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
        sw_tensor t;
        if (sw_import_item(PyTuple_GET_ITEM(seq, i), "seqwrap._C._bridge_import", "tensors", (int)i, 0, &scope,
                           &t) < 0) {
            sw_scope_release(&scope);
            Py_DECREF(seq);
            return NULL;
        }
        total += t.ndim;
    }
    sw_scope_release(&scope);
    Py_DECREF(seq);
    return PyLong_FromLongLong((long long)total);
}

#define SW_OP(name, prefix, has_cuda, doc)                                        \
    extern const sw_op sw_##prefix##_op;                                          \
    static PyObject *py_##name(PyObject *self, PyObject *args, PyObject *kwargs) { \
        (void)self;                                                               \
        return sw_call_op(&sw_##prefix##_op, args, kwargs);                       \
    }
#include "ops.def"

PyObject *sw_op_registry(void); /* registry.c */

static PyObject *py_op_registry(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return sw_op_registry();
}

static PyMethodDef methods[] = {
#define SW_OP(name, prefix, has_cuda, doc) \
    {#name, (PyCFunction)(void (*)(void))py_##name, METH_VARARGS | METH_KEYWORDS, doc},
#include "ops.def"
    {"_op_registry", py_op_registry, METH_NOARGS, "Every op of ops.def: name, arguments, what it writes, CUDA."},
    {"build_info", py_build_info, METH_NOARGS, "Facts about how this extension was built."},
    {"cuda_info", py_cuda_info, METH_NOARGS, "What the linked CUDA runtime sees (devices, driver)."},
    {"_set_bridge_mode", py_set_bridge_mode, METH_O, "'auto' (DLPack C exchange API when present) or 'capsule'."},
    {"_bridge_mode", py_bridge_mode, METH_NOARGS, "The DLPack path in use: 'fast' or 'capsule'."},
    {"_bridge_import", py_bridge_import, METH_O, "Import tensors through the bridge and release them (benchmark)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "seqwrap._C", "seqwrap's C/CUDA core.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void) {
    if (sw_bridge_init() < 0) return NULL;
    return PyModule_Create(&module_def);
}
