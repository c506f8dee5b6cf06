/* call.c - the one call path (see call.h): parse, check, import, seal, run, bump, raise. */
#include "call.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LIST_MAX 1000000

/* Everything one call owns, released by call_release. */
typedef struct {
    PyObject *obj[SW_CALL_MAX_ARGS];   /* strong references to the given arguments (NULL: defaulted) */
    PyObject *items[SW_CALL_MAX_ARGS]; /* list arguments as tuples (a hook may mutate the caller's list) */
    sw_import_scope scope;
    int ell_n;                         /* bound "..." run length, -1 while unbound */
    int64_t ell[SW_MAX_DIMS];
} call_state;

static void call_release(call_state *st, sw_call *c, int nargs) {
    sw_scope_release(&st->scope);
    for (int a = 0; a < nargs; ++a) {
        Py_XDECREF(st->obj[a]);
        Py_XDECREF(st->items[a]);
        free(c->args[a].items);
    }
}

/* ---- argument parsing --------------------------------------------------------------------- */

static int find_arg(const sw_op *op, const char *name) {
    for (int a = 0; a < op->nargs; ++a)
        if (strcmp(op->args[a].name, name) == 0) return a;
    return -1;
}

static int parse_args(const sw_op *op, PyObject *args, PyObject *kwargs, call_state *st) {
    Py_ssize_t npos = args ? PyTuple_GET_SIZE(args) : 0;
    if (npos > op->nargs) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", op->name, op->nargs, npos);
        return -1;
    }
    for (Py_ssize_t i = 0; i < npos; ++i) st->obj[i] = Py_NewRef(PyTuple_GET_ITEM(args, i));
    if (kwargs) {
        PyObject *key, *value;
        Py_ssize_t pos = 0;
        while (PyDict_Next(kwargs, &pos, &key, &value)) {
            const char *k = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
            if (!k) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "%s(): keywords must be strings", op->name);
                return -1;
            }
            int a = find_arg(op, k);
            if (a < 0) {
                PyErr_Format(PyExc_TypeError, "'%s' is an invalid keyword argument for %s()", k, op->name);
                return -1;
            }
            if (st->obj[a]) {
                PyErr_Format(PyExc_TypeError, "argument for %s() given by name ('%s') and position (%d)", op->name, k,
                             a + 1);
                return -1;
            }
            st->obj[a] = Py_NewRef(value);
        }
    }
    for (int a = 0; a < op->nargs; ++a) {
        if (!st->obj[a] && !op->args[a].has_default) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %d)", op->name, op->args[a].name,
                         a + 1);
            return -1;
        }
    }
    return 0;
}

/* ---- scalars ------------------------------------------------------------------------------ */

static int parse_int(const char *fn, const sw_arg_spec *s, PyObject *o, sw_value *v) {
    if (PyFloat_Check(o) || !PyIndex_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: '%s' must be an int, not %s", fn, s->name, Py_TYPE(o)->tp_name);
        return -1;
    }
    PyObject *idx = PyNumber_Index(o);
    if (!idx) return -1;
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (x == -1 && PyErr_Occurred()) return -1;
    const int ranged = s->imin != 0 || s->imax != 0;
    if (overflow || (ranged && (x < s->imin || x > s->imax))) {
        const long long lo = ranged ? (long long)s->imin : INT64_MIN, hi = ranged ? (long long)s->imax : INT64_MAX;
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be an int in [%lld, %lld], got %R", fn, s->name, lo, hi, o);
        return -1;
    }
    v->i = (int64_t)x;
    return 0;
}

static int parse_u64(const char *fn, const sw_arg_spec *s, PyObject *o, sw_value *v) {
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: '%s' must be an int, not %s", fn, s->name, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(o);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be in [0, 2**64)", fn, s->name);
        return -1;
    }
    v->u = (uint64_t)x;
    return 0;
}

