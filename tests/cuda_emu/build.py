"""Builds seqwrap's C core with every CUDA kernel compiled for the host under the CUDA emulation.

The result is a second copy of the extension (never shipped, never imported as seqwrap._C): the same
glue and call path, but CPU tensors count as CUDA tensors (SW_EMU_CPU_AS_CUDA in csrc/core/bridge.c),
so an op on host tensors builds its kernel parameters exactly as on a GPU and runs the .cu launcher,
whose kernels run as fibers under emu_runtime.cpp. One library per mode:
  plain   -O2
  asan    -O1 -g -fsanitize=address,undefined (signed overflow included), no recovery; load it in a
          process with the ASan runtime preloaded (LD_PRELOAD, as the Makefile's `asan` target does)
  race    -O1, the .cu files only also with gcc's ThreadSanitizer instrumentation (-fsanitize=thread) but
          linked WITHOUT libtsan: every load, store and atomic of the kernels calls a __tsan_* hook that
          emu_runtime.cpp defines itself, the global-memory race check (plain accesses of one address by
          two threads of a launch, one a write, not ordered by a __syncthreads of their block)
Cached under build/cuda_emu/<mode>-<hash of sources, flags and `rewrites`>/.

`rewrites` (source name -> text -> text) builds a deliberately altered kernel copy (seeded-bug tests).
"""
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def repo_root():
    for p in [HERE, *HERE.parents]:
        if (p / "csrc" / "core" / "module.c").exists():
            return p
    raise RuntimeError("tests/cuda_emu: no csrc/ above " + str(HERE))


ROOT = repo_root()
CSRC = ROOT / "csrc"
SAN = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
MODES = {"plain": ["-O2"], "asan": ["-O1", "-g", *SAN], "race": ["-O1"]}
# flags for the kernels' translation units only (the C core and the runtime stay uninstrumented)
KERNEL_FLAGS = {"race": ["-fsanitize=thread"]}

# `__shared__ T name[N];` -> a shadowed slot array, and its name registered for the race reports
SHARED_DECL = re.compile(r"__shared__\s+((?:[A-Za-z_]\w*\s+)*?[A-Za-z_][\w:]*)\s+([A-Za-z_]\w*)\s*(\[[^\]]*\])?\s*;")


def rewrite_shared(text):
    return SHARED_DECL.sub(lambda m: f"static SwShared<{m.group(1)}> {m.group(2)}{m.group(3) or ''}; "
                                     f"SW_EMU_NAME_SHARED({m.group(2)});", text)


def torch_include():
    spec = importlib.util.find_spec("torch")
    return Path(list(spec.submodule_search_locations)[0]) / "include"


def _sources():
    c = sorted(CSRC.rglob("*.c"))
    cu = sorted(CSRC.rglob("*.cu"))
    headers = sorted(p for ext in ("*.h", "*.inc", "*.def", "*.cuh") for p in CSRC.rglob(ext))
    return c, cu, headers


def build(mode="plain", rewrites=None, tag=""):
    """Returns the path of the emulated _C.so for `mode` (built when missing)."""
    rewrites = rewrites or {}
    c_src, cu_src, headers = _sources()
    include_dirs = sorted({str(p.parent) for p in headers})
    emu_files = [HERE / "sw_cuda_emu.h", HERE / "include" / "cuda_runtime.h", HERE / "emu_runtime.cpp", Path(__file__)]
    h = hashlib.sha256(repr((mode, sorted(rewrites.items()), MODES[mode], KERNEL_FLAGS.get(mode))).encode())
    for p in [*c_src, *cu_src, *headers, *emu_files]:
        h.update(p.as_posix().encode())
        h.update(p.read_bytes())
    out = ROOT / "build" / "cuda_emu" / f"{mode}{'-' + tag if tag else ''}-{h.hexdigest()[:16]}"
    so = out / "_C.so"
    if so.exists():
        return so
    out.mkdir(parents=True, exist_ok=True)
    py_inc = sysconfig.get_paths()["include"]
    incs = [f"-I{d}" for d in include_dirs] + [f"-I{py_inc}", f"-I{torch_include()}"]
    common = ["-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-ffp-contract=off", *MODES[mode]]
    defs = ['-DSEQWRAP_CUDA_ARCHS="emulated"', "-DSW_EMU_CPU_AS_CUDA"] + (["-DSEQWRAP_SANITIZE=1"] if mode == "asan" else [])
    # Objects are cached by content (the compile command, the source text, every header): a variant
    # with one rewritten kernel compiles that kernel only and links it with the cached rest.
    objects = ROOT / "build" / "cuda_emu" / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    shared_h = hashlib.sha256()
    for p in [*headers, *emu_files]:
        shared_h.update(p.as_posix().encode())
        shared_h.update(p.read_bytes())
    jobs, objs = [], []

    def add(cmd, src_path, text):
        key = hashlib.sha256(repr(cmd).encode() + text.encode() + shared_h.digest()).hexdigest()[:24]
        obj = objects / f"{Path(src_path).stem}-{key}.o"
        objs.append(str(obj))
        if not obj.exists():
            tmp = f"{obj}.{os.getpid()}.tmp"   # concurrent builds never share a partial object
            jobs.append((cmd + ["-c", str(src_path), "-o", tmp], obj, tmp))

    for src in c_src:
        add(["gcc", "-std=c11", "-fopenmp", *common, *defs, *incs], src, src.read_text())
    for src in cu_src:
        text = src.read_text()
        name = src.relative_to(CSRC).as_posix()
        for old, new in rewrites.get(name, ()):
            if old not in text:
                raise ValueError(f"rewrite of {name}: {old!r} not found")
            text = text.replace(old, new)
        host = out / (name.replace("/", "_") + ".cpp")
        host_text = f'#line 1 "{src}"\n' + rewrite_shared(text)
        host.write_text(host_text)
        add(["g++", "-std=c++17", "-x", "c++", "-include", str(HERE / "sw_cuda_emu.h"), f"-I{HERE / 'include'}",
             f"-I{src.parent}", *common, *KERNEL_FLAGS.get(mode, []), *defs, *incs], host, host_text)
    add(["g++", "-std=c++17", *common, f"-I{HERE}"], HERE / "emu_runtime.cpp", "")

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError("tests/cuda_emu build failed:\n" + " ".join(cmd) + "\n" + r.stderr[-6000:])

    def compile_one(job):
        cmd, obj, tmp = job
        run(cmd)
        os.replace(tmp, obj)
    with ThreadPoolExecutor(max_workers=2) as ex:
        list(ex.map(compile_one, jobs))
    tmp = out / "_C.so.tmp"
    run(["g++", "-shared", "-fopenmp", *MODES[mode], "-o", str(tmp), *objs])
    os.replace(tmp, so)
    return so


def load(so):
    """Imports the emulated library as a module of its own (not seqwrap._C) and returns it."""
    name = f"seqwrap_cuda_emu_{so.parent.name.replace('-', '_')}._C"
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    spec = importlib.util.spec_from_file_location(name, str(so), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "plain"))
