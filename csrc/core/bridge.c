/* bridge.c - DLPack import of torch tensors (see bridge.h). */
#include "bridge.h"

#include <ATen/dlpack.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

static PyObject *g_tensor_type = NULL;            /* torch.Tensor */
static PyTypeObject *g_tensor_base = NULL;        /* torch._C.TensorBase: every tensor's type derives from it */
static PyTypeObject *g_parameter_type = NULL;     /* torch.nn.Parameter */
static PyObject *g_increment_version = NULL;      /* torch.autograd.graph.increment_version */
static const DLPackExchangeAPI *g_api = NULL;     /* fast path, or NULL */
static sw_bridge_mode g_mode = SW_BRIDGE_AUTO;
static PyObject *g_str_requires_grad = NULL;
static PyObject *g_str_is_neg = NULL;
static PyObject *g_str_dlpack = NULL;
static PyObject *g_str_dlpack_device = NULL;
static PyObject *g_kw_versioned = NULL;           /* {"max_version": (1, 0)} */
static PyObject *g_kw_versioned_cuda = NULL;      /* same plus "stream": -1 (no sync) */
static PyObject *g_kw_cuda = NULL;                /* {"stream": -1} */
static PyObject *g_empty_tuple = NULL;

static const char *const k_dtype_names[SW_NUM_DTYPES] = {
    "float32", "float16", "bfloat16", "float64", "int32", "int64"};

const char *sw_dtype_name(sw_dtype d) {
    return (d >= 0 && d < SW_NUM_DTYPES) ? k_dtype_names[d] : "unknown";
}

/* `obj` (a new reference, or NULL with an exception set) as a type; NULL and ImportError if it is not one. */
static PyTypeObject *as_type(PyObject *obj, const char *what) {
    if (!obj) return NULL;
    if (!PyType_Check(obj)) {
        Py_DECREF(obj);
        PyErr_Format(PyExc_ImportError, "seqwrap: %s is not a type", what);
        return NULL;
    }
    return (PyTypeObject *)obj;
}

int sw_bridge_init(void) {
    PyObject *torch = PyImport_ImportModule("torch");
    if (!torch) return -1;
    g_tensor_type = PyObject_GetAttrString(torch, "Tensor");
    PyObject *torch_c = PyObject_GetAttrString(torch, "_C");
    Py_DECREF(torch);
    if (!g_tensor_type || !torch_c) {
        Py_XDECREF(torch_c);
        return -1;
    }
    /* The C base of every tensor type ("_TensorBase" before torch 2.3). The tensor check
     * looks at an object's real type (Py_TYPE), which __class__ cannot fake. */
    PyObject *base = PyObject_GetAttrString(torch_c, "TensorBase");
    if (!base) {
        PyErr_Clear();
        base = PyObject_GetAttrString(torch_c, "_TensorBase");
    }
    Py_DECREF(torch_c);
    g_tensor_base = as_type(base, "torch._C.TensorBase");
    if (!g_tensor_base) return -1;

    PyObject *param_mod = PyImport_ImportModule("torch.nn.parameter");
    PyObject *param = param_mod ? PyObject_GetAttrString(param_mod, "Parameter") : NULL;
    Py_XDECREF(param_mod);
    g_parameter_type = as_type(param, "torch.nn.Parameter");
    if (!g_parameter_type) return -1;

    PyObject *graph = PyImport_ImportModule("torch.autograd.graph");
    g_increment_version = graph ? PyObject_GetAttrString(graph, "increment_version") : NULL;
    Py_XDECREF(graph);
    if (!g_increment_version) return -1;

    g_str_requires_grad = PyUnicode_InternFromString("requires_grad");
    g_str_is_neg = PyUnicode_InternFromString("is_neg");
    g_str_dlpack = PyUnicode_InternFromString("__dlpack__");
    g_str_dlpack_device = PyUnicode_InternFromString("__dlpack_device__");
    g_empty_tuple = PyTuple_New(0);
    g_kw_versioned = Py_BuildValue("{s:(ii)}", "max_version", 1, 0);
    g_kw_versioned_cuda = Py_BuildValue("{s:(ii),s:i}", "max_version", 1, 0, "stream", -1);
    g_kw_cuda = Py_BuildValue("{s:i}", "stream", -1);
    if (!g_str_requires_grad || !g_str_is_neg || !g_str_dlpack || !g_str_dlpack_device || !g_empty_tuple ||
        !g_kw_versioned || !g_kw_versioned_cuda || !g_kw_cuda)
        return -1;

    /* Fast path: a capsule on the type, DLPack major version 1, with the
     * DLTensor filler present. Anything else leaves the capsule path. */
    PyObject *cap = PyObject_GetAttrString(g_tensor_type, "__dlpack_c_exchange_api__");
    if (cap && PyCapsule_IsValid(cap, "dlpack_exchange_api")) {
        const DLPackExchangeAPI *api = (const DLPackExchangeAPI *)PyCapsule_GetPointer(cap, "dlpack_exchange_api");
        if (api && api->header.version.major == DLPACK_MAJOR_VERSION &&
            api->dltensor_from_py_object_no_sync != NULL)
            g_api = api;  /* torch keeps the table alive for the life of the process */
    }
    Py_XDECREF(cap);
    PyErr_Clear();
    return 0;
}