static int parse_float(const char *fn, const sw_arg_spec *s, PyObject *o, sw_value *v) {
    double x = PyFloat_AsDouble(o);
    if (x == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: '%s' must be a real number, not %s", fn, s->name, Py_TYPE(o)->tp_name);
        return -1;
    }
    const int lo_set = isfinite(s->fmin), hi_set = isfinite(s->fmax);
    const int bad = (s->finite && !isfinite(x)) || ((lo_set || hi_set) && !(x >= s->fmin && x <= s->fmax));
    if (!bad) {
        v->f = x;
        return 0;
    }
    char msg[160]; /* PyErr_Format has no %g */
    if (lo_set && hi_set) snprintf(msg, sizeof msg, "must be in [%g, %g], got %g", s->fmin, s->fmax, x);
    else if (lo_set) snprintf(msg, sizeof msg, "must be a %snumber >= %g, got %g", s->finite ? "finite " : "", s->fmin, x);
    else if (hi_set) snprintf(msg, sizeof msg, "must be a %snumber <= %g, got %g", s->finite ? "finite " : "", s->fmax, x);
    else snprintf(msg, sizeof msg, "must be a finite number, got %g", x);
    PyErr_Format(PyExc_ValueError, "%s: %s %s", fn, s->name, msg);
    return -1;
}

static int parse_choice(const char *fn, const sw_arg_spec *s, PyObject *o, sw_value *v) {
    const char *str = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (!str) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "%s: '%s' must be a str, not %s", fn, s->name, Py_TYPE(o)->tp_name);
        return -1;
    }
    int n = 0;
    for (; s->choices[n]; ++n)
        if (strcmp(s->choices[n], str) == 0) {
            v->i = n;
            return 0;
        }
    char list[160] = "";
    for (int k = 0; k < n; ++k) {
        size_t used = strlen(list);
        snprintf(list + used, sizeof list - used, "%s'%s'", k == 0 ? "" : k == n - 1 ? " or " : ", ", s->choices[k]);
    }
    PyErr_Format(PyExc_ValueError, "%s: %s must be %s, not '%s'", fn, s->name, list, str);
    return -1;
}

static int parse_scalar(const char *fn, const sw_arg_spec *s, PyObject *o, sw_value *v) {
    if (!o) { /* defaulted */
        v->i = s->idefault;
        v->f = s->fdefault;
        return 0;
    }
    switch (s->kind) {
        case SW_ARG_INT: return parse_int(fn, s, o, v);
        case SW_ARG_U64: return parse_u64(fn, s, o, v);
        case SW_ARG_FLOAT: return parse_float(fn, s, o, v);
        case SW_ARG_CHOICE: return parse_choice(fn, s, o, v);
        case SW_ARG_BOOL: {
            int truth = PyObject_IsTrue(o);
            if (truth < 0) return -1;
            v->i = truth;
            return 0;
        }
        default: return 0;
    }
}

/* ---- tensor checks ------------------------------------------------------------------------ */

static sw_dtype real_of(sw_dtype d) { return d == SW_FLOAT64 ? SW_FLOAT64 : SW_FLOAT32; }

/* The tensor of argument `a`, item `idx` (lists), or NULL when absent. */
static const sw_tensor *arg_tensor(const sw_call *c, const sw_op *op, int a, int idx) {
    const sw_value *v = &c->args[a];
    if (op->args[a].kind == SW_ARG_TENSOR_LIST) return idx >= 0 && idx < v->n ? &v->items[idx] : &v->items[0];
    return v->present ? &v->t : NULL;
}

static void label_of(const sw_arg_spec *s, int idx, char *buf, size_t len) {
    if (idx >= 0) snprintf(buf, len, "%s[%d]", s->name, idx);
    else snprintf(buf, len, "%s", s->name);
}

