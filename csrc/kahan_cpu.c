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
    const int64_t n = job->n;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (n >= SW_KAHAN_PARALLEL_MIN)
#endif
    for (int64_t i = 0; i < n; ++i) {
        sw_kahan_step(&acc[i], &comp[i], sw_load_as_float(g, dt, i), scale);
    }
}

sw_code sw_kahan_accumulate_cpu(const sw_kahan_job *jobs, int njobs, float scale, sw_error *err) {
    (void)err;
    for (int j = 0; j < njobs; ++j) kahan_job_cpu(&jobs[j], scale);
    return SW_OK;
}