void sw_bridge_set_mode(sw_bridge_mode mode) { g_mode = mode; }
sw_bridge_mode sw_bridge_get_mode(void) { return g_mode; }
int sw_bridge_has_fast_path(void) { return g_api != NULL; }

void sw_scope_init(sw_import_scope *scope) {
    scope->count = 0;
    scope->capacity = 0;
    scope->hooks_ran = 0;
    scope->items = NULL;
}

void sw_scope_release(sw_import_scope *scope) {
    for (int i = 0; i < scope->count; ++i) {
        sw_import_entry *e = &scope->items[i];
        if (e->managed && e->versioned) {
            DLManagedTensorVersioned *m = (DLManagedTensorVersioned *)e->managed;
            if (m->deleter) m->deleter(m);
        } else if (e->managed) {
            DLManagedTensor *m = (DLManagedTensor *)e->managed;
            if (m->deleter) m->deleter(m);
        }
        Py_DECREF(e->obj);
    }
    free(scope->items);
    sw_scope_init(scope);
}

/* A new entry holding a strong reference to obj; NULL (MemoryError set) on failure. */
static sw_import_entry *scope_push(sw_import_scope *scope, PyObject *obj, const char *name, int index, int flags) {
    if (scope->count == scope->capacity) {
        if (scope->capacity > INT_MAX / 2) {
            PyErr_NoMemory();
            return NULL;
        }
        int cap = scope->capacity ? 2 * scope->capacity : 8;
        void *grown = realloc(scope->items, (size_t)cap * sizeof *scope->items);
        if (!grown) {
            PyErr_NoMemory();
            return NULL;
        }
        scope->items = (sw_import_entry *)grown;
        scope->capacity = cap;
    }
    sw_import_entry *e = &scope->items[scope->count++];
    memset(e, 0, sizeof *e);
    e->obj = Py_NewRef(obj);
    e->name = name;
    e->index = index;
    e->seq = scope->count - 1;
    e->writable = (flags & SW_WRITABLE) != 0;
    return e;
}

/* Maps a DLPack dtype onto sw_dtype; -1 if the bridge does not carry it. */
static int dtype_from_dl(DLDataType t) {
    if (t.lanes != 1) return -1;
    if (t.code == kDLFloat && t.bits == 32) return SW_FLOAT32;
    if (t.code == kDLFloat && t.bits == 16) return SW_FLOAT16;
    if (t.code == kDLFloat && t.bits == 64) return SW_FLOAT64;
    if (t.code == kDLBfloat && t.bits == 16) return SW_BFLOAT16;
    if (t.code == kDLInt && t.bits == 32) return SW_INT32;
    if (t.code == kDLInt && t.bits == 64) return SW_INT64;
    return -1;
}

