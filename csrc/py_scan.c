/* py_scan.c - CPython glue of the selective scan kernels (see sw_scan.h).
 *
 * _C.selective_scan_fwd(u, dt, A, B, C, D, z, h0, y, hlast, ckpt, block, work, stream, reset=None)
 * _C.selective_scan_bwd(u, dt, A, B, C, D, z, ckpt, dy, dhlast, du, ddt, dz, dB, dC, dA, dD, dh0,
 *                       block, trunc, grad_len, work, stream, reset=None)
 * Shapes: u, dt, z, y, dy, du, ddt, dz: (batch, dim, len); A: (dim, dstate); B, C: (batch, dstate, len);
 * D: (dim,); h0, hlast, dhlast, dA, dh0: (batch, dim, dstate); dB, dC: (batch, dstate, len) (zeroed);
 * dD: (batch, dim); ckpt: (batch, dim, ceil(len/block), dstate); work: None on the CPU, on CUDA a
 * tensor of batch*dim*(block+2)*dstate values. D, z, h0, dhlast may be None (dz is None iff z is).
 * reset: None or an int32 (batch, len) tensor, nonzero where a document starts (see sw_scan.h); the
 * backward must get the reset the forward got.
 * u, dt, B, C, z: float32 / float16 / bfloat16 / float64, all the same dtype; every other tensor
 * has the compute dtype: float64 for float64 inputs, float32 otherwise. Everything contiguous,
 * on one device. Every argument is checked before any kernel runs.
 */
#include "py_ops.h"

#include <stdio.h>
#include <string.h>

#include "bridge.h"
#include "sw_cuda.h"
#include "sw_scan.h"

static const char *const FN_FWD = "seqwrap.selective_scan";
static const char *const FN_BWD = "seqwrap.selective_scan (backward)";

/* The sizes every tensor is checked against. */
typedef struct {
    int64_t batch, dim, dstate, len, nblk;
    sw_dtype io, comp;
    sw_tensor u;  /* reference for device checks */
} scan_dims;

/* Raises ValueError unless t has exactly the shape `want` (ndim entries, names for the message). */
static int check_shape(const char *fn, const char *arg, const sw_tensor *t, int ndim, const int64_t *want,
                       const char *names) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; ++i) ok = t->shape[i] == want[i];
    if (ok) return 0;
    char got[160], exp[160];
    size_t g = (size_t)snprintf(got, sizeof got, "(");
    for (int i = 0; i < t->ndim && g < sizeof got; ++i)
        g += (size_t)snprintf(got + g, sizeof got - g, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (g < sizeof got) snprintf(got + g, sizeof got - g, t->ndim == 1 ? ",)" : ")");
    size_t e = (size_t)snprintf(exp, sizeof exp, "(");
    for (int i = 0; i < ndim && e < sizeof exp; ++i)
        e += (size_t)snprintf(exp + e, sizeof exp - e, i ? ", %lld" : "%lld", (long long)want[i]);
    if (e < sizeof exp) snprintf(exp + e, sizeof exp - e, ndim == 1 ? ",)" : ")");
    PyErr_Format(PyExc_ValueError, "%s: argument '%s' has shape %s; expected %s = %s", fn, arg, got, names, exp);
    return -1;
}

/* Imports one tensor argument and checks dtype, contiguity, device and shape.
 * `optional`: None is allowed (then *present = 0). */
static int take(PyObject *obj, const char *fn, const char *arg, int flags, int optional, sw_dtype dtype,
                int ndim, const int64_t *shape, const char *names, const scan_dims *dims, sw_import_scope *scope,
                sw_tensor *out, int *present) {
    if (present) *present = 0;
    if (obj == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a tensor, not None", fn, arg);
        return -1;
    }
    if (sw_import(obj, fn, arg, flags, scope, out) < 0 || sw_check_dtype(fn, arg, out, SW_DT(dtype)) < 0 ||
        check_shape(fn, arg, out, ndim, shape, names) < 0 || sw_check_contiguous(fn, arg, out) < 0 ||
        sw_check_same_device(fn, arg, out, "u", &dims->u) < 0)
        return -1;
    if (present) *present = 1;
    return 0;
}

