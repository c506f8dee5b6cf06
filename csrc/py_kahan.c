/* py_kahan.c - CPython glue of the compensated scaled accumulation kernel.
 *
 * _C.kahan_accumulate(accs, comps, grads, scale, stream)
 *   accs, comps: sequences of float32 tensors, written in place (acc += scale*g, Kahan)
 *   grads:       sequence of float32 / float16 / bfloat16 tensors, same shapes
 *   scale:       float
 *   stream:      int, the CUDA stream (torch.cuda.current_stream().cuda_stream); 0 on CPU
 * Every element of every list is checked before any kernel runs.
 */
#include "py_ops.h"

#include <stdlib.h>
#include <string.h>

#include "bridge.h"
#include "sw_cuda.h"
#include "sw_kahan.h"

static const char *const FN = "seqwrap.kahan_accumulate";

/* A written byte range, to refuse overlapping outputs (a silent race on CUDA). */
typedef struct { uintptr_t lo, hi; const char *what; int index; } write_range;

static int cmp_range(const void *a, const void *b) {
    uintptr_t x = ((const write_range *)a)->lo, y = ((const write_range *)b)->lo;
    return (x > y) - (x < y);
}

static int check_no_overlap(write_range *ranges, int n) {
    qsort(ranges, (size_t)n, sizeof *ranges, cmp_range);
    for (int i = 1; i < n; ++i) {
        if (ranges[i].lo < ranges[i - 1].hi) {
            PyErr_Format(PyExc_ValueError,
                         "%s: output tensors overlap in memory ('%s[%d]' and '%s[%d]'); every accumulator "
                         "and compensation buffer must be a separate tensor",
                         FN, ranges[i - 1].what, ranges[i - 1].index, ranges[i].what, ranges[i].index);
            return -1;
        }
    }
    return 0;
}

static int import_job(PyObject *acc_o, PyObject *comp_o, PyObject *g_o, int i, sw_import_scope *scope,
                      sw_tensor *first, sw_kahan_job *job) {
    char a_name[32], c_name[32], g_name[32];
    snprintf(a_name, sizeof a_name, "accs[%d]", i);
    snprintf(c_name, sizeof c_name, "comps[%d]", i);
    snprintf(g_name, sizeof g_name, "grads[%d]", i);
    sw_tensor acc, comp, g;
    if (sw_import(acc_o, FN, a_name, SW_WRITABLE, scope, &acc) < 0 ||
        sw_check_dtype(FN, a_name, &acc, SW_DT(SW_FLOAT32)) < 0 ||
        sw_check_nonempty(FN, a_name, &acc) < 0 || sw_check_contiguous(FN, a_name, &acc) < 0)
        return -1;
    if (i == 0) *first = acc;
    else if (sw_check_same_device(FN, a_name, &acc, "accs[0]", first) < 0) return -1;

    if (sw_import(comp_o, FN, c_name, SW_WRITABLE, scope, &comp) < 0 ||
        sw_check_dtype(FN, c_name, &comp, SW_DT(SW_FLOAT32)) < 0 ||
        sw_check_same_shape(FN, c_name, &comp, a_name, &acc) < 0 ||
        sw_check_same_device(FN, c_name, &comp, a_name, &acc) < 0 ||
        sw_check_contiguous(FN, c_name, &comp) < 0)
        return -1;

    if (sw_import(g_o, FN, g_name, SW_READONLY_NO_GRAD, scope, &g) < 0 ||
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
    PyObject *accs = PySequence_Fast(accs_o, "seqwrap.kahan_accumulate: 'accs' must be a list or tuple of tensors");
    if (!accs) return NULL;
    PyObject *comps = PySequence_Fast(comps_o, "seqwrap.kahan_accumulate: 'comps' must be a list or tuple of tensors");
    PyObject *grads = comps ? PySequence_Fast(grads_o, "seqwrap.kahan_accumulate: 'grads' must be a list or tuple of tensors") : NULL;
    PyObject *result = NULL;
    sw_kahan_job *jobs = NULL;
    write_range *ranges = NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    if (!grads) goto done;

    Py_ssize_t n = PySequence_Fast_GET_SIZE(accs);
    if (n == 0) {
        PyErr_Format(PyExc_ValueError, "%s: 'accs' is empty; pass at least one tensor", FN);
        goto done;
    }
    if (n > 1000000) {
        PyErr_Format(PyExc_ValueError, "%s: too many tensors (%zd)", FN, n);
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(comps) != n || PySequence_Fast_GET_SIZE(grads) != n) {
        PyErr_Format(PyExc_ValueError, "%s: 'accs', 'comps' and 'grads' must have the same length (got %zd, %zd, %zd)",
                     FN, n, PySequence_Fast_GET_SIZE(comps), PySequence_Fast_GET_SIZE(grads));
        goto done;
    }
    jobs = (sw_kahan_job *)calloc((size_t)n, sizeof *jobs);
    ranges = (write_range *)calloc((size_t)(2 * n), sizeof *ranges);
    if (!jobs || !ranges) {
        PyErr_NoMemory();
        goto done;
    }
    sw_tensor first;
    memset(&first, 0, sizeof first);
    for (Py_ssize_t i = 0; i < n; ++i) {
        if (import_job(PySequence_Fast_GET_ITEM(accs, i), PySequence_Fast_GET_ITEM(comps, i),
                       PySequence_Fast_GET_ITEM(grads, i), (int)i, &scope, &first, &jobs[i]) < 0)
            goto done;
        size_t bytes = (size_t)jobs[i].n * sizeof(float);
        ranges[2 * i] = (write_range){(uintptr_t)jobs[i].acc, (uintptr_t)jobs[i].acc + bytes, "accs", (int)i};
        ranges[2 * i + 1] = (write_range){(uintptr_t)jobs[i].comp, (uintptr_t)jobs[i].comp + bytes, "comps", (int)i};
    }
    if (check_no_overlap(ranges, (int)(2 * n)) < 0) goto done;

    sw_error err = {SW_OK, ""};
    sw_code rc;
    if (first.device == SW_CUDA) {
        rc = sw_kahan_accumulate_cuda(jobs, (int)n, (float)scale, first.device_id, stream, &err);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = sw_kahan_accumulate_cpu(jobs, (int)n, (float)scale, &err);
        Py_END_ALLOW_THREADS
    }
    if (rc != SW_OK) {
        sw_raise_status(FN, rc, &err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    free(jobs);
    free(ranges);
    Py_XDECREF(accs);
    Py_XDECREF(comps);
    Py_XDECREF(grads);
    return result;
}
