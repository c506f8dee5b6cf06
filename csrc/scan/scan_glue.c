/* scan_glue.c - CPython glue of the selective scan (scan.h), one path for both front ends.
 *
 * Mamba-1 (seqwrap.selective_scan), shapes as in mamba-ssm:
 *   _C.selective_scan_fwd(u, dt, A, B, C, D, z, h0, y, hlast, ckpt, block, work, stream, reset=None)
 *   _C.selective_scan_bwd(u, dt, A, B, C, D, z, ckpt, dy, dhlast, du, ddt, dz, dB, dC, dA, dD, dh0,
 *                         block, trunc, grad_len, work, stream, reset=None)
 *   u, dt, z, y, dy, du, ddt, dz: (batch, dim, len); A: (dim, dstate); B, C, dB, dC: (batch, dstate, len);
 *   D: (dim,); h0, hlast, dhlast, dA, dh0: (batch, dim, dstate); dD: (batch, dim);
 *   ckpt: (batch, dim, nblk, dstate).
 * Mamba-2 / SSD (seqwrap.ssd_scan), shapes as in mamba-ssm's mamba_chunk_scan_combined:
 *   _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, y, hlast, ckpt, block, work, stream, reset=None)
 *   _C.ssd_scan_bwd(x, dt, A, B, C, D, z, ckpt, dy, dhlast, dx, ddt, dz, dB, dC, dA, dD, dh0,
 *                   block, work, stream, trunc=0, grad_len=len, reset=None)
 *   x, z, y, dy, dx, dz: (batch, len, heads, headdim); dt, ddt: (batch, len, heads); A, D: (heads,);
 *   B, C, dB, dC: (batch, len, groups, dstate), groups divides heads; h0, hlast, dhlast, dh0:
 *   (batch, heads, headdim, dstate); dA, dD: (batch, heads, headdim); ckpt: (batch, heads, headdim,
 *   nblk, dstate).
 * Both: nblk = ceil(len / block); reset: None or int32 (batch, len), nonzero where a document
 * starts (the backward must get the forward's); work: None on the CPU, on CUDA a tensor of
 * rows*(block+7)*dstate values (rows = batch*dim or batch*heads*headdim). D, z, h0, dhlast may be
 * None (dz is None iff z is). x/u, dt, B, C, z: float32 / float16 / bfloat16 / float64, one dtype;
 * every other tensor has the compute dtype (float64 for float64 inputs, else float32). Everything
 * contiguous, on one device. ddt, dB, dC are zeroed by the kernels (sums).
 *
 * Each entry is a table of argument specs; one function imports and checks every argument (dtype,
 * shape, contiguity, device), refuses overlaps of written tensors (sw_scope_seal), runs the kernel
 * without the GIL and bumps the autograd version of every written tensor. */
#include "bridge.h"   /* Python.h first */

#include <limits.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "py_ops.h"
#include "scan.h"

/* Sizes a shape spec refers to. */
enum { Z_BATCH, Z_LEN, Z_HEADS, Z_HEADDIM, Z_GROUPS, Z_DSTATE, Z_NBLK, Z_WORK, Z_COUNT };

/* What an argument is: a tensor of the io dtype, of the compute dtype or int32; an int; the CUDA
 * scratch; the stream. */
enum { K_IO, K_COMP, K_I32, K_INT, K_WORK, K_STREAM };

#define NONE_OK 1     /* optional tensor: None allowed */
#define GRAD_LEN_DEFAULT LLONG_MIN   /* an omitted grad_len means len */

typedef struct {
    const char *name;
    int kind;
    int flags;           /* SW_READONLY_NO_GRAD or SW_WRITABLE (tensors) */
    int none_ok;
    size_t slot;         /* offsetof the sw_scan_params pointer (tensor) or int64_t (int) it fills */
    int ndim, dims[5];   /* Z_* sizes */
    const char *names;   /* the shape in words, for messages */
    long long dflt;      /* default of an optional int */
} arg_spec;

typedef struct {
    const char *fn, *pyname;
    int ssd;             /* 0: Mamba-1 layout, 1: Mamba-2 layout */
    int backward;
    int nargs, nreq;     /* arguments in call order; the first nreq are required */
    const arg_spec *args;
} entry_spec;

