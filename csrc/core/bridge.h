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

/* One tensor taken by a call. The scope owns a strong reference to the Python object
 * for the whole call (the kernel runs without the GIL: another thread may drop its own
 * references meanwhile), and, on the capsule path, the DLPack managed tensor. */
typedef struct {
    PyObject *obj;
    void *managed;         /* DLManagedTensor(Versioned) to delete, or NULL (fast path) */
    int versioned;
    int writable;          /* imported with SW_WRITABLE: the kernel writes it */
    const char *name;      /* argument name for messages (static storage), */
    int index;             /* and its index in a list argument, or -1 */
    int seq;               /* import order (messages name arguments in call order) */
    int device, device_id;
    uintptr_t lo, hi;      /* bytes it spans, [lo, hi); lo == hi when it has no element */
} sw_import_entry;

/* Everything one call imported, released together. */
typedef struct {
    int count;
    int capacity;
    int hooks_ran;         /* Python code other than torch's C++ may have run during the imports */
    sw_import_entry *items;
} sw_import_scope;

int sw_bridge_init(void);                   /* at module import: finds torch.Tensor and the fast path */
void sw_bridge_set_mode(sw_bridge_mode mode);
sw_bridge_mode sw_bridge_get_mode(void);
int sw_bridge_has_fast_path(void);

void sw_scope_init(sw_import_scope *scope);
void sw_scope_release(sw_import_scope *scope);  /* drops references, calls the deleters; needs the GIL */

/* Flags for sw_import. */
#define SW_WRITABLE 1  /* kernel writes it in place: must not require grad */
#define SW_READONLY_NO_GRAD 2  /* kernel reads it: must not require grad either */

/* Imports `obj` as argument `arg` of function `fn`.
 * Checks: is a torch.Tensor by its real type (an object whose __class__ claims to be a
 * tensor is refused), dtype supported by the bridge, device CPU or CUDA,
 * ndim <= SW_MAX_DIMS, and requires_grad when `flags` forbid it. */
int sw_import(PyObject *obj, const char *fn, const char *arg, int flags,
              sw_import_scope *scope, sw_tensor *out);
/* Same for element `index` of list argument `name` (messages say name[index]).
 * `name` must have static storage: the scope keeps it for sw_scope_seal's messages. */
int sw_import_item(PyObject *obj, const char *fn, const char *name, int index, int flags,
                   sw_import_scope *scope, sw_tensor *out);

/* Call after the last import, before the kernel runs:
 *  - refuses (ValueError) a written tensor whose bytes overlap those of any other argument
 *    (views with offsets into one storage included);
 *  - when a tensor subclass hook (or other Python code) ran during the imports, checks through
 *    the exporter (no Python code) that no tensor's memory changed since it was imported
 *    (RuntimeError otherwise). */
int sw_scope_seal(sw_import_scope *scope, const char *fn);

/* Call once the kernel ran (even if it failed: it may have written): bumps the autograd
 * version counter of every tensor imported SW_WRITABLE, as torch's in-place ops do. */
int sw_scope_bump_versions(sw_import_scope *scope);

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
