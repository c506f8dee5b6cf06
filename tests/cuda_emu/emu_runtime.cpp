// emu_runtime.cpp - fibers, schedules, barriers, warp shuffles and the shared-memory race check of
// the host emulation of CUDA (see sw_cuda_emu.h). One host thread runs one block at a time; its
// threads are fibers with their own stacks, switched by a hand-written x86-64 context swap (no
// system call per switch, unlike swapcontext), with AddressSanitizer told about every switch.
#include <stdarg.h>
#include <stdlib.h>
#include <sys/mman.h>

#include <string>
#include <vector>

#include "include/cuda_runtime.h"  // and sw_cuda_emu.h

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define SW_ASAN 1
#endif
#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

extern "C" {
void sw_emu_begin_launch(void);
__thread uint3 sw_emu_tidx, sw_emu_bidx;
__thread dim3 sw_emu_bdim, sw_emu_gdim;
}

// sw_emu_swap(&save_sp, new_sp): saves the callee-saved registers on the current stack, stores the
// stack pointer in *save_sp, switches to new_sp and restores the registers saved there.
extern "C" void sw_emu_swap(void **save_sp, void *new_sp);
asm(".text\n.globl sw_emu_swap\n.type sw_emu_swap,@function\nsw_emu_swap:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n  ret\n"
    ".size sw_emu_swap, .-sw_emu_swap\n");

