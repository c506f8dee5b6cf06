/* ssd_cpu.c - CPU driver of the Mamba-2 (SSD) scan (see sw_ssd.h).
 *
 * Forward: OpenMP over the batch*heads*headdim rows.
 * Backward: for each (batch, group), OpenMP over the heads of that group; one thread runs every
 * headdim row of its head, so ddt[b, t, h] (a sum over the head's rows) has one writer. dB and
 * dC of (b, g) (sums over the group's heads) go through thread-private (len, dstate) buffers,
 * added into the output once per thread. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sw_ssd.h"

/* Below this much work (rows * len * dstate) one thread runs everything: waking a team costs
 * more than it saves (same rule as the Mamba-1 scan). */
#define SW_SSD_PARALLEL_MIN (1 << 18)

static sw_code oom(sw_error *err, const char *what) {
    err->code = SW_ERR_INTERNAL;
    snprintf(err->message, sizeof err->message, "out of host memory for the %s scratch", what);
    return SW_ERR_INTERNAL;
}

sw_code sw_ssd_fwd_cpu(const sw_ssd_params *p, sw_error *err) {
    const int64_t rows = p->batch * p->heads * p->headdim;
    const size_t tsize = p->f64 ? sizeof(double) : sizeof(float);
    int failed = 0;
    const int par = rows * p->len * p->dstate >= SW_SSD_PARALLEL_MIN && rows > 1;
    (void)par;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed) if (par)
#endif
    {
        void *s = malloc((size_t)p->dstate * tsize);
        if (!s) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < rows; ++r) {
            if (!s) continue;
            const int64_t pi = r % p->headdim, h = (r / p->headdim) % p->heads, b = r / (p->headdim * p->heads);
            if (p->f64) sw_ssd_fwd_row_f64(p, b, h, pi, (double *)s);
            else sw_ssd_fwd_row_f32(p, b, h, pi, (float *)s);
        }
        free(s);
    }
    return failed ? oom(err, "SSD scan forward") : SW_OK;
}

/* out[i] += acc[i] for the (len, dstate) slice of one (b, g) (output t-stride groups*dstate). */
static void add_slice(const sw_ssd_params *p, void *out, const char *acc, int64_t b, int64_t g) {
    const int64_t L = p->len, N = p->dstate, G = p->groups;
    for (int64_t t = 0; t < L; ++t) {
        const int64_t o = ((b * L + t) * G + g) * N;
        if (p->f64) {
            for (int64_t n = 0; n < N; ++n) ((double *)out)[o + n] += ((const double *)acc)[t * N + n];
        } else {
            for (int64_t n = 0; n < N; ++n) ((float *)out)[o + n] += ((const float *)acc)[t * N + n];
        }
    }
}

sw_code sw_ssd_bwd_cpu(const sw_ssd_params *p, sw_error *err) {
    const int64_t N = p->dstate, L = p->len, P = p->headdim, hpg = p->heads / p->groups;
    const size_t tsize = p->f64 ? sizeof(double) : sizeof(float);
    const size_t nl = (size_t)(N * L);   /* one (b, g) slice of dB or dC */
    int failed = 0;
    const int par = p->batch * p->heads * P * L * N >= SW_SSD_PARALLEL_MIN && hpg > 1;
    (void)par;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed) if (par)
#endif
    {
        char *mu = (char *)malloc((size_t)N * tsize);
        char *hs = (char *)malloc((size_t)((p->block + 1) * N) * tsize);
        char *acc = (char *)malloc(2 * nl * tsize);   /* private dB, dC of one (b, g): (2, len, dstate) */
        const int ok = mu && hs && acc;
        if (!ok) failed = 1;
        for (int64_t bg = 0; bg < p->batch * p->groups; ++bg) {
            const int64_t b = bg / p->groups, g = bg % p->groups;
            int touched = 0;
            if (ok) memset(acc, 0, 2 * nl * tsize);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t hh = 0; hh < hpg; ++hh) {
                if (!ok) continue;
                const int64_t h = g * hpg + hh;
                touched = 1;
                for (int64_t pi = 0; pi < P; ++pi) {
                    if (p->f64)
                        sw_ssd_bwd_row_f64(p, b, h, pi, (double *)mu, (double *)hs, (double *)acc,
                                           (double *)(acc + nl * tsize), N);
                    else
                        sw_ssd_bwd_row_f32(p, b, h, pi, (float *)mu, (float *)hs, (float *)acc,
                                           (float *)(acc + nl * tsize), N);
                }
            }
            if (touched) {
#ifdef _OPENMP
#pragma omp critical(sw_ssd_bwd_reduce)
#endif
                {
                    add_slice(p, p->dB, acc, b, g);
                    add_slice(p, p->dC, acc + nl * tsize, b, g);
                }
            }
        }
        free(mu);
        free(hs);
        free(acc);
    }
    return failed ? oom(err, "SSD scan backward") : SW_OK;
}