#define SLOT(f) offsetof(sw_scan_params, f)
#define R SW_READONLY_NO_GRAD
#define W SW_WRITABLE
#define T1(n, k, fl, opt, f, a, nm) {n, k, fl, opt, SLOT(f), 1, {a}, nm, 0}
#define T2(n, k, fl, opt, f, a, b, nm) {n, k, fl, opt, SLOT(f), 2, {a, b}, nm, 0}
#define T3(n, k, fl, opt, f, a, b, c, nm) {n, k, fl, opt, SLOT(f), 3, {a, b, c}, nm, 0}
#define T4(n, k, fl, opt, f, a, b, c, d, nm) {n, k, fl, opt, SLOT(f), 4, {a, b, c, d}, nm, 0}
#define T5(n, k, fl, opt, f, a, b, c, d, e, nm) {n, k, fl, opt, SLOT(f), 5, {a, b, c, d, e}, nm, 0}
#define INT(n, f, dflt) {n, K_INT, 0, 0, SLOT(f), 0, {0}, NULL, dflt}
#define WORK {"work", K_WORK, W, NONE_OK, SLOT(work), 1, {Z_WORK}, "(rows*(block+7)*dstate,)", 0}
#define STREAM {"stream", K_STREAM, 0, 0, 0, 0, {0}, NULL, 0}
#define RESET T2("reset", K_I32, R, NONE_OK, reset, Z_BATCH, Z_LEN, "(batch, len)")

/* The shapes of each layout L: L_X (x, z, y, dy, dx, dz), L_DT (dt, ddt), L_BC (B, C, dB, dC), L_ROWN (h0, hlast,
 * dhlast, dh0), L_CKPT, and A, D, dA, dD; the names of x and dx; the backward's trailing arguments. */
#define M1_X(n, k, fl, opt, f) T3(n, k, fl, opt, f, Z_BATCH, Z_HEADS, Z_LEN, "(batch, dim, len)")
#define M1_DT(n, k, fl, f) M1_X(n, k, fl, 0, f)
#define M1_BC(n, k, fl, f) T3(n, k, fl, 0, f, Z_BATCH, Z_DSTATE, Z_LEN, "(batch, dstate, len)")
#define M1_ROWN(n, fl, opt, f) T3(n, K_COMP, fl, opt, f, Z_BATCH, Z_HEADS, Z_DSTATE, "(batch, dim, dstate)")
#define M1_CKPT(fl) T4("ckpt", K_COMP, fl, 0, ckpt, Z_BATCH, Z_HEADS, Z_NBLK, Z_DSTATE, "(batch, dim, nblk, dstate)")
#define M1_A T2("A", K_COMP, R, 0, A, Z_HEADS, Z_DSTATE, "(dim, dstate)")
#define M1_D T1("D", K_COMP, R, NONE_OK, D, Z_HEADS, "(dim,)")
#define M1_DA M1_ROWN("dA", W, 0, dA)
#define M1_DD T2("dD", K_COMP, W, 0, dD, Z_BATCH, Z_HEADS, "(batch, dim)")
#define M1_XNAME "u"
#define M1_DXNAME "du"
#define M1_BWD_TAIL INT("trunc", trunc, 0), INT("grad_len", grad_len, 0), WORK, STREAM, RESET

#define M2_X(n, k, fl, opt, f) T4(n, k, fl, opt, f, Z_BATCH, Z_LEN, Z_HEADS, Z_HEADDIM, "(batch, len, heads, headdim)")
#define M2_DT(n, k, fl, f) T3(n, k, fl, 0, f, Z_BATCH, Z_LEN, Z_HEADS, "(batch, len, heads)")
#define M2_BC(n, k, fl, f) T4(n, k, fl, 0, f, Z_BATCH, Z_LEN, Z_GROUPS, Z_DSTATE, "(batch, len, groups, dstate)")
#define M2_ROWN(n, fl, opt, f)                                                                                  \
    T4(n, K_COMP, fl, opt, f, Z_BATCH, Z_HEADS, Z_HEADDIM, Z_DSTATE, "(batch, heads, headdim, dstate)")
#define M2_CKPT(fl)                                                                                             \
    T5("ckpt", K_COMP, fl, 0, ckpt, Z_BATCH, Z_HEADS, Z_HEADDIM, Z_NBLK, Z_DSTATE,                             \
       "(batch, heads, headdim, nblk, dstate)")
