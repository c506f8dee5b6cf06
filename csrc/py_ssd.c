/* py_ssd.c - CPython glue of the Mamba-2 (SSD) scan kernels (see sw_ssd.h).
 *
 * _C.ssd_scan_fwd(x, dt, A, B, C, D, z, h0, y, hlast, ckpt, block, work, stream)
 * _C.ssd_scan_bwd(x, dt, A, B, C, D, z, ckpt, dy, dhlast, dx, ddt, dz, dB, dC, dA, dD, dh0,
 *                 block, work, stream)
 * Shapes: x, z, y, dy, dx, dz: (batch, len, heads, headdim); dt, ddt: (batch, len, heads);
 * A, D: (heads,); B, C, dB, dC: (batch, len, groups, dstate) with heads % groups == 0;
 * h0, hlast, dhlast, dh0: (batch, heads, headdim, dstate); dA, dD: (batch, heads, headdim);
 * ckpt: (batch, heads, headdim, ceil(len/block), dstate); work: None on the CPU, on CUDA a tensor
 * of batch*heads*headdim*(block+2)*dstate values. D, z, h0, dhlast may be None (dz is None iff z is).
 * ddt, dB and dC are accumulated into: the caller zeroes them.
 * x, dt, B, C, z: float32 / float16 / bfloat16 / float64, all the same dtype; every other tensor
 * has the compute dtype: float64 for float64 inputs, float32 otherwise. Everything contiguous, on
 * one device; no output may share memory with an input or another output. Every argument is
 * checked before any kernel runs.
 */
#include "py_ops.h"

#include <stdio.h>
#include <string.h>

#include "bridge.h"
#include "sw_ssd.h"

static const char *const FN_FWD = "seqwrap.ssd_scan";
static const char *const FN_BWD = "seqwrap.ssd_scan (backward)";

#define SSD_MAX_ARGS 24

/* The sizes every tensor is checked against, and the byte ranges seen so far (aliasing check). */
typedef struct {
    int64_t batch, len, heads, headdim, groups, dstate, nblk;
    sw_dtype io, comp;
    sw_tensor x;  /* reference for device checks */
    int nrange;
    struct { uintptr_t lo, hi; const char *name; int written; } range[SSD_MAX_ARGS];
} ssd_dims;

static size_t dtype_size(sw_dtype d) {
    switch (d) {
    case SW_FLOAT16:
    case SW_BFLOAT16: return 2;
    case SW_FLOAT32:
    case SW_INT32: return 4;
    default: return 8;
    }
}

/* Records t's byte range; raises ValueError if a written tensor overlaps any other one. */
static int track(const char *fn, const char *arg, const sw_tensor *t, int written, ssd_dims *dims) {
    const uintptr_t lo = (uintptr_t)t->data, hi = lo + (uintptr_t)((size_t)t->numel * dtype_size(t->dtype));
    for (int i = 0; i < dims->nrange; ++i) {
        if (!(written || dims->range[i].written)) continue;  /* inputs may share memory */
        if (lo < dims->range[i].hi && dims->range[i].lo < hi) {
            PyErr_Format(PyExc_ValueError,
                         "%s: argument '%s' shares memory with argument '%s'; outputs must be separate tensors that "
                         "alias no input or other output",
                         fn, arg, dims->range[i].name);
            return -1;
        }
    }
    if (dims->nrange < SSD_MAX_ARGS) {
        dims->range[dims->nrange].lo = lo;
        dims->range[dims->nrange].hi = hi;
        dims->range[dims->nrange].name = arg;
        dims->range[dims->nrange].written = written;
        dims->nrange++;
    }
    return 0;
}

/* Raises ValueError unless t has exactly the shape `want` (ndim entries; names for the message). */
static int check_shape(const char *fn, const char *arg, const sw_tensor *t, int ndim, const int64_t *want,
                       const char *names) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; ++i) ok = t->shape[i] == want[i];
    if (ok) return 0;
    char got[192], exp[192];
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

/* Imports one tensor argument and checks dtype, shape, contiguity, device and aliasing.
 * `optional`: None is allowed (then *present = 0); returns the data pointer in *data (NULL if absent). */
