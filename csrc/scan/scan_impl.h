/* scan_impl.h - the per-head loops of the selective scan, instantiated twice by scan.h
 * (SCAN_T = float with suffix _f32, SCAN_T = double with suffix _f64). No include guard on
 * purpose. See scan.h for the maths, the shapes and the strides.
 *
 * A call runs rows p0 <= p < p1 of head (b, h): the CPU passes the whole head (every constant of a
 * step is shared by its rows), the GPU one row per thread. Scratch sizes: SW_SCAN_WORK. */
#define SCAN_FN(name) SW_SCAN_CAT(name, SCAN_SUF)

SW_HOSTDEV SCAN_T SCAN_FN(sw_scan_sigmoid)(SCAN_T v) { return (SCAN_T)1 / ((SCAN_T)1 + SCAN_EXP(-v)); }

/* The constants of step t of head (b, h): decays a[n] (one exp per step when A is scalar, 0 at a
 * reset), Bt[n] = B[b,t,g,n] and, unless Ct is NULL, Ct[n] = C[b,t,g,n], read once for the head.
 * Returns dt[b,t,h]. */
SW_SCAN_HEAD SCAN_T SCAN_FN(sw_scan_step)(const sw_scan_params *p, int64_t b, int64_t h, int64_t t, SCAN_T *a,
                                        SCAN_T *Bt, SCAN_T *Ct) {
    const int64_t N = p->dstate, g = h / (p->heads / p->groups);
    const int64_t bo = b * p->sb[0] + t * p->sb[1] + g * p->sb[2], bn = p->sb[3];
    const SCAN_T dtv = SCAN_LOAD(p->dt, b * p->sdt[0] + t * p->sdt[1] + h * p->sdt[2]);
    const int rs = sw_scan_resets(p, b, t);
    const SCAN_T *A = (const SCAN_T *)p->A + h * (p->a_scalar ? 1 : N);
    if (p->a_scalar) {
        const SCAN_T a0 = rs ? (SCAN_T)0 : SCAN_EXP(dtv * A[0]);
        for (int64_t n = 0; n < N; ++n) a[n] = a0;
    } else {
        for (int64_t n = 0; n < N; ++n) a[n] = rs ? (SCAN_T)0 : SCAN_EXP(dtv * A[n]);
    }
    for (int64_t n = 0; n < N; ++n) Bt[n] = SCAN_LOAD(p->B, bo + n * bn);
    if (Ct)
        for (int64_t n = 0; n < N; ++n) Ct[n] = SCAN_LOAD(p->C, bo + n * bn);
    return dtv;
}

/* Offset of x[b, t, h, 0] (and of z, y, dy, dx, dz). */
SW_HOSTDEV int64_t SCAN_FN(sw_scan_xoff)(const sw_scan_params *p, int64_t b, int64_t t, int64_t h) {
    return b * p->sx[0] + t * p->sx[1] + h * p->sx[2];
}