#define M2_A T1("A", K_COMP, R, 0, A, Z_HEADS, "(heads,)")
#define M2_D T1("D", K_COMP, R, NONE_OK, D, Z_HEADS, "(heads,)")
#define M2_ROW(n, f) T3(n, K_COMP, W, 0, f, Z_BATCH, Z_HEADS, Z_HEADDIM, "(batch, heads, headdim)")
#define M2_DA M2_ROW("dA", dA)
#define M2_DD M2_ROW("dD", dD)
#define M2_XNAME "x"
#define M2_DXNAME "dx"
#define M2_BWD_TAIL WORK, STREAM, INT("trunc", trunc, 0), INT("grad_len", grad_len, GRAD_LEN_DEFAULT), RESET

/* The argument lists, in call order, of layout L. */
#define INPUTS(L)                                                                                               \
    L##_X(L##_XNAME, K_IO, R, 0, x), L##_DT("dt", K_IO, R, dt), L##_A, L##_BC("B", K_IO, R, B),               \
        L##_BC("C", K_IO, R, C), L##_D, L##_X("z", K_IO, R, NONE_OK, z)
#define FWD_SPECS(L)                                                                                            \
    {INPUTS(L), L##_ROWN("h0", R, NONE_OK, h0), L##_X("y", K_COMP, W, 0, y), L##_ROWN("hlast", W, 0, hlast),  \
     L##_CKPT(W), INT("block", block, 0), WORK, STREAM, RESET}
#define BWD_SPECS(L)                                                                                            \
    {INPUTS(L), L##_CKPT(R), L##_X("dy", K_COMP, R, 0, dy), L##_ROWN("dhlast", R, NONE_OK, dhlast),            \
     L##_X(L##_DXNAME, K_COMP, W, 0, dx), L##_DT("ddt", K_COMP, W, ddt), L##_X("dz", K_COMP, W, NONE_OK, dz),  \
     L##_BC("dB", K_COMP, W, dB), L##_BC("dC", K_COMP, W, dC), L##_DA, L##_DD, L##_ROWN("dh0", W, 0, dh0),     \
     INT("block", block, 0), L##_BWD_TAIL}

static const arg_spec M1_FWD[] = FWD_SPECS(M1);
static const arg_spec M1_BWD[] = BWD_SPECS(M1);
static const arg_spec M2_FWD[] = FWD_SPECS(M2);
static const arg_spec M2_BWD[] = BWD_SPECS(M2);

#define N_OF(a) ((int)(sizeof(a) / sizeof(a[0])))
static const entry_spec ENTRIES[4] = {
    {"seqwrap.selective_scan", "selective_scan_fwd", 0, 0, N_OF(M1_FWD), N_OF(M1_FWD) - 1, M1_FWD},
    {"seqwrap.selective_scan (backward)", "selective_scan_bwd", 0, 1, N_OF(M1_BWD), N_OF(M1_BWD) - 1, M1_BWD},
    {"seqwrap.ssd_scan", "ssd_scan_fwd", 1, 0, N_OF(M2_FWD), N_OF(M2_FWD) - 1, M2_FWD},
    {"seqwrap.ssd_scan (backward)", "ssd_scan_bwd", 1, 1, N_OF(M2_BWD), N_OF(M2_BWD) - 3, M2_BWD},
};
#define MAX_ARGS 32

/* Positional and keyword arguments into obj[] in spec order (borrowed; NULL: omitted optional). */
static int parse(const entry_spec *e, PyObject *args, PyObject *kwargs, PyObject **obj) {
    const Py_ssize_t npos = PyTuple_GET_SIZE(args);
    if (npos > e->nargs) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", e->pyname, e->nargs, npos);
        return -1;
    }
    Py_ssize_t used = 0;
    for (int i = 0; i < e->nargs; ++i) {
        PyObject *kw = kwargs ? PyDict_GetItemString(kwargs, e->args[i].name) : NULL;
        if (i < npos && kw) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", e->pyname, e->args[i].name);
            return -1;
        }
        used += kw != NULL;
        obj[i] = i < npos ? PyTuple_GET_ITEM(args, i) : kw;
        if (!obj[i] && i < e->nreq) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s' (pos %d)", e->pyname,
                         e->args[i].name, i + 1);
            return -1;
        }
    }
    if (kwargs && PyDict_GET_SIZE(kwargs) != used) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument", e->pyname);
        return -1;
    }
    return 0;
}