static const char *dl_code_name(uint8_t code) {
    switch (code) {
        case kDLInt: return "int";
        case kDLUInt: return "uint";
        case kDLFloat: return "float";
        case kDLBfloat: return "bfloat";
        case kDLComplex: return "complex";
        case kDLBool: return "bool";
        default: return "other";
    }
}

/* Copies a DLTensor into our descriptor, checking what the bridge supports. */
static int fill_from_dl(const DLTensor *dl, const char *fn, const char *arg, sw_tensor *out) {
    int dt = dtype_from_dl(dl->dtype);
    if (dt < 0) {
        PyErr_Format(PyExc_TypeError,
                     "%s: argument '%s' has an unsupported dtype (%s%d); seqwrap kernels take "
                     "float32, float16, bfloat16, float64, int32 or int64",
                     fn, arg, dl_code_name(dl->dtype.code), (int)dl->dtype.bits);
        return -1;
    }
    if (dl->device.device_type == kDLCPU || dl->device.device_type == kDLCUDAHost) {
#ifdef SW_EMU_CPU_AS_CUDA
        out->device = SW_CUDA;  /* tests/cuda_emu's build only: host tensors reach the emulated CUDA kernels */
#else
        out->device = SW_CPU;
#endif
    } else if (dl->device.device_type == kDLCUDA) {
        out->device = SW_CUDA;
    } else {
        PyErr_Format(PyExc_ValueError,
                     "%s: argument '%s' lives on an unsupported device (DLPack device type %d); "
                     "seqwrap kernels run on CPU and CUDA tensors",
                     fn, arg, (int)dl->device.device_type);
        return -1;
    }
    if (dl->ndim < 0 || dl->ndim > SW_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' has %d dimensions; at most %d are supported",
                     fn, arg, (int)dl->ndim, SW_MAX_DIMS);
        return -1;
    }
    out->dtype = (sw_dtype)dt;
    out->device_id = dl->device.device_id;
    out->ndim = dl->ndim;
    out->numel = 1;
    int64_t contiguous_stride = 1;
    for (int d = dl->ndim - 1; d >= 0; --d) {
        out->shape[d] = dl->shape[d];
        out->strides[d] = dl->strides ? dl->strides[d] : contiguous_stride;
        contiguous_stride *= dl->shape[d];
        out->numel *= dl->shape[d];
    }
    out->data = dl->data ? (void *)((char *)dl->data + dl->byte_offset) : NULL;
    return 0;
}

/* Replaces the pending exception (torch's, often with a C++ backtrace) by a
 * ValueError naming the argument and keeping only the first line of torch's text. */
static int reraise_export_error(const char *fn, const char *arg) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *text = value ? PyObject_Str(value) : NULL;
    const char *msg = text ? PyUnicode_AsUTF8(text) : NULL;
    if (!msg) {
        PyErr_Clear();
        msg = "unknown reason";
    }
    size_t len = strcspn(msg, "\n");
    PyObject *first_line = PyUnicode_FromStringAndSize(msg, (Py_ssize_t)(len > 300 ? 300 : len));
    Py_XDECREF(text);
    if (first_line) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' cannot be exported through DLPack: %U", fn, arg,
                     first_line);
        Py_DECREF(first_line);
    }
    Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
    return -1;
}

static int check_grad_flag(PyObject *obj, const char *fn, const char *arg, int flags) {
    if (!(flags & (SW_WRITABLE | SW_READONLY_NO_GRAD))) return 0;
    PyObject *rg = PyObject_GetAttr(obj, g_str_requires_grad);
    if (!rg) return -1;
    int truth = PyObject_IsTrue(rg);
    Py_DECREF(rg);
    if (truth < 0) return -1;
    if (truth) {
        PyErr_Format(PyExc_ValueError,
                     "%s: argument '%s' requires grad; seqwrap kernels %s it outside autograd, "
                     "pass a detached tensor (tensor.detach()) or call inside torch.no_grad()",
                     fn, arg, (flags & SW_WRITABLE) ? "write" : "read");
        return -1;
    }
    return 0;
}