static int take(PyObject *obj, const char *fn, const char *arg, int flags, int optional, sw_dtype dtype, int ndim,
                const int64_t *shape, const char *names, ssd_dims *dims, sw_import_scope *scope, void **data) {
    *data = NULL;
    if (obj == Py_None) {
        if (optional) return 0;
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a tensor, not None", fn, arg);
        return -1;
    }
    sw_tensor t;
    if (sw_import(obj, fn, arg, flags, scope, &t) < 0 || sw_check_dtype(fn, arg, &t, SW_DT(dtype)) < 0 ||
        check_shape(fn, arg, &t, ndim, shape, names) < 0 || sw_check_contiguous(fn, arg, &t) < 0 ||
        sw_check_same_device(fn, arg, &t, "x", &dims->x) < 0 || track(fn, arg, &t, flags == SW_WRITABLE, dims) < 0)
        return -1;
    *data = t.data;
    return 0;
}

/* x, dt, A, B, C, D, z: fills dims and the input fields of p. */
static int take_inputs(const char *fn, PyObject *x_o, PyObject *dt_o, PyObject *A_o, PyObject *B_o, PyObject *C_o,
                       PyObject *D_o, PyObject *z_o, long long block, sw_import_scope *scope, ssd_dims *dims,
                       sw_ssd_params *p) {
    memset(dims, 0, sizeof *dims);
    memset(p, 0, sizeof *p);
    sw_tensor x, Bt;
    if (sw_import(x_o, fn, "x", SW_READONLY_NO_GRAD, scope, &x) < 0 ||
        sw_check_dtype(fn, "x", &x, SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64)) < 0)
        return -1;
    if (x.ndim != 4) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'x' must have 4 dimensions (batch, len, heads, headdim); got %d",
                     fn, x.ndim);
        return -1;
    }
    if (sw_check_nonempty(fn, "x", &x) < 0 || sw_check_contiguous(fn, "x", &x) < 0) return -1;
    dims->x = x;
    dims->batch = x.shape[0];
    dims->len = x.shape[1];
    dims->heads = x.shape[2];
    dims->headdim = x.shape[3];
    dims->io = x.dtype;
    dims->comp = x.dtype == SW_FLOAT64 ? SW_FLOAT64 : SW_FLOAT32;
    if (track(fn, "x", &x, 0, dims) < 0) return -1;
    if (block < 1 || block > (1LL << 30)) {
        PyErr_Format(PyExc_ValueError, "%s: 'block' must be between 1 and 2^30, got %lld", fn, block);
        return -1;
    }
    dims->nblk = (dims->len + block - 1) / block;
    /* B fixes groups and dstate */
    if (B_o == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s: argument 'B' must be a tensor, not None", fn);
        return -1;
    }
    if (sw_import(B_o, fn, "B", SW_READONLY_NO_GRAD, scope, &Bt) < 0) return -1;
    if (Bt.ndim != 4 || Bt.shape[0] != dims->batch || Bt.shape[1] != dims->len) {
        PyErr_Format(PyExc_ValueError,
                     "%s: argument 'B' must have shape (batch, len, groups, dstate) with batch = %lld and len = %lld "
                     "(from x)", fn, (long long)dims->batch, (long long)dims->len);
        return -1;
    }
    dims->groups = Bt.shape[2];
    dims->dstate = Bt.shape[3];
    if (dims->groups < 1 || dims->heads % dims->groups != 0) {
        PyErr_Format(PyExc_ValueError, "%s: groups (B.shape[2] = %lld) must divide heads (x.shape[2] = %lld)", fn,
                     (long long)dims->groups, (long long)dims->heads);
        return -1;
    }
    if (dims->dstate < 1 || dims->dstate > SW_SSD_MAX_DSTATE) {
        PyErr_Format(PyExc_ValueError, "%s: dstate (B.shape[3]) must be between 1 and %d, got %lld", fn,
                     SW_SSD_MAX_DSTATE, (long long)dims->dstate);
        return -1;
    }
    const int64_t s_blhp[4] = {dims->batch, dims->len, dims->heads, dims->headdim};
    const int64_t s_blh[3] = {dims->batch, dims->len, dims->heads};
    const int64_t s_blgn[4] = {dims->batch, dims->len, dims->groups, dims->dstate};
    const int64_t s_h[1] = {dims->heads};
    const int R = SW_READONLY_NO_GRAD;
    void *dt, *A, *B, *C, *D, *z;
    if (take(dt_o, fn, "dt", R, 0, dims->io, 3, s_blh, "(batch, len, heads)", dims, scope, &dt) < 0 ||
        take(A_o, fn, "A", R, 0, dims->comp, 1, s_h, "(heads,)", dims, scope, &A) < 0 ||
        take(B_o, fn, "B", R, 0, dims->io, 4, s_blgn, "(batch, len, groups, dstate)", dims, scope, &B) < 0 ||
        take(C_o, fn, "C", R, 0, dims->io, 4, s_blgn, "(batch, len, groups, dstate)", dims, scope, &C) < 0 ||
        take(D_o, fn, "D", R, 1, dims->comp, 1, s_h, "(heads,)", dims, scope, &D) < 0 ||
        take(z_o, fn, "z", R, 1, dims->io, 4, s_blhp, "(batch, len, heads, headdim)", dims, scope, &z) < 0)
        return -1;
    p->batch = dims->batch;
    p->len = dims->len;
    p->heads = dims->heads;
    p->headdim = dims->headdim;
    p->groups = dims->groups;
    p->dstate = dims->dstate;
    p->block = (int64_t)block;
    p->io_dtype = dims->io;
    p->f64 = dims->comp == SW_FLOAT64;
    p->x = x.data;
    p->dt = dt;
    p->A = A;
    p->B = B;
    p->C = C;
    p->D = D;
    p->z = z;
    return 0;
}

