/* py_kahan.c - CPython glue of the compensated scaled accumulation kernel.
 *
 * _C.kahan_accumulate(accs, comps, grads, scale, stream)
 *   accs, comps: sequences of float32 tensors, written in place (acc += scale*g, Kahan)
 *   grads:       sequence of float32 / float16 / bfloat16 tensors, same shapes
 *   scale:       float
 *   stream:      int, the CUDA stream (torch.cuda.current_stream().cuda_stream); 0 on CPU
 * Every element of every list is checked before any kernel runs; no written tensor may share
 * memory with another argument; accs and comps get their autograd version bumped.
 */
#include "py_ops.h"

#include <stdlib.h>
#include <string.h>

#include "bridge.h"
#include "sw_cuda.h"
#include "sw_kahan.h"

static const char *const FN = "seqwrap.kahan_accumulate";

static int import_job(PyObject *acc_o, PyObject *comp_o, PyObject *g_o, int i, sw_import_scope *scope,
                      sw_tensor *first, sw_kahan_job *job) {
    char a_name[32], c_name[32], g_name[32];
    snprintf(a_name, sizeof a_name, "accs[%d]", i);
    snprintf(c_name, sizeof c_name, "comps[%d]", i);
    snprintf(g_name, sizeof g_name, "grads[%d]", i);
    sw_tensor acc, comp, g;
    if (sw_import_item(acc_o, FN, "accs", i, SW_WRITABLE, scope, &acc) < 0 ||
        sw_check_dtype(FN, a_name, &acc, SW_DT(SW_FLOAT32)) < 0 ||
        sw_check_nonempty(FN, a_name, &acc) < 0 || sw_check_contiguous(FN, a_name, &acc) < 0)
        return -1;
    if (i == 0) *first = acc;
    else if (sw_check_same_device(FN, a_name, &acc, "accs[0]", first) < 0) return -1;

    if (sw_import_item(comp_o, FN, "comps", i, SW_WRITABLE, scope, &comp) < 0 ||
        sw_check_dtype(FN, c_name, &comp, SW_DT(SW_FLOAT32)) < 0 ||
        sw_check_same_shape(FN, c_name, &comp, a_name, &acc) < 0 ||
        sw_check_same_device(FN, c_name, &comp, a_name, &acc) < 0 ||
        sw_check_contiguous(FN, c_name, &comp) < 0)
        return -1;

    if (sw_import_item(g_o, FN, "grads", i, SW_READONLY_NO_GRAD, scope, &g) < 0 ||
        sw_check_dtype(FN, g_name, &g, SW_DT_FLOATS16_32) < 0 ||
        sw_check_same_shape(FN, g_name, &g, a_name, &acc) < 0 ||
        sw_check_same_device(FN, g_name, &g, a_name, &acc) < 0 ||
        sw_check_contiguous(FN, g_name, &g) < 0)
        return -1;

    job->acc = (float *)acc.data;
    job->comp = (float *)comp.data;
    job->g = g.data;
    job->g_dtype = g.dtype;
    job->n = acc.numel;
    return 0;
}

PyObject *sw_py_kahan_accumulate(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"accs", "comps", "grads", "scale", "stream", NULL};
    PyObject *accs_o, *comps_o, *grads_o, *stream_o;
    double scale;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOdO:kahan_accumulate", kwlist, &accs_o, &comps_o,
                                     &grads_o, &scale, &stream_o))
        return NULL;
    void *stream;
    if (sw_parse_stream(stream_o, &stream) < 0) return NULL;

    PyObject *const lists[3] = {accs_o, comps_o, grads_o};
    const char *const list_names[3] = {"accs", "comps", "grads"};
    for (int k = 0; k < 3; ++k) {
        if (!PyList_Check(lists[k]) && !PyTuple_Check(lists[k])) {
            PyErr_Format(PyExc_TypeError, "%s: '%s' must be a list or tuple of tensors, not %s", FN,
                         list_names[k], Py_TYPE(lists[k])->tp_name);
            return NULL;
        }
    }
    /* Tuples of the lists' items, taken before anything calls back into Python: a hook of a
     * tensor subclass may mutate the caller's lists, never these. */
    PyObject *accs = PySequence_Tuple(accs_o);
    if (!accs) return NULL;
    PyObject *comps = PySequence_Tuple(comps_o);
    PyObject *grads = comps ? PySequence_Tuple(grads_o) : NULL;
    PyObject *result = NULL;
    sw_kahan_job *jobs = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    if (!grads) goto done;

    Py_ssize_t n = PyTuple_GET_SIZE(accs);
    if (n == 0) {
        PyErr_Format(PyExc_ValueError, "%s: 'accs' is empty; pass at least one tensor", FN);
        goto done;
    }
    if (n > 1000000) {
        PyErr_Format(PyExc_ValueError, "%s: too many tensors (%zd)", FN, n);
        goto done;
    }
    if (PyTuple_GET_SIZE(comps) != n || PyTuple_GET_SIZE(grads) != n) {
        PyErr_Format(PyExc_ValueError, "%s: 'accs', 'comps' and 'grads' must have the same length (got %zd, %zd, %zd)",
                     FN, n, PyTuple_GET_SIZE(comps), PyTuple_GET_SIZE(grads));
        goto done;
    }
    jobs = (sw_kahan_job *)calloc((size_t)n, sizeof *jobs);
    if (!jobs) {
        PyErr_NoMemory();
        goto done;
    }
    sw_tensor first;
    memset(&first, 0, sizeof first);
    for (Py_ssize_t i = 0; i < n; ++i) {
        if (import_job(PyTuple_GET_ITEM(accs, i), PyTuple_GET_ITEM(comps, i), PyTuple_GET_ITEM(grads, i), (int)i,
                       &scope, &first, &jobs[i]) < 0)
            goto done;
    }
    /* no accumulator or compensation may share memory with any other tensor of the call */
    if (sw_scope_seal(&scope, FN) < 0) goto done;

    sw_error err = {SW_OK, ""};
    sw_code rc;
    if (first.device == SW_CUDA) {
        rc = sw_kahan_accumulate_cuda(jobs, (int)n, (float)scale, first.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = sw_kahan_accumulate_cpu(jobs, (int)n, (float)scale, &err);
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
    free(jobs);
    Py_XDECREF(accs);
    Py_XDECREF(comps);
    Py_XDECREF(grads);
    return result;
}
