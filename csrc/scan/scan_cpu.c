/* scan_cpu.c - CPU driver of the selective scan (see scan.h).
 *
 * Forward: OpenMP over the batch*heads heads; one thread runs every channel of its head, so the
 * step constants (exp(dt*A), B_t, C_t) are read once per step and head.
 * Backward: for each (batch, group), OpenMP over the heads of that group; a head's channels run in
 * one thread, so ddt[b,t,h] has one writer. dB and dC of (b, g) (sums over the group's heads) go
 * through thread-private (len, dstate) buffers, added into the output once per thread. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "scan.h"

/* Below this much work (rows * len * dstate) one thread runs everything: waking a team (and
 * leaving it spinning next to torch's own OpenMP work) costs more than it saves. */
#define SW_SCAN_PARALLEL_MIN (1 << 18)

static sw_code oom(sw_error *err, const char *what) {
    err->code = SW_ERR_INTERNAL;
    snprintf(err->message, sizeof err->message, "out of host memory for the %s scratch", what);
    return SW_ERR_INTERNAL;
}

static int parallel(const sw_scan_params *p, int64_t items) {
    return items > 1 && p->batch * p->heads * p->headdim * p->len * p->dstate >= SW_SCAN_PARALLEL_MIN;
}

static size_t tsize(const sw_scan_params *p) { return p->f64 ? sizeof(double) : sizeof(float); }

sw_code sw_scan_fwd_cpu(const sw_scan_params *p, sw_error *err) {
    const int64_t heads = p->batch * p->heads, N = p->dstate, P = p->headdim;
    int failed = 0;
    const int par = parallel(p, heads);
    (void)par;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed) if (par)
#endif
    {
        char *s = (char *)malloc((size_t)((P + 3) * N) * tsize(p));   /* state (P, N), then 3*N step constants */
        if (!s) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t bh = 0; bh < heads; ++bh) {
            if (!s) continue;
            const int64_t b = bh / p->heads, h = bh % p->heads;
            if (p->f64) sw_scan_fwd_head_f64(p, b, h, 0, P, (double *)s, (double *)s + P * N);
            else sw_scan_fwd_head_f32(p, b, h, 0, P, (float *)s, (float *)s + P * N);
        }
        free(s);
    }
    return failed ? oom(err, "scan forward") : SW_OK;
}

/* out[b, t, g, n] += acc[t, n] over one (b, g) slice (out has B's strides). */
static void add_slice(const sw_scan_params *p, void *out, const char *acc, int64_t b, int64_t g) {
    const int64_t L = p->len, N = p->dstate;
    for (int64_t t = 0; t < L; ++t) {
        const int64_t o = b * p->sb[0] + t * p->sb[1] + g * p->sb[2];
        if (p->f64) {
            for (int64_t n = 0; n < N; ++n) ((double *)out)[o + n * p->sb[3]] += ((const double *)acc)[t * N + n];
        } else {
            for (int64_t n = 0; n < N; ++n) ((float *)out)[o + n * p->sb[3]] += ((const float *)acc)[t * N + n];
        }
    }
}

sw_code sw_scan_bwd_cpu(const sw_scan_params *p, sw_error *err) {
    const int64_t N = p->dstate, L = p->len, P = p->headdim, hpg = p->heads / p->groups;
    const size_t ts = tsize(p), nl = (size_t)(N * L);   /* one (b, g) slice of dB or dC */
    int failed = 0;
    const int par = parallel(p, hpg);
    memset(p->ddt, 0, (size_t)(p->batch * L * p->heads) * ts);   /* sums: zeroed here, added into */
    memset(p->dB, 0, (size_t)(p->batch * p->groups) * nl * ts);
    memset(p->dC, 0, (size_t)(p->batch * p->groups) * nl * ts);
    (void)par;
#ifdef _OPENMP
#pragma omp parallel reduction(| : failed) if (par)
#endif
    {
        char *work = (char *)malloc((size_t)SW_SCAN_WORK(P, N, p->block) * ts);
        char *acc = (char *)malloc(2 * nl * ts);   /* private dB, dC of one (b, g): (2, len, dstate) */
        const int ok = work && acc;
        if (!ok) failed = 1;
        /* work: mu (P, N), block states (block+1, P, N), step constants (5, N) */
        char *mu = work, *hs = ok ? mu + (size_t)(P * N) * ts : NULL;
        char *tmp = ok ? hs + (size_t)((p->block + 1) * P * N) * ts : NULL;
        for (int64_t bg = 0; bg < p->batch * p->groups; ++bg) {
            const int64_t b = bg / p->groups, g = bg % p->groups;
            int touched = 0;
            if (ok) memset(acc, 0, 2 * nl * ts);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t hh = 0; hh < hpg; ++hh) {
                if (!ok) continue;
                const int64_t h = g * hpg + hh;
                touched = 1;
                if (p->f64)
                    sw_scan_bwd_head_f64(p, b, h, 0, P, (double *)mu, (double *)hs, (double *)tmp, (double *)acc,
                                         (double *)(acc + nl * ts), N, 1);
                else
                    sw_scan_bwd_head_f32(p, b, h, 0, P, (float *)mu, (float *)hs, (float *)tmp, (float *)acc,
                                         (float *)(acc + nl * ts), N, 1);
            }
            if (touched) {
#ifdef _OPENMP
#pragma omp critical(sw_scan_bwd_reduce)
#endif
                {
                    add_slice(p, p->dB, acc, b, g);
                    add_slice(p, p->dC, acc + nl * ts, b, g);
                }
            }
        }
        free(work);
        free(acc);
    }
    return failed ? oom(err, "scan backward") : SW_OK;
}
