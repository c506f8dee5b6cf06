/* kahan_cpu.c - CPU kernel of compensated scaled accumulation (see sw_kahan.h). */
#include "sw_kahan.h"

/* Below this many elements a job runs on one thread: spawning a team costs
 * more than the work. */
#define SW_KAHAN_PARALLEL_MIN 32768

static void kahan_job_cpu(const sw_kahan_job *job, float scale) {
    float *acc = job->acc;
    float *comp = job->comp;
    const void *g = job->g;
    const sw_dtype dt = job->g_dtype;
    const int64_t n = job->n, sa = job->acc_stride, sc = job->comp_stride, sg = job->g_stride;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= SW_KAHAN_PARALLEL_MIN)
#endif
    for (int64_t i = 0; i < n; ++i) {
        sw_kahan_step(&acc[i * sa], &comp[i * sc], sw_load_as_float(g, dt, i * sg), scale);
    }
}

sw_code sw_kahan_cpu(const sw_kahan_params *p, sw_error *err) {
    (void)err;
    for (int j = 0; j < p->njobs; ++j) kahan_job_cpu(&p->jobs[j], p->scale);
    return SW_OK;
}
