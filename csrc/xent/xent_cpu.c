/* xent_cpu.c - CPU kernel of the chunked softmax cross-entropy (see sw_xent.h).
 * The row routine lives in xent_row.inc, instantiated once per real type. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sw_fastexp.h"
#include "sw_xent.h"

/* Vector-width clones of the float32 fast path on x86-64 (the loader picks one at run time). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SEQWRAP_SANITIZE)
#define SW_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define SW_CLONES
#endif

/* float32 logits, no softcap: the common case, written so the compiler vectorizes
 * every pass (omp simd reductions, sw_fast_expf). Same math as xent_row.inc. */
SW_CLONES static void xent_row_f32_fast(float *restrict row, int64_t V, int64_t label, int ignored, float scale,
                                        float eps, float z, int compute_grad, float *loss_out, float *lse_out) {
    float m = -INFINITY;
#ifdef _OPENMP
#pragma omp simd reduction(max : m)
#endif
    for (int64_t j = 0; j < V; ++j) m = row[j] > m ? row[j] : m;
    const float d_label = ignored ? 0.0f : row[label] - m;
    float sum_e = 0.0f, sum_d = 0.0f;
    if (compute_grad && !ignored) {
#ifdef _OPENMP
#pragma omp simd reduction(+ : sum_e, sum_d)
#endif
        for (int64_t j = 0; j < V; ++j) {
            float d = row[j] - m;
            float e = sw_fast_expf(d);
            row[j] = e;
            sum_e += e;
            sum_d += d;
        }
    } else {
#ifdef _OPENMP
#pragma omp simd reduction(+ : sum_e, sum_d)
#endif
        for (int64_t j = 0; j < V; ++j) {
            float d = row[j] - m;
            sum_e += sw_fast_expf(d);
            sum_d += d;
        }
    }
    const float log_sum_e = logf(sum_e);
    const float lse = m + log_sum_e;
    *lse_out = lse;
    *loss_out = ignored ? 0.0f : sw_xent_loss_f(log_sum_e, d_label, sum_d, lse, eps, z, V);
    if (!compute_grad) return;
    if (ignored) {
        memset(row, 0, (size_t)V * sizeof *row);
        return;
    }
    /* row holds exp(s - max): gradient = scale * (p * (1 + 2 z lse) - eps / V), minus (1 - eps) at the label */
    const float a = scale * (1.0f + 2.0f * z * lse) / sum_e, b = scale * (eps / (float)V);
#ifdef _OPENMP
#pragma omp simd
#endif
    for (int64_t j = 0; j < V; ++j) row[j] = row[j] * a - b;
    row[label] -= scale * (1.0f - eps);
}

#define SW_CAT_(a, b) a##b
#define SW_CAT(a, b) SW_CAT_(a, b)

/* float arithmetic for float32 / bfloat16 / float16 logits */
#define SUF f
#define REAL float
#define EXP expf
#define LOG logf
#define LOAD(p, i) sw_load_as_float((p), dtype, (i))
#define STORE(p, i, v) sw_store_from_float((p), dtype, (i), (v))
#define SPILL (dtype == SW_FLOAT32)
#include "xent_row.inc"
#undef SUF
#undef REAL
#undef EXP
#undef LOG
#undef LOAD
#undef STORE
#undef SPILL

/* double arithmetic for float64 logits */
#define SUF d
#define REAL double
#define EXP exp
#define LOG log
#define LOAD(p, i) (((const double *)(p))[i])
#define STORE(p, i, v) (((double *)(p))[i] = (v))
#define SPILL 1
#include "xent_row.inc"

static size_t elem_size(sw_dtype d) {
    return d == SW_FLOAT64 ? 8 : d == SW_FLOAT32 ? 4 : 2;
}

sw_code sw_xent_cpu(const sw_xent_params *job, sw_error *err) {
    const int64_t rows = job->rows, V = job->vocab;
    const size_t row_bytes = (size_t)job->logits_row_stride * elem_size(job->dtype);
    const int64_t sl = job->loss_stride, se = job->lse_stride, ss = job->grad_scale_stride;
    /* Each label is read exactly once (volatile: the compiler may not read it again), into a
     * private copy that is checked and then used: the caller runs this without the GIL, and
     * another thread may write the labels meanwhile. */
    int64_t *labels = (int64_t *)malloc((size_t)(rows > 0 ? rows : 1) * sizeof *labels);
    if (!labels) {
        snprintf(err->message, sizeof err->message, "out of memory copying %lld labels", (long long)rows);
        return SW_ERR_INTERNAL;
    }
    const volatile int64_t *src = job->labels;
    for (int64_t r = 0; r < rows; ++r) labels[r] = src[r * job->labels_stride];
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t y = labels[r];
        if (y != job->opt.ignore_index && (y < 0 || y >= V)) {
            snprintf(err->message, sizeof err->message,
                     "label %lld at position %lld is outside [0, %lld) and is not ignore_index (%lld)", (long long)y,
                     (long long)(r + job->row_offset), (long long)V, (long long)job->opt.ignore_index);
            free(labels);
            return SW_ERR_VALUE;
        }
    }
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (rows * V >= 65536)
#endif
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t label = labels[r];
        const int ignored = label == job->opt.ignore_index;
        void *row = (char *)job->logits + (size_t)r * row_bytes;
        if (job->dtype == SW_FLOAT32 && job->opt.softcap <= 0.0) {
            float scale = job->grad_scale ? ((const float *)job->grad_scale)[r * ss] : 1.0f;
            xent_row_f32_fast((float *)row, V, label, ignored, scale, (float)job->opt.label_smoothing,
                              (float)job->opt.z_loss, job->compute_grad, &((float *)job->loss)[r * sl],
                              &((float *)job->lse)[r * se]);
        } else {
#define ROW(R, SUF)                                                                                  \
    xent_row_##SUF(row, job->dtype, V, label, ignored,                                               \
                   job->grad_scale ? ((const R *)job->grad_scale)[r * ss] : (R)1, &job->opt,          \
                   job->compute_grad, &((R *)job->loss)[r * sl], &((R *)job->lse)[r * se])
            SW_DISPATCH_REAL(job->dtype, ROW);
#undef ROW
        }
    }
    free(labels);
    return SW_OK;
}
