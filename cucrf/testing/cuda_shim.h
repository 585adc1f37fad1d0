// cuda_shim.h -- lets g++ compile CUDA C kernel source for the CPU emulator
// (cucrf.testing.emulator).  Every CUDA thread of a block runs as its own
// fibre; __syncthreads and warp primitives switch fibres under a small
// scheduler.  Shared memory is `thread_local` (all fibres of a block share
// one OS thread), the one storage class valid both for block-scope
// `__shared__ T a[N]` and `extern __shared__ T a[]`.
#pragma once
#if !defined(__x86_64__)
#error "the cucrf CUDA emulator supports x86-64 only"
#endif
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <link.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <type_traits>
#include <utility>
#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __constant__
#define __managed__
#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
#define CUEMU 1
#define CUEMU_EXPORT extern "C" __attribute__((visibility("default")))
#ifndef CUEMU_MAX_DYN_SMEM
#define CUEMU_MAX_DYN_SMEM (227 * 1024)
#endif

// ---------------------------------------------------------------- types
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};
#define CUEMU_VEC(T, N2, N3, N4, A2, A4)                                                     \
  struct __attribute__((aligned(A2))) N2 { T x, y; };                                       \
  struct N3 { T x, y, z; };                                                                 \
  struct __attribute__((aligned(A4))) N4 { T x, y, z, w; };                                 \
  inline N2 make_##N2(T x, T y) { return {x, y}; }                                          \
  inline N3 make_##N3(T x, T y, T z) { return {x, y, z}; }                                  \
  inline N4 make_##N4(T x, T y, T z, T w) { return {x, y, z, w}; }