/* u, dt, A, B, C, D, z: fills dims and the input fields of p. */
static int take_inputs(const char *fn, PyObject *u_o, PyObject *dt_o, PyObject *A_o, PyObject *B_o,
                       PyObject *C_o, PyObject *D_o, PyObject *z_o, int64_t block, sw_import_scope *scope,
                       scan_dims *dims, sw_scan_params *p) {
    sw_tensor u, dt, A, B, C, D, z;
    if (sw_import(u_o, fn, "u", SW_READONLY_NO_GRAD, scope, &u) < 0 ||
        sw_check_dtype(fn, "u", &u, SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64)) < 0)
        return -1;
    if (u.ndim != 3) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'u' must have 3 dimensions (batch, dim, len); got %d", fn,
                     u.ndim);
        return -1;
    }
    if (sw_check_nonempty(fn, "u", &u) < 0 || sw_check_contiguous(fn, "u", &u) < 0) return -1;
    dims->u = u;
    dims->batch = u.shape[0];
    dims->dim = u.shape[1];
    dims->len = u.shape[2];
    dims->io = u.dtype;
    dims->comp = u.dtype == SW_FLOAT64 ? SW_FLOAT64 : SW_FLOAT32;
    if (block < 1 || block > (int64_t)1 << 30) {
        PyErr_Format(PyExc_ValueError, "%s: 'block' must be between 1 and 2^30, got %lld", fn, (long long)block);
        return -1;
    }
    dims->nblk = (dims->len + block - 1) / block;
    if (sw_import(A_o, fn, "A", SW_READONLY_NO_GRAD, scope, &A) < 0) return -1;
    if (A.ndim != 2 || A.shape[0] != dims->dim) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'A' must have shape (dim, dstate) with dim = %lld (u.shape[1])",
                     fn, (long long)dims->dim);
        return -1;
    }
    dims->dstate = A.shape[1];
    if (dims->dstate < 1 || dims->dstate > SW_SCAN_MAX_DSTATE) {
        PyErr_Format(PyExc_ValueError, "%s: dstate (A.shape[1]) must be between 1 and %d, got %lld", fn,
                     SW_SCAN_MAX_DSTATE, (long long)dims->dstate);
        return -1;
    }
    const int64_t s_bdl[3] = {dims->batch, dims->dim, dims->len};
    const int64_t s_dn[2] = {dims->dim, dims->dstate};
    const int64_t s_bnl[3] = {dims->batch, dims->dstate, dims->len};
    const int64_t s_d[1] = {dims->dim};
    const int f = SW_READONLY_NO_GRAD;
    int has_D, has_z;
    if (take(dt_o, fn, "dt", f, 0, dims->io, 3, s_bdl, "(batch, dim, len)", dims, scope, &dt, NULL) < 0 ||
        take(A_o, fn, "A", f, 0, dims->comp, 2, s_dn, "(dim, dstate)", dims, scope, &A, NULL) < 0 ||
        take(B_o, fn, "B", f, 0, dims->io, 3, s_bnl, "(batch, dstate, len)", dims, scope, &B, NULL) < 0 ||
        take(C_o, fn, "C", f, 0, dims->io, 3, s_bnl, "(batch, dstate, len)", dims, scope, &C, NULL) < 0 ||
        take(D_o, fn, "D", f, 1, dims->comp, 1, s_d, "(dim,)", dims, scope, &D, &has_D) < 0 ||
        take(z_o, fn, "z", f, 1, dims->io, 3, s_bdl, "(batch, dim, len)", dims, scope, &z, &has_z) < 0)
        return -1;
    memset(p, 0, sizeof *p);
    p->batch = dims->batch;
    p->dim = dims->dim;
    p->dstate = dims->dstate;
    p->len = dims->len;
    p->block = block;
    p->io_dtype = dims->io;
    p->f64 = dims->comp == SW_FLOAT64;
    p->u = u.data;
    p->dt = dt.data;
    p->A = A.data;
    p->B = B.data;
    p->C = C.data;
    p->D = has_D ? D.data : NULL;
    p->z = has_z ? z.data : NULL;
    p->grad_len = dims->len;
    return 0;
}

static int take_work(const char *fn, PyObject *work_o, const scan_dims *dims, int64_t block, sw_import_scope *scope,
                     sw_scan_params *p) {
    if (dims->u.device != SW_CUDA) return 0;  /* the CPU kernel allocates its own scratch */
    const int64_t s[1] = {dims->batch * dims->dim * (block + 2) * dims->dstate};
    sw_tensor w;
    if (take(work_o, fn, "work", SW_WRITABLE, 0, dims->comp, 1, s, "(batch*dim*(block+2)*dstate,)", dims, scope,
             &w, NULL) < 0)
        return -1;
    p->work = w.data;
    return 0;
}