static int check_dtype(const char *fn, const sw_op *op, const sw_call *c, int a, int idx, const char *label,
                       const sw_tensor *t) {
    const sw_arg_spec *s = &op->args[a];
    unsigned allowed = s->dtypes ? s->dtypes : (SW_DT(SW_NUM_DTYPES) - 1u);
    const int r = s->dtype_ref ? find_arg(op, s->dtype_ref) : -1;
    const sw_tensor *ref = r >= 0 && r < a ? arg_tensor(c, op, r, idx) : NULL;
    if (ref && s->dtype_rule != SW_DTYPE_ANY_OF) {
        unsigned rule = 0;
        for (int d = 0; d < SW_NUM_DTYPES; ++d) {
            int ok = s->dtype_rule == SW_DTYPE_SAME_AS   ? d == (int)ref->dtype
                     : s->dtype_rule == SW_DTYPE_REAL_OF ? d == (int)real_of(ref->dtype)
                                                         : real_of((sw_dtype)d) == real_of(ref->dtype);
            if (ok) rule |= SW_DT(d);
        }
        allowed &= rule;
    }
    return sw_check_dtype(fn, label, t, allowed);
}

static void format_dims(const int64_t *dims, int n, char *buf, size_t len) {
    size_t used = (size_t)snprintf(buf, len, "(");
    for (int d = 0; d < n && used < len; ++d)
        used += (size_t)snprintf(buf + used, len - used, d ? ", %lld" : "%lld", (long long)dims[d]);
    if (used < len) snprintf(buf + used, len - used, n == 1 ? ",)" : ")");
}

/* Splits a shape spec into tokens (at most SW_MAX_DIMS + 1). */
static int split_shape(const char *spec, char tok[][16], int max) {
    int n = 0;
    const char *p = spec;
    while (*p && n < max) {
        size_t len = strcspn(p, ",");
        size_t keep = len < 15 ? len : 15;
        memcpy(tok[n], p, keep);
        tok[n][keep] = '\0';
        ++n;
        p += len;
        if (*p == ',') ++p;
    }
    return n;
}

static int sym_find(const sw_call *c, const char *name) {
    for (int k = 0; k < c->nsyms; ++k)
        if (strcmp(c->sym_name[k], name) == 0) return k;
    return -1;
}

static int check_shape_spec(const char *fn, const sw_arg_spec *s, const char *label, const sw_tensor *t,
                            sw_call *c, call_state *st) {
    char tok[SW_MAX_DIMS + 1][16];
    const int ntok = split_shape(s->shape, tok, SW_MAX_DIMS + 1);
    const int ell = ntok > 0 && strcmp(tok[0], "...") == 0;
    const int explicit_n = ntok - ell;
    if ((!ell && t->ndim != explicit_n) || (ell && t->ndim < explicit_n)) {
        char got[160];
        format_dims(t->shape, t->ndim, got, sizeof got);
        if (s->what) PyErr_Format(PyExc_ValueError, "%s: argument '%s' must be %s, got shape %s", fn, label, s->what, got);
        else if (ell)
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' must have at least %d dimension%s (shape (%s)), got shape %s",
                         fn, label, explicit_n, explicit_n == 1 ? "" : "s", s->shape, got);
        else
            PyErr_Format(PyExc_ValueError, "%s: argument '%s' must be %d-D of shape (%s), got shape %s", fn, label,
                         explicit_n, s->shape, got);
        return -1;
    }
    /* The expected shape under the bindings so far; names seen first here bind (committed below). */
    int64_t want[2 * SW_MAX_DIMS]; /* room for a bound "..." of another rank, in the message */
    const char *new_name[SW_MAX_DIMS];
    int64_t new_size[SW_MAX_DIMS];
    int nnew = 0, ok = 1;
    const int prefix = t->ndim - explicit_n;
    if (ell && st->ell_n >= 0 && st->ell_n != prefix) ok = 0;
    for (int d = 0; d < prefix; ++d) want[d] = st->ell_n >= 0 && d < st->ell_n ? st->ell[d] : t->shape[d];
    for (int j = 0; j < explicit_n; ++j) {
        const char *tk = tok[ell + j];
        const int d = prefix + j;
        want[d] = t->shape[d];
        if (strcmp(tk, "*") == 0) continue;
        if (tk[0] >= '0' && tk[0] <= '9') {
            want[d] = (int64_t)strtoll(tk, NULL, 10);
            continue;
        }
        int k = sym_find(c, tk);
        if (k >= 0) {
            want[d] = c->sym_size[k];
            continue;
        }
        int seen = -1;
        for (int m = 0; m < nnew; ++m)
            if (strcmp(new_name[m], tk) == 0) seen = m;
        if (seen >= 0) want[d] = new_size[seen];
        else if (nnew < SW_MAX_DIMS) {
            new_name[nnew] = tk; /* points into tok: copied into c->sym_name below */
            new_size[nnew++] = t->shape[d];
        }
    }
    for (int d = 0; d < t->ndim && ok; ++d) ok = want[d] == t->shape[d];
    if (!ok) {
        char w[160], got[160];
        int wn = t->ndim;
        if (ell && st->ell_n >= 0 && st->ell_n != prefix) { /* the bound "..." decides the rank */
            wn = st->ell_n + explicit_n;
            for (int d = 0; d < st->ell_n; ++d) want[d] = st->ell[d];
            for (int j = 0; j < explicit_n; ++j) want[st->ell_n + j] = t->shape[prefix + j];
        }
        format_dims(want, wn, w, sizeof w);
        format_dims(t->shape, t->ndim, got, sizeof got);
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' must have shape %s (shape (%s) as bound by the arguments "
                     "before it), but '%s' has shape %s", fn, label, w, s->shape, label, got);
        return -1;
    }
    if (ell && st->ell_n < 0) {
        st->ell_n = prefix;
        for (int d = 0; d < prefix; ++d) st->ell[d] = t->shape[d];
    }
    for (int m = 0; m < nnew && c->nsyms < SW_CALL_MAX_SYMS; ++m) {
        snprintf(c->sym_name[c->nsyms], sizeof c->sym_name[0], "%s", new_name[m]);
        c->sym_size[c->nsyms++] = new_size[m];
    }
    return 0;
}

