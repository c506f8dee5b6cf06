/* sw_ssd_impl.h - per-row Mamba-2 (SSD) scan loops, instantiated twice by sw_ssd.h
 * (SSD_T = float with suffix _f32, SSD_T = double with suffix _f64). No include guard on
 * purpose. See sw_ssd.h for the maths and the shapes. A row is one (b, h, p). */

SW_HOSTDEV SSD_T SW_SSD_CAT(sw_ssd_sigmoid, SSD_SUF)(SSD_T v) { return (SSD_T)1 / ((SSD_T)1 + SSD_EXP(-v)); }

/* Forward of row (b, h, pi). s: dstate scratch values of T. */
SW_HOSTDEV void SW_SSD_CAT(sw_ssd_fwd_row, SSD_SUF)(const sw_ssd_params *p, int64_t b, int64_t h, int64_t pi,
                                                   SSD_T *s) {
    const int64_t N = p->dstate, L = p->len, H = p->heads, P = p->headdim, G = p->groups, K = p->block;
    const int64_t nblk = sw_ssd_nblk(p), g = h / (H / G);
    const int64_t row = (b * H + h) * P + pi;             /* row of h0, hlast, ckpt: (batch, heads, headdim) */
    const SSD_T Ah = ((const SSD_T *)p->A)[h];
    const SSD_T Dv = p->D ? ((const SSD_T *)p->D)[h] : (SSD_T)0;
    SSD_T *ckpt = (SSD_T *)p->ckpt + row * nblk * N;      /* ckpt[b, h, pi, :, :] */
    for (int64_t n = 0; n < N; ++n) s[n] = p->h0 ? ((const SSD_T *)p->h0)[row * N + n] : (SSD_T)0;
    for (int64_t t = 0; t < L; ++t) {
        if (t % K == 0)
            for (int64_t n = 0; n < N; ++n) ckpt[(t / K) * N + n] = s[n];
        const int64_t xi = ((b * L + t) * H + h) * P + pi;     /* x[b, t, h, pi] */
        const int64_t bi = ((b * L + t) * G + g) * N;          /* B[b, t, g, 0], C[b, t, g, 0] */
        const SSD_T dtv = SSD_LOAD(p->dt, (b * L + t) * H + h), xv = SSD_LOAD(p->x, xi);
        const SSD_T a = SSD_EXP(dtv * Ah), dtx = dtv * xv;
        SSD_T acc = 0;
        for (int64_t n = 0; n < N; ++n) {
            s[n] = a * s[n] + SSD_LOAD(p->B, bi + n) * dtx;
            acc += SSD_LOAD(p->C, bi + n) * s[n];
        }
        SSD_T yv = acc + Dv * xv;
        if (p->z) {
            const SSD_T zv = SSD_LOAD(p->z, xi);
            yv *= zv * SW_SSD_CAT(sw_ssd_sigmoid, SSD_SUF)(zv);
        }
        ((SSD_T *)p->y)[xi] = yv;
    }
    for (int64_t n = 0; n < N; ++n) ((SSD_T *)p->hlast)[row * N + n] = s[n];
}

/* Backward of row (b, h, pi).
 *   mu: dstate values; hs: (block+1)*dstate values (row 0: state entering the block, row j+1:
 *   state after step t0+j). dB, dC: where this row adds its share of dB[b, t, g, n] (at
 *   dB[t * tstride + n]): the output slice of (b, g) on the GPU, a thread-private (len, dstate)
 *   buffer on the CPU. ddt is added into the output (atomically on the GPU). */