static int take_work(const char *fn, PyObject *work_o, ssd_dims *dims, sw_import_scope *scope, sw_ssd_params *p) {
    if (dims->x.device != SW_CUDA) {
        if (work_o != Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: 'work' must be None for CPU tensors", fn);
            return -1;
        }
        return 0;  /* the CPU kernel allocates its own scratch */
    }
    const int64_t s[1] = {dims->batch * dims->heads * dims->headdim * (p->block + 2) * dims->dstate};
    return take(work_o, fn, "work", SW_WRITABLE, 0, dims->comp, 1, s, "(batch*heads*headdim*(block+2)*dstate,)",
                dims, scope, &p->work);
}

static int run(const char *fn, const ssd_dims *dims, const sw_ssd_params *p, void *stream, int backward) {
    sw_error err = {SW_OK, ""};
    sw_code rc;
    if (dims->x.device == SW_CUDA) {
        rc = backward ? sw_ssd_bwd_cuda(p, dims->x.device_id, stream, &err)
                      : sw_ssd_fwd_cuda(p, dims->x.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = backward ? sw_ssd_bwd_cpu(p, &err) : sw_ssd_fwd_cpu(p, &err);
        Py_END_ALLOW_THREADS
    }
    if (rc != SW_OK) {
        sw_raise_status(fn, rc, &err);
        return -1;
    }
    return 0;
}

PyObject *sw_py_ssd_scan_fwd(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"x", "dt", "A", "B", "C", "D", "z", "h0", "y", "hlast", "ckpt", "block", "work",
                             "stream", NULL};
    PyObject *x, *dt, *A, *B, *C, *D, *z, *h0, *y, *hlast, *ckpt, *work, *stream_o;
    long long block;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOOOLOO:ssd_scan_fwd", kwlist, &x, &dt, &A, &B, &C, &D,
                                     &z, &h0, &y, &hlast, &ckpt, &block, &work, &stream_o))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;
    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    ssd_dims dims;
    sw_ssd_params p;
    if (take_inputs(FN_FWD, x, dt, A, B, C, D, z, block, &scope, &dims, &p) < 0) goto done;
    {
        const int64_t s_bhpn[4] = {dims.batch, dims.heads, dims.headdim, dims.dstate};
        const int64_t s_blhp[4] = {dims.batch, dims.len, dims.heads, dims.headdim};
        const int64_t s_ck[5] = {dims.batch, dims.heads, dims.headdim, dims.nblk, dims.dstate};
        const sw_dtype c = dims.comp;
        const int R = SW_READONLY_NO_GRAD, W = SW_WRITABLE;
        void *h0_d;
        if (take(h0, FN_FWD, "h0", R, 1, c, 4, s_bhpn, "(batch, heads, headdim, dstate)", &dims, &scope, &h0_d) < 0 ||
            take(y, FN_FWD, "y", W, 0, c, 4, s_blhp, "(batch, len, heads, headdim)", &dims, &scope, &p.y) < 0 ||
            take(hlast, FN_FWD, "hlast", W, 0, c, 4, s_bhpn, "(batch, heads, headdim, dstate)", &dims, &scope,
                 &p.hlast) < 0 ||
            take(ckpt, FN_FWD, "ckpt", W, 0, c, 5, s_ck, "(batch, heads, headdim, nblk, dstate)", &dims, &scope,
                 &p.ckpt) < 0 ||
            take_work(FN_FWD, work, &dims, &scope, &p) < 0)
            goto done;
        p.h0 = h0_d;
    }
    if (run(FN_FWD, &dims, &p, stream, 0) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    return result;
}