namespace {

enum State { RUN, AT_BARRIER, AT_SHUFFLE, DONE };
enum Schedule { IN_ORDER = 0, REVERSED = 1, RANDOM = 2 };

#ifdef SW_ASAN
const size_t kStack = 1 << 20;  // sanitized frames are larger
#else
const size_t kStack = 256 << 10;
#endif
const int kMaxThreads = 1024;

struct Fiber {
    void *sp = nullptr;
    char *stack = nullptr;  // kStack bytes, lowest page a guard
    int tid = 0;
    State state = DONE;
    unsigned mask = 0;      // shuffle: mask, kind, argument, width, value in and out
    int kind = 0, arg = 0, width = 32;
    uint64_t in = 0, out = 0;
    void *fake_stack = nullptr;
};

struct Config {
    int schedule = IN_ORDER;
    uint64_t seed = 0;
    long long first_block = 0, last_block = -1;  // -1: every block
    size_t dyn_smem_cap = 48 << 10;
};

Config g_cfg;
std::vector<std::string> g_reports;
std::vector<std::string> g_launched;  // distinct kernel names launched since the last take
cudaError_t g_last_error = cudaSuccess;
Fiber g_fibers[kMaxThreads];
int g_nthreads = 0;
Fiber *g_cur = nullptr;
void *g_sched_sp = nullptr;
[[maybe_unused]] const void *g_sched_stack_bottom = nullptr;
[[maybe_unused]] size_t g_sched_stack_size = 0;
sw_emu_body g_body = nullptr;
void *g_closure = nullptr;
const char *g_kernel = "?";
long long g_block_linear = 0;
uint64_t g_epoch = 0;  // advanced at every block start and barrier release: unique over the run
uint64_t g_rng = 0;
std::vector<unsigned char> g_dyn_smem;

struct SharedName {
    const char *name;
    const char *base;
    size_t bytes, elem;
};
std::vector<SharedName> g_names;

uint64_t next_random() {  // splitmix64
    uint64_t z = (g_rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void order(std::vector<int> &v) {
    if (g_cfg.schedule == REVERSED) {
        for (size_t i = 0, j = v.size(); i + 1 < j; ++i, --j) std::swap(v[i], v[j - 1]);
    } else if (g_cfg.schedule == RANDOM) {
        for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random() % i]);
    }
}

void set_thread_index(int tid) {
    sw_emu_tidx.x = tid % sw_emu_bdim.x;
    sw_emu_tidx.y = (tid / sw_emu_bdim.x) % sw_emu_bdim.y;
    sw_emu_tidx.z = tid / (sw_emu_bdim.x * sw_emu_bdim.y);
}

// fiber -> scheduler
void yield_to_scheduler() {
    Fiber *f = g_cur;
#ifdef SW_ASAN
    __sanitizer_start_switch_fiber(f->state == DONE ? nullptr : &f->fake_stack, g_sched_stack_bottom,
                                   g_sched_stack_size);
#endif
    sw_emu_swap(&f->sp, g_sched_sp);
#ifdef SW_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
    g_cur = f;
    set_thread_index(f->tid);
}

void fiber_entry() {
#ifdef SW_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
    set_thread_index(g_cur->tid);
    g_body(g_closure);
    g_cur->state = DONE;
    yield_to_scheduler();
    abort();  // a finished fiber is never resumed
}

// scheduler -> fiber f, until it blocks or finishes
void resume(Fiber *f) {
    g_cur = f;
    set_thread_index(f->tid);
    void *fake = nullptr;
#ifdef SW_ASAN
    __sanitizer_start_switch_fiber(&fake, f->stack, kStack);
#endif
    sw_emu_swap(&g_sched_sp, f->sp);
#ifdef SW_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    (void)fake;
    g_cur = nullptr;
}

void start_fiber(Fiber *f, int tid) {
    if (!f->stack) {
        void *m = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) abort();
        mprotect(m, 4096, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
        f->stack = (char *)m;
    }
    f->tid = tid;
    f->state = RUN;
    f->fake_stack = nullptr;
    uintptr_t top = ((uintptr_t)(f->stack + kStack)) & ~(uintptr_t)15;
    void **sp = (void **)(top - 16);  // the return slot: after `ret`, rsp % 16 == 8 as at a call
    sp[0] = (void *)&fiber_entry;
    sp[1] = nullptr;
    sp -= 6;                          // r15 r14 r13 r12 rbx rbp
    for (int i = 0; i < 6; ++i) sp[i] = nullptr;
    f->sp = sp;
}

const char *slot_name(const void *slot, char *buf, size_t n) {
    for (const SharedName &s : g_names) {
        const char *p = (const char *)slot;
        if (p >= s.base && p < s.base + s.bytes) {
            if (s.bytes > s.elem) snprintf(buf, n, "%s[%zu]", s.name, (size_t)(p - s.base) / s.elem);
            else snprintf(buf, n, "%s", s.name);
            return buf;
        }
    }
    snprintf(buf, n, "shared slot %p", slot);
    return buf;
}

// Resolves the shuffles of warp w whose lanes have all arrived; returns how many lanes it released.
int resolve_warp(int w) {
    const int base = w * 32, lanes = g_nthreads - base < 32 ? g_nthreads - base : 32;
    int released = 0;
    for (int l = 0; l < lanes; ++l) {
        Fiber &f = g_fibers[base + l];
        if (f.state != AT_SHUFFLE) continue;
        const unsigned mask = f.mask;
        if (!(mask >> l & 1u)) {
            sw_emu_report("%s block %lld: thread %d calls a warp shuffle with mask 0x%08x that does not name its own "
                          "lane %d", g_kernel, g_block_linear, f.tid, mask, l);
            f.mask |= 1u << l;
            return -1;
        }
        // every lane of the mask must be at a shuffle with the same mask
        bool complete = true;
        for (int m = 0; m < 32; ++m) {
            if (!(mask >> m & 1u)) continue;
            if (m >= lanes) {
                sw_emu_report("%s block %lld: warp shuffle mask 0x%08x names lane %d, which does not exist (block of %d "
                              "threads)", g_kernel, g_block_linear, mask, m, g_nthreads);
                return -1;
            }
            const Fiber &o = g_fibers[base + m];
            if (o.state == AT_SHUFFLE && o.mask != mask) {
                sw_emu_report("%s block %lld: threads %d and %d meet at a warp shuffle with different masks (0x%08x, "
                              "0x%08x)", g_kernel, g_block_linear, f.tid, o.tid, mask, o.mask);
                return -1;
            }
            if (o.state != AT_SHUFFLE) complete = false;
        }
        if (!complete) continue;
        for (int m = 0; m < 32; ++m) {
            if (!(mask >> m & 1u)) continue;
            Fiber &d = g_fibers[base + m];
            const int width = d.width, seg = m / width * width, in_seg = m % width;
            int src = m;
            switch (d.kind) {
                case 0: src = seg + ((d.arg % width) + width) % width; break;
                case 1: src = in_seg - d.arg >= 0 ? m - d.arg : m; break;
                case 2: src = in_seg + d.arg < width ? m + d.arg : m; break;
                default: src = (in_seg ^ d.arg) < width ? seg + (in_seg ^ d.arg) : m; break;
            }
            if (!(mask >> src & 1u)) {
                sw_emu_report("%s block %lld: thread %d reads lane %d in a warp shuffle whose mask 0x%08x excludes it "
                              "(undefined value)", g_kernel, g_block_linear, d.tid, src, mask);
                src = m;
            }
            d.out = g_fibers[base + src].in;
        }
        for (int m = 0; m < 32; ++m) {
            if (mask >> m & 1u) {
                g_fibers[base + m].state = RUN;
                ++released;
            }
        }
    }
    return released;
}

// Runs one block to completion (or until it can make no progress, which is reported).
void run_block() {
    for (int t = 0; t < g_nthreads; ++t) start_fiber(&g_fibers[t], t);
    ++g_epoch;
    std::vector<int> runnable;
    runnable.reserve(g_nthreads);
    for (;;) {
        runnable.clear();
        for (int t = 0; t < g_nthreads; ++t)
            if (g_fibers[t].state == RUN) runnable.push_back(t);
        if (!runnable.empty()) {
            order(runnable);
            for (int t : runnable) resume(&g_fibers[t]);
            continue;
        }
        int released = 0, at_barrier = 0, done = 0;
        for (int w = 0; w * 32 < g_nthreads; ++w) {
            const int r = resolve_warp(w);
            if (r < 0) return;  // reported; the block is abandoned
            released += r;
        }
        if (released) continue;
        for (int t = 0; t < g_nthreads; ++t) {
            at_barrier += g_fibers[t].state == AT_BARRIER;
            done += g_fibers[t].state == DONE;
        }
        if (done == g_nthreads) return;
        if (at_barrier + done == g_nthreads) {
            if (done) {
                sw_emu_report("%s block %lld: __syncthreads reached by %d of %d threads (the others have exited)",
                              g_kernel, g_block_linear, at_barrier, g_nthreads);
            }
            ++g_epoch;
            for (int t = 0; t < g_nthreads; ++t)
                if (g_fibers[t].state == AT_BARRIER) g_fibers[t].state = RUN;
            continue;
        }
        int first_bar = -1, first_shfl = -1;
        for (int t = 0; t < g_nthreads; ++t) {
            if (g_fibers[t].state == AT_BARRIER && first_bar < 0) first_bar = t;
            if (g_fibers[t].state == AT_SHUFFLE && first_shfl < 0) first_shfl = t;
        }
        sw_emu_report("%s block %lld: deadlock: thread %d waits at __syncthreads while thread %d waits at a warp "
                      "shuffle its warp never completes", g_kernel, g_block_linear, first_bar, first_shfl);
        return;
    }
}

}  // namespace

