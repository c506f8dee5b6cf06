/* sw_scan_impl.h - per-channel selective scan loops, instantiated twice by sw_scan.h
 * (SCAN_T = float with suffix _f32, SCAN_T = double with suffix _f64). No include guard
 * on purpose. See sw_scan.h for the maths and the shapes. */

SW_HOSTDEV SCAN_T SW_SCAN_CAT(sw_scan_sigmoid, SCAN_SUF)(SCAN_T x) { return (SCAN_T)1 / ((SCAN_T)1 + SCAN_EXP(-x)); }

/* The decay a = exp(dt * A) of one step; 0 at a document reset (the entering state is dropped). */
SW_HOSTDEV SCAN_T SW_SCAN_CAT(sw_scan_decay, SCAN_SUF)(SCAN_T dtv, SCAN_T a_n, int reset) {
    return reset ? (SCAN_T)0 : SCAN_EXP(dtv * a_n);
}

/* Forward of one (b, d) row. h: dstate scratch values of T. */
SW_HOSTDEV void SW_SCAN_CAT(sw_scan_fwd_row, SCAN_SUF)(const sw_scan_params *p, int64_t b, int64_t d, SCAN_T *h) {
    const int64_t N = p->dstate, L = p->len, K = p->block, nblk = sw_scan_nblk(p);
    const int64_t row = b * p->dim + d;                 /* row of u, dt, z, y: (batch, dim) */
    const SCAN_T *A = (const SCAN_T *)p->A + d * N;     /* A[d, :] */
    const SCAN_T Dv = p->D ? ((const SCAN_T *)p->D)[d] : (SCAN_T)0;
    SCAN_T *ckpt = (SCAN_T *)p->ckpt + row * nblk * N;  /* ckpt[b, d, :, :] */
    SCAN_T *y = (SCAN_T *)p->y + row * L;
    for (int64_t n = 0; n < N; ++n) h[n] = p->h0 ? ((const SCAN_T *)p->h0)[row * N + n] : (SCAN_T)0;
    for (int64_t t = 0; t < L; ++t) {
        if (t % K == 0)
            for (int64_t n = 0; n < N; ++n) ckpt[(t / K) * N + n] = h[n];
        const SCAN_T dtv = SCAN_LOAD(p->dt, row * L + t), uv = SCAN_LOAD(p->u, row * L + t);
        const int rs = sw_scan_resets(p, b, t);
        SCAN_T acc = 0;
        for (int64_t n = 0; n < N; ++n) {
            const int64_t bi = (b * N + n) * L + t;     /* B[b, n, t], C[b, n, t] */
            h[n] = SW_SCAN_CAT(sw_scan_decay, SCAN_SUF)(dtv, A[n], rs) * h[n] + dtv * SCAN_LOAD(p->B, bi) * uv;
            acc += SCAN_LOAD(p->C, bi) * h[n];
        }
        SCAN_T yv = acc + Dv * uv;
        if (p->z) {
            const SCAN_T zv = SCAN_LOAD(p->z, row * L + t);
            yv *= zv * SW_SCAN_CAT(sw_scan_sigmoid, SCAN_SUF)(zv);
        }
        y[t] = yv;
    }
    for (int64_t n = 0; n < N; ++n) ((SCAN_T *)p->hlast)[row * N + n] = h[n];
}

/* g_t = dy_t * silu(z_t): the gradient reaching C_t . h_t. */
SW_HOSTDEV SCAN_T SW_SCAN_CAT(sw_scan_gate_grad, SCAN_SUF)(const sw_scan_params *p, int64_t row, int64_t t) {
    const SCAN_T gy = ((const SCAN_T *)p->dy)[row * p->len + t];
    if (!p->z) return gy;
    const SCAN_T zv = SCAN_LOAD(p->z, row * p->len + t);
    return gy * zv * SW_SCAN_CAT(sw_scan_sigmoid, SCAN_SUF)(zv);
}

/* Backward of one (b, d) row.
 *   mu: dstate values; hs: (block+1)*dstate values (row 0: state entering the block,
 *   row j+1: state after step t0+j); dB, dC: where to add this row's share of dB[b], dC[b]
 *   ((dstate, len) each: a thread-private buffer on the CPU, the output on the GPU). */