/* torch's lazy negation (tensor._neg_view(), and the imaginary part of a
 * conjugate view) flips values on read without touching memory: DLPack would
 * hand out the un-negated bytes. Refuse such tensors. */
static int check_view_bits(PyObject *obj, const char *fn, const char *arg) {
    PyObject *r = PyObject_CallMethodObjArgs(obj, g_str_is_neg, NULL);
    if (!r) return -1;
    int truth = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (truth < 0) return -1;
    if (truth) {
        PyErr_Format(PyExc_ValueError, "%s: argument '%s' is a lazily negated view (tensor.is_neg()); "
                     "call .resolve_neg() first", fn, arg);
        return -1;
    }
    return 0;
}

/* Capsule path: tensor.__dlpack__(...); the managed tensor is handed to `entry` (deleted at release). */
static int import_capsule(PyObject *obj, const char *fn, const char *arg, int flags, sw_import_entry *entry,
                          sw_tensor *out) {
    PyObject *dev = PyObject_CallMethodObjArgs(obj, g_str_dlpack_device, NULL);
    if (!dev) return reraise_export_error(fn, arg);
    long dev_type = PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2 ? PyLong_AsLong(PyTuple_GET_ITEM(dev, 0)) : -1;
    Py_DECREF(dev);
    if (dev_type == -1 && PyErr_Occurred()) return -1;
    int is_cuda = dev_type == kDLCUDA;

    PyObject *method = PyObject_GetAttr(obj, g_str_dlpack);
    if (!method) return -1;
    PyObject *cap = PyObject_Call(method, g_empty_tuple, is_cuda ? g_kw_versioned_cuda : g_kw_versioned);
    if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* A torch without max_version: legacy, unversioned capsule. */
        PyErr_Clear();
        cap = is_cuda ? PyObject_Call(method, g_empty_tuple, g_kw_cuda) : PyObject_CallNoArgs(method);
    }
    Py_DECREF(method);
    if (!cap) return reraise_export_error(fn, arg);

    int rc = -1;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *m = (DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (m && PyCapsule_SetName(cap, "used_dltensor_versioned") == 0) {
            entry->managed = m;
            entry->versioned = 1;
            rc = 0;
            if (m->version.major != DLPACK_MAJOR_VERSION) {
                PyErr_Format(PyExc_ValueError, "%s: argument '%s' came with DLPack major version %u; "
                             "seqwrap understands %d", fn, arg, m->version.major, DLPACK_MAJOR_VERSION);
                rc = -1;
            }
            if (rc == 0 && (m->flags & DLPACK_FLAG_BITMASK_READ_ONLY) && (flags & SW_WRITABLE)) {
                PyErr_Format(PyExc_ValueError, "%s: argument '%s' is read-only; seqwrap writes it in place",
                             fn, arg);
                rc = -1;
            }
            if (rc == 0) rc = fill_from_dl(&m->dl_tensor, fn, arg, out);
        }
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *m = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (m && PyCapsule_SetName(cap, "used_dltensor") == 0) {
            entry->managed = m;
            entry->versioned = 0;
            rc = fill_from_dl(&m->dl_tensor, fn, arg, out);
        }
    } else {
        PyErr_Format(PyExc_TypeError, "%s: argument '%s': __dlpack__() did not return a DLPack capsule",
                     fn, arg);
    }
    Py_DECREF(cap);
    return rc;
}

static size_t elem_bytes(sw_dtype d) {
    switch (d) {
        case SW_FLOAT64: case SW_INT64: return 8;
        case SW_FLOAT32: case SW_INT32: return 4;
        default: return 2;
    }
}

