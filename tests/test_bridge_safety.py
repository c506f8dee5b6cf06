"""The C bridge survives hostile callers: other threads dropping tensors while a kernel runs,
tensor subclasses that mutate the argument lists or other arguments from a hook, objects that only
claim to be tensors, and labels rewritten while the cross-entropy kernel runs. Each case runs in a
child interpreter (tests/isolated.py): a crash fails the test, not the runner."""
import pytest

from .isolated import run_isolated

pytestmark = pytest.mark.ccore

MODES = ["auto", "capsule"]


@pytest.mark.parametrize("mode", MODES)
def test_tensors_dropped_by_another_thread_while_the_kernel_runs(mode):
    # Issue 16 item 1: the thread's call must keep every tensor alive until the kernel is done.
    run_isolated(f"""
        import threading, time, torch
        seqwrap._C._set_bridge_mode("{mode}")
        N = 4_000_000
        for delay in (0.0005, 0.001, 0.002, 0.004):
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
        print("ok")
    """)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hook", ["is_neg", "requires_grad", "__torch_function__"])
def test_subclass_hook_that_clears_the_argument_list(mode, hook):
    # Issue 16 item 2: the glue must own what it reads from the lists while it calls back into Python.
    hooks = {
        "is_neg": "    def is_neg(self):\n        L.clear(); return False\n",
        "requires_grad": "    @property\n    def requires_grad(self):\n        L.clear(); return False\n",
        "__torch_function__": ("    @classmethod\n"
                               "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
                               "        L.clear()\n"
                               "        return super().__torch_function__(func, types, args, kwargs or {})\n"),
    }
    out = run_isolated("import torch\nclass Evil(torch.Tensor):\n" + hooks[hook] + f"""
seqwrap._C._set_bridge_mode("{mode}")
import gc
accs = [torch.zeros(1000).as_subclass(Evil) for _ in range(4)]
L = accs
comps = [torch.zeros(1000) for _ in range(4)]
grads = [torch.ones(1000)] * 4
try:
    seqwrap._C.kahan_accumulate(accs, comps, grads, 1.0, None)
except (TypeError, ValueError) as e:
    print("refused:", e)
gc.collect()
junk = [torch.full((1000,), 7.0) for _ in range(64)]
print("len", len(L), "comps", [float(c.sum()) for c in comps])
""")
    assert "len 0" in out, out


@pytest.mark.parametrize("mode", MODES)
def test_object_claiming_to_be_a_tensor_is_refused(mode):
    # Issue 16 item 3: __class__ spoofing must not pass the tensor check.
    out = run_isolated(f"""
        import torch
        from unittest import mock
        seqwrap._C._set_bridge_mode("{mode}")
        class Liar:
            __class__ = torch.Tensor
        for fake in (mock.MagicMock(spec=torch.Tensor), mock.NonCallableMagicMock(spec=torch.Tensor), Liar()):
            assert isinstance(fake, torch.Tensor)  # what the old check trusted
            for call in (
                lambda: seqwrap._C.kahan_accumulate([fake], [torch.zeros(3)], [torch.ones(3)], 1.0, None),
                lambda: seqwrap._C.kahan_accumulate([torch.zeros(3)], [torch.zeros(3)], [fake], 1.0, None),
                lambda: seqwrap._C.lse_merge(fake, torch.zeros(2), torch.zeros(2, 4), torch.zeros(2), None),
            ):
                try:
                    call()
                except TypeError as e:
                    assert "must be a torch.Tensor" in str(e), e
                    print("refused:", type(fake).__name__)
                else:
                    raise SystemExit("a fake tensor was accepted")
    """)
    assert out.count("refused:") == 9, out


def test_tensor_subclasses_are_still_accepted():
    run_isolated("""
        import torch
        class Sub(torch.Tensor):
            pass
        acc, comp = torch.zeros(5).as_subclass(Sub), torch.nn.Parameter(torch.zeros(5), requires_grad=False)
        seqwrap._C.kahan_accumulate([acc], [comp], [torch.ones(5).as_subclass(Sub)], 2.0, None)
        assert torch.equal(acc.as_subclass(torch.Tensor), torch.full((5,), 2.0)), acc
    """)


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
            for _ in range(60):
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


@pytest.mark.parametrize("mode", MODES)
def test_subclass_hook_that_swaps_the_memory_of_an_imported_tensor(mode):
    # A hook run while the later arguments are checked gives an earlier argument new memory and
    # frees the old: the call must notice before the kernel writes into the freed bytes.
    out = run_isolated(f"""
import torch
seqwrap._C._set_bridge_mode("{mode}")
accs = []
class Evil(torch.Tensor):
    def is_neg(self):
        accs[0].set_(torch.zeros(1000))
        return False
accs += [torch.zeros(1000), torch.zeros(1000).as_subclass(Evil)]
comps = [torch.zeros(1000) for _ in range(2)]
try:
    seqwrap._C.kahan_accumulate(accs, comps, [torch.ones(1000)] * 2, 1.0, None)
except RuntimeError as e:
    assert "changed its memory while the arguments were being checked" in str(e), e
    print("refused")
print(float(accs[0].sum()))
""")
    assert "refused" in out, out
