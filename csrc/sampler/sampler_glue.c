/* sampler_glue.c - seqwrap._C.sample_chunks on the call path (call.h); see sw_sampler.h.
 *
 * sample_chunks(weights, probs, seed, step, mode, budget, cap, stream)
 *   weights: (k,) float64, written in place
 *   probs:   (k,) float64 (mode "bernoulli"), or None (mode "fixed")
 *   seed, step: ints in [0, 2**64)
 *   mode:    "bernoulli" or "fixed"
 *   budget:  int, chunks kept in mode "fixed" (ignored otherwise; 1 <= budget <= k checked by the kernel)
 *   cap:     float, largest factor per hop in mode "fixed" (0: none)
 */
#include "call.h"

#include "sw_sampler.h"

enum { WEIGHTS, PROBS, SEED, STEP, MODE, BUDGET, CAP, STREAM };

static const char *const modes[] = {"bernoulli", "fixed", NULL}; /* index == sw_sample_mode */

static const sw_arg_spec args[] = {
    SW_OUT("weights", .dtypes = SW_DT(SW_FLOAT64), .shape = "k", .nonempty = 1),
    SW_OPT_IN("probs", .dtypes = SW_DT(SW_FLOAT64), .shape = "k"),
    SW_U64("seed"),
    SW_U64("step"),
    SW_CHOICE("mode", modes),
    SW_INT("budget", 0, INT64_MAX),
    SW_FLOAT("cap", -INFINITY, INFINITY),
    SW_STREAM("stream"),
};

static int validate(const sw_call *c) {
    const int bernoulli = c->args[MODE].i == SW_SAMPLE_BERNOULLI, has_probs = c->args[PROBS].present;
    if (bernoulli && !has_probs) {
        PyErr_Format(PyExc_ValueError, "%s: mode 'bernoulli' needs 'probs' (one probability per chunk)", c->op->fn);
        return -1;
    }
    if (!bernoulli && has_probs) {
        PyErr_Format(PyExc_ValueError, "%s: mode 'fixed' takes no 'probs'; pass None", c->op->fn);
        return -1;
    }
    return 0;
}

static sw_code run(const sw_call *c, sw_error *err) {
    const sw_tensor *w = &c->args[WEIGHTS].t, *q = &c->args[PROBS].t;
    const int has_probs = c->args[PROBS].present;
    const sw_sampler_params p = {(sw_sample_mode)c->args[MODE].i, c->args[SEED].u, c->args[STEP].u, w->numel,
                                 has_probs ? (const double *)q->data : NULL, c->args[BUDGET].i, c->args[CAP].f,
                                 (double *)w->data, has_probs ? sw_flat_stride(q, 1) : 1, sw_flat_stride(w, 1)};
    return c->device == SW_CUDA ? sw_sampler_cuda(&p, &c->launch, err) : sw_sampler_cpu(&p, err);
}

const sw_op sw_sampler_op = {"sample_chunks", "seqwrap.sample_chunks", args, SW_NARGS(args), 1, validate, run};
