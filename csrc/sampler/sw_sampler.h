/* sw_sampler.h - SpaCO's chunk sampler and compensation weights.
 *
 * A counter-based RNG: the random key of chunk i in training step `step` is a
 * pure function of (seed, step, i) (three rounds of the SplitMix64 finaliser),
 * so CPU and GPU, and any number of threads, draw the same selection.
 *
 * Two modes, k chunks, output weights[k] (0 = chunk not backpropagated):
 *   bernoulli: chunk i kept iff u_i < q_i, u_i uniform in [0, 1) from its key;
 *              weight 1/q_i. Exactly unbiased (each gradient path through kept
 *              chunks i1..ip carries 1/(q_i1...q_ip), kept with prob q_i1...q_ip).
 *   fixed:     the t chunks with the smallest (key, index) are kept (t of k uniformly,
 *              without replacement); weight min(k/t, cap) (cap <= 0: no cap). Only
 *              approximately unbiased: paths through p >= 2 chunks survive with
 *              probability t(t-1).../(k(k-1)...) but carry (k/t)^p.
 * The per-chunk functions below are shared by sampler_cpu.c and sampler.cu.
 */
#ifndef SEQWRAP_SAMPLER_H
#define SEQWRAP_SAMPLER_H

#include <stdint.h>

#include "ops.h"
#include "sw_portable.h"
#include "sw_status.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { SW_SAMPLE_BERNOULLI = 0, SW_SAMPLE_FIXED = 1 } sw_sample_mode;

/* probs[i] sits at i * probs_stride, weights[i] at i * weights_stride (elements). */
typedef struct sw_sampler_params {
    sw_sample_mode mode;
    uint64_t seed;
    uint64_t step;
    int64_t k;            /* number of chunks, >= 1 */
    const double *probs;  /* bernoulli: k inclusion probabilities in (0, 1] */
    int64_t t;            /* fixed: chunks kept, 1 <= t <= k */
    double cap;           /* fixed: largest factor per hop, >= 1; 0 = no cap */
    double *weights;      /* out: k factors */
    int64_t probs_stride;
    int64_t weights_stride;
} sw_sampler_params;

SW_HOSTDEV uint64_t sw_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* The random key of chunk i at (seed, step). */
SW_HOSTDEV uint64_t sw_chunk_key(uint64_t seed, uint64_t step, uint64_t i) {
    return sw_splitmix64(sw_splitmix64(sw_splitmix64(seed) ^ step) ^ i);
}

/* Uniform double in [0, 1) from the top 53 bits of a key (exact on CPU and GPU). */
SW_HOSTDEV double sw_key_uniform(uint64_t key) {
    return (double)(key >> 11) * (1.0 / 9007199254740992.0);
}

/* Bernoulli weight of chunk i: 1/q if kept, 0 if not; NaN if q is not in (0, 1]. */
SW_HOSTDEV double sw_bernoulli_weight(uint64_t seed, uint64_t step, int64_t i, double q) {
    if (!(q > 0.0 && q <= 1.0)) return (q - q) / (q - q); /* NaN for any q */
    return sw_key_uniform(sw_chunk_key(seed, step, (uint64_t)i)) < q ? 1.0 / q : 0.0;
}

/* The factor of a kept chunk in fixed mode: min(k/t, cap), cap <= 0 meaning none. */
SW_HOSTDEV double sw_fixed_factor(int64_t k, int64_t t, double cap) {
    double f = (double)k / (double)t;
    return (cap > 0.0 && cap < f) ? cap : f;
}

/* (key_a, a) < (key_b, b): the total order of fixed-mode selection. */
SW_HOSTDEV int sw_key_before(uint64_t key_a, int64_t a, uint64_t key_b, int64_t b) {
    return key_a < key_b || (key_a == key_b && a < b);
}

/* Checks the scalar parameters (mode, k, t, cap); probs are checked by the kernels. */
sw_code sw_sampler_check(const sw_sampler_params *p, sw_error *err);

/* CPU: fills p->weights. Also rejects probabilities outside (0, 1]. CUDA: sw_sampler_cuda (ops.h). */
sw_code sw_sampler_cpu(const sw_sampler_params *p, sw_error *err);

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_SAMPLER_H */
