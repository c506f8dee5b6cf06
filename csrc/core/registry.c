/* registry.c - seqwrap._C._op_registry(): every entry of ops.def as Python data, so tests and
 * tools can walk the ops (tests/test_op_contracts.py builds valid and invalid calls from it).
 *
 * Per op: {"name", "fn", "has_cuda", "spec": bool (on the call path), "args": [...],
 * "arg_names": [...], "writes": [...]}; per argument of a call-path op: {"name", "kind", "writes",
 * "dtypes", "dtype_rule", "dtype_ref", "shape", "shape_like", "what", "nonempty", "contiguous",
 * "min", "max", "finite", "choices", "default", "default_dim"} (None where it does not apply;
 * "default_dim": an omitted int takes the size of that symbolic dim). */
#include "call.h"

#include <math.h>
#include <string.h>

#define SW_OP(name, prefix, has_cuda, doc) extern const sw_op sw_##prefix##_op;
#include "ops.def"

static const char *const k_kinds[] = {"tensor", "optional tensor", "tensor list", "int", "uint64",
                                      "float", "bool", "choice", "stream"};
static const char *const k_rules[] = {"any_of", "same_as", "real_of", "real_is"};

static PyObject *str_or_none(const char *s) { return s ? PyUnicode_FromString(s) : Py_NewRef(Py_None); }

static PyObject *dtype_list(unsigned mask) {
    PyObject *l = PyList_New(0);
    for (int d = 0; l && d < SW_NUM_DTYPES; ++d) {
        if (!(mask & SW_DT(d)) && mask) continue;
        PyObject *s = PyUnicode_FromString(sw_dtype_name((sw_dtype)d));
        if (!s || PyList_Append(l, s) < 0) Py_CLEAR(l);
        Py_XDECREF(s);
    }
    return l;
}

static PyObject *choice_list(const char *const *choices) {
    if (!choices) return Py_NewRef(Py_None);
    PyObject *l = PyList_New(0);
    for (int k = 0; l && choices[k]; ++k) {
        PyObject *s = PyUnicode_FromString(choices[k]);
        if (!s || PyList_Append(l, s) < 0) Py_CLEAR(l);
        Py_XDECREF(s);
    }
    return l;
}

static PyObject *describe_arg(const sw_arg_spec *s) {
    const int tensor = s->kind == SW_ARG_TENSOR || s->kind == SW_ARG_OPT_TENSOR || s->kind == SW_ARG_TENSOR_LIST;
    const int ranged = s->imin != 0 || s->imax != 0;
    PyObject *lo = Py_NewRef(Py_None), *hi = Py_NewRef(Py_None), *dflt = Py_NewRef(Py_None);
    if (s->kind == SW_ARG_INT) {
        Py_SETREF(lo, PyLong_FromLongLong(ranged ? (long long)s->imin : INT64_MIN));
        Py_SETREF(hi, PyLong_FromLongLong(ranged ? (long long)s->imax : INT64_MAX));
        if (s->has_default) Py_SETREF(dflt, PyLong_FromLongLong((long long)s->idefault));
    } else if (s->kind == SW_ARG_FLOAT) {
        if (isfinite(s->fmin)) Py_SETREF(lo, PyFloat_FromDouble(s->fmin));
        if (isfinite(s->fmax)) Py_SETREF(hi, PyFloat_FromDouble(s->fmax));
        if (s->has_default) Py_SETREF(dflt, PyFloat_FromDouble(s->fdefault));
    } else if (s->kind == SW_ARG_U64) {
        Py_SETREF(lo, PyLong_FromLong(0));
        Py_SETREF(hi, PyLong_FromUnsignedLongLong(~0ull));
    }
    if (!lo || !hi || !dflt) {
        Py_XDECREF(lo); Py_XDECREF(hi); Py_XDECREF(dflt);
        return NULL;
    }
    return Py_BuildValue("{s:s,s:s,s:O,s:N,s:s,s:N,s:N,s:N,s:N,s:O,s:O,s:N,s:N,s:O,s:N,s:N,s:N}",
                         "name", s->name, "kind", k_kinds[s->kind],
                         "writes", tensor && s->access == SW_WRITE ? Py_True : Py_False,
                         "dtypes", tensor ? dtype_list(s->dtypes) : Py_NewRef(Py_None),
                         "dtype_rule", k_rules[s->dtype_rule], "dtype_ref", str_or_none(s->dtype_ref),
                         "shape", str_or_none(s->shape), "shape_like", str_or_none(s->shape_like),
                         "what", str_or_none(s->what), "nonempty", s->nonempty ? Py_True : Py_False,
                         "contiguous", tensor && !s->strided ? Py_True : Py_False, "min", lo, "max", hi,
                         "finite", s->finite ? Py_True : Py_False, "choices", choice_list(s->choices),
                         "default", dflt, "default_dim", str_or_none(s->default_dim));
}

PyObject *sw_op_describe(const sw_op *op) {
    PyObject *args = PyList_New(0), *names = PyList_New(0), *writes = PyList_New(0);
    for (int a = 0; args && names && writes && a < op->nargs; ++a) {
        PyObject *d = describe_arg(&op->args[a]);
        PyObject *n = PyUnicode_FromString(op->args[a].name);
        int ok = d && n && PyList_Append(args, d) == 0 && PyList_Append(names, n) == 0;
        if (ok && PyDict_GetItemString(d, "writes") == Py_True) ok = PyList_Append(writes, n) == 0;
        Py_XDECREF(d);
        Py_XDECREF(n);
        if (!ok) Py_CLEAR(args);
    }
    if (!args || !names || !writes) {
        Py_XDECREF(args); Py_XDECREF(names); Py_XDECREF(writes);
        return NULL;
    }
    return Py_BuildValue("{s:s,s:s,s:O,s:O,s:N,s:N,s:N}", "name", op->name, "fn", op->fn, "has_cuda",
                         op->has_cuda ? Py_True : Py_False, "spec", Py_True, "args", args, "arg_names", names,
                         "writes", writes);
}

static int append(PyObject *list, PyObject *item) {
    int rc = item ? PyList_Append(list, item) : -1;
    Py_XDECREF(item);
    return rc;
}

PyObject *sw_op_registry(void) {
    PyObject *ops = PyList_New(0);
    if (!ops) return NULL;
#define SW_OP(name, prefix, has_cuda, doc) \
    if (append(ops, sw_op_describe(&sw_##prefix##_op)) < 0) goto fail;
#include "ops.def"
    return ops;
fail:
    Py_DECREF(ops);
    return NULL;
}