/* The bytes a descriptor spans, [*lo, *hi); lo == hi when it has no element. */
static void byte_range(const sw_tensor *t, uintptr_t *lo, uintptr_t *hi) {
    *lo = *hi = (uintptr_t)t->data;
    if (t->numel <= 0 || !t->data) return;
    int64_t min_off = 0, max_off = 0;  /* element offsets of the first and last element */
    for (int d = 0; d < t->ndim; ++d) {
        int64_t span = (t->shape[d] - 1) * t->strides[d];
        if (span < 0) min_off += span;
        else max_off += span;
    }
    const int64_t es = (int64_t)elem_bytes(t->dtype);
    *lo = (uintptr_t)((intptr_t)t->data + (intptr_t)(min_off * es));
    *hi = (uintptr_t)((intptr_t)t->data + (intptr_t)((max_off + 1) * es));
}

/* Types whose attribute reads and methods run only torch's C++ code (no user hook). */
static int is_plain_tensor_type(PyTypeObject *type) {
    return (PyObject *)type == g_tensor_type || type == g_parameter_type;
}

static int import_one(PyObject *obj, const char *fn, const char *name, int index, const char *label, int flags,
                      sw_import_scope *scope, sw_tensor *out) {
    if (!PyObject_TypeCheck(obj, g_tensor_base)) {  /* the real type: __class__ is not consulted */
        PyErr_Format(PyExc_TypeError, "%s: argument '%s' must be a torch.Tensor, not %s", fn, label,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    /* From here on the scope owns a reference: hooks of a tensor subclass (run by the checks
     * below) or another thread may drop every other reference to obj. */
    sw_import_entry *entry = scope_push(scope, obj, name, index, flags);
    if (!entry) return -1;
    const int fast = g_api && g_mode == SW_BRIDGE_AUTO;
    if (!fast || !is_plain_tensor_type(Py_TYPE(obj))) scope->hooks_ran = 1;
    if (check_grad_flag(obj, fn, label, flags) < 0) return -1;
    if (check_view_bits(obj, fn, label) < 0) return -1;
    if (fast) {
        DLTensor dl;
        memset(&dl, 0, sizeof dl);
        if (g_api->dltensor_from_py_object_no_sync(obj, &dl) != 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_BufferError, "the exporter gave no reason");
            return reraise_export_error(fn, label);
        }
        if (fill_from_dl(&dl, fn, label, out) < 0) return -1;
    } else if (import_capsule(obj, fn, label, flags, entry, out) < 0) {
        return -1;
    }
    entry->device = (int)out->device;
    entry->device_id = out->device_id;
    byte_range(out, &entry->lo, &entry->hi);
    return 0;
}

int sw_import(PyObject *obj, const char *fn, const char *arg, int flags, sw_import_scope *scope,
              sw_tensor *out) {
    return import_one(obj, fn, arg, -1, arg, flags, scope, out);
}

int sw_import_item(PyObject *obj, const char *fn, const char *name, int index, int flags, sw_import_scope *scope,
                   sw_tensor *out) {
    char label[64];
    snprintf(label, sizeof label, "%s[%d]", name, index);
    return import_one(obj, fn, name, index, label, flags, scope, out);
}

static void entry_label(const sw_import_entry *e, char *buf, size_t len) {
    if (e->index >= 0) snprintf(buf, len, "%s[%d]", e->name, e->index);
    else snprintf(buf, len, "%s", e->name);
}

static int cmp_entry(const void *a, const void *b) {
    const sw_import_entry *x = (const sw_import_entry *)a, *y = (const sw_import_entry *)b;
    if (x->device != y->device) return x->device < y->device ? -1 : 1;
    if (x->device_id != y->device_id) return x->device_id < y->device_id ? -1 : 1;
    return (x->lo > y->lo) - (x->lo < y->lo);
}

static int overlap_error(const char *fn, const sw_import_entry *a, const sw_import_entry *b) {
    if (b->seq < a->seq) {
        const sw_import_entry *t = a;
        a = b;
        b = t;
    }
    char la[64], lb[64];
    entry_label(a, la, sizeof la);
    entry_label(b, lb, sizeof lb);
    const sw_import_entry *w = a->writable ? a : b;
    char lw[64];
    entry_label(w, lw, sizeof lw);
    PyErr_Format(PyExc_ValueError,
                 "%s: arguments '%s' and '%s' overlap in memory; '%s' is written in place and must not share "
                 "memory with any other argument (pass separate tensors, or .clone() one)", fn, la, lb, lw);
    return -1;
}

/* Every pair of entries that overlap with at least one of them written is refused. One sort and a
 * sweep: with entries ordered by start, an entry overlaps an earlier one iff it starts before the
 * largest end seen so far (among written entries, when it is only read). */
static int check_overlap(sw_import_scope *scope, const char *fn) {
    if (scope->count < 2) return 0;
    qsort(scope->items, (size_t)scope->count, sizeof *scope->items, cmp_entry);
    const sw_import_entry *far_any = NULL, *far_written = NULL;  /* the largest end so far */
    for (int i = 0; i < scope->count; ++i) {
        const sw_import_entry *e = &scope->items[i];
        if (i > 0 && (e->device != e[-1].device || e->device_id != e[-1].device_id)) far_any = far_written = NULL;
        if (e->lo == e->hi) continue;  /* no element */
        if (e->writable && far_any && e->lo < far_any->hi) return overlap_error(fn, far_any, e);
        if (!e->writable && far_written && e->lo < far_written->hi) return overlap_error(fn, far_written, e);
        if (!far_any || e->hi > far_any->hi) far_any = e;
        if (e->writable && (!far_written || e->hi > far_written->hi)) far_written = e;
    }
    return 0;
}

/* After a hook ran: every tensor must still span the bytes it was imported with. */
static int check_unchanged(sw_import_scope *scope, const char *fn) {
    if (!scope->hooks_ran || !g_api) return 0;
    for (int i = 0; i < scope->count; ++i) {
        sw_import_entry *e = &scope->items[i];
        DLTensor dl;
        memset(&dl, 0, sizeof dl);
        sw_tensor now;
        char label[64];
        entry_label(e, label, sizeof label);
        if (g_api->dltensor_from_py_object_no_sync(e->obj, &dl) != 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_BufferError, "the exporter gave no reason");
            return reraise_export_error(fn, label);
        }
        if (fill_from_dl(&dl, fn, label, &now) < 0) return -1;
        uintptr_t lo, hi;
        byte_range(&now, &lo, &hi);
        if (lo != e->lo || hi != e->hi) {
            PyErr_Format(PyExc_RuntimeError,
                         "%s: argument '%s' changed its memory while the arguments were being checked (by a "
                         "tensor subclass hook or another thread); nothing was computed", fn, label);
            return -1;
        }
    }
    return 0;
}