/* Forward of rows [p0, p1) of head (b, h). s: (p1-p0)*dstate, tmp: 3*dstate values of T. */
SW_SCAN_HEAD void SCAN_FN(sw_scan_fwd_head)(const sw_scan_params *p, int64_t b, int64_t h, int64_t p0, int64_t p1,
                                          SCAN_T *s, SCAN_T *tmp) {
    const int64_t N = p->dstate, L = p->len, K = p->block, nblk = sw_scan_nblk(p), np = p1 - p0;
    const int64_t row0 = (b * p->heads + h) * p->headdim + p0;   /* first row of h0, hlast, ckpt */
    const SCAN_T Dv = p->D ? ((const SCAN_T *)p->D)[h] : (SCAN_T)0;
    SCAN_T *a = tmp, *Bt = tmp + N, *Ct = tmp + 2 * N;
    for (int64_t i = 0; i < np * N; ++i) s[i] = p->h0 ? ((const SCAN_T *)p->h0)[row0 * N + i] : (SCAN_T)0;
    for (int64_t t = 0; t < L; ++t) {
        if (t % K == 0)
            for (int64_t r = 0; r < np; ++r)
                for (int64_t n = 0; n < N; ++n) ((SCAN_T *)p->ckpt)[((row0 + r) * nblk + t / K) * N + n] = s[r * N + n];
        const SCAN_T dtv = SCAN_FN(sw_scan_step)(p, b, h, t, a, Bt, Ct);
        const int64_t xo = SCAN_FN(sw_scan_xoff)(p, b, t, h);
        for (int64_t r = 0; r < np; ++r) {
            const int64_t xi = xo + (p0 + r) * p->sx[3];
            const SCAN_T xv = SCAN_LOAD(p->x, xi), dtx = dtv * xv;
            SCAN_T *sr = s + r * N, acc = 0;
            SW_SCAN_SIMD_SUM(acc)
            for (int64_t n = 0; n < N; ++n) {
                sr[n] = a[n] * sr[n] + Bt[n] * dtx;
                acc += Ct[n] * sr[n];
            }
            SCAN_T yv = acc + Dv * xv;
            if (p->z) {
                const SCAN_T zv = SCAN_LOAD(p->z, xi);
                yv *= zv * SCAN_FN(sw_scan_sigmoid)(zv);
            }
            ((SCAN_T *)p->y)[xi] = yv;
        }
    }
    for (int64_t i = 0; i < np * N; ++i) ((SCAN_T *)p->hlast)[row0 * N + i] = s[i];
}

/* Recomputes the states of block [t0, t1) of rows [p0, p1): hs[j] ((np, dstate) each) is the state
 * entering step t0 + j; hs[0] comes from ckpt. */
SW_SCAN_HEAD void SCAN_FN(sw_scan_recompute)(const sw_scan_params *p, int64_t b, int64_t h, int64_t p0, int64_t np,
                                           int64_t blk, SCAN_T *hs, SCAN_T *tmp) {
    const int64_t N = p->dstate, K = p->block, nblk = sw_scan_nblk(p);
    const int64_t row0 = (b * p->heads + h) * p->headdim + p0, t0 = blk * K;
    const int64_t t1 = t0 + K < p->len ? t0 + K : p->len;
    SCAN_T *a = tmp, *Bt = tmp + N;
    for (int64_t r = 0; r < np; ++r)
        for (int64_t n = 0; n < N; ++n) hs[r * N + n] = ((const SCAN_T *)p->ckpt)[((row0 + r) * nblk + blk) * N + n];
    for (int64_t t = t0; t < t1; ++t) {
        const SCAN_T dtv = SCAN_FN(sw_scan_step)(p, b, h, t, a, Bt, NULL);
        const int64_t xo = SCAN_FN(sw_scan_xoff)(p, b, t, h);
        for (int64_t r = 0; r < np; ++r) {
            const SCAN_T dtx = dtv * SCAN_LOAD(p->x, xo + (p0 + r) * p->sx[3]);
            const SCAN_T *sp = hs + ((t - t0) * np + r) * N;
            SCAN_T *st = hs + ((t - t0 + 1) * np + r) * N;
            SW_SCAN_SIMD
            for (int64_t n = 0; n < N; ++n) st[n] = a[n] * sp[n] + Bt[n] * dtx;
        }
    }
}

/* g_t = dy_t * silu(z_t) of the element at xi: the gradient reaching C_t . s_t. */
SW_HOSTDEV SCAN_T SCAN_FN(sw_scan_gate_grad)(const sw_scan_params *p, int64_t xi) {
    const SCAN_T gy = ((const SCAN_T *)p->dy)[xi];
    if (!p->z) return gy;
    const SCAN_T zv = SCAN_LOAD(p->z, xi);
    return gy * zv * SCAN_FN(sw_scan_sigmoid)(zv);
}

/* The truncated-adjoint window of one head (trunc > 0): W = sum of dt over (t, t+T], R = resets there. */
typedef struct {
    double W;
    int64_t R;
    int have;
} SCAN_FN(sw_scan_window);