extern "C" {

void sw_emu_report(const char *fmt, ...) {
    if (g_reports.size() >= 64) return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_reports.emplace_back(buf);
}

// Test interface (ctypes) ------------------------------------------------------------------------------
// schedule: 0 in order, 1 reversed, 2 seeded random; blocks [first, last] only, a negative index
// counting from the end of each launch's grid ((0, -1): every block; (-2, -1): the last two).
__attribute__((visibility("default"))) void sw_emu_configure(int schedule, uint64_t seed, long long first_block, long long last_block) {
    g_cfg.schedule = schedule;
    g_cfg.seed = seed;
    g_cfg.first_block = first_block;
    g_cfg.last_block = last_block;
    g_rng = seed;
}
// Copies the reports gathered since the last call, '\n'-separated, into buf; returns their number.
__attribute__((visibility("default"))) int sw_emu_take_reports(char *buf, size_t n) {
    std::string all;
    for (const std::string &r : g_reports) all += r + "\n";
    const int count = (int)g_reports.size();
    g_reports.clear();
    if (n) {
        snprintf(buf, n, "%s", all.c_str());
    }
    return count;
}
__attribute__((visibility("default"))) // The distinct kernels launched since the last call, '\n'-separated.
__attribute__((visibility("default"))) int sw_emu_take_launched(char *buf, size_t n) {
    std::string all;
    for (const std::string &k : g_launched) all += k + "\n";
    const int count = (int)g_launched.size();
    g_launched.clear();
    if (n) snprintf(buf, n, "%s", all.c_str());
    return count;
}
long long sw_emu_epoch(void) { return (long long)g_epoch; }

int sw_emu_launch(const char *kernel, dim3 grid, dim3 block, size_t dyn_smem, void *stream, sw_emu_body body,
                  void *closure) {
    (void)stream;
    sw_emu_begin_launch();
    bool seen = false;
    for (const std::string &k : g_launched) seen = seen || k == kernel;
    if (!seen) g_launched.emplace_back(kernel);
    const unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    if (g_cur) {
        sw_emu_report("%s: launched from device code (dynamic parallelism is not emulated)", kernel);
        return g_last_error = cudaErrorLaunchFailure;
    }
    if (nthreads == 0 || nthreads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
        grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
        return g_last_error = cudaErrorInvalidConfiguration;
    }
    if (dyn_smem > g_cfg.dyn_smem_cap) return g_last_error = cudaErrorInvalidValue;
    g_dyn_smem.assign(dyn_smem, 0xa5);
    g_nthreads = (int)nthreads;
    g_body = body;
    g_closure = closure;
    g_kernel = kernel;
    sw_emu_bdim = block;
    sw_emu_gdim = grid;
    const long long nblocks = (long long)grid.x * grid.y * grid.z;
    // negative: counted from the end of this launch's grid (-1 the last block), as Python indexes
    long long first = g_cfg.first_block < 0 ? nblocks + g_cfg.first_block : g_cfg.first_block;
    long long last = g_cfg.last_block < 0 ? nblocks + g_cfg.last_block : g_cfg.last_block;
    if (first < 0) first = 0;
    if (last > nblocks - 1) last = nblocks - 1;
    std::vector<long long> blocks;
    for (long long b = first; b <= last; ++b) blocks.push_back(b);
    if (g_cfg.schedule == REVERSED) {
        for (size_t i = 0, j = blocks.size(); i + 1 < j; ++i, --j) std::swap(blocks[i], blocks[j - 1]);
    } else if (g_cfg.schedule == RANDOM) {
        for (size_t i = blocks.size(); i > 1; --i) std::swap(blocks[i - 1], blocks[next_random() % i]);
    }
    for (long long b : blocks) {
        g_block_linear = b;
        sw_emu_bidx.x = (unsigned)(b % grid.x);
        sw_emu_bidx.y = (unsigned)(b / grid.x % grid.y);
        sw_emu_bidx.z = (unsigned)(b / ((long long)grid.x * grid.y));
        run_block();
    }
    return cudaSuccess;
}

void sw_emu_syncthreads(void) {
    if (!g_cur) abort();
    g_cur->state = AT_BARRIER;
    yield_to_scheduler();
}

uint64_t sw_emu_shfl(unsigned mask, uint64_t value, int kind, int arg, int width) {
    Fiber *f = g_cur;
    if (!f) abort();
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        sw_emu_report("%s block %lld: thread %d: warp shuffle width %d is not a power of two <= 32", g_kernel,
                      g_block_linear, f->tid, width);
        width = 32;
    }
    f->mask = mask;
    f->in = value;
    f->kind = kind;
    f->arg = arg;
    f->width = width;
    f->state = AT_SHUFFLE;
    yield_to_scheduler();
    return g_cur->out;
}

