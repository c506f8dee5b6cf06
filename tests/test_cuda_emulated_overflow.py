"""Index overflow: the CUDA kernels at logical sizes where rows x columns exceeds 2^31, run under the
emulator (tests/cuda_emu) on sparse virtual memory: the tensors are anonymous MAP_NORESERVE mappings
(untouched pages cost nothing), only the last block(s) of each launch run (EmulatedDevice.active's
`blocks`), only the rows those blocks read are filled, and their outputs are compared with a float64
reference computed on those rows alone. A kernel that forms an offset in 32 bits reads or writes
another row (zero pages, or outside the mapping) and fails. A seeded 32-bit offset proves it."""
import ctypes
import os
import contextlib

import pytest
import torch

from seqwrap.ops import library

from .cuda_emu import build
from .cuda_emu.device import EmulatedDevice

PROT_RW, MAP_PRIVATE, MAP_ANONYMOUS, MAP_NORESERVE = 3, 0x02, 0x20, 0x4000
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@contextlib.contextmanager
def sparse(shape, dtype):
    """A zero tensor of `shape` over an anonymous NORESERVE mapping (only touched pages are backed)."""
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    addr = _libc.mmap(None, nbytes, PROT_RW, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        pytest.fail(f"mmap of {nbytes} bytes failed (errno {ctypes.get_errno()})")
    try:
        buf = (ctypes.c_char * nbytes).from_address(addr)
        yield torch.frombuffer(buf, dtype=dtype, count=n).view(shape)
    finally:
        _libc.munmap(addr, nbytes)


@pytest.fixture(scope="module")
def emu():
    return EmulatedDevice(build.build(os.environ.get("SEQWRAP_EMU_MODE", "plain")))


# -- cross-entropy: one block per row, row offset r * row_stride * element size ----------------------------

XENT_ROWS, XENT_VOCAB = 16385, 131073   # a 128K vocabulary: rows x V = 2147631105 > 2^31


def _xent_last_row(dev):
    g = torch.Generator().manual_seed(11)
    assert XENT_ROWS * XENT_VOCAB > 2**31
    with sparse((XENT_ROWS, XENT_VOCAB), torch.bfloat16) as logits:
        row = (torch.randn(XENT_VOCAB, generator=g, dtype=torch.float64) * 3).to(torch.bfloat16)
        logits[-1] = row
        labels = torch.full((XENT_ROWS,), -100, dtype=torch.int64)
        labels[-1] = XENT_VOCAB - 2
        loss, lse = torch.full((XENT_ROWS,), float("nan")), torch.full((XENT_ROWS,), float("nan"))
        with dev.active(blocks=(-1, -1)) as run:
            library.cross_entropy_chunk(logits, labels, loss, lse, None, -100, 0.0, 0.0, 0.0, True, None, 0)
        grad = logits[-1].double().clone()
    assert run.launched == ["sw_xent_kernel<R>"] or run.launched[0].startswith("sw_xent_kernel"), run.launched
    assert lse[:-1].isnan().all(), "blocks other than the last ran (the check would not be sparse)"
    x = row.double()
    want_lse = torch.logsumexp(x, 0)
    want_grad = torch.softmax(x, 0)
    want_grad[XENT_VOCAB - 2] -= 1
    return (lse[-1].double(), loss[-1].double(), grad), (want_lse, want_lse - x[XENT_VOCAB - 2], want_grad)


def _close(got, want):
    (lse, loss, grad), (wl, wloss, wgrad) = got, want
    return (abs(lse - wl) <= 1e-5 * abs(wl) and abs(loss - wloss) <= 1e-5 * abs(wloss)
            and (grad - wgrad).abs().max() <= 1e-2 * wgrad.abs().max())


def test_cross_entropy_last_row_past_2_31_elements(emu):
    got, want = _xent_last_row(emu)
    assert _close(got, want), (got[:2], want[:2], (got[2] - want[2]).abs().max())


def test_a_32_bit_row_offset_is_caught():
    """The seeded bug: the row's byte offset (16384 x 131073 x 2 bytes > 2^32) formed in 32 bits: it
    wraps to 32 KiB, inside row 0, whose zero logits give lse = log(V) instead of the row's."""
    bad = [("void *row = (char *)job.logits + r * job.logits_row_stride * elem_bytes;",
            "void *row = (char *)job.logits + (unsigned)(r * job.logits_row_stride * elem_bytes);")]
    dev = EmulatedDevice(build.build("plain", rewrites={"xent/xent.cu": bad}, tag="bug-offset32"))
    got, want = _xent_last_row(dev)
    assert not _close(got, want)
    assert abs(got[0] - want[0]) > 0.1   # it read another (zero) row: lse = log(V), not the row's


# -- LSE merge: one thread per element, i = blockIdx.x * blockDim.x + threadIdx.x over rows x dim -----------

def test_lse_merge_last_elements_past_2_31(emu):
    rows, dim = 32769, 65537                # rows x dim = 2147581953 > 2^31; 257 elements in the last 2 blocks
    tail = rows * dim - 256 * ((rows * dim - 1) // 256 - 1)   # elements the last two blocks of 256 cover
    assert rows * dim > 2**31 and tail <= dim
    g = torch.Generator().manual_seed(12)
    lse_rows = slice(256 * ((rows - 1) // 256 - 1), rows)        # rows the update kernel's last two blocks own
    with sparse((rows, dim), torch.float32) as acc, sparse((rows, dim), torch.float32) as blk:
        a0, b0 = torch.randn(tail, generator=g), torch.randn(tail, generator=g)
        acc[-1, -tail:], blk[-1, -tail:] = a0, b0
        acc_lse, blk_lse = torch.zeros(rows), torch.zeros(rows)
        acc_lse[lse_rows] = torch.randn(acc_lse[lse_rows].shape, generator=g)
        blk_lse[lse_rows] = torch.randn(blk_lse[lse_rows].shape, generator=g)
        la, lb = acc_lse[-1].double(), blk_lse[-1].double()
        want_lse = torch.logaddexp(acc_lse[lse_rows].double(), blk_lse[lse_rows].double())
        with emu.active(blocks=(-2, -1)) as run:
            library.lse_merge(acc, acc_lse, blk, blk_lse)
        got = acc[-1, -tail:].double().clone()
        untouched = acc[-1, -tail - 1].item()
    assert sorted(k.split("<")[0] for k in run.launched) == ["sw_lse_merge_kernel", "sw_lse_update_kernel"]
    l = torch.logaddexp(la, lb)
    want = torch.exp(la - l) * a0.double() + torch.exp(lb - l) * b0.double()
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert untouched == 0.0
    assert (acc_lse[lse_rows].double() - want_lse).abs().max() <= 1e-5
