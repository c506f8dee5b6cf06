/* py_convert.c - exposes the core's float32 -> bfloat16 / float16 rounding (sw_half.h)
 * so tests can compare it bit for bit with torch's conversions. CPU only. */
#include "bridge.h"
#include "py_ops.h"
#include "sw_elem.h"

PyObject *sw_py_round_to_half(PyObject *self, PyObject *args) {
    (void)self;
    static const char *const fn = "seqwrap._C._round_to_half";
    PyObject *src_o, *dst_o;
    if (!PyArg_ParseTuple(args, "OO:_round_to_half", &src_o, &dst_o)) return NULL;
    sw_import_scope scope;
    sw_scope_init(&scope);
    sw_tensor src, dst;
    PyObject *result = NULL;
    if (sw_import(src_o, fn, "src", SW_READONLY_NO_GRAD, &scope, &src) < 0 ||
        sw_check_dtype(fn, "src", &src, SW_DT(SW_FLOAT32)) < 0 || sw_check_contiguous(fn, "src", &src) < 0 ||
        sw_import(dst_o, fn, "dst", SW_WRITABLE, &scope, &dst) < 0 ||
        sw_check_dtype(fn, "dst", &dst, SW_DT(SW_BFLOAT16) | SW_DT(SW_FLOAT16)) < 0 ||
        sw_check_contiguous(fn, "dst", &dst) < 0 || sw_check_same_shape(fn, "dst", &dst, "src", &src) < 0)
        goto done;
    if (src.device != SW_CPU || dst.device != SW_CPU) {
        PyErr_Format(PyExc_ValueError, "%s: CPU tensors only", fn);
        goto done;
    }
    if (sw_scope_seal(&scope, fn) < 0) goto done;
    for (int64_t i = 0; i < src.numel; ++i)
        sw_store_from_float(dst.data, dst.dtype, i, ((const float *)src.data)[i]);
    if (sw_scope_bump_versions(&scope) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    sw_scope_release(&scope);
    return result;
}
