/* xent_glue.c - seqwrap._C.cross_entropy_chunk on the call path (call.h).
 *
 * cross_entropy_chunk(logits, labels, loss, lse, grad_scale, ignore_index, label_smoothing,
 *                     z_loss, softcap, compute_grad, error_flag, stream, row_offset=0)
 *   logits:     (rows, V) float32 / bfloat16 / float16 / float64; overwritten with
 *               d loss_r / d logits (times grad_scale[r]) when compute_grad
 *   labels:     (rows,) int64
 *   (labels, loss, lse and grad_scale may have any stride: the kernels read it from sw_xent_params)
 *   loss, lse:  (rows,) float32 (float64 for float64 logits), written
 *   grad_scale: None or (rows,) of the loss dtype
 *   error_flag: None on CPU; on CUDA an int32 tensor whose first element is set to 1 when a
 *               label is out of range (the CPU kernel raises instead, before writing any row)
 *   row_offset: added to row numbers in error messages (position of the chunk in the batch)
 */
#include "call.h"

#include <float.h>
#include <math.h>

#include "sw_xent.h"

enum { LOGITS, LABELS, LOSS, LSE, GRAD_SCALE, IGNORE_INDEX, SMOOTHING, Z_LOSS, SOFTCAP, COMPUTE_GRAD, ERROR_FLAG,
       STREAM, ROW_OFFSET };

#define REAL_OF_LOGITS .dtypes = SW_DT(SW_FLOAT32) | SW_DT(SW_FLOAT64), .dtype_rule = SW_DTYPE_REAL_OF, \
                       .dtype_ref = "logits", .shape = "rows", .strided = 1

static const sw_arg_spec args[] = {
    SW_OUT("logits", .dtypes = SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64), .shape = "rows,V", .nonempty = 1,
           .what = "a non-empty (rows, V) matrix"),
    SW_IN("labels", .dtypes = SW_DT(SW_INT64), .shape = "rows", .strided = 1),
    SW_OUT("loss", REAL_OF_LOGITS),
    SW_OUT("lse", REAL_OF_LOGITS),
    SW_OPT_IN("grad_scale", REAL_OF_LOGITS),
    SW_INT("ignore_index", INT64_MIN, INT64_MAX),
    SW_FLOAT("label_smoothing", 0.0, 1.0),
    SW_FLOAT("z_loss", 0.0, INFINITY, .finite = 1),
    SW_FLOAT("softcap", 0.0, INFINITY, .finite = 1),
    SW_BOOL("compute_grad"),
    SW_OPT_OUT("error_flag", .dtypes = SW_DT(SW_INT32), .nonempty = 1),
    SW_STREAM("stream"),
    SW_INT("row_offset", 0, INT64_MAX, .has_default = 1),
};

/* The labels are read on the device on CUDA, where an out-of-range one needs the flag; a softcap
 * must fit the float32 compute dtype of non-float64 logits (0 turns capping off, infinity: NaN). */
static int validate(const sw_call *c) {
    const char *fn = c->op->fn;
    const sw_tensor *logits = &c->args[LOGITS].t;
    if (logits->device == SW_CUDA && !c->args[ERROR_FLAG].present) {
        PyErr_Format(PyExc_ValueError, "%s: CUDA logits need an int32 'error_flag' tensor", fn);
        return -1;
    }
    const double cap = c->args[SOFTCAP].f;
    if (logits->dtype != SW_FLOAT64 && cap != 0.0 && !(cap >= FLT_MIN && cap <= FLT_MAX)) {
        char got[64];
        snprintf(got, sizeof got, "%g", cap);
        PyErr_Format(PyExc_ValueError,
                     "%s: softcap %s does not fit float32, the compute dtype of these logits (it must be in "
                     "[%g, %g]); pass float64 logits for a cap outside that range", fn, got, (double)FLT_MIN,
                     (double)FLT_MAX);
        return -1;
    }
    return 0;
}

static int64_t stride0(const sw_value *v) { return v->present ? v->t.strides[0] : 1; }

static sw_code run(const sw_call *c, sw_error *err) {
    const sw_tensor *logits = &c->args[LOGITS].t;
    const sw_value *scale = &c->args[GRAD_SCALE], *flag = &c->args[ERROR_FLAG];
    const sw_xent_params p = {
        logits->data, logits->dtype, sw_flat_stride(logits, 1),
        (const int64_t *)c->args[LABELS].t.data, stride0(&c->args[LABELS]),
        c->args[LOSS].t.data, stride0(&c->args[LOSS]),
        c->args[LSE].t.data, stride0(&c->args[LSE]),
        scale->present ? scale->t.data : NULL, stride0(scale),
        logits->shape[0], logits->shape[1], (int)c->args[COMPUTE_GRAD].i,
        {c->args[IGNORE_INDEX].i, c->args[SMOOTHING].f, c->args[Z_LOSS].f, c->args[SOFTCAP].f},
        c->args[ROW_OFFSET].i, flag->present ? (int *)flag->t.data : NULL,
    };
    /* Each label is read once (another thread may write the labels meanwhile): on CUDA an
     * out-of-range label sets error_flag; on the CPU it is an error before any row is written. */
    return c->device == SW_CUDA ? sw_xent_cuda(&p, &c->launch, err) : sw_xent_cpu(&p, err);
}

const sw_op sw_xent_op = {"cross_entropy_chunk", "seqwrap.linear_cross_entropy", args, SW_NARGS(args), 1, validate,
                          run};
