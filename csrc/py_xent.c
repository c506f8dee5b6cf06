/* py_xent.c - CPython glue of the chunked cross-entropy kernel.
 *
 * _C.cross_entropy_chunk(logits, labels, loss, lse, grad_scale, ignore_index, label_smoothing,
 *                        z_loss, softcap, compute_grad, error_flag, stream, row_offset=0)
 *   logits:     (rows, V) float32 / bfloat16 / float16 / float64, contiguous; overwritten with
 *               d loss_r / d logits (times grad_scale[r]) when compute_grad
 *   labels:     (rows,) int64
 *   loss, lse:  (rows,) float32 (float64 for float64 logits), written
 *   grad_scale: None or (rows,) of the loss dtype
 *   error_flag: None on CPU; on CUDA an int32 (1,) tensor set to 1 when a label is out of range
 *   row_offset: added to row numbers in error messages (position of the chunk in the batch)
 */
#include "bridge.h" /* Python.h first */
#include "py_ops.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "sw_cuda.h"
#include "sw_xent.h"

static const char *const FN = "seqwrap.linear_cross_entropy";

static int check_vector(const char *arg, const sw_tensor *t, const sw_tensor *logits, sw_dtype dtype) {
    if (sw_check_dtype(FN, arg, t, SW_DT(dtype)) < 0 || sw_check_same_device(FN, arg, t, "logits", logits) < 0 ||
        sw_check_contiguous(FN, arg, t) < 0)
        return -1;
    if (t->ndim != 1 || t->shape[0] != logits->shape[0]) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' must have shape (%lld,), one entry per logits row",
                     FN, arg, (long long)logits->shape[0]);
        return -1;
    }
    return 0;
}

static int check_params(const sw_xent_params *p) {
    if (!(p->label_smoothing >= 0.0 && p->label_smoothing <= 1.0)) {
        char got[64];
        snprintf(got, sizeof got, "%g", p->label_smoothing);
        PyErr_Format(PyExc_ValueError, "%s: label_smoothing must be in [0, 1], got %s", FN, got);
        return -1;
    }
    if (!(p->z_loss >= 0.0 && isfinite(p->z_loss))) {
        PyErr_Format(PyExc_ValueError, "%s: z_loss must be a finite number >= 0", FN);
        return -1;
    }
    if (!(p->softcap >= 0.0 && isfinite(p->softcap))) {
        PyErr_Format(PyExc_ValueError, "%s: softcap must be a finite number > 0 (or None)", FN);
        return -1;
    }
    return 0;
}

/* float32 compute (float32 / bfloat16 / float16 logits): a cap that rounds to 0 would turn the
 * cap off, one that rounds to infinity would give NaN. */
static int check_cap_fits_float(double softcap) {
    if (softcap == 0.0 || (softcap >= FLT_MIN && softcap <= FLT_MAX)) return 0;
    char got[64];
    snprintf(got, sizeof got, "%g", softcap);
    PyErr_Format(PyExc_ValueError,
                 "%s: softcap %s does not fit float32, the compute dtype of these logits (it must be in "
                 "[%g, %g]); pass float64 logits for a cap outside that range", FN, got, (double)FLT_MIN,
                 (double)FLT_MAX);
    return -1;
}

PyObject *sw_py_cross_entropy_chunk(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"logits", "labels", "loss", "lse", "grad_scale", "ignore_index", "label_smoothing",
                             "z_loss", "softcap", "compute_grad", "error_flag", "stream", "row_offset", NULL};
    PyObject *logits_o, *labels_o, *loss_o, *lse_o, *scale_o, *flag_o, *stream_o;
    long long ignore_index, row_offset = 0;
    double eps, z, softcap;
    int compute_grad;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOLdddpOO|L:cross_entropy_chunk", kwlist, &logits_o,
                                     &labels_o, &loss_o, &lse_o, &scale_o, &ignore_index, &eps, &z, &softcap,
                                     &compute_grad, &flag_o, &stream_o, &row_offset))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;
    sw_xent_params params = {(int64_t)ignore_index, eps, z, softcap};
    if (check_params(&params) < 0) return NULL;

    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    sw_tensor logits, labels, loss, lse, scale, flag;
    memset(&scale, 0, sizeof scale);
    memset(&flag, 0, sizeof flag);
    if (sw_import(logits_o, FN, "logits", SW_WRITABLE, &scope, &logits) < 0 ||
        sw_check_dtype(FN, "logits", &logits, SW_DT_FLOATS16_32 | SW_DT(SW_FLOAT64)) < 0 ||
        sw_check_contiguous(FN, "logits", &logits) < 0)
        goto done;
    if (logits.ndim != 2 || logits.shape[0] < 1 || logits.shape[1] < 1) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'logits' must be a non-empty (rows, V) matrix", FN);
        goto done;
    }
    const sw_dtype real = logits.dtype == SW_FLOAT64 ? SW_FLOAT64 : SW_FLOAT32;
    if (sw_import(labels_o, FN, "labels", SW_READONLY_NO_GRAD, &scope, &labels) < 0 ||
        check_vector("labels", &labels, &logits, SW_INT64) < 0)
        goto done;
    if (sw_import(loss_o, FN, "loss", SW_WRITABLE, &scope, &loss) < 0 || check_vector("loss", &loss, &logits, real) < 0)
        goto done;
    if (sw_import(lse_o, FN, "lse", SW_WRITABLE, &scope, &lse) < 0 || check_vector("lse", &lse, &logits, real) < 0)
        goto done;
    if (scale_o != Py_None && (sw_import(scale_o, FN, "grad_scale", SW_READONLY_NO_GRAD, &scope, &scale) < 0 ||
                               check_vector("grad_scale", &scale, &logits, real) < 0))
        goto done;
    if (real == SW_FLOAT32 && check_cap_fits_float(params.softcap) < 0) goto done;
    if (logits.device == SW_CUDA) {
        if (flag_o == Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: CUDA logits need an int32 'error_flag' tensor", FN);
            goto done;
        }
        if (sw_import(flag_o, FN, "error_flag", SW_WRITABLE, &scope, &flag) < 0 ||
            sw_check_dtype(FN, "error_flag", &flag, SW_DT(SW_INT32)) < 0 ||
            sw_check_same_device(FN, "error_flag", &flag, "logits", &logits) < 0 ||
            sw_check_nonempty(FN, "error_flag", &flag) < 0)
            goto done;
    }
    /* loss, lse, logits, error_flag are written: none may share memory with another argument */
    if (sw_scope_seal(&scope, FN) < 0) goto done;

    const int64_t rows = logits.shape[0], V = logits.shape[1];
    sw_xent_job job = {logits.data, logits.dtype, (const int64_t *)labels.data, loss.data, lse.data,
                       scale_o != Py_None ? scale.data : NULL, rows, V, compute_grad, params, (int64_t)row_offset};
    sw_error err = {SW_OK, ""};
    sw_code rc;
    /* The kernels read each label once (another thread may be writing the labels meanwhile):
     * on CUDA an out-of-range label sets error_flag; on the CPU it is an error before any row
     * is written. */
    if (logits.device == SW_CUDA) {
        rc = sw_xent_cuda(&job, (int *)flag.data, logits.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = sw_xent_cpu(&job, &err);
        Py_END_ALLOW_THREADS
    }
    if (sw_scope_bump_versions(&scope) < 0) goto done;
    if (rc != SW_OK) {
        sw_raise_status(FN, rc, &err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    return result;
}