/* 1 if two index tuples of t address one element: with the dims of more than one element sorted by
 * |stride|, each stride must exceed the span of the dims inside it. */
static int overlaps_itself(const sw_tensor *t) {
    int64_t st[SW_MAX_DIMS], sz[SW_MAX_DIMS];
    int n = 0;
    for (int d = 0; d < t->ndim; ++d) {
        if (t->shape[d] < 2) continue;
        int64_t a = t->strides[d] < 0 ? -t->strides[d] : t->strides[d];
        int k = n++;
        for (; k > 0 && st[k - 1] > a; --k) {
            st[k] = st[k - 1];
            sz[k] = sz[k - 1];
        }
        st[k] = a;
        sz[k] = t->shape[d];
    }
    int64_t span = 0; /* largest offset reachable by the dims inside */
    for (int k = 0; k < n; ++k) {
        if (st[k] <= span) return 1;
        span += (sz[k] - 1) * st[k];
    }
    return 0;
}

static int check_tensor(const char *fn, const sw_op *op, sw_call *c, call_state *st, int a, int idx,
                        const sw_tensor **first, char *first_label) {
    const sw_arg_spec *s = &op->args[a];
    const sw_tensor *t = arg_tensor(c, op, a, idx);
    char label[64];
    label_of(s, idx, label, sizeof label);
    if (check_dtype(fn, op, c, a, idx, label, t) < 0) return -1;
    const sw_tensor *like = NULL;
    char like_label[64] = "";
    if (s->shape_like) {
        int r = find_arg(op, s->shape_like);
        like = r >= 0 && r < a ? arg_tensor(c, op, r, idx) : NULL;
        if (like) label_of(&op->args[r], op->args[r].kind == SW_ARG_TENSOR_LIST ? idx : -1, like_label,
                           sizeof like_label);
    }
    if (s->shape && check_shape_spec(fn, s, label, t, c, st) < 0) return -1;
    if (s->nonempty && t->numel == 0) {
        char got[160];
        format_dims(t->shape, t->ndim, got, sizeof got);
        if (s->what) PyErr_Format(PyExc_ValueError, "%s: argument '%s' must be %s, got shape %s", fn, label, s->what, got);
        else sw_check_nonempty(fn, label, t);
        return -1;
    }
    if (like && sw_check_same_shape(fn, label, t, like_label, like) < 0) return -1;
    if (!s->strided && sw_check_contiguous(fn, label, t) < 0) return -1;
    if (s->strided && s->access == SW_WRITE && overlaps_itself(t)) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' is written but its elements overlap each other (a zero "
                     "or too small stride); pass a tensor with distinct elements (.contiguous())", fn, label);
        return -1;
    }
    if (like) {
        if (sw_check_same_device(fn, label, t, like_label, like) < 0) return -1;
    } else if (*first) {
        if (sw_check_same_device(fn, label, t, first_label, *first) < 0) return -1;
    }
    if (!*first) {
        *first = t;
        snprintf(first_label, 64, "%s", label);
    }
    if (t->device == SW_CUDA && !op->has_cuda) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' is a CUDA tensor; CPU tensors only (this op has no CUDA "
                     "kernel)", fn, label);
        return -1;
    }
    return 0;
}

