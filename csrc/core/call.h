/* call.h - the one call path of seqwrap._C: an op declares its arguments, the path does the rest.
 *
 * An op is a static `sw_op`: its Python name, the name used in messages, an array of argument
 * specs (in call order), an optional `validate` for rules that tie arguments together, and `run`.
 * It is listed once in csrc/core/ops.def; the method table, the no-CUDA stubs and
 * `seqwrap._C._op_registry()` are generated from that list. For every call, sw_call_op:
 *   1. parses positional and keyword arguments by the spec names (TypeError for a missing,
 *      unknown or doubled argument);
 *   2. checks every scalar: int in [min, max], uint64, float in [min, max] (optionally finite),
 *      bool, one of a fixed set of strings (choice), stream (None or an int cudaStream_t);
 *   3. imports every tensor through the bridge (bridge.h: real tensor type, supported dtype and
 *      device, requires_grad refused) and checks, naming the function and the argument:
 *      dtype, shape (symbolic dims bind on first use and must match after), non-empty,
 *      contiguity, same device as the other tensors, a CUDA tensor only for an op with a kernel;
 *      then an omitted int whose spec names a `default_dim` takes that dim's bound size;
 *   4. calls op->validate (GIL held) for cross-argument rules, if the op has one;
 *   5. sw_scope_seal: no written tensor overlaps another argument, nothing changed under a hook;
 *   6. calls op->run(ctx, err) with the GIL released (CPU kernels run there; CUDA kernels are
 *      launched on ctx->stream, on device ctx->device_id);
 *   7. sw_scope_bump_versions on every written tensor, always, even when run failed;
 *   8. raises the status run returned (sw_raise_status), or returns None.
 * `run` only ever sees checked sw_tensors and scalars in ctx->args[i] (same order as the spec).
 *
 * Declaring an op (see csrc/kahan/kahan_glue.c for a list op, csrc/xent/xent_glue.c for scalars):
 *
 *   enum { LM_ACC_OUT, LM_ACC_LSE, LM_BLK_OUT, LM_BLK_LSE, LM_STREAM };   // indices into ctx->args
 *   static const sw_arg_spec lm_args[] = {
 *       SW_OUT("acc_out", .dtypes = SW_DT(SW_FLOAT32) | SW_DT(SW_FLOAT64), .shape = "...,D", .nonempty = 1),
 *       SW_OUT("acc_lse", .dtype_rule = SW_DTYPE_SAME_AS, .dtype_ref = "acc_out", .shape = "..."),
 *       SW_IN("blk_out", .dtypes = SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64), .dtype_rule = SW_DTYPE_REAL_IS,
 *             .dtype_ref = "acc_out", .shape = "...,D"),
 *       SW_IN("blk_lse", .dtype_rule = SW_DTYPE_SAME_AS, .dtype_ref = "acc_out", .shape = "..."),
 *       SW_STREAM("stream"),
 *   };
 *   static sw_code lm_run(const sw_call *c, sw_error *err) {
 *       const sw_tensor *acc = &c->args[LM_ACC_OUT].t;  ...fill the params struct, strides included...
 *       return c->device == SW_CUDA ? sw_lse_merge_cuda(&p, &c->launch, err) : sw_lse_merge_cpu(&p, err);
 *   }
 *   const sw_op sw_lse_merge_op = {"lse_merge", "seqwrap.lse_merge", lm_args, SW_NARGS(lm_args),
 *                                  1, NULL, lm_run};
 *   and in ops.def:  SW_OP(lse_merge, lse_merge, 1, "doc string")
 *   The params struct is `typedef struct sw_lse_merge_params {...} sw_lse_merge_params;` (tagged:
 *   ops.h declares the launcher sw_lse_merge_cuda(const struct sw_lse_merge_params *, const
 *   sw_launch *, sw_error *) from ops.def, and cuda_absent.c stubs it in a build without nvcc).
 *   Several entries of one kernel (csrc/scan/scan_glue.c: four entries, two layouts) share one
 *   launcher: their ops.def entries say has_cuda `shared` and an SW_LAUNCHER(prefix, params) entry
 *   declares and stubs sw_<prefix>_cuda(const struct sw_<params>_params *, ...).
 *   An int left out may take a size the tensors bound: SW_INT("grad_len", 0, INT64_MAX,
 *   .has_default = 1, .default_dim = "len") (resolved after step 3, before validate).
 *   Then add an entry to tests/op_examples.py EXAMPLES; tests/test_op_contracts.py does the rest.
 *   Scalars reach run as c->args[i].i (int, bool, choice index), .u (uint64), .f (float).
 *
 * Shape strings: comma-separated dims. A name ("rows", "V", "D") binds the size it first meets and
 * must match it afterwards; a number is a fixed size; "*" is any size; a leading "..." binds a run
 * of leading dims (the same run for every tensor that uses "..."). NULL: any shape. `shape_like`
 * instead names an earlier tensor whose shape this one must have (for list arguments: the item
 * with the same index). `what` replaces "N-D of shape (...)" in rank / emptiness messages.
 * List arguments (SW_LIST_IN / SW_LIST_OUT) are lists or tuples of tensors; all lists of one op
 * have the same length, at least 1. A tensor must be contiguous unless its spec says `.strided = 1`
 * (the kernel then indexes it through the strides its parameter struct carries); a written strided
 * tensor whose elements overlap each other (a zero stride, say) is refused.
 */