CUEMU_VEC(float, float2, float3, float4, 8, 16)
CUEMU_VEC(double, double2, double3, double4, 16, 32)
CUEMU_VEC(int, int2, int3, int4, 8, 16)
CUEMU_VEC(long long, longlong2, longlong3, longlong4, 16, 32)
#undef CUEMU_VEC
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// Built-in variables: plain globals that the scheduler sets before it resumes
// a fibre (cheaper than thread_local and each fibre sees its own value).
inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- math
using std::isfinite;
using std::isinf;
using std::isnan;
using std::signbit;
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __saturatef(float a) { return a < 0.f ? 0.f : (a > 1.f ? 1.f : a); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
template <class To, class From> inline To cuemu_bits(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
  To r; std::memcpy(&r, &v, sizeof r); return r;
}
inline float __int_as_float(int v) { return cuemu_bits<float>(v); }
inline int __float_as_int(float v) { return cuemu_bits<int>(v); }
inline float __uint_as_float(unsigned v) { return cuemu_bits<float>(v); }
inline unsigned __float_as_uint(float v) { return cuemu_bits<unsigned>(v); }
inline double __longlong_as_double(long long v) { return cuemu_bits<double>(v); }
inline long long __double_as_longlong(double v) { return cuemu_bits<long long>(v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __clz(int v) { return v ? __builtin_clz((unsigned)v) : 32; }
inline int __ffs(int v) { return __builtin_ffs(v); }
// CUDA's min/max accept mixed argument types; fmin/fmax keep CUDA's NaN rule.
template <class A, class B> inline std::common_type_t<A, B> min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmin(C(a), C(b));
  else return C(a) < C(b) ? C(a) : C(b);
}
template <class A, class B> inline std::common_type_t<A, B> max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return std::fmax(C(a), C(b));
  else return C(a) < C(b) ? C(b) : C(a);
}
template <class T> inline T __ldg(const T* p) { return *p; }

// Blocks run one at a time on one OS thread: atomics are plain updates.
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; *p = o < v ? v : o; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <class T> inline T atomicCAS(T* p, T c, T v) { T o = *p; if (o == c) *p = v; return o; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---------------------------------------------------------------- scheduler
extern "C" void cuemu_switch(void** save_sp, void* new_sp);
// Minimal x86-64 context switch (callee-saved registers only): swapcontext
// would also make a sigprocmask syscall per switch.
asm(R"(
  .text
  .p2align 4
  .hidden cuemu_switch
  .type cuemu_switch,@function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
)");
extern thread_local unsigned char cuemu_dyn_smem_ref[] asm("cuemu_dyn_smem");

namespace cuemu {
enum State : unsigned char { RUN, BAR, WARP, DONE };
enum Op : int { SYNCWARP, SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR, BALLOT, ANY, ALL };
struct Fibre {
  void* sp; char* stack; void* fake = nullptr;
  uint3 tid; State st; int line, op, arg, width, pred;
  unsigned mask; unsigned long long val, res;
};
constexpr size_t kStack = 256 * 1024;
struct Launch {
  void (*thunk)(void**) = nullptr; void** params = nullptr;
  Fibre* fib = nullptr; char* stacks = nullptr; int n = 0, cur = -1, cap = 0;
  void* sched_sp = nullptr; void* sched_fake = nullptr;
  const void* sched_bottom = nullptr; size_t sched_size = 0;
  int n_alive = 0, n_bar = 0, n_done = 0, bar_result = 0;
  bool failed = false, dirty = false; char* err = nullptr; int errlen = 0;
};
inline Launch g;

template <class... Args> inline void fail(const char* fmt, Args... a) {
  if (!g.failed && g.err) std::snprintf(g.err, g.errlen, fmt, a...);
  g.failed = true;
}

inline void to_scheduler(Fibre& f) {
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(f.st == DONE ? nullptr : &f.fake, g.sched_bottom, g.sched_size);
#endif
  cuemu_switch(&f.sp, g.sched_sp);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(f.fake, nullptr, nullptr);
#endif
}

[[noreturn]] inline void fibre_main() {
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(nullptr, &g.sched_bottom, &g.sched_size);
#endif
  g.thunk(g.params);
  Fibre& f = g.fib[g.cur];
  f.st = DONE;
  to_scheduler(f);
  __builtin_trap();  // a finished fibre is never resumed
}

inline void resume(int i) {
  Fibre& f = g.fib[i];
  g.cur = i;
  threadIdx = f.tid;
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(&g.sched_fake, f.stack, kStack);
#endif
  cuemu_switch(&g.sched_sp, f.sp);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(g.sched_fake, nullptr, nullptr);
#endif
}

inline bool ensure_stacks(int n) {
  if (n <= g.cap) return true;
  if (g.stacks) { munmap(g.stacks, kStack * g.cap); delete[] g.fib; }
  g.cap = 0;
  void* m = mmap(nullptr, kStack * n, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (m == MAP_FAILED) { fail("cannot map %d fibre stacks", n); return false; }
  g.stacks = static_cast<char*>(m);
  for (int i = 0; i < n; ++i) mprotect(g.stacks + kStack * i, 4096, PROT_NONE);  // guard page
  g.fib = new Fibre[n];
  g.cap = n;
  return true;
}

// -------- warp primitives: a warp-level rendezvous resolved by the scheduler
inline unsigned alive_mask(int w) {
  unsigned m = 0;
  for (int l = 0; l < 32 && w * 32 + l < g.n; ++l)
    if (g.fib[w * 32 + l].st != DONE) m |= 1u << l;
  return m;
}
inline int shfl_src(int op, int lane, int arg, int width) {
  int base = lane & ~(width - 1), rel = lane & (width - 1);
  switch (op) {
    case SHFL_IDX: return base + (arg & (width - 1));
    case SHFL_UP: return rel < arg ? lane : lane - arg;
    case SHFL_DOWN: return rel + arg >= width ? lane : lane + arg;
    case SHFL_XOR: { int s = lane ^ arg; return s >= base + width ? lane : s; }
  }
  return lane;
}
// Completes the pending warp operation of warp w if every non-exited lane
// named in its mask has arrived.
inline void try_warp(int w) {
  Fibre* F = g.fib + w * 32;
  int nl = std::min(32, g.n - w * 32);
  unsigned alive = alive_mask(w);
  for (int l = 0; l < nl; ++l) {
    if (F[l].st != WARP) continue;
    unsigned need = F[l].mask & alive, have = 0;
    for (int k = 0; k < nl; ++k) {
      if (!(need >> k & 1u)) continue;
      if (F[k].st == WARP) {
        if (F[k].mask != F[l].mask || F[k].op != F[l].op)
          return fail("divergent warp operations in warp %d: lane %d (line %d, mask 0x%08x) and "
                      "lane %d (line %d, mask 0x%08x)", w, l, F[l].line, F[l].mask, k, F[k].line, F[k].mask);
        have |= 1u << k;
      }
    }
    if (have != need) continue;
    unsigned ballot = 0;
    for (int k = 0; k < nl; ++k) if ((have >> k & 1u) && F[k].pred) ballot |= 1u << k;
    for (int k = 0; k < nl; ++k) {
      if (!(have >> k & 1u)) continue;
      Fibre& f = F[k];
      if (f.op >= SHFL_IDX && f.op <= SHFL_XOR) {
        int s = shfl_src(f.op, k, f.arg, f.width);
        if (s < 0 || s >= 32 || !(have >> s & 1u)) {
          const char* why = s >= nl ? "does not exist (partial warp)"
                            : (s < nl && F[s].st == DONE) ? "has exited" : "is not in the mask";
          return fail("warp shuffle at line %d: lane %d of warp %d reads lane %d, which %s",
                      f.line, k, w, s, why);
        }
        f.res = F[s].val;
      } else if (f.op == BALLOT) f.res = ballot;
      else if (f.op == ANY) f.res = ballot != 0;
      else if (f.op == ALL) f.res = ballot == have;
      f.st = RUN;
    }
  }
}

inline Fibre& current(const char* what, int line) {
  if (g.cur < 0) { std::fprintf(stderr, "cuemu: %s (line %d) called outside a kernel\n", what, line); std::abort(); }
  return g.fib[g.cur];
}

inline unsigned long long warp_op(int op, unsigned mask, unsigned long long val, int arg, int width,
                                  int pred, int line) {
  Fibre& f = current("warp primitive", line);
  int lane = g.cur % 32;
  if (!(mask >> lane & 1u)) {
    fail("warp primitive at line %d: lane %d (thread %d) is not in its own mask 0x%08x", line, lane, g.cur, mask);
  } else if (width < 1 || width > 32 || (width & (width - 1))) {
    fail("warp shuffle at line %d: width %d is not a power of two in [1, 32]", line, width);
  }
  f.st = WARP; f.op = op; f.mask = mask; f.val = val; f.arg = arg; f.width = width; f.pred = pred; f.line = line;
  to_scheduler(f);
  return f.res;
}

template <class T> inline T shfl(int op, unsigned mask, T v, int arg, int width, int line) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffle of an unsupported type");
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = warp_op(op, mask, bits, arg, width, 0, line);
  T r; std::memcpy(&r, &bits, sizeof(T));
  return r;
}

inline int syncthreads(int line, int pred) {
  Fibre& f = current("__syncthreads", line);
  f.st = BAR; f.line = line; f.pred = pred != 0;
  to_scheduler(f);
  return g.bar_result;
}

// Runs one block; returns false on an error (message in g.err).
inline bool run_block(bool reverse) {
  const int n = g.n;
  for (int i = 0; i < n; ++i) {
    Fibre& f = g.fib[i];
    f.stack = g.stacks + kStack * i;
#ifdef __SANITIZE_ADDRESS__
    if (g.dirty) __asan_unpoison_memory_region(f.stack + 4096, kStack - 4096);
#endif
    // Initial frame: six zeroed callee-saved registers, then the entry point
    // as return address at a 16-byte aligned slot (ABI alignment on entry).
    void** top = reinterpret_cast<void**>(f.stack + kStack) - 2;
    top[0] = reinterpret_cast<void*>(&fibre_main);
    top[1] = nullptr;
    for (int r = 1; r <= 6; ++r) top[-r] = nullptr;
    f.sp = top - 6;
    unsigned lin = i;
    f.tid = {lin % blockDim.x, lin / blockDim.x % blockDim.y, lin / (blockDim.x * blockDim.y)};
    f.st = RUN; f.line = 0;
  }
  g.dirty = false;
  g.n_alive = n; g.n_bar = 0; g.n_done = 0;
  while (g.n_alive > 0) {
    bool ran = false;
    for (int k = 0; k < n; ++k) {
      int i = reverse ? n - 1 - k : k;
      if (g.fib[i].st != RUN) continue;
      ran = true;
      resume(i);
      if (g.failed) return false;
      Fibre& f = g.fib[i];
      if (f.st == DONE) { --g.n_alive; ++g.n_done; }
      if (f.st == BAR) ++g.n_bar;
      if (f.st == DONE || f.st == WARP) { try_warp(i / 32); if (g.failed) return false; }
      if (g.n_bar > 0 && g.n_bar == g.n_alive) {
        int line = -1, cnt = 0;
        for (int t = 0; t < n; ++t) {
          Fibre& b = g.fib[t];
          if (b.st != BAR) continue;
          if (line >= 0 && b.line != line) {
            fail("threads wait at different __syncthreads (lines %d and %d)", line, b.line);
            return false;
          }
          line = b.line; cnt += b.pred;
        }
        if (g.n_done > 0) {
          fail("__syncthreads at line %d reached by %d of %d threads; %d threads had already exited "
               "(barrier after an early return?)", line, g.n_bar, n, g.n_done);
          return false;
        }
        g.bar_result = cnt;
        for (int t = 0; t < n; ++t) if (g.fib[t].st == BAR) g.fib[t].st = RUN;
        g.n_bar = 0;
      }
    }
    if (!ran && g.n_alive > 0) {
      int nb = 0, nw = 0, lw = -1, lb = -1;
      for (int t = 0; t < n; ++t) {
        if (g.fib[t].st == BAR) { ++nb; lb = g.fib[t].line; }
        if (g.fib[t].st == WARP) { ++nw; lw = g.fib[t].line; }
      }
      fail("deadlock: %d threads wait at __syncthreads (line %d), %d at a warp primitive (line %d) "
           "that never completes (a lane named in the mask is blocked elsewhere)", nb, lb, nw, lw);
      return false;
    }
  }
  return true;
}

// Shared memory lives in this module's TLS block: find it to poison it.
struct TlsInfo { void* base; size_t size; };
inline int tls_cb(dl_phdr_info* info, size_t, void* data) {
  Dl_info self;
  dladdr(reinterpret_cast<void*>(&tls_cb), &self);
  if (reinterpret_cast<void*>(info->dlpi_addr) != self.dli_fbase) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i)
    if (info->dlpi_phdr[i].p_type == PT_TLS) {
      *static_cast<TlsInfo*>(data) = {info->dlpi_tls_data, info->dlpi_phdr[i].p_memsz};
      return 1;
    }
  return 1;
}
inline TlsInfo tls_block() {
  volatile unsigned char touch = cuemu_dyn_smem_ref[0];  // allocate this thread's TLS block
  (void)touch;
  TlsInfo t{nullptr, 0};
  dl_iterate_phdr(&tls_cb, &t);
  return t;
}

// Fills shared memory with 0xFF bytes: NaN as float/double, -1 as int.
inline void poison_shared(const TlsInfo& t, size_t dyn) {
  unsigned char* d = cuemu_dyn_smem_ref;
  unsigned char* b = static_cast<unsigned char*>(t.base);
#ifdef __SANITIZE_ADDRESS__
  __asan_unpoison_memory_region(d, CUEMU_MAX_DYN_SMEM);
#endif
  if (b && b < d) std::memset(b, 0xFF, d - b);
  if (b && d + CUEMU_MAX_DYN_SMEM < b + t.size)
    std::memset(d + CUEMU_MAX_DYN_SMEM, 0xFF, b + t.size - d - CUEMU_MAX_DYN_SMEM);
  // Also a margin past the requested size: an off-by-one read gives NaN.
  std::memset(d, 0xFF, std::min<size_t>(dyn + 4096, CUEMU_MAX_DYN_SMEM));
#ifdef __SANITIZE_ADDRESS__
  // Reads past the requested dynamic size are reported as use-after-poison.
  __asan_poison_memory_region(d + dyn, CUEMU_MAX_DYN_SMEM - dyn);
#endif
}

// cfg: grid xyz, block xyz, dynamic shared bytes, reverse flag.
inline int launch(const long long* cfg, void (*thunk)(void**), void** params, char* err, int errlen) {
  g.err = err; g.errlen = errlen; g.failed = false;
  if (err && errlen) err[0] = 0;
  gridDim = dim3(cfg[0], cfg[1], cfg[2]);
  blockDim = dim3(cfg[3], cfg[4], cfg[5]);
  size_t dyn = cfg[6];
  bool reverse = cfg[7] != 0;
  if (dyn > CUEMU_MAX_DYN_SMEM) { fail("dynamic shared memory %zu exceeds %d", dyn, CUEMU_MAX_DYN_SMEM); return 1; }
  g.thunk = thunk; g.params = params;
  g.n = blockDim.x * blockDim.y * blockDim.z;
  if (!ensure_stacks(g.n)) return 1;
  TlsInfo t = tls_block();
  long long nb = (long long)gridDim.x * gridDim.y * gridDim.z;
  for (long long k = 0; k < nb && !g.failed; ++k) {
    long long b = reverse ? nb - 1 - k : k;
    blockIdx = {unsigned(b % gridDim.x), unsigned(b / gridDim.x % gridDim.y),
                unsigned(b / ((long long)gridDim.x * gridDim.y))};
    poison_shared(t, dyn);
    if (!run_block(reverse)) {
      char tmp[64];
      std::snprintf(tmp, sizeof tmp, " [block (%u,%u,%u)]", blockIdx.x, blockIdx.y, blockIdx.z);
      if (err) std::strncat(err, tmp, errlen - std::strlen(err) - 1);
    }
  }
  g.cur = -1;
  if (g.failed) g.dirty = true;  // abandoned fibres leave stale ASan stack poison
  return g.failed ? 1 : 0;
}

inline long long static_shared_bytes() {
  TlsInfo t = tls_block();
  return t.size > CUEMU_MAX_DYN_SMEM ? (long long)(t.size - CUEMU_MAX_DYN_SMEM) : 0;
}

// Calls the kernel reading each parameter as CUDA reads its parameter buffer.
template <class... A, size_t... I>
inline void invoke_impl(void (*f)(A...), void** p, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}
template <class... A> inline void invoke(void (*f)(A...), void** p) {
  invoke_impl(f, p, std::index_sequence_for<A...>{});
}
// out = [nparams, size0, is_pointer0, size1, is_pointer1, ...]
template <class... A> inline void meta(void (*)(A...), long long* out) {
  out[0] = sizeof...(A);
  int i = 0;
  ((out[1 + 2 * i] = sizeof(A), out[2 + 2 * i] = std::is_pointer_v<A>, ++i), ...);
}
}  // namespace cuemu

// ---------------------------------------------------------------- CUDA API
#define __syncthreads() ::cuemu::syncthreads(__LINE__, 1)
#define __syncthreads_count(p) ::cuemu::syncthreads(__LINE__, (p))
#define __syncthreads_or(p) (::cuemu::syncthreads(__LINE__, (p)) != 0)
#define __syncthreads_and(p) (::cuemu::syncthreads(__LINE__, (p)) == (int)(blockDim.x * blockDim.y * blockDim.z))
#define __syncwarp(...) ::cuemu::syncwarp(__LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_sync(m, v, s, ...) ::cuemu::shfl(::cuemu::SHFL_IDX, (m), (v), (s), ::cuemu::width_arg(__VA_ARGS__), __LINE__)
#define __shfl_up_sync(m, v, d, ...) ::cuemu::shfl(::cuemu::SHFL_UP, (m), (v), (d), ::cuemu::width_arg(__VA_ARGS__), __LINE__)
#define __shfl_down_sync(m, v, d, ...) ::cuemu::shfl(::cuemu::SHFL_DOWN, (m), (v), (d), ::cuemu::width_arg(__VA_ARGS__), __LINE__)
#define __shfl_xor_sync(m, v, x, ...) ::cuemu::shfl(::cuemu::SHFL_XOR, (m), (v), (x), ::cuemu::width_arg(__VA_ARGS__), __LINE__)
#define __ballot_sync(m, p) ((unsigned)::cuemu::warp_op(::cuemu::BALLOT, (m), 0, 0, 32, (p) != 0, __LINE__))
#define __any_sync(m, p) ((int)::cuemu::warp_op(::cuemu::ANY, (m), 0, 0, 32, (p) != 0, __LINE__))
#define __all_sync(m, p) ((int)::cuemu::warp_op(::cuemu::ALL, (m), 0, 0, 32, (p) != 0, __LINE__))
namespace cuemu {
inline int width_arg() { return 32; }
inline int width_arg(int w) { return w; }
inline void syncwarp(int line, unsigned mask = 0xffffffffu) { warp_op(SYNCWARP, mask, 0, 0, 32, 0, line); }
}  // namespace cuemu
inline unsigned __activemask() { return ::cuemu::alive_mask(::cuemu::g.cur / 32); }
inline unsigned __lanemask_lt() { return (1u << (::cuemu::g.cur % 32)) - 1u; }
