"""A static check of the CUDA kernels' index arithmetic (csrc/**/*.cu, *.cuh): every value computed
from blockIdx / threadIdx / blockDim with a multiplication is declared 64-bit (long long, int64_t,
size_t) and its product is formed in 64 bits (a 64-bit cast before the first `*`): blockIdx.x *
blockDim.x is an unsigned 32-bit product otherwise, the overflow of fused cross-entropy kernels at
large vocabularies. tests/test_cuda_emulated_overflow.py runs kernels past 2^31 elements; this covers
every kernel by reading, including those not run at such sizes (Kahan, scan, sampler)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WIDE = r"(?:long long|int64_t|size_t|uint64_t|unsigned long long)"
DECL = re.compile(r"(?:const\s+)?(?P<type>(?:unsigned\s+|signed\s+)?(?:long long|int64_t|size_t|uint64_t|int|unsigned|"
                  r"int32_t|uint32_t|long|short))\s+(?P<name>\w+)\s*=\s*(?P<expr>[^;,]*)[;,]")
BUILTIN = re.compile(r"\b(?:blockIdx|threadIdx|blockDim|gridDim)\.[xyz]\b")
CAST = re.compile(r"\(\s*" + WIDE + r"\s*\)")


def findings(text, where="?"):
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        code = line.split("//")[0]
        for m in DECL.finditer(code):
            expr = m.group("expr")
            if not BUILTIN.search(expr) or "*" not in expr:
                continue
            head = expr[:expr.index("*")]
            if not re.fullmatch(WIDE, m.group("type")) and m.group("type") != "unsigned long long":
                out.append(f"{where}:{n}: {m.group('name')} is {m.group('type')}, computed with a product: {code.strip()}")
            elif not CAST.search(head):
                out.append(f"{where}:{n}: {m.group('name')}'s product is formed in 32 bits (no 64-bit cast before the "
                           f"first *): {code.strip()}")
    return out


def test_kernel_index_arithmetic_is_64_bit():
    files = [p for ext in ("*.cu", "*.cuh") for p in sorted((ROOT / "csrc").rglob(ext))]
    assert len(files) >= 5
    bad = [f for p in files for f in findings(p.read_text(), p.relative_to(ROOT).as_posix())]
    assert bad == [], "\n".join(bad)


def test_the_check_flags_32_bit_index_products():
    assert findings("    const long long i = blockIdx.x * blockDim.x + threadIdx.x;")
    assert findings("    const int r = (long long)blockIdx.x * blockDim.x + threadIdx.x;")
    assert findings("    for (unsigned j = blockIdx.x * 512 + threadIdx.x; j < n; ++j)")
    assert not findings("    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;")
    assert not findings("    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;")