SW_HOSTDEV void SW_SSD_CAT(sw_ssd_bwd_row, SSD_SUF)(const sw_ssd_params *p, int64_t b, int64_t h, int64_t pi,
                                                   SSD_T *mu, SSD_T *hs, SSD_T *dB, SSD_T *dC, int64_t tstride) {
    const int64_t N = p->dstate, L = p->len, H = p->heads, P = p->headdim, G = p->groups, K = p->block;
    const int64_t nblk = sw_ssd_nblk(p), g = h / (H / G);
    const int64_t row = (b * H + h) * P + pi;
    const SSD_T Ah = ((const SSD_T *)p->A)[h];
    const SSD_T Dv = p->D ? ((const SSD_T *)p->D)[h] : (SSD_T)0;
    const SSD_T *ckpt = (const SSD_T *)p->ckpt + row * nblk * N;
    SSD_T dAacc = 0, dDacc = 0;
    for (int64_t n = 0; n < N; ++n) mu[n] = p->dhlast ? ((const SSD_T *)p->dhlast)[row * N + n] : (SSD_T)0;
    for (int64_t blk = nblk - 1; blk >= 0; --blk) {
        const int64_t t0 = blk * K, t1 = t0 + K < L ? t0 + K : L;
        /* recompute the block's states from its checkpoint */
        for (int64_t n = 0; n < N; ++n) hs[n] = ckpt[blk * N + n];
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t bi = ((b * L + t) * G + g) * N;
            const SSD_T dtv = SSD_LOAD(p->dt, (b * L + t) * H + h);
            const SSD_T a = SSD_EXP(dtv * Ah), dtx = dtv * SSD_LOAD(p->x, ((b * L + t) * H + h) * P + pi);
            const SSD_T *sp = hs + (t - t0) * N;
            SSD_T *st = hs + (t - t0 + 1) * N;
            for (int64_t n = 0; n < N; ++n) st[n] = a * sp[n] + SSD_LOAD(p->B, bi + n) * dtx;
        }
        for (int64_t t = t1 - 1; t >= t0; --t) {
            const int64_t xi = ((b * L + t) * H + h) * P + pi;
            const int64_t bi = ((b * L + t) * G + g) * N;
            const SSD_T dtv = SSD_LOAD(p->dt, (b * L + t) * H + h), xv = SSD_LOAD(p->x, xi);
            const SSD_T a = SSD_EXP(dtv * Ah);
            const SSD_T *sp = hs + (t - t0) * N, *st = hs + (t - t0 + 1) * N;
            const SSD_T gy = ((const SSD_T *)p->dy)[xi];
            SSD_T gv = gy, dzv = 0;
            if (p->z) {
                const SSD_T zv = SSD_LOAD(p->z, xi);
                const SSD_T sg = SW_SSD_CAT(sw_ssd_sigmoid, SSD_SUF)(zv);
                SSD_T ypre = Dv * xv;
                for (int64_t n = 0; n < N; ++n) ypre += SSD_LOAD(p->C, bi + n) * st[n];
                dzv = gy * ypre * sg * ((SSD_T)1 + zv * ((SSD_T)1 - sg));
                gv = gy * zv * sg;
            }
            SSD_T dxv = gv * Dv, ddtv = 0;
            dDacc += gv * xv;
            for (int64_t n = 0; n < N; ++n) {
                mu[n] += SSD_LOAD(p->C, bi + n) * gv;
                SW_SSD_ATOMIC_ADD(&dC[t * tstride + n], gv * st[n]);
            }
            const SSD_T dtx = dtv * xv;
            for (int64_t n = 0; n < N; ++n) {
                const SSD_T Bn = SSD_LOAD(p->B, bi + n);
                const SSD_T da = mu[n] * sp[n];   /* dL/da through state n */
                SW_SSD_ATOMIC_ADD(&dB[t * tstride + n], mu[n] * dtx);
                dxv += mu[n] * dtv * Bn;
                ddtv += da * a * Ah + mu[n] * Bn * xv;
                dAacc += da * a * dtv;
                mu[n] *= a;   /* now dL/ds_{t-1}, before step t-1's own output */
            }
            ((SSD_T *)p->dx)[xi] = dxv;
            SW_SSD_ATOMIC_ADD(&((SSD_T *)p->ddt)[(b * L + t) * H + h], ddtv);
            if (p->z) ((SSD_T *)p->dz)[xi] = dzv;
        }
    }
    for (int64_t n = 0; n < N; ++n) ((SSD_T *)p->dh0)[row * N + n] = mu[n];
    ((SSD_T *)p->dA)[row] = dAacc;
    ((SSD_T *)p->dD)[row] = dDacc;
}