void sw_emu_syncwarp(unsigned mask) { (void)sw_emu_shfl(mask, 0, 0, 0, 32); }

void sw_emu_shared_read(void *shadow, const void *slot) {
    SwShadow *s = (SwShadow *)shadow;
    if (!g_cur) return;
    const int t = g_cur->tid;
    if (s->write_epoch == g_epoch && s->writer != t) {
        char name[96];
        sw_emu_report("%s block %lld: race on shared memory: thread %d reads %s, written by thread %d since the last "
                      "__syncthreads", g_kernel, g_block_linear, t, slot_name(slot, name, sizeof name), s->writer);
    }
    if (s->read_epoch != g_epoch) {
        s->read_epoch = g_epoch;
        s->reader = t;
    } else if (s->reader != t) {
        s->reader = -2;
    }
}

void sw_emu_shared_write(void *shadow, const void *slot) {
    SwShadow *s = (SwShadow *)shadow;
    if (!g_cur) return;
    const int t = g_cur->tid;
    char name[96];
    if (s->write_epoch == g_epoch && s->writer != t) {
        sw_emu_report("%s block %lld: race on shared memory: threads %d and %d both write %s since the last "
                      "__syncthreads", g_kernel, g_block_linear, s->writer, t, slot_name(slot, name, sizeof name));
    } else if (s->read_epoch == g_epoch && s->reader != t) {
        if (s->reader == -2)
            sw_emu_report("%s block %lld: race on shared memory: thread %d writes %s, read by several threads since "
                          "the last __syncthreads", g_kernel, g_block_linear, t, slot_name(slot, name, sizeof name));
        else
            sw_emu_report("%s block %lld: race on shared memory: thread %d writes %s, read by thread %d since the last "
                          "__syncthreads", g_kernel, g_block_linear, t, slot_name(slot, name, sizeof name), s->reader);
    }
    s->write_epoch = g_epoch;
    s->writer = t;
}

