/* scan_cpu.c - CPU driver of the selective scan (see sw_scan.h): OpenMP over the
 * batch*dim rows; dB and dC (sums over channels) go through thread-private buffers. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sw_scan.h"

/* Below this much work (rows * len * dstate) one thread runs everything: waking a team (and
 * leaving it spinning next to torch's own OpenMP work) costs more than it saves. */
#define SW_SCAN_PARALLEL_MIN (1 << 18)

static sw_code oom(sw_error *err, const char *what) {
    err->code = SW_ERR_INTERNAL;
    snprintf(err->message, sizeof err->message, "out of host memory for the %s scratch", what);
    return SW_ERR_INTERNAL;
}

sw_code sw_scan_fwd_cpu(const sw_scan_params *p, sw_error *err) {
    const int64_t rows = p->batch * p->dim;
    const size_t tsize = p->f64 ? sizeof(double) : sizeof(float);
    int failed = 0;
    const int par = rows * p->len * p->dstate >= SW_SCAN_PARALLEL_MIN && rows > 1;
    (void)par;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed) if (par)
#endif
    {
        void *h = malloc((size_t)p->dstate * tsize);
        if (!h) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < rows; ++r) {
            if (!h) continue;
            if (p->f64) sw_scan_fwd_row_f64(p, r / p->dim, r % p->dim, (double *)h);
            else sw_scan_fwd_row_f32(p, r / p->dim, r % p->dim, (float *)h);
        }
        free(h);
    }
    return failed ? oom(err, "scan forward") : SW_OK;
}

sw_code sw_scan_bwd_cpu(const sw_scan_params *p, sw_error *err) {
    const int64_t rows = p->batch * p->dim, N = p->dstate, L = p->len;
    const size_t tsize = p->f64 ? sizeof(double) : sizeof(float);
    const size_t nl = (size_t)(N * L);   /* one batch's dB or dC */
    int failed = 0;
    const int par = rows * L * N >= SW_SCAN_PARALLEL_MIN && rows > 1;
    (void)par;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed) if (par)
#endif
    {
        char *mu = (char *)malloc((size_t)N * tsize);
        char *hs = (char *)malloc((size_t)((p->block + 1) * N) * tsize);
        /* private dB[b], dC[b] for every batch row: (batch, 2, dstate, len) */
        char *acc = (char *)calloc((size_t)p->batch * 2 * nl, tsize);
        const int ok = mu && hs && acc;
        if (!ok) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < rows; ++r) {
            if (!ok) continue;
            const int64_t b = r / p->dim, d = r % p->dim;
            char *dBb = acc + (size_t)b * 2 * nl * tsize, *dCb = dBb + nl * tsize;
            if (p->f64) sw_scan_bwd_row_f64(p, b, d, (double *)mu, (double *)hs, (double *)dBb, (double *)dCb);
            else sw_scan_bwd_row_f32(p, b, d, (float *)mu, (float *)hs, (float *)dBb, (float *)dCb);
        }
        if (ok) {
#ifdef _OPENMP
#pragma omp critical(sw_scan_bwd_reduce)
#endif
            for (int64_t b = 0; b < p->batch; ++b) {
                const size_t off = (size_t)b * nl;
                for (size_t i = 0; i < nl; ++i) {
                    const size_t src = (size_t)b * 2 * nl + i;
                    if (p->f64) {
                        ((double *)p->dB)[off + i] += ((double *)acc)[src];
                        ((double *)p->dC)[off + i] += ((double *)acc)[src + nl];
                    } else {
                        ((float *)p->dB)[off + i] += ((float *)acc)[src];
                        ((float *)p->dC)[off + i] += ((float *)acc)[src + nl];
                    }
                }
            }
        }
        free(mu);
        free(hs);
        free(acc);
    }
    return failed ? oom(err, "scan backward") : SW_OK;
}