/* ---- tensor import ------------------------------------------------------------------------ */

static int is_tensor_kind(sw_arg_kind k) {
    return k == SW_ARG_TENSOR || k == SW_ARG_OPT_TENSOR || k == SW_ARG_TENSOR_LIST;
}

static int import_flags(const sw_arg_spec *s) { return s->access == SW_WRITE ? SW_WRITABLE : SW_READONLY_NO_GRAD; }

/* Lists: type, one common length >= 1, then a tuple of the items for each. */
static int take_lists(const char *fn, const sw_op *op, sw_call *c, call_state *st) {
    int nlists = 0, first = -1;
    for (int a = 0; a < op->nargs; ++a) {
        const sw_arg_spec *s = &op->args[a];
        if (s->kind != SW_ARG_TENSOR_LIST) continue;
        PyObject *o = st->obj[a];
        if (!PyList_Check(o) && !PyTuple_Check(o)) {
            PyErr_Format(PyExc_TypeError, "%s: '%s' must be a list or tuple of tensors, not %s", fn, s->name,
                         Py_TYPE(o)->tp_name);
            return -1;
        }
        ++nlists;
        if (first < 0) first = a;
    }
    if (!nlists) return 0;
    int mismatch = 0;
    Py_ssize_t n0 = -1;
    for (int a = 0; a < op->nargs; ++a) {
        if (op->args[a].kind != SW_ARG_TENSOR_LIST) continue;
        st->items[a] = PySequence_Tuple(st->obj[a]);
        if (!st->items[a]) return -1;
        Py_ssize_t n = PyTuple_GET_SIZE(st->items[a]);
        if (n0 < 0) n0 = n;
        else if (n != n0) mismatch = 1;
    }
    if (n0 == 0) {
        PyErr_Format(PyExc_ValueError, "%s: '%s' is empty; pass at least one tensor", fn, op->args[first].name);
        return -1;
    }
    if (n0 > LIST_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: too many tensors (%zd)", fn, n0);
        return -1;
    }
    if (mismatch) {
        char names[200] = "", sizes[120] = "";
        int k = 0;
        for (int a = 0; a < op->nargs; ++a) {
            if (op->args[a].kind != SW_ARG_TENSOR_LIST) continue;
            size_t un = strlen(names), us = strlen(sizes);
            snprintf(names + un, sizeof names - un, "%s'%s'", k == 0 ? "" : k == nlists - 1 ? " and " : ", ",
                     op->args[a].name);
            snprintf(sizes + us, sizeof sizes - us, "%s%zd", k ? ", " : "", PyTuple_GET_SIZE(st->items[a]));
            ++k;
        }
        PyErr_Format(PyExc_ValueError, "%s: %s must have the same length (got %s)", fn, names, sizes);
        return -1;
    }
    for (int a = 0; a < op->nargs; ++a) {
        if (op->args[a].kind != SW_ARG_TENSOR_LIST) continue;
        c->args[a].n = (int)n0;
        c->args[a].items = (sw_tensor *)calloc((size_t)n0, sizeof(sw_tensor));
        if (!c->args[a].items) {
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static int import_tensors(const char *fn, const sw_op *op, sw_call *c, call_state *st) {
    if (take_lists(fn, op, c, st) < 0) return -1;
    const sw_tensor *first = NULL;
    char first_label[64] = "";
    for (int a = 0; a < op->nargs; ++a) {
        const sw_arg_spec *s = &op->args[a];
        if (!is_tensor_kind(s->kind)) continue;
        sw_value *v = &c->args[a];
        if (s->kind == SW_ARG_TENSOR_LIST) {
            for (int i = 0; i < v->n; ++i) {
                if (sw_import_item(PyTuple_GET_ITEM(st->items[a], i), fn, s->name, i, import_flags(s), &st->scope,
                                   &v->items[i]) < 0 ||
                    check_tensor(fn, op, c, st, a, i, &first, first_label) < 0)
                    return -1;
            }
            v->present = 1;
            continue;
        }
        PyObject *o = st->obj[a];
        if (s->kind == SW_ARG_OPT_TENSOR && (!o || o == Py_None)) continue;
        if (sw_import(o, fn, s->name, import_flags(s), &st->scope, &v->t) < 0) return -1;
        v->present = 1;
        if (check_tensor(fn, op, c, st, a, -1, &first, first_label) < 0) return -1;
    }
    if (first) {
        c->device = first->device;
        c->launch.device = first->device_id;
    }
    return 0;
}

/* ---- the call ----------------------------------------------------------------------------- */

PyObject *sw_call_op(const sw_op *op, PyObject *args, PyObject *kwargs) {
    const char *fn = op->fn;
    if (op->nargs > SW_CALL_MAX_ARGS) {
        PyErr_Format(PyExc_SystemError, "%s: too many arguments in the op spec", fn);
        return NULL;
    }
    call_state st;
    memset(&st, 0, sizeof st);
    sw_scope_init(&st.scope);
    st.ell_n = -1;
    sw_call c;
    memset(&c, 0, sizeof c);
    c.op = op;
    c.device = SW_CPU;
    PyObject *result = NULL;
    if (parse_args(op, args, kwargs, &st) < 0) goto done;
    for (int a = 0; a < op->nargs; ++a) {
        const sw_arg_spec *s = &op->args[a];
        if (s->kind == SW_ARG_STREAM) {
            if (sw_parse_stream(st.obj[a] ? st.obj[a] : Py_None, &c.launch.stream) < 0) goto done;
        } else if (!is_tensor_kind(s->kind) && parse_scalar(fn, s, st.obj[a], &c.args[a]) < 0) {
            goto done;
        }
    }
    if (import_tensors(fn, op, &c, &st) < 0) goto done;
    for (int a = 0; a < op->nargs; ++a) /* omitted ints that default to a dim the tensors bound */
        if (!st.obj[a] && op->args[a].default_dim) {
            c.args[a].i = sw_call_dim(&c, op->args[a].default_dim);
            if (c.args[a].i < 0) {
                PyErr_Format(PyExc_SystemError, "%s: '%s' defaults to dim '%s', which no tensor binds", fn,
                             op->args[a].name, op->args[a].default_dim);
                goto done;
            }
        }
    if (op->validate && op->validate(&c) < 0) goto done;
    if (sw_scope_seal(&st.scope, fn) < 0) goto done;

    sw_error err = {SW_OK, ""};
    sw_code rc;
    Py_BEGIN_ALLOW_THREADS
    rc = op->run(&c, &err);
    Py_END_ALLOW_THREADS
    if (sw_scope_bump_versions(&st.scope) < 0) goto done; /* always: the kernel may have written */
    if (rc != SW_OK) {
        sw_raise_status(fn, rc, &err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    call_release(&st, &c, op->nargs);
    return result;
}

int64_t sw_call_dim(const sw_call *ctx, const char *name) {
    int k = sym_find(ctx, name);
    return k >= 0 ? ctx->sym_size[k] : -1;
}

int64_t sw_flat_stride(const sw_tensor *t, int nd) {
    for (int d = nd - 1; d >= 0; --d)
        if (t->shape[d] > 1) return t->strides[d];
    return 1;
}
