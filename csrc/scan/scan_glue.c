/* scan_glue.c - the selective scan (scan.h) on the generic call path (core/call.h): four entries,
 * two layouts, one kernel.
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
 * None (dz is None iff z is). x/u, dt, B, C, z: float32 / float16 / bfloat16 / float64, one dtype
 * (the io dtype); every other tensor has the compute dtype (float64 for float64 inputs, else
 * float32). Everything contiguous, on one device. ddt, dB, dC are zeroed by the kernels (sums).
 *
 * The spec tables of both layouts come from one list (SCAN_FWD / SCAN_BWD below) written over a
 * layout's shape strings; the call path checks every argument, scan_validate the rules between
 * them, scan_run fills sw_scan_params (Mamba-1 is the Mamba-2 layout with headdim = groups = 1 and
 * A per state) and runs the kernel. */
#include "call.h" /* Python.h first */

#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "scan.h"

/* ---- the spec tables ---------------------------------------------------------------------- */

/* Each layout L names its first tensor (L##_XNAME, which fixes the io dtype) and its gradient, and
 * gives the shape of: L##_X (x, z, y, dy, dx, dz), L##_DT (dt, ddt), L##_BC (B, C, dB, dC), L##_ROWN
 * (h0, hlast, dhlast, dh0), L##_CKPT, L##_A, L##_D, L##_DA, L##_DD. */
#define M1_XNAME "u"
#define M1_DXNAME "du"
#define M1_X "batch,dim,len"
#define M1_DT "batch,dim,len"
#define M1_BC "batch,dstate,len"
#define M1_ROWN "batch,dim,dstate"
#define M1_CKPT "batch,dim,nblk,dstate"
#define M1_A "dim,dstate"
#define M1_D "dim"
#define M1_DA "batch,dim,dstate"
#define M1_DD "batch,dim"

#define M2_XNAME "x"
#define M2_DXNAME "dx"
#define M2_X "batch,len,heads,headdim"
#define M2_DT "batch,len,heads"
#define M2_BC "batch,len,groups,dstate"
#define M2_ROWN "batch,heads,headdim,dstate"
#define M2_CKPT "batch,heads,headdim,nblk,dstate"
#define M2_A "heads"
#define M2_D "heads"
#define M2_DA "batch,heads,headdim"
#define M2_DD "batch,heads,headdim"

/* Dtype rules: the io dtype of the first tensor, or the compute dtype real(io). */
#define IO_OF(L) .dtype_rule = SW_DTYPE_SAME_AS, .dtype_ref = L##_XNAME
#define COMP_OF(L) .dtypes = SW_DT(SW_FLOAT32) | SW_DT(SW_FLOAT64), .dtype_rule = SW_DTYPE_REAL_OF, .dtype_ref = L##_XNAME
#define SCAN_INT_MAX INT64_MAX
#define BLOCK SW_INT("block", 1, (int64_t)1 << 30)
#define WORK(L) SW_OPT_OUT("work", COMP_OF(L), .shape = "wsize") /* size checked by scan_validate */
#define RESET SW_OPT_IN("reset", .dtypes = SW_DT(SW_INT32), .shape = "batch,len", .has_default = 1)

/* The backward's trailing scalars: Mamba-1 takes trunc and grad_len before work (required), Mamba-2
 * after stream (trunc = 0, grad_len = len when omitted). */
#define M1_BWD_TAIL(L)                                                                                         \
    SW_INT("trunc", 0, SCAN_INT_MAX), SW_INT("grad_len", 0, SCAN_INT_MAX), WORK(L), SW_STREAM("stream"), RESET
#define M2_BWD_TAIL(L)                                                                                         \
    WORK(L), SW_STREAM("stream"), SW_INT("trunc", 0, SCAN_INT_MAX, .has_default = 1),                        \
        SW_INT("grad_len", 0, SCAN_INT_MAX, .has_default = 1, .default_dim = "len"), RESET