void sw_emu_name_shared(const char *name, const void *base, size_t bytes, size_t elem) {
    for (const SharedName &s : g_names)
        if (s.base == (const char *)base) return;
    g_names.push_back({name, (const char *)base, bytes, elem});
}

void *sw_emu_dynamic_shared(void) { return g_dyn_smem.data(); }

// CUDA runtime stubs: one emulated device, 0.
cudaError_t cudaGetDevice(int *d) { *d = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetLastError(void) {
    cudaError_t e = g_last_error;
    g_last_error = cudaSuccess;
    return e;
}
cudaError_t cudaGetDeviceCount(int *n) { *n = 1; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 0; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *v) { *v = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int *v, enum cudaDeviceAttr a, int d) {
    (void)d;
    *v = a == cudaDevAttrComputeCapabilityMajor ? 9 : 0;
    return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void *p, int value, size_t n, cudaStream_t s) {
    (void)s;
    memset(p, value, n);
    return cudaSuccess;
}
const char *cudaGetErrorString(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidConfiguration: return "invalid configuration argument";
        case cudaErrorInvalidValue: return "invalid argument";
        default: return "emulated CUDA error";
    }
}
const char *cudaGetErrorName(cudaError_t e) {
    switch (e) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        default: return "cudaErrorLaunchFailure";
    }
}

}  // extern "C"

// ---- global-memory race check (build mode "race") ---------------------------------------------------------
// The kernels' translation units are compiled with -fsanitize=thread but linked without libtsan: gcc
// then calls the __tsan_* hooks below at every load, store and atomic. Per global address (keyed by
// the exact start address of the access: partial overlaps of different widths are not compared), a
// shadow keeps the last write and a summary of the plain reads of the current launch. Two accesses
// by different threads conflict when at least one writes, not both are atomic, and they are not
// ordered: blocks of one launch are unordered (a GPU runs them concurrently), threads of one block
// are ordered only by a __syncthreads between them (the epoch). A plain `+=` from two threads is
// such a pair (a lost update on a GPU) whichever order the emulator runs them in, so the check
// does not depend on the schedule. Shared memory (its own check), the fibers' stacks, the
// launching thread's stack (the kernel's by-value arguments) and the emulator's thread-locals are
// not global memory and are skipped. Launches are ordered (one stream): the shadow is per launch.
#include <pthread.h>

#include <unordered_map>