/* Slides the window to (t, t+T] (steps move down by one per call); 1 when step t+T exists. */
SW_HOSTDEV int SCAN_FN(sw_scan_slide)(const sw_scan_params *p, int64_t b, int64_t h, int64_t t,
                                      SCAN_FN(sw_scan_window) *w) {
    const int64_t T = p->trunc;
    if (T <= 0 || t + T >= p->len) return 0;
#define SCAN_DT(m) ((double)SCAN_LOAD(p->dt, b * p->sdt[0] + (m) * p->sdt[1] + h * p->sdt[2]))
    if (!w->have) {
        for (int64_t m = t + 1; m <= t + T; ++m) {
            w->W += SCAN_DT(m);
            w->R += sw_scan_resets(p, b, m);
        }
        w->have = 1;
    } else {
        w->W += SCAN_DT(t + 1) - SCAN_DT(t + T + 1);
        w->R += sw_scan_resets(p, b, t + 1) - sw_scan_resets(p, b, t + T + 1);
    }
#undef SCAN_DT
    return 1;
}

/* Backward of rows [p0, p1) of head (b, h).
 *   mu: np*dstate; hs: (block+1)*np*dstate; tmp: 5*dstate values of T.
 *   dB, dC: where the head adds its share of dB[b,t,g,n], at dB[t*ts + n*ns] (the output slice of
 *   (b, g) on the GPU, atomically; a thread-private (len, dstate) buffer on the CPU). ddt is added
 *   into the output (atomically on the GPU); dx, dz, dA, dD, dh0 rows are written. */
