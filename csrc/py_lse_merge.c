/* py_lse_merge.c - CPython glue of the LSE merge kernel.
 *
 * _C.lse_merge(acc_out, acc_lse, blk_out, blk_lse, stream)
 *   acc_out: (..., D) float32 (float64 for float64 attention), updated in place
 *   acc_lse: (...) same dtype, updated in place
 *   blk_out: (..., D) float32 / bfloat16 / float16 (float64 with a float64 accumulator)
 *   blk_lse: (...) dtype of acc_lse
 */
#include "bridge.h" /* Python.h first */
#include "py_ops.h"

#include <string.h>

#include "sw_cuda.h"
#include "sw_lse_merge.h"

static const char *const FN = "seqwrap.lse_merge";

PyObject *sw_py_lse_merge(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"acc_out", "acc_lse", "blk_out", "blk_lse", "stream", NULL};
    PyObject *ao, *al, *bo, *bl, *stream_o;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO:lse_merge", kwlist, &ao, &al, &bo, &bl, &stream_o))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;
    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    sw_tensor acc_out, acc_lse, blk_out, blk_lse;
    if (sw_import(ao, FN, "acc_out", SW_WRITABLE, &scope, &acc_out) < 0 ||
        sw_check_dtype(FN, "acc_out", &acc_out, SW_DT(SW_FLOAT32) | SW_DT(SW_FLOAT64)) < 0 ||
        sw_check_nonempty(FN, "acc_out", &acc_out) < 0 || sw_check_contiguous(FN, "acc_out", &acc_out) < 0)
        goto done;
    if (acc_out.ndim < 1) {
        PyErr_Format(PyExc_ValueError, "%s: argument 'acc_out' must have a last (head) dimension", FN);
        goto done;
    }
    const int is_double = acc_out.dtype == SW_FLOAT64;
    if (sw_import(bo, FN, "blk_out", SW_READONLY_NO_GRAD, &scope, &blk_out) < 0 ||
        sw_check_dtype(FN, "blk_out", &blk_out, is_double ? SW_DT(SW_FLOAT64) : SW_DT_FLOATS16_32) < 0 ||
        sw_check_same_shape(FN, "blk_out", &blk_out, "acc_out", &acc_out) < 0 ||
        sw_check_same_device(FN, "blk_out", &blk_out, "acc_out", &acc_out) < 0 ||
        sw_check_contiguous(FN, "blk_out", &blk_out) < 0)
        goto done;
    /* lse tensors: the shape of acc_out without its last dimension */
    sw_tensor lse_shape = acc_out;
    lse_shape.ndim = acc_out.ndim - 1;
    if (sw_import(al, FN, "acc_lse", SW_WRITABLE, &scope, &acc_lse) < 0 ||
        sw_check_dtype(FN, "acc_lse", &acc_lse, SW_DT(acc_out.dtype)) < 0 ||
        sw_check_same_shape(FN, "acc_lse", &acc_lse, "acc_out[..., 0]", &lse_shape) < 0 ||
        sw_check_same_device(FN, "acc_lse", &acc_lse, "acc_out", &acc_out) < 0 ||
        sw_check_contiguous(FN, "acc_lse", &acc_lse) < 0)
        goto done;
    if (sw_import(bl, FN, "blk_lse", SW_READONLY_NO_GRAD, &scope, &blk_lse) < 0 ||
        sw_check_dtype(FN, "blk_lse", &blk_lse, SW_DT(acc_out.dtype)) < 0 ||
        sw_check_same_shape(FN, "blk_lse", &blk_lse, "acc_out[..., 0]", &lse_shape) < 0 ||
        sw_check_same_device(FN, "blk_lse", &blk_lse, "acc_out", &acc_out) < 0 ||
        sw_check_contiguous(FN, "blk_lse", &blk_lse) < 0)
        goto done;
    /* acc_out and acc_lse are written: no argument may share memory with them */
    if (sw_scope_seal(&scope, FN) < 0) goto done;
    const int64_t dim = acc_out.shape[acc_out.ndim - 1];
    sw_lse_merge_job job = {acc_out.data, acc_lse.data, blk_out.data, blk_lse.data, blk_out.dtype, is_double,
                            acc_out.numel / dim, dim};
    sw_error err = {SW_OK, ""};
    sw_code rc;
    if (acc_out.device == SW_CUDA) {
        rc = sw_lse_merge_cuda(&job, acc_out.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = sw_lse_merge_cpu(&job, &err);
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