namespace {
struct GlobalShadow {
    uint64_t launch = 0;                          // the launch these fields belong to
    long long w_block = -1;                       // last write: block, thread, epoch, atomic
    int w_tid = -1;
    uint64_t w_epoch = 0;
    bool w_atomic = false;
    long long r_block = -1;                       // plain reads: their block (-2: several blocks)
    uint64_t r_epoch = 0;                         // the latest epoch of a plain read
    int r_tid = -1;                               // its reader; -2: several threads read in r_epoch
};
std::unordered_map<uintptr_t, GlobalShadow> g_global;
uint64_t g_launch_id = 0;
uintptr_t g_host_stack_lo = 0, g_host_stack_hi = 0;

bool is_global(uintptr_t a) {
    if (!g_cur) return false;  // host code of the launcher
    const uintptr_t st = (uintptr_t)g_cur->stack;
    if (a >= st && a < st + kStack) return false;
    if (!g_host_stack_hi) {
        pthread_attr_t at;
        void *lo;
        size_t n;
        pthread_getattr_np(pthread_self(), &at);
        pthread_attr_getstack(&at, &lo, &n);
        pthread_attr_destroy(&at);
        g_host_stack_lo = (uintptr_t)lo;
        g_host_stack_hi = (uintptr_t)lo + n;
    }
    if (a >= g_host_stack_lo && a < g_host_stack_hi) return false;
    const uintptr_t tl[] = {(uintptr_t)&sw_emu_tidx, (uintptr_t)&sw_emu_bidx, (uintptr_t)&sw_emu_bdim,
                            (uintptr_t)&sw_emu_gdim};
    for (uintptr_t t : tl)
        if (a >= t && a < t + sizeof(dim3)) return false;
    if (!g_dyn_smem.empty() && a >= (uintptr_t)g_dyn_smem.data() && a < (uintptr_t)g_dyn_smem.data() + g_dyn_smem.size())
        return false;
    for (const SharedName &s : g_names)
        if (a >= (uintptr_t)s.base && a < (uintptr_t)s.base + s.bytes) return false;
    return true;
}

// true when an access of (block, tid) now is unordered with one of (b, t, epoch) earlier in this launch
bool unordered(long long b, int t, uint64_t epoch) {
    return b != g_block_linear || (t != g_cur->tid && epoch == g_epoch);
}

void global_access(const void *p, int size, bool write, bool atomic) {
    const uintptr_t a = (uintptr_t)p;
    if (!is_global(a)) return;
    GlobalShadow &s = g_global[a];
    if (s.launch != g_launch_id) s = GlobalShadow{g_launch_id};
    const int t = g_cur->tid;
    const char *what = write ? (atomic ? "updates atomically" : "writes") : (atomic ? "reads atomically" : "reads");
    if (s.w_tid >= 0 && !(atomic && s.w_atomic) && unordered(s.w_block, s.w_tid, s.w_epoch) &&
        !(s.w_block == g_block_linear && s.w_tid == t)) {
        sw_emu_report("%s block %lld: race on global memory: thread %d %s %p (%d bytes), written %s by thread %d of "
                      "block %lld in this launch, not ordered by a __syncthreads (%s)", g_kernel, g_block_linear, t,
                      what, p, size, s.w_atomic ? "atomically" : "plainly (non-atomic)", s.w_tid, s.w_block,
                      write ? "a lost update on a GPU" : "a stale or torn read on a GPU");
    } else if (write && s.r_tid != -1 &&
               (s.r_block != g_block_linear || (s.r_epoch == g_epoch && s.r_tid != t))) {
        sw_emu_report("%s block %lld: race on global memory: thread %d %s %p (%d bytes), read (plainly) by %s in this "
                      "launch, not ordered by a __syncthreads", g_kernel, g_block_linear, t, what, p, size,
                      s.r_block != g_block_linear ? "another block" : "another thread of the block");
    }
    if (write) {
        s.w_block = g_block_linear;
        s.w_tid = t;
        s.w_epoch = g_epoch;
        s.w_atomic = atomic;
        s.r_tid = -1;  // later accesses are compared with this write, which is ordered after those reads
        s.r_block = -1;
    } else if (!atomic) {
        if (s.r_tid == -1) {
            s.r_block = g_block_linear;
            s.r_tid = t;
            s.r_epoch = g_epoch;
        } else {
            if (s.r_block != g_block_linear) s.r_block = -2;
            if (s.r_epoch != g_epoch) {
                s.r_epoch = g_epoch;
                s.r_tid = t;
            } else if (s.r_tid != t) {
                s.r_tid = -2;
            }
        }
    }
}
}  // namespace