SW_SCAN_HEAD void SCAN_FN(sw_scan_bwd_head)(const sw_scan_params *p, int64_t b, int64_t h, int64_t p0, int64_t p1,
                                          SCAN_T *mu, SCAN_T *hs, SCAN_T *tmp, SCAN_T *dB, SCAN_T *dC, int64_t ts,
                                          int64_t ns) {
    const int64_t N = p->dstate, L = p->len, K = p->block, nblk = sw_scan_nblk(p), np = p1 - p0;
    const int64_t row0 = (b * p->heads + h) * p->headdim + p0, na = p->a_scalar ? 1 : N;
    const int64_t g = h / (p->heads / p->groups);
    const SCAN_T *A = (const SCAN_T *)p->A + h * na;
    const SCAN_T Dv = p->D ? ((const SCAN_T *)p->D)[h] : (SCAN_T)0;
    SCAN_T *a = tmp, *Bt = tmp + N, *Ct = tmp + 2 * N, *dBt = tmp + 3 * N, *dCt = tmp + 4 * N;
    SCAN_T *dA = (SCAN_T *)p->dA + row0 * na, *dD = (SCAN_T *)p->dD + row0;
    SCAN_FN(sw_scan_window) win = {0.0, 0, 0};
    for (int64_t i = 0; i < np * na; ++i) dA[i] = 0;
    for (int64_t r = 0; r < np; ++r) dD[r] = 0;
    for (int64_t i = 0; i < np * N; ++i) mu[i] = p->dhlast ? ((const SCAN_T *)p->dhlast)[row0 * N + i] : (SCAN_T)0;
    for (int64_t blk = nblk - 1; blk >= 0; --blk) {
        const int64_t t0 = blk * K, t1 = t0 + K < L ? t0 + K : L;
        SCAN_FN(sw_scan_recompute)(p, b, h, p0, np, blk, hs, tmp);
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const SCAN_T dtv = SCAN_FN(sw_scan_step)(p, b, h, t, a, Bt, Ct);
            const int64_t xo = SCAN_FN(sw_scan_xoff)(p, b, t, h);
            const int own = t < p->grad_len;
            /* truncation: drop the loss of step t+T from mu_t (nothing when a reset cuts it off) */
            const int cut = SCAN_FN(sw_scan_slide)(p, b, h, t, &win) && win.R == 0;
            const int64_t co = b * p->sb[0] + (t + p->trunc) * p->sb[1] + g * p->sb[2];
            SCAN_T ddth = 0;
            for (int64_t n = 0; n < N; ++n) dBt[n] = dCt[n] = 0;
            for (int64_t r = 0; r < np; ++r) {
                const int64_t xi = xo + (p0 + r) * p->sx[3];
                const SCAN_T xv = SCAN_LOAD(p->x, xi), gy = ((const SCAN_T *)p->dy)[xi];
                const SCAN_T *sp = hs + ((t - t0) * np + r) * N, *st = sp + np * N;
                SCAN_T *m = mu + r * N;
                SCAN_T gv = gy, dzv = 0;
                if (p->z) {
                    const SCAN_T zv = SCAN_LOAD(p->z, xi), sg = SCAN_FN(sw_scan_sigmoid)(zv);
                    SCAN_T ypre = 0;
                    SW_SCAN_SIMD_SUM(ypre)
                    for (int64_t n = 0; n < N; ++n) ypre += Ct[n] * st[n];
                    ypre += Dv * xv;
                    dzv = gy * ypre * sg * ((SCAN_T)1 + zv * ((SCAN_T)1 - sg));
                    gv = gy * zv * sg;
                }
                if (cut) {   /* applied before this step's own C_t g_t: both only add into mu_t */
                    const SCAN_T g2 = SCAN_FN(sw_scan_gate_grad)(p, xi + p->trunc * p->sx[1]);
                    for (int64_t n = 0; n < N; ++n)
                        m[n] -= SCAN_EXP(A[p->a_scalar ? 0 : n] * (SCAN_T)win.W) * SCAN_LOAD(p->C, co + n * p->sb[3]) * g2;
                }
                if (!own) {   /* mu_t += C_t g_t, then dL/ds_{t-1} = a mu_t */
                    SW_SCAN_SIMD
                    for (int64_t n = 0; n < N; ++n) m[n] = (m[n] + Ct[n] * gv) * a[n];
                    ((SCAN_T *)p->dx)[xi] = 0;
                    if (p->z) ((SCAN_T *)p->dz)[xi] = 0;
                    continue;
                }
                /* one pass over the state: mu_t = mu + C_t g_t; q = sum_n dL/da_n a_n (* A_n when A is per
                 * state); rb = sum_n mu_t B_t; dC, dB of this step; then mu_{t-1} = a mu_t */
                const SCAN_T dtx = dtv * xv;
                SCAN_T q = 0, rb = 0;
                if (p->a_scalar) {
                    SW_SCAN_SIMD_SUM2(q, rb)
                    for (int64_t n = 0; n < N; ++n) {
                        const SCAN_T mn = m[n] + Ct[n] * gv;
                        dCt[n] += gv * st[n];
                        q += mn * sp[n];
                        rb += mn * Bt[n];
                        dBt[n] += mn * dtx;
                        m[n] = mn * a[n];
                    }
                    q *= a[0];
                    dA[r] += q * dtv;
                    q *= A[0];
                } else {
                    SCAN_T *dAr = dA + r * N;
                    SW_SCAN_SIMD_SUM2(q, rb)
                    for (int64_t n = 0; n < N; ++n) {
                        const SCAN_T mn = m[n] + Ct[n] * gv, da = mn * sp[n] * a[n];
                        dCt[n] += gv * st[n];
                        q += da * A[n];
                        rb += mn * Bt[n];
                        dAr[n] += da * dtv;
                        dBt[n] += mn * dtx;
                        m[n] = mn * a[n];
                    }
                }
                dD[r] += gv * xv;
                ddth += q + rb * xv;
                ((SCAN_T *)p->dx)[xi] = gv * Dv + rb * dtv;
                if (p->z) ((SCAN_T *)p->dz)[xi] = dzv;
            }
            if (own) {
                SW_SCAN_ATOMIC_ADD(&((SCAN_T *)p->ddt)[b * p->sdt[0] + t * p->sdt[1] + h * p->sdt[2]], ddth);
                for (int64_t n = 0; n < N; ++n) {
                    SW_SCAN_ATOMIC_ADD(&dB[t * ts + n * ns], dBt[n]);
                    SW_SCAN_ATOMIC_ADD(&dC[t * ts + n * ns], dCt[n]);
                }
            }
        }
    }
    for (int64_t i = 0; i < np * N; ++i) ((SCAN_T *)p->dh0)[row0 * N + i] = mu[i];
}

#undef SCAN_FN