#ifndef SEQWRAP_CALL_H
#define SEQWRAP_CALL_H

#include "bridge.h" /* Python.h first */

#include <stdint.h>

#include "sw_status.h"
#include "sw_tensor.h"

#define SW_CALL_MAX_ARGS 24
#define SW_CALL_MAX_SYMS 16

typedef enum {
    SW_ARG_TENSOR = 0,      /* a tensor */
    SW_ARG_OPT_TENSOR = 1,  /* a tensor or None */
    SW_ARG_TENSOR_LIST = 2, /* a list or tuple of tensors */
    SW_ARG_INT = 3,         /* int64 in [imin, imax] */
    SW_ARG_U64 = 4,         /* int in [0, 2**64) */
    SW_ARG_FLOAT = 5,       /* double in [fmin, fmax]; finite when .finite */
    SW_ARG_BOOL = 6,        /* any object, by truth value */
    SW_ARG_CHOICE = 7,      /* one of the strings in .choices (ctx value: its index) */
    SW_ARG_STREAM = 8       /* None or an int holding a cudaStream_t */
} sw_arg_kind;

typedef enum { SW_READ = 0, SW_WRITE = 1 } sw_access;  /* both refuse tensors that require grad */

/* How a tensor's dtype relates to the dtype of tensor `dtype_ref` (an earlier argument). The
 * allowed set is .dtypes (every bridge dtype when 0) narrowed by the rule. "real" is the compute
 * dtype: float64 for float64, float32 for every other dtype. */
typedef enum {
    SW_DTYPE_ANY_OF = 0,  /* one of .dtypes */
    SW_DTYPE_SAME_AS = 1, /* dtype == dtype(ref) */
    SW_DTYPE_REAL_OF = 2, /* dtype == real(dtype(ref)): e.g. the loss of bf16 logits is float32 */
    SW_DTYPE_REAL_IS = 3  /* real(dtype) == real(dtype(ref)): e.g. a bf16 block into a float32 sum */
} sw_dtype_rule;

typedef struct {
    const char *name;
    sw_arg_kind kind;
    /* tensors and tensor lists */
    sw_access access;
    unsigned dtypes;            /* SW_DT(...) mask; 0 = any dtype the bridge carries */
    sw_dtype_rule dtype_rule;
    const char *dtype_ref;
    const char *shape;          /* symbolic shape, see above; NULL = any */
    const char *shape_like;     /* or: same shape as this earlier tensor */
    const char *what;           /* e.g. "a non-empty (rows, V) matrix" */
    int nonempty;               /* refuse 0 elements */
    int strided;                /* any strides (the kernel reads them from its params struct); else contiguous */
    /* scalars */
    int64_t imin, imax;         /* SW_ARG_INT range (both 0: any int64) */
    double fmin, fmax;          /* SW_ARG_FLOAT range */
    int finite;                 /* SW_ARG_FLOAT must be finite */
    const char *const *choices; /* SW_ARG_CHOICE: NULL-terminated */
    /* an argument that may be left out (keyword with a default) */
    int has_default;
    int64_t idefault;
    double fdefault;
    /* SW_ARG_INT with has_default: when omitted, the size bound to this symbolic dim by the tensors
     * (e.g. "len": grad_len defaults to the sequence length); idefault is then unused. */
    const char *default_dim;
} sw_arg_spec;