/* Raises ValueError unless t has exactly the shape `want` (ndim entries; names for the message). */
static int check_shape(const char *fn, const char *arg, const sw_tensor *t, int ndim, const int64_t *want,
                       const char *names) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; ++i) ok = t->shape[i] == want[i];
    if (ok) return 0;
    char buf[2][192];
    for (int k = 0; k < 2; ++k) {
        const int n = k ? ndim : t->ndim;
        size_t u = (size_t)snprintf(buf[k], sizeof buf[k], "(");
        for (int i = 0; i < n && u < sizeof buf[k]; ++i)
            u += (size_t)snprintf(buf[k] + u, sizeof buf[k] - u, i ? ", %lld" : "%lld",
                                  (long long)(k ? want[i] : t->shape[i]));
        if (u < sizeof buf[k]) snprintf(buf[k] + u, sizeof buf[k] - u, n == 1 ? ",)" : ")");
    }
    PyErr_Format(PyExc_ValueError, "%s: argument '%s' has shape %s; expected %s = %s", fn, arg, buf[0], names, buf[1]);
    return -1;
}

/* The argument named `name` of e (the specs name each once). */
static int find(const entry_spec *e, const char *name) {
    for (int i = 0; i < e->nargs; ++i)
        if (strcmp(e->args[i].name, name) == 0) return i;
    return -1;
}

/* The first tensor (u or x): fixes batch, len, heads, headdim and the dtypes. */
static int take_first(const entry_spec *e, PyObject *o, sw_import_scope *scope, sw_tensor *x, int64_t *z) {
    const char *fn = e->fn, *arg = e->args[0].name;
    const int want = e->ssd ? 4 : 3;
    if (sw_import(o, fn, arg, R, scope, x) < 0 || sw_check_dtype(fn, arg, x, SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64)) < 0)
        return -1;
    if (x->ndim != want) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' must have %d dimensions %s; got %d", fn, arg, want,
                     e->ssd ? "(batch, len, heads, headdim)" : "(batch, dim, len)", x->ndim);
        return -1;
    }
    if (sw_check_nonempty(fn, arg, x) < 0 || sw_check_contiguous(fn, arg, x) < 0) return -1;
    z[Z_BATCH] = x->shape[0];
    z[Z_LEN] = x->shape[e->ssd ? 1 : 2];
    z[Z_HEADS] = x->shape[e->ssd ? 2 : 1];
    z[Z_HEADDIM] = e->ssd ? x->shape[3] : 1;
    return 0;
}

/* The tensor fixing groups and dstate: A (dim, dstate) for Mamba-1, B (batch, len, groups, dstate)
 * for Mamba-2. */
static int take_state_dims(const entry_spec *e, PyObject **obj, sw_import_scope *scope, sw_tensor *t, int64_t *z) {
    const char *fn = e->fn, *arg = e->ssd ? "B" : "A";
    PyObject *o = obj[find(e, arg)];
    if (o == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a tensor, not None", fn, arg);
        return -1;
    }
    if (sw_import(o, fn, arg, R, scope, t) < 0) return -1;
    if (!e->ssd && (t->ndim != 2 || t->shape[0] != z[Z_HEADS])) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'A' must have shape (dim, dstate) with dim = %lld (u.shape[1])",
                     fn, (long long)z[Z_HEADS]);
        return -1;
    }
    if (e->ssd && (t->ndim != 4 || t->shape[0] != z[Z_BATCH] || t->shape[1] != z[Z_LEN])) {
        PyErr_Format(PyExc_ValueError,
                     "%s: argument 'B' must have shape (batch, len, groups, dstate) with batch = %lld and len = %lld "
                     "(from x)", fn, (long long)z[Z_BATCH], (long long)z[Z_LEN]);
        return -1;
    }
    z[Z_GROUPS] = e->ssd ? t->shape[2] : 1;
    z[Z_DSTATE] = t->shape[t->ndim - 1];
    if (z[Z_GROUPS] < 1 || z[Z_HEADS] % z[Z_GROUPS] != 0) {
        PyErr_Format(PyExc_ValueError, "%s: groups (B.shape[2] = %lld) must divide heads (x.shape[2] = %lld)", fn,
                     (long long)z[Z_GROUPS], (long long)z[Z_HEADS]);
        return -1;
    }
    if (z[Z_DSTATE] < 1 || z[Z_DSTATE] > SW_SCAN_MAX_DSTATE) {
        PyErr_Format(PyExc_ValueError, "%s: dstate (%s) must be between 1 and %d, got %lld", fn,
                     e->ssd ? "B.shape[3]" : "A.shape[1]", SW_SCAN_MAX_DSTATE, (long long)z[Z_DSTATE]);
        return -1;
    }
    return 0;
}

