/* kahan_glue.c - seqwrap._C.kahan_accumulate on the call path (call.h).
 *
 * kahan_accumulate(accs, comps, grads, scale, stream)
 *   accs, comps: lists of float32 tensors, written in place (acc += scale*g, Kahan), any shapes
 *   grads:       list of float32 / float16 / bfloat16 tensors, grads[i] shaped like accs[i]
 *   scale:       float
 *   stream:      None or int, the CUDA stream (torch.cuda.current_stream().cuda_stream)
 */
#include "call.h"

#include <stdlib.h>

#include "sw_kahan.h"

enum { ACCS, COMPS, GRADS, SCALE, STREAM };

static const sw_arg_spec args[] = {
    SW_LIST_OUT("accs", .dtypes = SW_DT(SW_FLOAT32), .nonempty = 1),
    SW_LIST_OUT("comps", .dtypes = SW_DT(SW_FLOAT32), .shape_like = "accs"),
    SW_LIST_IN("grads", .dtypes = SW_DT_FLOATS16_32, .shape_like = "accs"),
    SW_FLOAT("scale", -INFINITY, INFINITY),
    SW_STREAM("stream"),
};

static sw_code run(const sw_call *c, sw_error *err) {
    const int n = c->args[ACCS].n;
    sw_kahan_job *jobs = (sw_kahan_job *)calloc((size_t)n, sizeof *jobs);
    if (!jobs) {
        snprintf(err->message, sizeof err->message, "out of memory for %d accumulation jobs", n);
        return SW_ERR_INTERNAL;
    }
    for (int i = 0; i < n; ++i) {
        const sw_tensor *a = &c->args[ACCS].items[i], *k = &c->args[COMPS].items[i], *g = &c->args[GRADS].items[i];
        jobs[i] = (sw_kahan_job){(float *)a->data, (float *)k->data, g->data, g->dtype, a->numel,
                                 sw_flat_stride(a, a->ndim), sw_flat_stride(k, k->ndim), sw_flat_stride(g, g->ndim)};
    }
    const sw_kahan_params p = {jobs, n, (float)c->args[SCALE].f};
    sw_code rc = c->device == SW_CUDA ? sw_kahan_cuda(&p, &c->launch, err) : sw_kahan_cpu(&p, err);
    free(jobs);
    return rc;
}

const sw_op sw_kahan_op = {"kahan_accumulate", "seqwrap.kahan_accumulate", args, SW_NARGS(args), 1, NULL, run};