SW_HOSTDEV void SW_SCAN_CAT(sw_scan_bwd_row, SCAN_SUF)(const sw_scan_params *p, int64_t b, int64_t d, SCAN_T *mu,
                                                       SCAN_T *hs, SCAN_T *dB, SCAN_T *dC) {
    const int64_t N = p->dstate, L = p->len, K = p->block, nblk = sw_scan_nblk(p), T = p->trunc;
    const int64_t row = b * p->dim + d;
    const SCAN_T *A = (const SCAN_T *)p->A + d * N;
    const SCAN_T Dv = p->D ? ((const SCAN_T *)p->D)[d] : (SCAN_T)0;
    const SCAN_T *ckpt = (const SCAN_T *)p->ckpt + row * nblk * N;
    SCAN_T *dA = (SCAN_T *)p->dA + row * N;
    SCAN_T dDacc = 0;
    double W = 0.0;     /* sum of dt over (t, t+T]: the decay exponent of the truncation term */
    int64_t R = 0;      /* resets in (t, t+T]: the truncation term is 0 when there is one */
    int have_W = 0;
    for (int64_t n = 0; n < N; ++n) {
        mu[n] = p->dhlast ? ((const SCAN_T *)p->dhlast)[row * N + n] : (SCAN_T)0;
        dA[n] = 0;
    }
    for (int64_t blk = nblk - 1; blk >= 0; --blk) {
        const int64_t t0 = blk * K, t1 = t0 + K < L ? t0 + K : L;
        /* recompute the block's states from its checkpoint */
        for (int64_t n = 0; n < N; ++n) hs[n] = ckpt[blk * N + n];
        for (int64_t t = t0; t < t1; ++t) {
            const SCAN_T dtv = SCAN_LOAD(p->dt, row * L + t), uv = SCAN_LOAD(p->u, row * L + t);
            const SCAN_T *hp = hs + (t - t0) * N;
            SCAN_T *ht = hs + (t - t0 + 1) * N;
            const int rs = sw_scan_resets(p, b, t);
            for (int64_t n = 0; n < N; ++n)
                ht[n] = SW_SCAN_CAT(sw_scan_decay, SCAN_SUF)(dtv, A[n], rs) * hp[n] +
                        dtv * SCAN_LOAD(p->B, (b * N + n) * L + t) * uv;
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const SCAN_T dtv = SCAN_LOAD(p->dt, row * L + t), uv = SCAN_LOAD(p->u, row * L + t);
            const SCAN_T *hp = hs + (t - t0) * N, *ht = hs + (t - t0 + 1) * N;
            const SCAN_T gy = ((const SCAN_T *)p->dy)[row * L + t];
            const int own = t < p->grad_len;
            SCAN_T g = gy, dzv = 0;
            if (p->z) {
                const SCAN_T zv = SCAN_LOAD(p->z, row * L + t);
                const SCAN_T sg = SW_SCAN_CAT(sw_scan_sigmoid, SCAN_SUF)(zv);
                SCAN_T ypre = Dv * uv;
                for (int64_t n = 0; n < N; ++n) ypre += SCAN_LOAD(p->C, (b * N + n) * L + t) * ht[n];
                dzv = gy * ypre * sg * ((SCAN_T)1 + zv * ((SCAN_T)1 - sg));
                g = gy * zv * sg;
            }
            SCAN_T duv = own ? g * Dv : (SCAN_T)0, ddtv = 0;
            if (own) dDacc += g * uv;
            for (int64_t n = 0; n < N; ++n) {
                const int64_t bi = (b * N + n) * L + t;
                mu[n] += SCAN_LOAD(p->C, bi) * g;
                if (own) SW_SCAN_ATOMIC_ADD(&dC[n * L + t], g * ht[n]);
            }
            if (T > 0 && t + T < L) {
                /* drop the loss of step t+T from the window of mu_t */
                if (!have_W) {
                    for (int64_t m = t + 1; m <= t + T; ++m) {
                        W += (double)SCAN_LOAD(p->dt, row * L + m);
                        R += sw_scan_resets(p, b, m);
                    }
                    have_W = 1;
                } else {
                    W += (double)SCAN_LOAD(p->dt, row * L + t + 1) - (double)SCAN_LOAD(p->dt, row * L + t + T + 1);
                    R += sw_scan_resets(p, b, t + 1) - sw_scan_resets(p, b, t + T + 1);
                }
                const SCAN_T g2 = SW_SCAN_CAT(sw_scan_gate_grad, SCAN_SUF)(p, row, t + T);
                if (R == 0)   /* else a reset cuts step t+T off h_t: nothing to drop */
                    for (int64_t n = 0; n < N; ++n)
                        mu[n] -= SCAN_EXP(A[n] * (SCAN_T)W) * SCAN_LOAD(p->C, (b * N + n) * L + t + T) * g2;
            }
            const int rs = sw_scan_resets(p, b, t);
            for (int64_t n = 0; n < N; ++n) {
                const SCAN_T a = SW_SCAN_CAT(sw_scan_decay, SCAN_SUF)(dtv, A[n], rs);
                if (own) {
                    const SCAN_T Bn = SCAN_LOAD(p->B, (b * N + n) * L + t);
                    const SCAN_T da = mu[n] * hp[n];   /* dL/da */
                    ddtv += da * a * A[n] + mu[n] * Bn * uv;
                    dA[n] += da * a * dtv;
                    SW_SCAN_ATOMIC_ADD(&dB[n * L + t], mu[n] * dtv * uv);
                    duv += mu[n] * dtv * Bn;
                }
                mu[n] *= a;   /* now dL/dh_{t-1}, before step t-1's own output */
            }
            ((SCAN_T *)p->du)[row * L + t] = duv;
            ((SCAN_T *)p->ddt)[row * L + t] = own ? ddtv : (SCAN_T)0;
            if (p->z) ((SCAN_T *)p->dz)[row * L + t] = own ? dzv : (SCAN_T)0;
        }
    }
    for (int64_t n = 0; n < N; ++n) ((SCAN_T *)p->dh0)[row * N + n] = mu[n];
    ((SCAN_T *)p->dD)[row] = dDacc;
}
