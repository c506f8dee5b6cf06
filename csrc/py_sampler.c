/* py_sampler.c - CPython glue of SpaCO's chunk sampler (see sw_sampler.h).
 *
 * _C.sample_chunks(weights, probs, seed, step, mode, budget, cap, stream)
 *   weights: float64, 1-D, contiguous, k elements, written in place
 *   probs:   float64, same shape and device (mode "bernoulli"), or None (mode "fixed")
 *   seed, step: ints in [0, 2**64)
 *   mode:    "bernoulli" or "fixed"
 *   budget:  int, chunks kept in mode "fixed" (ignored otherwise)
 *   cap:     float, largest factor per hop in mode "fixed" (0: none)
 *   stream:  int, the CUDA stream; 0 on CPU
 */
#include "py_ops.h"

#include <string.h>

#include "bridge.h"
#include "sw_cuda.h"
#include "sw_sampler.h"

static const char *const FN = "seqwrap.sample_chunks";

static int parse_u64(PyObject *o, const char *arg, uint64_t *out) {
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s: '%s' must be an int, not %s", FN, arg, Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: '%s' must be in [0, 2**64)", FN, arg);
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

PyObject *sw_py_sample_chunks(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"weights", "probs", "seed", "step", "mode", "budget", "cap", "stream", NULL};
    PyObject *w_o, *p_o, *seed_o, *step_o, *stream_o;
    const char *mode;
    long long budget;
    double cap;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOsLdO:sample_chunks", kwlist, &w_o, &p_o, &seed_o, &step_o,
                                     &mode, &budget, &cap, &stream_o))
        return NULL;
    sw_sampler_params params;
    memset(&params, 0, sizeof params);
    if (strcmp(mode, "bernoulli") == 0) params.mode = SW_SAMPLE_BERNOULLI;
    else if (strcmp(mode, "fixed") == 0) params.mode = SW_SAMPLE_FIXED;
    else {
        PyErr_Format(PyExc_ValueError, "%s: mode must be 'bernoulli' or 'fixed', not '%s'", FN, mode);
        return NULL;
    }
    if (parse_u64(seed_o, "seed", &params.seed) < 0 || parse_u64(step_o, "step", &params.step) < 0) return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;

    PyObject *result = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    sw_tensor w, p;
    if (sw_import(w_o, FN, "weights", SW_WRITABLE, &scope, &w) < 0 ||
        sw_check_dtype(FN, "weights", &w, SW_DT(SW_FLOAT64)) < 0 || sw_check_nonempty(FN, "weights", &w) < 0 ||
        sw_check_contiguous(FN, "weights", &w) < 0)
        goto done;
    if (w.ndim != 1) {
        PyErr_Format(PyExc_ValueError, "%s: 'weights' must be 1-D (one factor per chunk), got %d dimensions", FN, w.ndim);
        goto done;
    }
    if (params.mode == SW_SAMPLE_BERNOULLI) {
        if (p_o == Py_None) {
            PyErr_Format(PyExc_ValueError, "%s: mode 'bernoulli' needs 'probs' (one probability per chunk)", FN);
            goto done;
        }
        if (sw_import(p_o, FN, "probs", SW_READONLY_NO_GRAD, &scope, &p) < 0 ||
            sw_check_dtype(FN, "probs", &p, SW_DT(SW_FLOAT64)) < 0 ||
            sw_check_same_shape(FN, "probs", &p, "weights", &w) < 0 ||
            sw_check_same_device(FN, "probs", &p, "weights", &w) < 0 || sw_check_contiguous(FN, "probs", &p) < 0)
            goto done;
        params.probs = (const double *)p.data;
    } else if (p_o != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: mode 'fixed' takes no 'probs'; pass None", FN);
        goto done;
    }
    /* weights is written: probs may not share memory with it */
    if (sw_scope_seal(&scope, FN) < 0) goto done;
    params.k = w.numel;
    params.t = (int64_t)budget;
    params.cap = cap;
    params.weights = (double *)w.data;

    sw_error err = {SW_OK, ""};
    sw_code rc;
    if (w.device == SW_CUDA) {
        rc = sw_sample_chunks_cuda(&params, w.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = sw_sample_chunks_cpu(&params, &err);
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