/* x, dt, A, B, C, D, z: the inputs both directions take. */
#define SCAN_INPUTS(L)                                                                                         \
    SW_IN(L##_XNAME, .dtypes = SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64), .shape = L##_X, .nonempty = 1),          \
        SW_IN("dt", IO_OF(L), .shape = L##_DT), SW_IN("A", COMP_OF(L), .shape = L##_A),                        \
        SW_IN("B", IO_OF(L), .shape = L##_BC), SW_IN("C", IO_OF(L), .shape = L##_BC),                          \
        SW_OPT_IN("D", COMP_OF(L), .shape = L##_D), SW_OPT_IN("z", IO_OF(L), .shape = L##_X)
#define SCAN_FWD(L)                                                                                            \
    {SCAN_INPUTS(L), SW_OPT_IN("h0", COMP_OF(L), .shape = L##_ROWN), SW_OUT("y", COMP_OF(L), .shape = L##_X),    \
     SW_OUT("hlast", COMP_OF(L), .shape = L##_ROWN), SW_OUT("ckpt", COMP_OF(L), .shape = L##_CKPT), BLOCK,    \
     WORK(L), SW_STREAM("stream"), RESET}
#define SCAN_BWD(L)                                                                                            \
    {SCAN_INPUTS(L), SW_IN("ckpt", COMP_OF(L), .shape = L##_CKPT), SW_IN("dy", COMP_OF(L), .shape = L##_X),     \
     SW_OPT_IN("dhlast", COMP_OF(L), .shape = L##_ROWN), SW_OUT(L##_DXNAME, COMP_OF(L), .shape = L##_X),       \
     SW_OUT("ddt", COMP_OF(L), .shape = L##_DT), SW_OPT_OUT("dz", COMP_OF(L), .shape = L##_X),                \
     SW_OUT("dB", COMP_OF(L), .shape = L##_BC), SW_OUT("dC", COMP_OF(L), .shape = L##_BC),                    \
     SW_OUT("dA", COMP_OF(L), .shape = L##_DA), SW_OUT("dD", COMP_OF(L), .shape = L##_DD),                    \
     SW_OUT("dh0", COMP_OF(L), .shape = L##_ROWN), BLOCK, L##_BWD_TAIL(L)}

static const sw_arg_spec m1_fwd[] = SCAN_FWD(M1);
static const sw_arg_spec m1_bwd[] = SCAN_BWD(M1);
static const sw_arg_spec m2_fwd[] = SCAN_FWD(M2);
static const sw_arg_spec m2_bwd[] = SCAN_BWD(M2);

/* ---- the call's sizes and arguments ------------------------------------------------------- */

/* The checked value of argument `name`, or NULL when this entry has no such argument. */
static const sw_value *arg(const sw_call *c, const char *name) {
    for (int a = 0; a < c->op->nargs; ++a)
        if (strcmp(c->op->args[a].name, name) == 0) return &c->args[a];
    return NULL;
}

/* The tensor of argument `name`, or NULL when absent (None, or not an argument of this entry). */
static const sw_tensor *tensor(const sw_call *c, const char *name) {
    const sw_value *v = arg(c, name);
    return v && v->present ? &v->t : NULL;
}

static void *data(const sw_call *c, const char *name) {
    const sw_tensor *t = tensor(c, name);
    return t ? t->data : NULL;
}

/* The sizes of a call in the Mamba-2 terms of scan.h (Mamba-1: heads = dim, headdim = groups = 1). */
typedef struct {
    int ssd, backward;
    int64_t batch, len, heads, headdim, groups, dstate, block;
} scan_dims;

static scan_dims dims_of(const sw_call *c) {
    scan_dims d;
    d.ssd = strcmp(c->op->args[0].name, M2_XNAME) == 0;
    d.backward = arg(c, "dy") != NULL;
    d.batch = sw_call_dim(c, "batch");
    d.len = sw_call_dim(c, "len");
    d.heads = sw_call_dim(c, d.ssd ? "heads" : "dim");
    d.headdim = d.ssd ? sw_call_dim(c, "headdim") : 1;
    d.groups = d.ssd ? sw_call_dim(c, "groups") : 1;
    d.dstate = sw_call_dim(c, "dstate");
    d.block = arg(c, "block")->i;
    return d;
}

/* ---- rules between arguments (GIL held) ---------------------------------------------------- */

static int scan_validate(const sw_call *c) {
    const char *fn = c->op->fn;
    const scan_dims d = dims_of(c);
    if (d.groups < 1 || d.heads % d.groups != 0) {
        PyErr_Format(PyExc_ValueError, "%s: groups (B.shape[2] = %lld) must divide heads (x.shape[2] = %lld)", fn,
                     (long long)d.groups, (long long)d.heads);
        return -1;
    }
    if (d.dstate < 1 || d.dstate > SW_SCAN_MAX_DSTATE) {
        PyErr_Format(PyExc_ValueError, "%s: dstate (%s) must be between 1 and %d, got %lld", fn,
                     d.ssd ? "B.shape[3]" : "A.shape[1]", SW_SCAN_MAX_DSTATE, (long long)d.dstate);
        return -1;
    }
    /* ckpt (..., nblk, dstate): one state per block of the sequence */
    const sw_tensor *ckpt = tensor(c, "ckpt");
    const int64_t nblk = (d.len + d.block - 1) / d.block; /* len < 2^62, block <= 2^30: no overflow */
    if (ckpt->shape[ckpt->ndim - 2] != nblk) {
        char got[96];
        size_t u = (size_t)snprintf(got, sizeof got, "(");
        for (int i = 0; i < ckpt->ndim && u < sizeof got; ++i)
            u += (size_t)snprintf(got + u, sizeof got - u, i ? ", %lld" : "%lld", (long long)ckpt->shape[i]);
        if (u < sizeof got) snprintf(got + u, sizeof got - u, ")");
        PyErr_Format(PyExc_ValueError, "%s: argument 'ckpt' has shape %s; expected nblk = ceil(len / block) = %lld "
                     "blocks in dim %d", fn, got, (long long)nblk, ckpt->ndim - 2);
        return -1;
    }
    if (d.backward) {
        if ((tensor(c, "dz") != NULL) != (tensor(c, "z") != NULL)) {
            PyErr_Format(PyExc_ValueError, "%s: 'dz' must be given exactly when 'z' is", fn);
            return -1;
        }
        const int64_t grad_len = arg(c, "grad_len")->i;
        if (grad_len > d.len) {
            PyErr_Format(PyExc_ValueError, "%s: 'grad_len' must be in [0, len=%lld], got %lld", fn, (long long)d.len,
                         (long long)grad_len);
            return -1;
        }
    }
    /* work: the CPU kernel allocates its own scratch; a CUDA thread per row needs
     * SW_SCAN_WORK(1, dstate, block) = (block + 7) * dstate values */
    const sw_tensor *work = tensor(c, "work");
    if (c->device != SW_CUDA) {
        if (work) {
            PyErr_Format(PyExc_ValueError, "%s: 'work' must be None for CPU tensors", fn);
            return -1;
        }
        return 0;
    }
    const int64_t rows = d.batch * d.heads * d.headdim; /* <= numel(x) */
    const int64_t per_row = SW_SCAN_WORK(1, d.dstate, d.block); /* <= (2^30 + 7) * 256 */
    if (!work || work->numel % per_row != 0 || work->numel / per_row != rows) {
        PyErr_Format(PyExc_ValueError, "%s: 'work' must be a CUDA tensor of rows*(block+7)*dstate = %lld*%lld values",
                     fn, (long long)rows, (long long)per_row);
        return -1;
    }
    return 0;
}

/* ---- the kernel (GIL released) ------------------------------------------------------------- */

static sw_code scan_run(const sw_call *c, sw_error *err) {
    const scan_dims d = dims_of(c);
    const int64_t L = d.len, H = d.heads, P = d.headdim, G = d.groups, N = d.dstate;
    const sw_tensor *x = tensor(c, d.ssd ? M2_XNAME : M1_XNAME);
    sw_scan_params p;
    memset(&p, 0, sizeof p);
    p.batch = d.batch;
    p.len = L;
    p.heads = H;
    p.headdim = P;
    p.groups = G;
    p.dstate = N;
    p.block = d.block;
    p.a_scalar = d.ssd;
    p.io_dtype = x->dtype;
    p.f64 = x->dtype == SW_FLOAT64;
    if (d.ssd) { /* x (batch, len, heads, headdim), dt (batch, len, heads), B (batch, len, groups, dstate) */
        const int64_t sx[4] = {L * H * P, H * P, P, 1}, sdt[3] = {L * H, H, 1}, sb[4] = {L * G * N, G * N, N, 1};
        memcpy(p.sx, sx, sizeof sx);
        memcpy(p.sdt, sdt, sizeof sdt);
        memcpy(p.sb, sb, sizeof sb);
    } else { /* u, dt (batch, dim, len), B (batch, dstate, len) */
        const int64_t sx[4] = {H * L, 1, L, 0}, sdt[3] = {H * L, 1, L}, sb[4] = {N * L, 1, 0, L};
        memcpy(p.sx, sx, sizeof sx);
        memcpy(p.sdt, sdt, sizeof sdt);
        memcpy(p.sb, sb, sizeof sb);
    }
    /* every tensor pointer by its argument's name (NULL: None, or not an argument of this entry) */
#define SCAN_TENSOR_SLOTS(X)                                                                             \
    X(dt) X(A) X(B) X(C) X(D) X(z) X(h0) X(reset) X(y) X(hlast) X(ckpt) X(dy) X(dhlast) X(ddt) X(dz) X(dB) \
    X(dC) X(dA) X(dD) X(dh0) X(work)
#define SCAN_FILL(f) p.f = data(c, #f);
    SCAN_TENSOR_SLOTS(SCAN_FILL)
#undef SCAN_FILL
    p.x = x->data;
    p.dx = data(c, d.ssd ? M2_DXNAME : M1_DXNAME);
    p.trunc = d.backward ? arg(c, "trunc")->i : 0;
    p.grad_len = d.backward ? arg(c, "grad_len")->i : L;
    if (c->device == SW_CUDA)
        return d.backward ? sw_scan_bwd_cuda(&p, &c->launch, err) : sw_scan_fwd_cuda(&p, &c->launch, err);
    return d.backward ? sw_scan_bwd_cpu(&p, err) : sw_scan_fwd_cpu(&p, err);
}

const sw_op sw_selective_scan_fwd_op = {"selective_scan_fwd", "seqwrap.selective_scan", m1_fwd, SW_NARGS(m1_fwd),
                                        1, scan_validate, scan_run};
const sw_op sw_selective_scan_bwd_op = {"selective_scan_bwd", "seqwrap.selective_scan (backward)", m1_bwd,
                                        SW_NARGS(m1_bwd), 1, scan_validate, scan_run};
const sw_op sw_ssd_scan_fwd_op = {"ssd_scan_fwd", "seqwrap.ssd_scan", m2_fwd, SW_NARGS(m2_fwd), 1, scan_validate,
                                  scan_run};
const sw_op sw_ssd_scan_bwd_op = {"ssd_scan_bwd", "seqwrap.ssd_scan (backward)", m2_bwd, SW_NARGS(m2_bwd), 1,
                                  scan_validate, scan_run};