/* The optional document resets: None, or int32 (batch, len) on u's device. */
static int take_reset(const char *fn, PyObject *reset_o, const scan_dims *dims, sw_import_scope *scope,
                      sw_scan_params *p) {
    const int64_t s_bl[2] = {dims->batch, dims->len};
    sw_tensor t;
    int present;
    if (take(reset_o, fn, "reset", SW_READONLY_NO_GRAD, 1, SW_INT32, 2, s_bl, "(batch, len)", dims, scope, &t,
             &present) < 0)
        return -1;
    p->reset = present ? (const int32_t *)t.data : NULL;
    return 0;
}

PyObject *sw_py_selective_scan_fwd(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"u", "dt", "A", "B", "C", "D", "z", "h0", "y", "hlast", "ckpt", "block", "work",
                             "stream", "reset", NULL};
    PyObject *u, *dt, *A, *B, *C, *D, *z, *h0, *y, *hlast, *ckpt, *work, *stream_o, *reset = Py_None;
    long long block;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOOOLOO|O:selective_scan_fwd", kwlist, &u, &dt, &A, &B,
                                     &C, &D, &z, &h0, &y, &hlast, &ckpt, &block, &work, &stream_o, &reset))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;
    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    scan_dims dims;
    sw_scan_params p;
    sw_tensor t;
    int has_h0;
    if (take_inputs(FN_FWD, u, dt, A, B, C, D, z, (int64_t)block, &scope, &dims, &p) < 0) goto done;
    if (take_reset(FN_FWD, reset, &dims, &scope, &p) < 0) goto done;
    {
        const int64_t s_bdn[3] = {dims.batch, dims.dim, dims.dstate};
        const int64_t s_bdl[3] = {dims.batch, dims.dim, dims.len};
        const int64_t s_ck[4] = {dims.batch, dims.dim, dims.nblk, dims.dstate};
        if (take(h0, FN_FWD, "h0", SW_READONLY_NO_GRAD, 1, dims.comp, 3, s_bdn, "(batch, dim, dstate)", &dims,
                 &scope, &t, &has_h0) < 0)
            goto done;
        p.h0 = has_h0 ? t.data : NULL;
        if (take(y, FN_FWD, "y", SW_WRITABLE, 0, dims.comp, 3, s_bdl, "(batch, dim, len)", &dims, &scope, &t,
                 NULL) < 0)
            goto done;
        p.y = t.data;
        if (take(hlast, FN_FWD, "hlast", SW_WRITABLE, 0, dims.comp, 3, s_bdn, "(batch, dim, dstate)", &dims,
                 &scope, &t, NULL) < 0)
            goto done;
        p.hlast = t.data;
        if (take(ckpt, FN_FWD, "ckpt", SW_WRITABLE, 0, dims.comp, 4, s_ck, "(batch, dim, nblk, dstate)", &dims,
                 &scope, &t, NULL) < 0)
            goto done;
        p.ckpt = t.data;
        if (take_work(FN_FWD, work, &dims, (int64_t)block, &scope, &p) < 0) goto done;
    }
    /* y, hlast, ckpt, work are written: none may share memory with another argument */
    if (sw_scope_seal(&scope, FN_FWD) < 0) goto done;
    {
        sw_error err = {SW_OK, ""};
        sw_code rc;
        if (dims.u.device == SW_CUDA) {
            rc = sw_scan_fwd_cuda(&p, dims.u.device_id, stream, &err);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = sw_scan_fwd_cpu(&p, &err);
            Py_END_ALLOW_THREADS
        }
        if (sw_scope_bump_versions(&scope) < 0) goto done;
        if (rc != SW_OK) {
            sw_raise_status(FN_FWD, rc, &err);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    return result;
}

PyObject *sw_py_selective_scan_bwd(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"u",  "dt", "A",  "B",  "C",  "D",  "z",  "ckpt",  "dy",    "dhlast",   "du", "ddt",
                             "dz", "dB", "dC", "dA", "dD", "dh0", "block", "trunc", "grad_len", "work", "stream",
                             "reset", NULL};
    PyObject *u, *dt, *A, *B, *C, *D, *z, *ckpt, *dy, *dhlast, *du, *ddt, *dz, *dB, *dC, *dA, *dD, *dh0, *work,
        *stream_o, *reset = Py_None;
    long long block, trunc, grad_len;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOOOOOOOOOOLLLOO|O:selective_scan_bwd", kwlist, &u, &dt,
                                     &A, &B, &C, &D, &z, &ckpt, &dy, &dhlast, &du, &ddt, &dz, &dB, &dC, &dA, &dD,
                                     &dh0, &block, &trunc, &grad_len, &work, &stream_o, &reset))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;
    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    scan_dims dims;
    sw_scan_params p;
    sw_tensor t;
    int present;
    if (take_inputs(FN_BWD, u, dt, A, B, C, D, z, (int64_t)block, &scope, &dims, &p) < 0) goto done;
    if (take_reset(FN_BWD, reset, &dims, &scope, &p) < 0) goto done;
    if (trunc < 0) {
        PyErr_Format(PyExc_ValueError, "%s: 'trunc' must be >= 0 (0: no truncation), got %lld", FN_BWD, trunc);
        goto done;
    }
    if (grad_len < 0 || grad_len > dims.len) {
        PyErr_Format(PyExc_ValueError, "%s: 'grad_len' must be in [0, len=%lld], got %lld", FN_BWD,
                     (long long)dims.len, grad_len);
        goto done;
    }
    p.trunc = trunc;
    p.grad_len = grad_len;
    {
        const int64_t s_bdn[3] = {dims.batch, dims.dim, dims.dstate};
        const int64_t s_bdl[3] = {dims.batch, dims.dim, dims.len};
        const int64_t s_bnl[3] = {dims.batch, dims.dstate, dims.len};
        const int64_t s_ck[4] = {dims.batch, dims.dim, dims.nblk, dims.dstate};
        const int64_t s_bd[2] = {dims.batch, dims.dim};
        const sw_dtype c = dims.comp;
        const int R = SW_READONLY_NO_GRAD, W = SW_WRITABLE;
        if (take(ckpt, FN_BWD, "ckpt", R, 0, c, 4, s_ck, "(batch, dim, nblk, dstate)", &dims, &scope, &t, NULL) < 0)
            goto done;
        p.ckpt = t.data;
        if (take(dy, FN_BWD, "dy", R, 0, c, 3, s_bdl, "(batch, dim, len)", &dims, &scope, &t, NULL) < 0) goto done;
        p.dy = t.data;
        if (take(dhlast, FN_BWD, "dhlast", R, 1, c, 3, s_bdn, "(batch, dim, dstate)", &dims, &scope, &t,
                 &present) < 0)
            goto done;
        p.dhlast = present ? t.data : NULL;
        if (take(du, FN_BWD, "du", W, 0, c, 3, s_bdl, "(batch, dim, len)", &dims, &scope, &t, NULL) < 0) goto done;
        p.du = t.data;
        if (take(ddt, FN_BWD, "ddt", W, 0, c, 3, s_bdl, "(batch, dim, len)", &dims, &scope, &t, NULL) < 0)
            goto done;
        p.ddt = t.data;
        if (take(dz, FN_BWD, "dz", W, 1, c, 3, s_bdl, "(batch, dim, len)", &dims, &scope, &t, &present) < 0)
            goto done;
        if (present != (p.z != NULL)) {
            PyErr_Format(PyExc_ValueError, "%s: 'dz' must be given exactly when 'z' is", FN_BWD);
            goto done;
        }
        p.dz = present ? t.data : NULL;
        if (take(dB, FN_BWD, "dB", W, 0, c, 3, s_bnl, "(batch, dstate, len)", &dims, &scope, &t, NULL) < 0)
            goto done;
        p.dB = t.data;
        if (take(dC, FN_BWD, "dC", W, 0, c, 3, s_bnl, "(batch, dstate, len)", &dims, &scope, &t, NULL) < 0)
            goto done;
        p.dC = t.data;
        if (take(dA, FN_BWD, "dA", W, 0, c, 3, s_bdn, "(batch, dim, dstate)", &dims, &scope, &t, NULL) < 0)
            goto done;
        p.dA = t.data;
        if (take(dD, FN_BWD, "dD", W, 0, c, 2, s_bd, "(batch, dim)", &dims, &scope, &t, NULL) < 0) goto done;
        p.dD = t.data;
        if (take(dh0, FN_BWD, "dh0", W, 0, c, 3, s_bdn, "(batch, dim, dstate)", &dims, &scope, &t, NULL) < 0)
            goto done;
        p.dh0 = t.data;
        if (take_work(FN_BWD, work, &dims, (int64_t)block, &scope, &p) < 0) goto done;
    }
    /* du, ddt, dz, dB, dC, dA, dD, dh0, work are written: none may share memory with another argument */
    if (sw_scope_seal(&scope, FN_BWD) < 0) goto done;
    {
        sw_error err = {SW_OK, ""};
        sw_code rc;
        if (dims.u.device == SW_CUDA) {
            rc = sw_scan_bwd_cuda(&p, dims.u.device_id, stream, &err);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = sw_scan_bwd_cpu(&p, &err);
            Py_END_ALLOW_THREADS
        }
        if (sw_scope_bump_versions(&scope) < 0) goto done;
        if (rc != SW_OK) {
            sw_raise_status(FN_BWD, rc, &err);
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    return result;
}