#define SW_IN(nm, ...) {.name = (nm), .kind = SW_ARG_TENSOR, .access = SW_READ, __VA_ARGS__}
#define SW_OUT(nm, ...) {.name = (nm), .kind = SW_ARG_TENSOR, .access = SW_WRITE, __VA_ARGS__}
#define SW_OPT_IN(nm, ...) {.name = (nm), .kind = SW_ARG_OPT_TENSOR, .access = SW_READ, __VA_ARGS__}
#define SW_OPT_OUT(nm, ...) {.name = (nm), .kind = SW_ARG_OPT_TENSOR, .access = SW_WRITE, __VA_ARGS__}
#define SW_LIST_IN(nm, ...) {.name = (nm), .kind = SW_ARG_TENSOR_LIST, .access = SW_READ, __VA_ARGS__}
#define SW_LIST_OUT(nm, ...) {.name = (nm), .kind = SW_ARG_TENSOR_LIST, .access = SW_WRITE, __VA_ARGS__}
#define SW_INT(nm, lo, hi, ...) {.name = (nm), .kind = SW_ARG_INT, .imin = (lo), .imax = (hi), __VA_ARGS__}
#define SW_U64(nm) {.name = (nm), .kind = SW_ARG_U64}
#define SW_FLOAT(nm, lo, hi, ...) {.name = (nm), .kind = SW_ARG_FLOAT, .fmin = (lo), .fmax = (hi), __VA_ARGS__}
#define SW_BOOL(nm) {.name = (nm), .kind = SW_ARG_BOOL}
#define SW_CHOICE(nm, list) {.name = (nm), .kind = SW_ARG_CHOICE, .choices = (list)}
#define SW_STREAM(nm) {.name = (nm), .kind = SW_ARG_STREAM}
#define SW_NARGS(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* One checked argument. */
typedef struct {
    int present;        /* 0: an optional tensor given as None */
    sw_tensor t;        /* SW_ARG_TENSOR / SW_ARG_OPT_TENSOR */
    int n;              /* SW_ARG_TENSOR_LIST: items[0..n) */
    sw_tensor *items;
    int64_t i;          /* SW_ARG_INT, SW_ARG_BOOL (0/1), SW_ARG_CHOICE (index) */
    uint64_t u;         /* SW_ARG_U64 */
    double f;           /* SW_ARG_FLOAT */
} sw_value;

typedef struct sw_op sw_op;

/* What validate and run receive. */
typedef struct {
    const sw_op *op;
    sw_device_type device;  /* of the tensors (CPU when the op got none) */
    sw_launch launch;       /* device index and stream, for CUDA launchers */
    sw_value args[SW_CALL_MAX_ARGS];
    int nsyms;              /* bound symbolic dims (for messages and run) */
    char sym_name[SW_CALL_MAX_SYMS][16];
    int64_t sym_size[SW_CALL_MAX_SYMS];
} sw_call;

struct sw_op {
    const char *name;              /* seqwrap._C.<name> */
    const char *fn;                /* names the function in messages: "seqwrap.lse_merge" */
    const sw_arg_spec *args;
    int nargs;
    int has_cuda;                  /* 0: CUDA tensors are refused by the call path */
    /* Optional, GIL held, after every per-argument check and before the seal: rules that tie
     * arguments together. Returns 0, or -1 with a Python exception set (name fn and argument). */
    int (*validate)(const sw_call *ctx);
    /* The kernel, GIL released. Fills err and returns its code on failure. */
    sw_code (*run)(const sw_call *ctx, sw_error *err);
};

/* The generic entry point: every op's method in the module table calls this. */
PyObject *sw_call_op(const sw_op *op, PyObject *args, PyObject *kwargs);

/* Size bound to symbolic dim `name` in this call, or -1. */
int64_t sw_call_dim(const sw_call *ctx, const char *name);

/* Element stride of dims [0, nd) of t flattened into one index: the stride of the innermost of
 * them with more than one element (1 when none has). Exact when those dims are collapsible, as
 * for the contiguous tensors the call path passes today (size-1 dims may carry any stride). */
int64_t sw_flat_stride(const sw_tensor *t, int nd);

/* Python description of an op's spec (for seqwrap._C._op_registry()). */
PyObject *sw_op_describe(const sw_op *op);

#endif /* SEQWRAP_CALL_H */
