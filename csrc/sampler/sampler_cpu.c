/* sampler_cpu.c - CPU kernel of SpaCO's chunk sampler (see sw_sampler.h). */
#include <stdio.h>
#include <stdlib.h>

#include "sw_sampler.h"

#define SW_SAMPLER_MAX_CHUNKS (1LL << 40)

static sw_code fail(sw_error *err, const char *msg, double value) {
    err->code = SW_ERR_VALUE;
    snprintf(err->message, sizeof err->message, msg, value);
    return SW_ERR_VALUE;
}

sw_code sw_sampler_check(const sw_sampler_params *p, sw_error *err) {
    if (p->k < 1 || p->k > SW_SAMPLER_MAX_CHUNKS) return fail(err, "the number of chunks must be >= 1 (got %.0f)", (double)p->k);
    if (p->mode == SW_SAMPLE_BERNOULLI) {
        if (!p->probs) return fail(err, "sampling 'bernoulli' needs probabilities (%g given)", 0.0);
        return SW_OK;
    }
    if (p->mode != SW_SAMPLE_FIXED) return fail(err, "unknown sampling mode %g", (double)p->mode);
    if (p->t < 1 || p->t > p->k) {
        err->code = SW_ERR_VALUE;
        snprintf(err->message, sizeof err->message, "budget must be between 1 and the number of chunks (%lld), got %lld",
                 (long long)p->k, (long long)p->t);
        return SW_ERR_VALUE;
    }
    if (p->cap != p->cap || (p->cap != 0.0 && p->cap < 1.0))
        return fail(err, "max_compensation must be >= 1 (or 0 for none), got %g", p->cap);
    return SW_OK;
}

typedef struct { uint64_t key; int64_t index; } keyed;

static int cmp_keyed(const void *a, const void *b) {
    const keyed *x = (const keyed *)a, *y = (const keyed *)b;
    if (sw_key_before(x->key, x->index, y->key, y->index)) return -1;
    return sw_key_before(y->key, y->index, x->key, x->index);
}

sw_code sw_sampler_cpu(const sw_sampler_params *p, sw_error *err) {
    sw_code rc = sw_sampler_check(p, err);
    if (rc != SW_OK) return rc;
    const int64_t k = p->k;
    if (p->mode == SW_SAMPLE_BERNOULLI) {
        for (int64_t i = 0; i < k; ++i) {  /* check everything before writing anything */
            double q = p->probs[i * p->probs_stride];
            if (!(q > 0.0 && q <= 1.0)) {
                err->code = SW_ERR_VALUE;
                snprintf(err->message, sizeof err->message,
                         "probability of chunk %lld is %g; every probability must be in (0, 1]", (long long)i, q);
                return SW_ERR_VALUE;
            }
        }
        for (int64_t i = 0; i < k; ++i)
            p->weights[i * p->weights_stride] = sw_bernoulli_weight(p->seed, p->step, i, p->probs[i * p->probs_stride]);
        return SW_OK;
    }
    /* fixed: sort (key, index) and keep the first t; same set as the GPU's rank count */
    keyed *order = (keyed *)malloc((size_t)k * sizeof *order);
    if (!order) {
        err->code = SW_ERR_VALUE;
        snprintf(err->message, sizeof err->message, "out of memory sorting %lld chunk keys", (long long)k);
        return SW_ERR_VALUE;
    }
    for (int64_t i = 0; i < k; ++i) order[i] = (keyed){sw_chunk_key(p->seed, p->step, (uint64_t)i), i};
    qsort(order, (size_t)k, sizeof *order, cmp_keyed);
    const double f = sw_fixed_factor(k, p->t, p->cap);
    for (int64_t i = 0; i < k; ++i) p->weights[i * p->weights_stride] = 0.0;
    for (int64_t r = 0; r < p->t; ++r) p->weights[order[r].index * p->weights_stride] = f;
    free(order);
    return SW_OK;
}