/* An int argument: the given int or the spec's default. */
static int take_int(const entry_spec *e, const arg_spec *a, PyObject *o, long long *v) {
    if (!o) {
        *v = a->dflt;
        return 0;
    }
    *v = PyLong_AsLongLong(o);
    if (*v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: '%s' must be an int, not %s", e->fn, a->name, Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

/* Imports and checks one tensor argument, records its data pointer in p. */
static int take_tensor(const entry_spec *e, const arg_spec *a, PyObject *o, const int64_t *z, const sw_tensor *x,
                       sw_import_scope *scope, sw_scan_params *p) {
    const char *fn = e->fn;
    const sw_dtype comp = x->dtype == SW_FLOAT64 ? SW_FLOAT64 : SW_FLOAT32;
    if (a->kind == K_WORK && x->device != SW_CUDA) {
        if (o && o != Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: 'work' must be None for CPU tensors", fn);
            return -1;
        }
        return 0;   /* the CPU kernel allocates its own scratch */
    }
    if (!o || o == Py_None) {
        if (a->none_ok && a->kind != K_WORK) return 0;
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a tensor, not None", fn, a->name);
        return -1;
    }
    int64_t want[5];
    for (int i = 0; i < a->ndim; ++i) want[i] = z[a->dims[i]];
    const sw_dtype dt = a->kind == K_IO ? x->dtype : a->kind == K_I32 ? SW_INT32 : comp;
    sw_tensor t;
    if (sw_import(o, fn, a->name, a->flags, scope, &t) < 0 || sw_check_dtype(fn, a->name, &t, SW_DT(dt)) < 0 ||
        check_shape(fn, a->name, &t, a->ndim, want, a->names) < 0 || sw_check_contiguous(fn, a->name, &t) < 0 ||
        sw_check_same_device(fn, a->name, &t, e->args[0].name, x) < 0)
        return -1;
    *(const void **)((char *)p + a->slot) = t.data;
    return 0;
}

/* Strides of the layouts (scan.h) and the mode. */
static void set_layout(const entry_spec *e, const int64_t *z, sw_scan_params *p) {
    const int64_t L = z[Z_LEN], H = z[Z_HEADS], P = z[Z_HEADDIM], G = z[Z_GROUPS], N = z[Z_DSTATE];
    p->batch = z[Z_BATCH];
    p->len = L;
    p->heads = H;
    p->headdim = P;
    p->groups = G;
    p->dstate = N;
    p->a_scalar = e->ssd;
    if (e->ssd) {   /* x (batch, len, heads, headdim), dt (batch, len, heads), B (batch, len, groups, dstate) */
        const int64_t sx[4] = {L * H * P, H * P, P, 1}, sdt[3] = {L * H, H, 1}, sb[4] = {L * G * N, G * N, N, 1};
        memcpy(p->sx, sx, sizeof sx);
        memcpy(p->sdt, sdt, sizeof sdt);
        memcpy(p->sb, sb, sizeof sb);
    } else {        /* u, dt (batch, dim, len), B (batch, dstate, len) */
        const int64_t sx[4] = {H * L, 1, L, 0}, sdt[3] = {H * L, 1, L}, sb[4] = {N * L, 1, 0, L};
        memcpy(p->sx, sx, sizeof sx);
        memcpy(p->sdt, sdt, sizeof sdt);
        memcpy(p->sb, sb, sizeof sb);
    }
}

/* Range checks of block, trunc and grad_len. */
static int check_ints(const entry_spec *e, const sw_scan_params *p) {
    if (p->block < 1 || p->block > (int64_t)1 << 30) {
        PyErr_Format(PyExc_ValueError, "%s: 'block' must be between 1 and 2^30, got %lld", e->fn, (long long)p->block);
        return -1;
    }
    if (p->trunc < 0) {
        PyErr_Format(PyExc_ValueError, "%s: 'trunc' must be >= 0 (0: no truncation), got %lld", e->fn,
                     (long long)p->trunc);
        return -1;
    }
    if (p->grad_len < 0 || p->grad_len > p->len) {
        PyErr_Format(PyExc_ValueError, "%s: 'grad_len' must be in [0, len=%lld], got %lld", e->fn, (long long)p->len,
                     (long long)p->grad_len);
        return -1;
    }
    return 0;
}

/* Everything after parsing: import and check, seal, run, bump, raise. */
static int call(const entry_spec *e, PyObject **obj, sw_import_scope *scope) {
    sw_scan_params p;
    memset(&p, 0, sizeof p);
    int64_t z[Z_COUNT] = {0};
    sw_tensor x, st;
    void *stream = NULL;
    if (take_first(e, obj[0], scope, &x, z) < 0) return -1;
    p.io_dtype = x.dtype;
    p.f64 = x.dtype == SW_FLOAT64;
    for (int i = 0; i < e->nargs; ++i) {   /* ints first: block sizes the checkpoints */
        const arg_spec *a = &e->args[i];
        long long v;
        if (a->kind == K_STREAM && sw_parse_stream(obj[i] ? obj[i] : Py_None, &stream) < 0) return -1;
        if (a->kind != K_INT) continue;
        if (take_int(e, a, obj[i], &v) < 0) return -1;
        *(int64_t *)((char *)&p + a->slot) = v == GRAD_LEN_DEFAULT ? z[Z_LEN] : v;
    }
    if (!e->backward) p.grad_len = z[Z_LEN];
    p.len = z[Z_LEN];
    if (check_ints(e, &p) < 0 || take_state_dims(e, obj, scope, &st, z) < 0) return -1;
    z[Z_NBLK] = (z[Z_LEN] + p.block - 1) / p.block;
    z[Z_WORK] = z[Z_BATCH] * z[Z_HEADS] * z[Z_HEADDIM] * SW_SCAN_WORK(1, z[Z_DSTATE], p.block);
    set_layout(e, z, &p);
    for (int i = 0; i < e->nargs; ++i)
        if (e->args[i].kind <= K_I32 || e->args[i].kind == K_WORK)
            if (take_tensor(e, &e->args[i], obj[i], z, &x, scope, &p) < 0) return -1;
    if (e->backward && (p.dz != NULL) != (p.z != NULL)) {
        PyErr_Format(PyExc_ValueError, "%s: 'dz' must be given exactly when 'z' is", e->fn);
        return -1;
    }
    /* written tensors may share memory with no other argument */
    if (sw_scope_seal(scope, e->fn) < 0) return -1;
    sw_error err = {SW_OK, ""};
    sw_code rc;
    if (x.device == SW_CUDA) {
        rc = e->backward ? sw_scan_bwd_cuda(&p, x.device_id, stream, &err) : sw_scan_fwd_cuda(&p, x.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = e->backward ? sw_scan_bwd_cpu(&p, &err) : sw_scan_fwd_cpu(&p, &err);
        Py_END_ALLOW_THREADS
    }
    if (sw_scope_bump_versions(scope) < 0) return -1;
    if (rc != SW_OK) {
        sw_raise_status(e->fn, rc, &err);
        return -1;
    }
    return 0;
}

static PyObject *entry(const entry_spec *e, PyObject *args, PyObject *kwargs) {
    PyObject *obj[MAX_ARGS];
    if (parse(e, args, kwargs, obj) < 0) return NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    const int rc = call(e, obj, &scope);
    sw_scope_release(&scope);
    return rc < 0 ? NULL : Py_NewRef(Py_None);
}

#define ENTRY(fname, i)                                                   \
    PyObject *fname(PyObject *self, PyObject *args, PyObject *kwargs) {   \
        (void)self;                                                       \
        return entry(&ENTRIES[i], args, kwargs);                          \
    }
ENTRY(sw_py_selective_scan_fwd, 0)
ENTRY(sw_py_selective_scan_bwd, 1)
ENTRY(sw_py_ssd_scan_fwd, 2)
ENTRY(sw_py_ssd_scan_bwd, 3)
