/* ops.h - declarations generated from ops.def: every call-path op's sw_op, and the CUDA launcher of
 * every op that has one. Launchers take the op's parameter struct, the device and stream, and fill
 * err on failure; they never synchronise the host. An op's own header defines its struct. */
#ifndef SEQWRAP_OPS_H
#define SEQWRAP_OPS_H

#include "sw_status.h"
#include "sw_tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SW_DECLARE_LAUNCHER(prefix, params)                                                         \
    struct sw_##params##_params;                                                                    \
    sw_code sw_##prefix##_cuda(const struct sw_##params##_params *p, const sw_launch *l, sw_error *err);
#define SW_LAUNCHER_1(prefix) SW_DECLARE_LAUNCHER(prefix, prefix)
#define SW_LAUNCHER_0(prefix)
#define SW_LAUNCHER_shared(prefix) /* declared by its SW_LAUNCHER entry */
#define SW_OP(name, prefix, has_cuda, doc) SW_LAUNCHER_##has_cuda(prefix)
#define SW_LAUNCHER(prefix, params) SW_DECLARE_LAUNCHER(prefix, params)
#include "ops.def"

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_OPS_H */
