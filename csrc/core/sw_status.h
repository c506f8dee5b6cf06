/* sw_status.h - status codes returned by every entry point of the C core.
 *
 * Kernels never abort, exit or print: they return a code and, when useful,
 * fill an sw_error with a human-readable message. The CPython glue turns a
 * non-zero code into a Python exception (see module.c / bridge.c).
 */
#ifndef SEQWRAP_STATUS_H
#define SEQWRAP_STATUS_H

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    SW_OK = 0,
    SW_ERR_VALUE = 1,        /* bad argument value found by the core (raises ValueError) */
    SW_ERR_NO_CUDA = 2,      /* CUDA tensor given but the CUDA kernels were not built */
    SW_ERR_CUDA = 3,         /* a CUDA runtime call failed (raises RuntimeError) */
    SW_ERR_INTERNAL = 4      /* a broken invariant inside seqwrap (raises RuntimeError) */
} sw_code;

#define SW_ERROR_MSG_LEN 256

typedef struct {
    sw_code code;
    char message[SW_ERROR_MSG_LEN];
} sw_error;

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_STATUS_H */
