/* round_to_half.c - seqwrap._C._round_to_half(src, dst): the core's float32 -> bfloat16 / float16
 * rounding (sw_half.h), so tests can compare it bit for bit with torch's conversions. CPU only.
 *   src: (n...) float32;  dst: same shape, bfloat16 or float16, written. */
#include "call.h"

#include "sw_elem.h"

enum { SRC, DST };

static const sw_arg_spec args[] = {
    SW_IN("src", .dtypes = SW_DT(SW_FLOAT32)),
    SW_OUT("dst", .dtypes = SW_DT(SW_BFLOAT16) | SW_DT(SW_FLOAT16), .shape_like = "src"),
};

static sw_code run(const sw_call *c, sw_error *err) {
    (void)err;
    const sw_tensor *src = &c->args[SRC].t, *dst = &c->args[DST].t;
    const int64_t ss = sw_flat_stride(src, src->ndim), sd = sw_flat_stride(dst, dst->ndim);
    for (int64_t i = 0; i < src->numel; ++i)
        sw_store_from_float(dst->data, dst->dtype, i * sd, ((const float *)src->data)[i * ss]);
    return SW_OK;
}

const sw_op sw_round_to_half_op = {"_round_to_half", "seqwrap._C._round_to_half", args, SW_NARGS(args), 0, NULL,
                                   run};
