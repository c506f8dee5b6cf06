"""The contract of every op in seqwrap._C._op_registry(), checked op by op from the registry itself
(issue 20): a new op in csrc/core/ops.def joins every test here with one entry in tests/op_examples.py.

For every op: each written tensor's autograd version is bumped (and only those); a written tensor
overlapping any other argument is refused; a wrong dtype, wrong shape, meta tensor, non-contiguous
tensor, out-of-range scalar or spoofed tensor is refused with a message naming the argument; calls
from two threads and re-entrant calls from a tensor-subclass hook give the sequential result, and a
hook that moves an imported tensor's memory is caught; the torch custom op passes opcheck; an op
with a CUDA kernel is exercised by the GPU sanitizer's workload (benchmarks/gpu_check).
Every op is on the one call path (its spec in the registry), so every case runs for every op.
"""
import threading

import pytest
import torch

import seqwrap

from . import op_examples as X

pytestmark = pytest.mark.ccore
C = seqwrap._C
REGISTRY = {op["name"]: op for op in C._op_registry()}


def ops():
    """Every registered op as a parameter."""
    return list(REGISTRY)


def call(name, kwargs):
    getattr(C, name)(**kwargs)


def raises_naming(name, kwargs, exc, *fragments):
    with pytest.raises(exc) as info:
        call(name, kwargs)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, f"{name}: expected {f!r} in the message: {msg}"
    return msg


def spec(name):
    op = REGISTRY[name]
    assert op["spec"], f"{name} has no declarative spec (its own glue)"
    return op


# ---- the registry itself -----------------------------------------------------------------------

def test_registry_lists_every_method_and_nothing_else():
    names = set(REGISTRY)
    assert {"kahan_accumulate", "cross_entropy_chunk", "lse_merge", "_round_to_half", "sample_chunks",
            "selective_scan_fwd", "ssd_scan_fwd"} <= names
    for n in names:
        assert callable(getattr(C, n)), n
    for n in names:
        op = REGISTRY[n]
        assert set(op["writes"]) <= set(op["arg_names"]) and op["writes"], n


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_op_has_an_example_and_a_custom_op_entry(name):
    X.example(name)
    assert name in X.CUSTOM_OPS, f"{name}: add its custom op (or None and why) to op_examples.CUSTOM_OPS"


# ---- writes: versions and overlaps ------------------------------------------------------------

@pytest.mark.parametrize("name", ops())
def test_written_tensors_get_their_version_bumped(name):
    op = REGISTRY[name]
    a = X.build(op)
    before = {label: t._version for label, _, _, t in X.tensors(a)}
    call(name, a)
    outs = {label for label, _ in X.written(op, a)}
    assert outs, name
    for label, _, _, t in X.tensors(a):
        if label in outs:
            assert t._version > before[label], f"{name}: '{label}' is written but its version stayed"
        else:
            assert t._version == before[label], f"{name}: '{label}' is only read but its version moved"


def _sharing(a, b):
    """Copies of a and b (shapes, dtypes, a's values) laid over the same bytes."""
    nbytes = max(a.numel() * a.element_size(), b.numel() * b.element_size())
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    b2 = buf[: b.numel() * b.element_size()].view(b.dtype).view(b.shape)
    a2 = buf[: a.numel() * a.element_size()].view(a.dtype).view(a.shape)
    a2.copy_(a)
    return a2, b2


def _overlap_cases():
    for n in REGISTRY:
        op = REGISTRY[n]
        a = X.build(op)
        for wl, wname, widx, w in X.tensors(a):
            if wname not in op["writes"]:
                continue
            for ol, oname, oidx, o in X.tensors(a):
                if ol != wl:
                    yield pytest.param(n, wl, ol, id=f"{n}-{wl}-{ol}")


@pytest.mark.parametrize("name, w_label, o_label", list(_overlap_cases()))
def test_a_written_tensor_overlapping_another_argument_is_refused(name, w_label, o_label):
    op = REGISTRY[name]
    a = X.build(op)
    where = {label: (n, i, t) for label, n, i, t in X.tensors(a)}
    (wn, wi, w), (on, oi, o) = where[w_label], where[o_label]
    w2, o2 = _sharing(w, o)
    a = X.replace(X.replace(a, wn, wi, w2), on, oi, o2)
    before = w2.clone()
    msg = raises_naming(name, a, ValueError, "overlap in memory", f"'{w_label}'", f"'{o_label}'")
    assert torch.equal(w2.view(torch.uint8) if w2.dtype == torch.bool else w2, before) or "overlap" in msg


