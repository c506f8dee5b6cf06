/* sw_tensor.h - the plain tensor descriptor that kernels see.
 *
 * The CPython glue fills it from a DLPack DLTensor (bridge.c); kernels never
 * see Python, torch or DLPack. Shapes and strides are in elements; `data`
 * already includes DLPack's byte_offset.
 */
#ifndef SEQWRAP_TENSOR_H
#define SEQWRAP_TENSOR_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SW_MAX_DIMS 8

typedef enum {
    SW_FLOAT32 = 0,
    SW_FLOAT16 = 1,
    SW_BFLOAT16 = 2,
    SW_FLOAT64 = 3,
    SW_INT32 = 4,
    SW_INT64 = 5,
    SW_NUM_DTYPES = 6
} sw_dtype;

/* Bit masks for "which dtypes may this argument have". */
#define SW_DT(d) (1u << (d))
#define SW_DT_FLOATS16_32 (SW_DT(SW_FLOAT32) | SW_DT(SW_FLOAT16) | SW_DT(SW_BFLOAT16))

typedef enum { SW_CPU = 0, SW_CUDA = 1 } sw_device_type;

/* Where a CUDA kernel runs: the device index of the op's tensors and torch's stream (cudaStream_t). */
typedef struct {
    int device;
    void *stream;
} sw_launch;

typedef struct {
    void *data;
    sw_dtype dtype;
    sw_device_type device;
    int device_id;
    int ndim;
    int64_t numel;
    int64_t shape[SW_MAX_DIMS];
    int64_t strides[SW_MAX_DIMS];
} sw_tensor;

#ifdef __cplusplus
}
#endif

#endif /* SEQWRAP_TENSOR_H */