int sw_scope_seal(sw_import_scope *scope, const char *fn) {
    if (check_unchanged(scope, fn) < 0) return -1;
    return check_overlap(scope, fn);
}

int sw_scope_bump_versions(sw_import_scope *scope) {
    int n = 0;
    for (int i = 0; i < scope->count; ++i) n += scope->items[i].writable;
    if (n == 0) return 0;
    PyObject *written = PyTuple_New(n);
    if (!written) return -1;
    for (int i = 0, k = 0; i < scope->count; ++i)
        if (scope->items[i].writable) PyTuple_SET_ITEM(written, k++, Py_NewRef(scope->items[i].obj));
    PyObject *r = PyObject_CallOneArg(g_increment_version, written);
    Py_DECREF(written);
    if (!r) return -1;
    Py_DECREF(r);
    return 0;
}

int sw_check_dtype(const char *fn, const char *arg, const sw_tensor *t, unsigned allowed_mask) {
    if (allowed_mask & SW_DT(t->dtype)) return 0;
    char allowed[128] = "";
    for (int d = 0; d < SW_NUM_DTYPES; ++d) {
        if (!(allowed_mask & SW_DT(d))) continue;
        if (allowed[0]) strncat(allowed, ", ", sizeof allowed - strlen(allowed) - 1);
        strncat(allowed, k_dtype_names[d], sizeof allowed - strlen(allowed) - 1);
    }
    PyErr_Format(PyExc_TypeError, "%s: argument '%s' has dtype %s; expected %s", fn, arg,
                 sw_dtype_name(t->dtype), allowed);
    return -1;
}

