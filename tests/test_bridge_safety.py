"""The C bridge survives hostile callers: other threads dropping tensors while a kernel runs,
tensor subclasses that mutate the argument lists or other arguments from a hook, objects that only
claim to be tensors, and labels rewritten while the cross-entropy kernel runs. Each test runs in a
child interpreter (tests/isolated.py), through both DLPack paths ("auto": torch's C exchange API,
and "capsule"): a crash fails the test, not the runner. The child prints each case before it runs,
so a crash names its case."""
import pytest

from .isolated import run_isolated

pytestmark = pytest.mark.ccore


def test_tensors_dropped_by_another_thread_while_the_kernel_runs():
    # Issue 16 item 1: the thread's call must keep every tensor alive until the kernel is done.
    out = run_isolated("""
        import threading, time, torch
        N = 4_000_000
        for mode in ("auto", "capsule"):
            seqwrap._C._set_bridge_mode(mode)
            for delay in (0.0005, 0.001, 0.002, 0.004):
                print("case", mode, delay, flush=True)
                accs = [torch.zeros(N) for _ in range(3)]
                comps = [torch.zeros(N) for _ in range(3)]
                grads = [torch.ones(N) for _ in range(3)]
                t = threading.Thread(target=seqwrap.kahan_accumulate_, args=(accs, comps, grads, 0.5))
                t.start()
                time.sleep(delay)
                accs.clear(); comps.clear(); grads.clear()
                junk = [torch.full((N,), 5.0) for _ in range(6)]
                t.join()
                del junk
        print("done")
    """)
    assert out.count("case") == 8 and "done" in out, out


_HOOKS = {  # tensor-subclass hooks the bridge calls back into while it checks an argument
    "is_neg": "    def is_neg(self):\n        L.clear(); return False\n",
    "requires_grad": "    @property\n    def requires_grad(self):\n        L.clear(); return False\n",
    "__torch_function__": ("    @classmethod\n"
                           "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                           "        L.clear()\n"
                           "        return super().__torch_function__(func, types, args, kwargs or {})\n"),
}


def test_subclass_hook_that_clears_the_argument_list():
    # Issue 16 item 2: the glue must own what it reads from the lists while it calls back into
    # Python. Before the fix the cleared list freed the items under the glue.
    classes = "".join(f"class Evil_{name.strip('_')}(torch.Tensor):\n{body}\n" for name, body in _HOOKS.items())
    out = run_isolated("import gc, torch\nL = []\n" + classes + """
for cls in (Evil_is_neg, Evil_requires_grad, Evil_torch_function):
    for mode in ("auto", "capsule"):
        print("case", cls.__name__, mode, flush=True)
        seqwrap._C._set_bridge_mode(mode)
        accs = [torch.zeros(1000).as_subclass(cls) for _ in range(4)]
        L = accs
        comps = [torch.zeros(1000) for _ in range(4)]
        grads = [torch.ones(1000)] * 4
        seqwrap._C.kahan_accumulate(accs, comps, grads, 1.0, None)
        gc.collect()
        junk = [torch.full((1000,), 7.0) for _ in range(64)]
        assert len(L) == 0
        assert all(torch.equal(c, torch.zeros(1000)) for c in comps), "the compensations must stay 0"
        print("ok", cls.__name__, mode)
""")
    assert out.count("ok") == 6, out


def test_subclass_hook_that_swaps_the_memory_of_an_imported_tensor():
    # A hook run while a later argument is checked gives an earlier argument new memory and frees
    # the old: the call must notice before the kernel writes into the freed bytes.
    out = run_isolated("""
import torch
accs = []
class Evil(torch.Tensor):
    def is_neg(self):
        accs[0].set_(torch.zeros(1000))
        return False
for mode in ("auto", "capsule"):
    print("case", mode, flush=True)
    seqwrap._C._set_bridge_mode(mode)
    accs[:] = [torch.zeros(1000), torch.zeros(1000).as_subclass(Evil)]
    comps = [torch.zeros(1000) for _ in range(2)]
    try:
        seqwrap._C.kahan_accumulate(accs, comps, [torch.ones(1000)] * 2, 1.0, None)
    except RuntimeError as e:
        assert "'accs[0]' changed its memory while the arguments were being checked" in str(e), e
        assert float(accs[0].sum()) == 0.0
        print("refused", mode)
""")
    assert out.count("refused") == 2, out


def test_object_claiming_to_be_a_tensor_is_refused():
    # Issue 16 item 3: __class__ spoofing must not pass the tensor check (it reached torch's
    # exporter, which segfaulted).
    out = run_isolated("""
import torch
from unittest import mock
class Liar:
    __class__ = torch.Tensor
for mode in ("auto", "capsule"):
    seqwrap._C._set_bridge_mode(mode)
    for fake in (mock.MagicMock(spec=torch.Tensor), mock.NonCallableMagicMock(spec=torch.Tensor), Liar()):
        assert isinstance(fake, torch.Tensor)  # what the old check trusted
        for call in (
            lambda: seqwrap._C.kahan_accumulate([fake], [torch.zeros(3)], [torch.ones(3)], 1.0, None),
            lambda: seqwrap._C.kahan_accumulate([torch.zeros(3)], [torch.zeros(3)], [fake], 1.0, None),
            lambda: seqwrap._C.lse_merge(fake, torch.zeros(2), torch.zeros(2, 4), torch.zeros(2), None),
        ):
            print("case", mode, type(fake).__name__, flush=True)
            try:
                call()
            except TypeError as e:
                assert "must be a torch.Tensor, not " + type(fake).__name__ in str(e), e
                print("refused")
            else:
                raise SystemExit("a fake tensor was accepted")
""")
    assert out.count("refused") == 18, out


def test_tensor_subclasses_and_parameters_are_still_accepted():
    import torch

    import seqwrap

    class Sub(torch.Tensor):
        pass

    acc, comp = torch.zeros(5).as_subclass(Sub), torch.nn.Parameter(torch.zeros(5), requires_grad=False)
    seqwrap._C.kahan_accumulate([acc], [comp], [torch.ones(5).as_subclass(Sub)], 2.0, None)
    assert torch.equal(acc.as_subclass(torch.Tensor), torch.full((5,), 2.0))


def test_labels_rewritten_while_the_kernel_runs():
    # Issue 16 item 5: a label is read once; a value written concurrently is either used as read
    # (in range) or reported as out of range; never used to index the row.
    out = run_isolated("""
        import threading, torch
        rows, V = 64, 40_000
        labels = torch.zeros(rows, dtype=torch.int64)
        stop = False
        def writer():
            while not stop:
                labels.fill_(1 << 40)
                labels.fill_(3)
        t = threading.Thread(target=writer)
        t.start()
        bad = ok = 0
        try:
            for _ in range(40):
                logits = torch.randn(rows, V)
                loss, lse = torch.empty(rows), torch.empty(rows)
                try:
                    seqwrap._C.cross_entropy_chunk(logits, labels, loss, lse, None, -100, 0.1, 0.0, 0.0, True, None, 0)
                    ok += 1
                except ValueError as e:
                    assert "is outside [0, 40000)" in str(e), e
                    bad += 1
        finally:
            stop = True
            t.join()
        print("ok", ok, "refused", bad)
    """)
    assert "refused" in out, out