# ---- bad arguments, each named ----------------------------------------------------------------

_PROBE_DTYPES = [torch.int32, torch.int64, torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("name", ops())
def test_wrong_dtype_is_named(name):
    op = spec(name)
    a = X.build(op)
    built = {}
    for arg in op["args"]:
        v = a[arg["name"]]
        if isinstance(v, (torch.Tensor, list)) and v is not None:
            allowed = X.allowed_dtypes(arg, built)
            bad = next(d for d in _PROBE_DTYPES if d not in allowed)
            idx = 0 if isinstance(v, list) else None
            t = v[0] if isinstance(v, list) else v
            label = f"{arg['name']}[0]" if isinstance(v, list) else arg["name"]
            wrong = torch.zeros(t.shape, dtype=bad)
            raises_naming(name, X.replace(a, arg["name"], idx, wrong), TypeError, f"'{label}' has dtype")
        built[arg["name"]] = v


def _shape_probes(op):
    """(argument, wrong shape) for every tensor whose shape is fixed by its spec or earlier arguments."""
    a = X.build(op)
    seen_ellipsis = False
    for arg in op["args"]:
        v = a[arg["name"]]
        if not isinstance(v, (torch.Tensor, list)):
            continue
        shape = arg["shape"] or ""
        has_ell = shape.startswith("...")
        if arg["shape_like"] or (shape and not has_ell) or (has_ell and seen_ellipsis):
            yield arg, a
        seen_ellipsis |= has_ell


@pytest.mark.parametrize("name", ops())
def test_wrong_shape_is_named(name):
    op = spec(name)
    probes = list(_shape_probes(op))
    assert probes, f"{name}: no tensor with a checked shape"
    for arg, a in probes:
        v = a[arg["name"]]
        idx = 0 if isinstance(v, list) else None
        t = v[0] if isinstance(v, list) else v
        label = f"{arg['name']}[0]" if isinstance(v, list) else arg["name"]
        wrong = torch.zeros(*t.shape, 2, dtype=t.dtype)
        raises_naming(name, X.replace(a, arg["name"], idx, wrong), ValueError, f"'{label}'", "shape")


@pytest.mark.parametrize("name", ops())
def test_meta_tensor_is_named(name):
    op = REGISTRY[name]
    a = X.build(op)
    for label, n, i, t in X.tensors(a):
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        raises_naming(name, X.replace(a, n, i, meta), ValueError, f"'{label}'")


def _outputs(op, a):
    return [t.clone() for _, t in X.written(op, a)]


@pytest.mark.parametrize("name", ops())
def test_non_contiguous_tensor_is_refused_by_name_or_computed_right(name):
    op = REGISTRY[name]
    ref = X.build(op, seed=1)
    call(name, ref)
    want = _outputs(op, ref)
    probed = 0
    for label, n, i, t in X.tensors(X.build(op, seed=1)):
        if t.numel() < 2:
            continue
        a = X.build(op, seed=1)
        orig = dict((lb, tt) for lb, _, _, tt in X.tensors(a))[label]
        strided = torch.empty(*orig.shape, 2, dtype=orig.dtype)[..., 0]
        strided.copy_(orig)
        assert not strided.is_contiguous()
        a = X.replace(a, n, i, strided)
        probed += 1
        try:
            call(name, a)
        except ValueError as e:
            assert f"'{label}'" in str(e) and "contiguous" in str(e), str(e)
            continue
        for got, exp in zip(_outputs(op, a), want):
            torch.testing.assert_close(got, exp, rtol=0, atol=0, msg=f"{name}: strided '{label}' computed wrong")
    assert probed, name


def _range_probes(arg):
    kind = arg["kind"]
    if kind == "int":
        return [arg["min"] - 1, arg["max"] + 1]
    if kind == "uint64":
        return [-1, 1 << 64]
    if kind == "float":
        return [v for v in ((arg["min"] - 1.0) if arg["min"] is not None else None,
                            (arg["max"] + 1.0) if arg["max"] is not None else None,
                            float("nan") if arg["min"] is not None or arg["finite"] else None) if v is not None]
    if kind == "choice":
        return ["no-such-" + arg["choices"][0]]
    return []


@pytest.mark.parametrize("name", ops())
def test_out_of_range_scalars_are_named(name):
    op = spec(name)
    probed = 0
    for arg in op["args"]:
        for bad in _range_probes(arg):
            a = X.build(op)
            a[arg["name"]] = bad
            raises_naming(name, a, ValueError, arg["name"])
            probed += 1
    ranged = [arg["name"] for arg in op["args"] if _range_probes(arg)]
    assert probed == sum(len(_range_probes(arg)) for arg in op["args"]) and (probed or not ranged)


# ---- bridge safety ------------------------------------------------------------------------------

class Liar:
    __class__ = torch.Tensor


@pytest.mark.parametrize("name", ops())
def test_object_claiming_to_be_a_tensor_is_refused(name):
    op = REGISTRY[name]
    a = X.build(op)
    for label, n, i, _ in X.tensors(a):
        assert isinstance(Liar(), torch.Tensor)
        raises_naming(name, X.replace(a, n, i, Liar()), TypeError, f"'{label}' must be a torch.Tensor, not Liar")


@pytest.mark.parametrize("name", ops())
def test_two_threads_give_the_sequential_results(name):
    op = REGISTRY[name]
    seeds = range(12)
    want = {}
    for s in seeds:
        a = X.build(op, seed=s)
        call(name, a)
        want[s] = _outputs(op, a)
    got, errors = {}, []

    def worker(part):
        try:
            for s in part:
                a = X.build(op, seed=s)
                call(name, a)
                got[s] = _outputs(op, a)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(list(seeds)[k::2],)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for s in seeds:
        for g, w in zip(got[s], want[s]):
            assert torch.equal(g, w), f"{name}: seed {s} differs when two threads call"


def _last_tensor(a):
    return X.tensors(a)[-1]


@pytest.mark.parametrize("name", ops())
def test_reentrant_call_from_a_subclass_hook(name):
    """A __torch_function__ hook of the last tensor calls the same op again while the outer call is
    importing its arguments: both give the results of plain calls."""
    op = REGISTRY[name]
    ref = X.build(op, seed=5)
    call(name, ref)
    want = _outputs(op, ref)
    inner_ref = X.build(op, seed=6)
    call(name, inner_ref)
    inner_want = _outputs(op, inner_ref)
    inner = X.build(op, seed=6)
    state = {"done": False}

    class Reenter(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if not state["done"]:
                state["done"] = True
                call(name, inner)
            return super().__torch_function__(func, types, args, kwargs or {})

    a = X.build(op, seed=5)
    label, n, i, t = _last_tensor(a)
    a = X.replace(a, n, i, t.as_subclass(Reenter))
    call(name, a)
    assert state["done"], "the hook did not run"
    for g, w in zip(_outputs(op, a), want):
        assert torch.equal(g.as_subclass(torch.Tensor), w), name
    for g, w in zip(_outputs(op, inner), inner_want):
        assert torch.equal(g, w), name


@pytest.mark.parametrize("name", ops())
def test_hook_that_moves_an_imported_tensor_is_caught(name):
    if not C.build_info()["dlpack_fast_path"]:
        pytest.skip("the memory check after hooks needs torch's DLPack C exchange API")
    op = REGISTRY[name]
    a = X.build(op)
    first_label, fn_, fi, first = X.tensors(a)[0]
    keep = []

    class Mover(torch.Tensor):
        def is_neg(self):
            if not keep:
                keep.append(first.untyped_storage())  # the old bytes stay allocated whatever happens
                first.set_(first.clone())
            return False

    label, n, i, t = _last_tensor(a)
    a = X.replace(a, n, i, t.as_subclass(Mover))
    raises_naming(name, a, RuntimeError, f"'{first_label}' changed its memory")


# ---- torch custom ops and the GPU sanitizer target ----------------------------------------------

@pytest.mark.parametrize("name", list(REGISTRY))
def test_custom_op_passes_opcheck(name):
    entry = X.CUSTOM_OPS[name]
    if entry is None:
        pytest.skip(f"{name} is not registered as a torch custom op (see op_examples.CUSTOM_OPS)")
    import seqwrap.ops.ssd_scan  # noqa: F401  (registers seqwrap::ssd_scan_*)

    op = REGISTRY[name]
    custom, adapt = entry
    a = X.build(op)
    if adapt == X._NO_STREAM:
        args = tuple(v for k, v in a.items() if k != "stream")
    else:
        args = adapt(a)
    torch.library.opcheck(getattr(torch.ops.seqwrap, custom).default, args)


def _sanitizer_calls():
    """Runs the sanitizer workload's kernels on the CPU, recording which _C ops they reach."""
    from benchmarks.gpu_check import sanitize_target

    seen = set()
    saved = {n: getattr(C, n) for n in REGISTRY}

    def spy(n, f):
        def wrapper(*args, **kwargs):
            seen.add(n)
            return f(*args, **kwargs)
        return wrapper

    try:
        for n, f in saved.items():
            setattr(C, n, spy(n, f))
        for kernel in sanitize_target.KERNELS.values():
            kernel("cpu")
    finally:
        for n, f in saved.items():
            setattr(C, n, f)
    return seen


_SANITIZED = {}


@pytest.mark.parametrize("name", [n for n, op in REGISTRY.items() if op["has_cuda"]])
def test_cuda_kernel_is_in_the_gpu_sanitizer_target(name):
    if "seen" not in _SANITIZED:
        _SANITIZED["seen"] = _sanitizer_calls()
    assert name in _SANITIZED["seen"], (f"{name} has a CUDA kernel that benchmarks/gpu_check/sanitize_target.py "
                                        "never runs")


# ---- argument parsing and failing kernels ---------------------------------------------------------

@pytest.mark.parametrize("name", ops())
def test_missing_unknown_and_surplus_arguments_are_type_errors(name):
    op = REGISTRY[name]
    a = X.build(op)
    required = next(n for n in op["arg_names"] if n in a and n != "stream")
    with pytest.raises(TypeError, match=f"'{required}'"):
        call(name, {k: v for k, v in a.items() if k != required})
    last = list(a)[-1]
    with pytest.raises(TypeError, match="'no_such_argument'"):
        call(name, dict({k: v for k, v in a.items() if k != last}, no_such_argument=1))
    with pytest.raises(TypeError):
        getattr(C, name)(*a.values(), *[None] * (len(op["arg_names"]) + 1 - len(a)), None)


def test_versions_are_bumped_even_when_the_kernel_fails():
    """The call path bumps before it raises: a kernel that failed may have written."""
    w, q = torch.zeros(3, dtype=torch.float64), torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    with pytest.raises(ValueError, match="probability of chunk 1"):
        C.sample_chunks(w, q, 0, 0, "bernoulli", 0, 0.0, None)
    assert w._version == 1 and q._version == 0
    logits, loss, lse = torch.randn(2, 5), torch.empty(2), torch.empty(2)
    with pytest.raises(ValueError, match="label 9 at position 1"):
        C.cross_entropy_chunk(logits, torch.tensor([1, 9]), loss, lse, None, -100, 0.0, 0.0, 0.0, True, None, None)
    assert (logits._version, loss._version, lse._version) == (1, 1, 1)


@pytest.mark.parametrize("name", ops())
def test_strided_tensors_compute_right_and_a_self_overlapping_output_is_refused(name):
    """Arguments the spec lets through with any strides: the kernel reads them from its params struct
    (a stride-2 copy gives the contiguous call's result, checked above); a written one whose
    elements alias each other (stride 0) is refused by name."""
    op = spec(name)
    probed = 0
    for arg in op["args"]:
        if arg["kind"] not in ("tensor", "optional tensor") or arg["contiguous"] or not arg["writes"]:
            continue
        a = X.build(op)
        t = a[arg["name"]]
        if t is None or t.numel() < 2:
            continue
        aliased = torch.zeros(1, dtype=t.dtype).expand(t.shape)
        raises_naming(name, X.replace(a, arg["name"], None, aliased), ValueError, f"'{arg['name']}'",
                      "overlap each other")
        probed += 1
    if name == "cross_entropy_chunk":
        assert probed == 2, "loss and lse are strided outputs"