int sw_check_contiguous(const char *fn, const char *arg, const sw_tensor *t) {
    if (t->numel == 0) return 0;  /* no element to address: any strides will do */
    int64_t expected = 1;
    for (int d = t->ndim - 1; d >= 0; --d) {
        if (t->shape[d] != 1 && t->strides[d] != expected) {
            PyErr_Format(PyExc_ValueError,
                         "%s: argument '%s' is not contiguous (stride %lld in dimension %d, expected %lld); "
                         "call .contiguous() first",
                         fn, arg, (long long)t->strides[d], d, (long long)expected);
            return -1;
        }
        expected *= t->shape[d];
    }
    return 0;
}

int sw_check_nonempty(const char *fn, const char *arg, const sw_tensor *t) {
    if (t->numel > 0) return 0;
    PyErr_Format(PyExc_ValueError, "%s: argument '%s' is empty (0 elements)", fn, arg);
    return -1;
}

static void format_shape(const sw_tensor *t, char *buf, size_t len) {
    size_t used = (size_t)snprintf(buf, len, "(");
    for (int d = 0; d < t->ndim && used < len; ++d)
        used += (size_t)snprintf(buf + used, len - used, d ? ", %lld" : "%lld", (long long)t->shape[d]);
    if (used < len) snprintf(buf + used, len - used, t->ndim == 1 ? ",)" : ")");
}

int sw_check_same_shape(const char *fn, const char *arg, const sw_tensor *t, const char *ref_arg,
                        const sw_tensor *ref) {
    int same = t->ndim == ref->ndim;
    for (int d = 0; same && d < t->ndim; ++d) same = t->shape[d] == ref->shape[d];
    if (same) return 0;
    char a[160], b[160];
    format_shape(t, a, sizeof a);
    format_shape(ref, b, sizeof b);
    PyErr_Format(PyExc_ValueError, "%s: argument '%s' has shape %s but '%s' has shape %s; they must match",
                 fn, arg, a, ref_arg, b);
    return -1;
}

static const char *device_name(sw_device_type d) { return d == SW_CUDA ? "cuda" : "cpu"; }

int sw_check_same_device(const char *fn, const char *arg, const sw_tensor *t, const char *ref_arg,
                         const sw_tensor *ref) {
    if (t->device == ref->device && (t->device == SW_CPU || t->device_id == ref->device_id)) return 0;
    PyErr_Format(PyExc_ValueError, "%s: argument '%s' is on %s:%d but '%s' is on %s:%d; all tensors must be "
                 "on the same device", fn, arg, device_name(t->device), t->device_id, ref_arg,
                 device_name(ref->device), ref->device_id);
    return -1;
}

int sw_parse_stream(PyObject *obj, void **stream) {
    *stream = NULL;
    if (obj == Py_None) return 0;
    *stream = PyLong_AsVoidPtr(obj);
    return (*stream == NULL && PyErr_Occurred()) ? -1 : 0;
}

PyObject *sw_raise_status(const char *fn, sw_code code, const sw_error *err) {
    PyObject *type = code == SW_ERR_VALUE ? PyExc_ValueError : PyExc_RuntimeError;
    PyErr_Format(type, "%s: %s", fn, err->message[0] ? err->message : "the C core reported an error");
    return NULL;
}
