/* sw_kahan.h - compensated (Kahan) scaled accumulation: acc += scale * g.
 *
 * acc and comp are float32 buffers of n elements; g holds n elements of
 * float32, bfloat16 or float16. After the call, acc is the running sum and
 * comp holds the (negated) low-order bits lost so far; the next addition
 * feeds them back in. Per element:
 *     y = scale*g - comp;  t = acc + y;  comp = (t - acc) - y;  acc = t
 * The per-element step is shared by the CPU kernel (kahan_cpu.c) and the CUDA
 * kernel (kahan.cu), so both run the same float32 operations.
 */
#ifndef SEQWRAP_KAHAN_H
#define SEQWRAP_KAHAN_H

#include <stdint.h>

#include "ops.h"
#include "sw_elem.h"
#include "sw_portable.h"
#include "sw_status.h"
#include "sw_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

SW_HOSTDEV void sw_kahan_step(float *acc, float *comp, float value, float scale) {
    float y = SW_FSUB(SW_FMUL(scale, value), *comp);
    float t = SW_FADD(*acc, y);
    *comp = SW_FSUB(SW_FSUB(t, *acc), y);
    *acc = t;
}

/* One accumulation job: the three buffers of one tensor, n elements each, element i of a buffer
 * at i * its stride (in elements; 1 for the contiguous tensors the call path passes today).
 * g_dtype is SW_FLOAT32, SW_FLOAT16 or SW_BFLOAT16. */
typedef struct {
    float *acc;
    float *comp;
    const void *g;
    sw_dtype g_dtype;
    int64_t n;
    int64_t acc_stride, comp_stride, g_stride;
} sw_kahan_job;

/* Every job of one call: accs[i] += scale * grads[i]. */
typedef struct sw_kahan_params {
    const sw_kahan_job *jobs;
    int njobs;
    float scale;
} sw_kahan_params;

/* CPU: runs every job (OpenMP inside each large job). CUDA: sw_kahan_cuda (ops.h). */
sw_code sw_kahan_cpu(const sw_kahan_params *p, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_KAHAN_H */
