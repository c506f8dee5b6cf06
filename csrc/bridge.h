/* bridge.h - torch tensors into sw_tensor descriptors, through DLPack.
 *
 * Two paths:
 *   fast:    torch's DLPack C exchange table (`Tensor.__dlpack_c_exchange_api__`,
 *            capsule "dlpack_exchange_api"): fills a DLTensor in place, no
 *            capsule, no allocation. Used when the installed torch offers it.
 *   capsule: `tensor.__dlpack__()`; the capsule is renamed to
 *            "used_dltensor[_versioned]" and its deleter is called when the
 *            import scope is released.
 * Every function returning int returns 0 on success and -1 with a Python
 * exception set (TypeError / ValueError naming the function and argument).
 */
#ifndef SEQWRAP_BRIDGE_H
#define SEQWRAP_BRIDGE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "sw_status.h"
#include "sw_tensor.h"

typedef enum { SW_BRIDGE_AUTO = 0, SW_BRIDGE_CAPSULE = 1 } sw_bridge_mode;

/* Holds the DLPack managed tensors taken during one call, released together. */
typedef struct {
    int count;
    int capacity;
    struct sw_owned { void *managed; int versioned; } *items;
} sw_import_scope;

int sw_bridge_init(void);                   /* at module import: finds torch.Tensor and the fast path */
void sw_bridge_set_mode(sw_bridge_mode mode);
sw_bridge_mode sw_bridge_get_mode(void);
int sw_bridge_has_fast_path(void);

void sw_scope_init(sw_import_scope *scope);
void sw_scope_release(sw_import_scope *scope);  /* calls the deleters; needs the GIL */

/* Flags for sw_import. */
#define SW_WRITABLE 1  /* kernel writes it in place: must not require grad */
#define SW_READONLY_NO_GRAD 2  /* kernel reads it: must not require grad either */

/* Imports `obj` (a torch.Tensor) as argument `arg` of function `fn`.
 * Checks: is a tensor, dtype supported by the bridge, device CPU or CUDA,
 * ndim <= SW_MAX_DIMS, and requires_grad when `flags` forbid it. */
int sw_import(PyObject *obj, const char *fn, const char *arg, int flags,
              sw_import_scope *scope, sw_tensor *out);

/* Argument checks (all raise and return -1 on failure). */
int sw_check_dtype(const char *fn, const char *arg, const sw_tensor *t, unsigned allowed_mask);
int sw_check_contiguous(const char *fn, const char *arg, const sw_tensor *t);
int sw_check_nonempty(const char *fn, const char *arg, const sw_tensor *t);
int sw_check_same_shape(const char *fn, const char *arg, const sw_tensor *t,
                        const char *ref_arg, const sw_tensor *ref);
int sw_check_same_device(const char *fn, const char *arg, const sw_tensor *t,
                         const char *ref_arg, const sw_tensor *ref);

const char *sw_dtype_name(sw_dtype d);

/* The `stream` argument of a glue function: None (CPU, or the default stream) or an int
 * holding a cudaStream_t (torch.cuda.current_stream().cuda_stream). 0 on success. */
int sw_parse_stream(PyObject *obj, void **stream);

/* Raises the Python exception matching a failed core status. Returns NULL. */
PyObject *sw_raise_status(const char *fn, sw_code code, const sw_error *err);

#endif /* SEQWRAP_BRIDGE_H */