PyObject *sw_py_ssd_scan_bwd(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"x",  "dt", "A",  "B",  "C",  "D",  "z",   "ckpt",  "dy",   "dhlast", "dx",
                             "ddt", "dz", "dB", "dC", "dA", "dD", "dh0", "block", "work", "stream", NULL};
    PyObject *x, *dt, *A, *B, *C, *D, *z, *ckpt, *dy, *dhlast, *dx, *ddt, *dz, *dB, *dC, *dA, *dD, *dh0, *work,
        *stream_o;
    long long block;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOOOOOOOOOOLOO:ssd_scan_bwd", kwlist, &x, &dt, &A, &B, &C,
                                     &D, &z, &ckpt, &dy, &dhlast, &dx, &ddt, &dz, &dB, &dC, &dA, &dD, &dh0, &block,
                                     &work, &stream_o))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;
    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    ssd_dims dims;
    sw_ssd_params p;
    if (take_inputs(FN_BWD, x, dt, A, B, C, D, z, block, &scope, &dims, &p) < 0) goto done;
    {
        const int64_t s_bhpn[4] = {dims.batch, dims.heads, dims.headdim, dims.dstate};
        const int64_t s_blhp[4] = {dims.batch, dims.len, dims.heads, dims.headdim};
        const int64_t s_blh[3] = {dims.batch, dims.len, dims.heads};
        const int64_t s_blgn[4] = {dims.batch, dims.len, dims.groups, dims.dstate};
        const int64_t s_bhp[3] = {dims.batch, dims.heads, dims.headdim};
        const int64_t s_ck[5] = {dims.batch, dims.heads, dims.headdim, dims.nblk, dims.dstate};
        const sw_dtype c = dims.comp;
        const int R = SW_READONLY_NO_GRAD, W = SW_WRITABLE;
        void *ck, *gy, *ghl;
        if (take(ckpt, FN_BWD, "ckpt", R, 0, c, 5, s_ck, "(batch, heads, headdim, nblk, dstate)", &dims, &scope,
                 &ck) < 0 ||
            take(dy, FN_BWD, "dy", R, 0, c, 4, s_blhp, "(batch, len, heads, headdim)", &dims, &scope, &gy) < 0 ||
            take(dhlast, FN_BWD, "dhlast", R, 1, c, 4, s_bhpn, "(batch, heads, headdim, dstate)", &dims, &scope,
                 &ghl) < 0 ||
            take(dx, FN_BWD, "dx", W, 0, c, 4, s_blhp, "(batch, len, heads, headdim)", &dims, &scope, &p.dx) < 0 ||
            take(ddt, FN_BWD, "ddt", W, 0, c, 3, s_blh, "(batch, len, heads)", &dims, &scope, &p.ddt) < 0 ||
            take(dz, FN_BWD, "dz", W, 1, c, 4, s_blhp, "(batch, len, heads, headdim)", &dims, &scope, &p.dz) < 0)
            goto done;
        p.ckpt = ck;
        p.dy = gy;
        p.dhlast = ghl;
        if ((p.dz != NULL) != (p.z != NULL)) {
            PyErr_Format(PyExc_ValueError, "%s: 'dz' must be given exactly when 'z' is", FN_BWD);
            goto done;
        }
        if (take(dB, FN_BWD, "dB", W, 0, c, 4, s_blgn, "(batch, len, groups, dstate)", &dims, &scope, &p.dB) < 0 ||
            take(dC, FN_BWD, "dC", W, 0, c, 4, s_blgn, "(batch, len, groups, dstate)", &dims, &scope, &p.dC) < 0 ||
            take(dA, FN_BWD, "dA", W, 0, c, 3, s_bhp, "(batch, heads, headdim)", &dims, &scope, &p.dA) < 0 ||
            take(dD, FN_BWD, "dD", W, 0, c, 3, s_bhp, "(batch, heads, headdim)", &dims, &scope, &p.dD) < 0 ||
            take(dh0, FN_BWD, "dh0", W, 0, c, 4, s_bhpn, "(batch, heads, headdim, dstate)", &dims, &scope,
                 &p.dh0) < 0 ||
            take_work(FN_BWD, work, &dims, &scope, &p) < 0)
            goto done;
    }
    if (run(FN_BWD, &dims, &p, stream, 1) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    return result;
}
