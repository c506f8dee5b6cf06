/* sw_xent.h - softmax cross-entropy of a logits chunk, turned in place into its gradient.
 *
 * For each row r of a (rows, V) logits chunk with label y = labels[r]:
 *   s_j   = softcap > 0 ? softcap * tanh(x_j / softcap) : x_j        (capped logits)
 *   m     = max_j s_j,  L = log sum_j exp(s_j - m),  lse = m + L       (float32, float64 for float64 input)
 *   loss  = lse - (1 - eps) s_y - (eps / V) sum_j s_j + z * lse^2     (eps: label smoothing, z: z-loss)
 *         = L - (1 - eps) (s_y - m) - (eps / V) sum_j (s_j - m) + z * lse^2   (as computed: no sum of
 *           raw logits, which overflows for logits near the largest float)
 *   dx_j  = scale_r * [ p_j (1 + 2 z lse) - eps / V - (1 - eps) [j == y] ] * ds_j/dx_j,
 *           p_j = exp(s_j - m) / sum_k exp(s_k - m),  ds_j/dx_j = 1 - (s_j / softcap)^2
 * Rows whose label is ignore_index get loss 0 and gradient 0 (their lse is still written).
 * Labels are read once each (another thread may write them while a kernel runs). A label outside
 * [0, V) is an error (CPU: reported before any row is written; CUDA: flagged, row treated as ignored).
 *
 * The coefficient helpers below are the per-row / per-element math shared by
 * the CPU kernel (xent_cpu.c) and the CUDA kernel (xent.cu).
 */
#ifndef SEQWRAP_XENT_H
#define SEQWRAP_XENT_H

#include <math.h>
#include <stdint.h>

#include "ops.h"
#include "sw_elem.h"
#include "sw_portable.h"
#include "sw_status.h"
#include "sw_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
    int64_t ignore_index;
    double label_smoothing;   /* eps in [0, 1] */
    double z_loss;            /* z >= 0 */
    double softcap;           /* > 0 enables capping; 0 disables */
} sw_xent_options;

/* One chunk: logits (rows, V), row r at r * logits_row_stride elements, its V elements
 * contiguous, written in place with the gradient when compute_grad; labels (rows,) int64;
 * loss/lse (rows,) float32, or float64 when the logits are float64; grad_scale (rows,) of the
 * same real type or NULL (= 1). Vectors: element r at r * its stride. error_flag: CUDA only, a
 * device int set to 1 when a label is outside [0, V) (that row is then treated as ignored). */
typedef struct sw_xent_params {
    void *logits;
    sw_dtype dtype;
    int64_t logits_row_stride;
    const int64_t *labels;
    int64_t labels_stride;
    void *loss;
    int64_t loss_stride;
    void *lse;
    int64_t lse_stride;
    const void *grad_scale;
    int64_t grad_scale_stride;
    int64_t rows;
    int64_t vocab;
    int compute_grad;
    sw_xent_options opt;
    int64_t row_offset;       /* added to row numbers in error messages */
    int *error_flag;
} sw_xent_params;

/* Per-element math, one copy per real type (float for fp32/bf16/fp16 input, double for fp64). */
#define SW_XENT_DEFINE_MATH(SUF, REAL, TANH)                                                        \
    SW_HOSTDEV REAL sw_xent_cap_##SUF(REAL x, REAL softcap) {                                       \
        return softcap > (REAL)0 ? softcap * TANH(x / softcap) : x;                                 \
    }                                                                                               \
    /* ds/dx of the cap, from the capped value s. */                                                \
    SW_HOSTDEV REAL sw_xent_cap_grad_##SUF(REAL s, REAL softcap) {                                  \
        if (softcap <= (REAL)0) return (REAL)1;                                                     \
        REAL t = s / softcap;                                                                       \
        return (REAL)1 - t * t;                                                                     \
    }                                                                                               \
    /* log_sum_e = L, d_label = s_y - m, sum_d = sum_j (s_j - m) (see the top of this file). */  \
    SW_HOSTDEV REAL sw_xent_loss_##SUF(REAL log_sum_e, REAL d_label, REAL sum_d, REAL lse, REAL eps, \
                                       REAL z, int64_t vocab) {                                     \
        REAL loss = log_sum_e - ((REAL)1 - eps) * d_label;                                          \
        if (eps != (REAL)0) loss -= eps / (REAL)vocab * sum_d;                                      \
        if (z != (REAL)0) loss += z * lse * lse;                                                    \
        return loss;                                                                                \
    }                                                                                               \
    /* d loss / d s_j from p_j = softmax_j; p_factor = 1 + 2 z lse. */                              \
    SW_HOSTDEV REAL sw_xent_dlogit_##SUF(REAL p, int is_label, REAL p_factor, REAL eps,            \
                                         int64_t vocab) {                                           \
        REAL g = p * p_factor - eps / (REAL)vocab;                                                  \
        return is_label ? g - ((REAL)1 - eps) : g;                                                  \
    }

SW_XENT_DEFINE_MATH(f, float, tanhf)
SW_XENT_DEFINE_MATH(d, double, tanh)

/* CPU: every row of the job (OpenMP over rows). Copies the labels once, checks the copy (a bad
 * label: SW_ERR_VALUE, nothing written) and computes from it. */
sw_code sw_xent_cpu(const sw_xent_params *job, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_XENT_H */