extern "C" {
void sw_emu_begin_launch(void) {  // called by sw_emu_launch
    ++g_launch_id;
    if (g_global.size() > (1u << 22)) g_global.clear();
}
void __tsan_init(void) {}
void __tsan_func_entry(void *) {}
void __tsan_func_exit(void) {}
#define SW_TSAN_RW(n)                                                                        \
    void __tsan_read##n(void *p) { global_access(p, n, false, false); }                     \
    void __tsan_write##n(void *p) { global_access(p, n, true, false); }                     \
    void __tsan_unaligned_read##n(void *p) { global_access(p, n, false, false); }           \
    void __tsan_unaligned_write##n(void *p) { global_access(p, n, true, false); }           \
    void __tsan_volatile_read##n(void *p) { global_access(p, n, false, false); }            \
    void __tsan_volatile_write##n(void *p) { global_access(p, n, true, false); }
SW_TSAN_RW(1)
SW_TSAN_RW(2)
SW_TSAN_RW(4)
SW_TSAN_RW(8)
SW_TSAN_RW(16)
void __tsan_read_range(void *p, unsigned long n) { global_access(p, (int)n, false, false); }
void __tsan_write_range(void *p, unsigned long n) { global_access(p, (int)n, true, false); }
void __tsan_vptr_update(void **p, void *) { global_access(p, 8, true, false); }
void __tsan_vptr_read(void **p) { global_access(p, 8, false, false); }
// Atomics: performed here (the instrumented code no longer does them), recorded as atomic accesses.
#define SW_TSAN_ATOMIC(bits, T)                                                                          \
    T __tsan_atomic##bits##_load(const volatile T *a, int mo) {                                          \
        global_access((const void *)a, bits / 8, false, true);                                          \
        return __atomic_load_n(a, mo);                                                                   \
    }                                                                                                    \
    void __tsan_atomic##bits##_store(volatile T *a, T v, int mo) {                                       \
        global_access((const void *)a, bits / 8, true, true);                                           \
        __atomic_store_n(a, v, mo);                                                                      \
    }                                                                                                    \
    T __tsan_atomic##bits##_exchange(volatile T *a, T v, int mo) {                                       \
        global_access((const void *)a, bits / 8, true, true);                                           \
        return __atomic_exchange_n(a, v, mo);                                                            \
    }                                                                                                    \
    T __tsan_atomic##bits##_fetch_add(volatile T *a, T v, int mo) {                                      \
        global_access((const void *)a, bits / 8, true, true);                                           \
        return __atomic_fetch_add(a, v, mo);                                                             \
    }                                                                                                    \
    int __tsan_atomic##bits##_compare_exchange_strong(volatile T *a, T *c, T v, int mo, int fmo) {        \
        global_access((const void *)a, bits / 8, true, true);                                           \
        return __atomic_compare_exchange_n(a, c, v, false, mo, fmo);                                     \
    }                                                                                                    \
    int __tsan_atomic##bits##_compare_exchange_weak(volatile T *a, T *c, T v, int mo, int fmo) {          \
        global_access((const void *)a, bits / 8, true, true);                                           \
        return __atomic_compare_exchange_n(a, c, v, true, mo, fmo);                                      \
    }
SW_TSAN_ATOMIC(8, char)
SW_TSAN_ATOMIC(16, short)
SW_TSAN_ATOMIC(32, int)
SW_TSAN_ATOMIC(64, long long)
void __tsan_atomic_thread_fence(int mo) { __atomic_thread_fence(mo); }
void __tsan_atomic_signal_fence(int mo) { __atomic_signal_fence(mo); }
}  // extern "C"
