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

/* The backward runs a head's channels in tiles of this many rows, so that the tile's recomputed block
 * states ((block+1) * rows * dstate values) stay in a core's L2 cache. */
static int64_t bwd_tile(const sw_scan_params *p) {
    const int64_t per_row = (p->block + 1) * p->dstate * (int64_t)tsize(p);
    const int64_t rows = ((int64_t)256 << 10) / per_row;
    return rows < 1 ? 1 : rows > p->headdim ? p->headdim : rows;
}

/* x86-64 with gcc: the per-head loops are also compiled for AVX2 and picked at load time (ifunc);
 * elsewhere, and in sanitizer builds, the baseline ISA only. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(SEQWRAP_SANITIZE)
#define SW_SCAN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SW_SCAN_CLONES
#endif

SW_SCAN_CLONES static void fwd_head(const sw_scan_params *p, int64_t b, int64_t h, char *s) {
    const int64_t PN = p->headdim * p->dstate;
    if (p->f64) sw_scan_fwd_head_f64(p, b, h, 0, p->headdim, (double *)s, (double *)s + PN);
    else sw_scan_fwd_head_f32(p, b, h, 0, p->headdim, (float *)s, (float *)s + PN);
}

/* Rows [p0, p1) of head (b, h); work as laid out in sw_scan_bwd_cpu, acc: private (2, len, dstate). */
SW_SCAN_CLONES static void bwd_rows(const sw_scan_params *p, int64_t b, int64_t h, int64_t p0, int64_t p1, char *work,
                                    char *acc, int64_t tile) {
    const int64_t N = p->dstate, nl = N * p->len;
    if (p->f64) {
        double *mu = (double *)work, *hs = mu + tile * N, *tmp = hs + (p->block + 1) * tile * N;
        sw_scan_bwd_head_f64(p, b, h, p0, p1, mu, hs, tmp, (double *)acc, (double *)acc + nl, N, 1);
    } else {
        float *mu = (float *)work, *hs = mu + tile * N, *tmp = hs + (p->block + 1) * tile * N;
        sw_scan_bwd_head_f32(p, b, h, p0, p1, mu, hs, tmp, (float *)acc, (float *)acc + nl, N, 1);
    }
}

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
            fwd_head(p, b, h, s);
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
    const int64_t N = p->dstate, L = p->len, P = p->headdim, hpg = p->heads / p->groups, tile = bwd_tile(p);
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
        /* work: mu (tile, N), block states (block+1, tile, N), step constants (5, N) */
        char *work = (char *)malloc((size_t)SW_SCAN_WORK(tile, N, p->block) * ts);
        char *acc = (char *)malloc(2 * nl * ts);   /* private dB, dC of one (b, g): (2, len, dstate) */
        const int ok = work && acc;
        if (!ok) failed = 1;
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
                for (int64_t p0 = 0; p0 < P; p0 += tile) bwd_rows(p, b, h, p0, p0 + tile < P ? p0 + tile : P, work, acc, tile);
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
