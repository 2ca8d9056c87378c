// The SIMT emulator's scheduler, warp collectives and emulated CUDA runtime (see simt_emu.h).
#include "kernels/cuda/emu/simt_emu.h"

#include <sys/mman.h>
// The assembly switch on x86-64; ucontext elsewhere, or when KILN_EMU_UCONTEXT is defined (how that path is
// tried on x86-64).
#if defined(__x86_64__) && !defined(KILN_EMU_UCONTEXT)
#define KILN_EMU_ASM_SWITCH 1
#else
#define KILN_EMU_ASM_SWITCH 0
#include <ucontext.h>
#endif
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#include <sanitizer/asan_interface.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"

// ---- Fiber switching ----
// glibc's swapcontext saves and restores the signal mask with a system call on every switch: that was about
// three quarters of the emulator's time (a barrier in a 256-thread block is 512 switches). On x86-64 a switch
// here pushes the callee-saved registers and the SSE / x87 control words on the old stack, stores its stack
// pointer and pops the same from the new one; a new fiber's stack is laid out as if it had switched away at
// the start of kiln_emu_fiber_start, which calls the entry function held in rbx.
#if KILN_EMU_ASM_SWITCH
extern "C" void kiln_emu_switch(void** save_sp, void* load_sp);
extern "C" void kiln_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .globl kiln_emu_switch
  .hidden kiln_emu_switch
  .type kiln_emu_switch, @function
kiln_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr 8(%rsp)
  fnstcw 12(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr 8(%rsp)
  fldcw 12(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size kiln_emu_switch, .-kiln_emu_switch

  .p2align 4
  .globl kiln_emu_fiber_start
  .hidden kiln_emu_fiber_start
  .type kiln_emu_fiber_start, @function
kiln_emu_fiber_start:
  callq *%rbx
  ud2
  .size kiln_emu_fiber_start, .-kiln_emu_fiber_start
)");
#endif

namespace kiln::emu {
std::atomic<int64_t> g_mallocs{0};
namespace {

#if KILN_EMU_ASM_SWITCH
struct Context {
  void* sp = nullptr;
};
// A context that starts entry() (which must never return) on [stack, stack + bytes).
void context_init(Context& c, char* stack, size_t bytes, void (*entry)()) {
  auto top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  // kiln_emu_switch's frame: 8 bytes unused, mxcsr, x87 control word, r15 r14 r13 r12 rbx rbp, return address;
  // after its ret the stack pointer is 16-byte aligned, as the call in kiln_emu_fiber_start needs.
  auto* frame = reinterpret_cast<uint64_t*>(top - 88);
  std::memset(frame, 0, 88);
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpcw));
  std::memcpy(reinterpret_cast<char*>(frame) + 8, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(frame) + 12, &fpcw, 2);
  frame[6] = reinterpret_cast<uint64_t>(entry);  // rbx
  frame[8] = reinterpret_cast<uint64_t>(&kiln_emu_fiber_start);
  c.sp = frame;
}
void context_switch(Context& from, Context& to) { kiln_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void context_init(Context& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSlotBytes = 64;
constexpr size_t kMaxSmem = 227 * 1024;  // Hopper's per-block opt-in limit

struct AsyncCopy {
  void* dst;
  const void* src;
  int src_bytes;
};

struct Fiber {
  Context ctx;
  void* fake_stack = nullptr;  // AddressSanitizer's, while the fiber is switched out
  std::vector<AsyncCopy> open;                     // issued, not yet committed
  std::vector<std::vector<AsyncCopy>> committed;  // oldest first
  dim3 tid;
  int linear = 0;
  bool done = false;
  char* stack = nullptr;
};

struct Warp {
  int live = 0, arrived = 0;
  uint64_t gen = 0;
  const char* what = nullptr;
  size_t bytes = 0;
  // Each lane's value at lane * bytes, so a lane reads all 32 in one copy; two buffers, by generation, so a
  // lane that arrives at the next exchange does not overwrite what a slower lane is still reading.
  alignas(16) unsigned char slot[2][32 * kSlotBytes];
};

// One OS thread's emulation state: the block it is running and the fibers that run it.
// Race shadow of one 16-byte shared-memory chunk: the barrier epoch and warp of its last cp.async write and
// of its ldmatrix reads in the current epoch.
struct Shadow {
  uint64_t w_epoch = ~0ull, r_epoch = ~0ull;
  int w_warp = -1, r_warp = -1;
  bool r_many = false;
};

struct Runner {
  dim3 bidx, bdim, gdim;
  std::vector<unsigned char> smem;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int live = 0, bar_arrived = 0;
  uint64_t bar_gen = 0, events = 0;
  Context sched;
  const void* sched_stack = nullptr;  // the OS thread's stack, for AddressSanitizer's fiber annotations
  size_t sched_stack_bytes = 0;
  Fiber* cur = nullptr;
  const std::function<void()>* body = nullptr;
  std::string failure;  // set by a fiber that found a bug; the scheduler throws it
};

// The fiber stacks of one OS thread, kept from launch to launch: mapping them afresh for every launch made each
// launch fault in every stack page it touched again.
struct StackPool {
  char* base = nullptr;
  size_t count = 0;
  bool parked = false;  // a failed block left fibers parked mid-call on these stacks

  ~StackPool() {
    if (base) munmap(base, count * kStackBytes);
  }
  char* stacks(size_t n) {
    if (n > count) {
      if (base) munmap(base, count * kStackBytes);
      void* p = mmap(nullptr, n * kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                     -1, 0);
      KILN_CHECK(p != MAP_FAILED, "SIMT emulator: cannot map ", n, " fiber stacks");
      base = static_cast<char*>(p);
      count = n;
    } else if (parked) {
#if defined(__SANITIZE_ADDRESS__)
      // The parked frames' redzones are still poisoned where the next fibers' frames will be.
      __asan_unpoison_memory_region(base, count * kStackBytes);
#endif
    }
    parked = false;
    return base;
  }
};
thread_local StackPool t_stacks;

thread_local Runner* t_runner = nullptr;
std::atomic<int64_t> g_bank_conflicts{0};

Runner& runner() {
  if (t_runner == nullptr) {
    std::fprintf(stderr, "SIMT emulator: a device function was called outside a kernel launch\n");
    std::abort();
  }
  return *t_runner;
}

// Switches between the scheduler and a fiber, telling AddressSanitizer which stack is live (without it, it
// takes the fiber's frames for the OS thread's and reports them).
void enter_fiber(Runner& r, Fiber& f) {
#if defined(__SANITIZE_ADDRESS__)
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  context_switch(r.sched, f.ctx);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}
void leave_fiber(Runner& r, bool for_good) {
  Fiber& f = *r.cur;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_start_switch_fiber(for_good ? nullptr : &f.fake_stack, r.sched_stack, r.sched_stack_bytes);
#endif
  context_switch(f.ctx, r.sched);
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.sched_stack, &r.sched_stack_bytes);
#endif
}
void yield(Runner& r) { leave_fiber(r, false); }

// A bug found inside a fiber: record it and park the fiber for good (the scheduler stops the launch).
[[noreturn]] void fiber_fail(Runner& r, std::string msg) {
  if (r.failure.empty()) r.failure = std::move(msg);
  for (;;) yield(r);
}

void note_smem_write(const void* p);

void perform(const std::vector<AsyncCopy>& copies) {
  for (const AsyncCopy& c : copies) {
    note_smem_write(c.dst);
    std::memset(c.dst, 0, 16);
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
  }
}

void fiber_entry() {
  Runner& r = *t_runner;
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, &r.sched_stack, &r.sched_stack_bytes);
#endif
  (*r.body)();
  Fiber& f = *r.cur;
  for (const auto& g : f.committed) perform(g);
  perform(f.open);
  f.done = true;
  r.live--;
  r.events++;
  // A thread that exits no longer counts towards barriers it has not reached.
  if (r.bar_arrived > 0 && r.bar_arrived == r.live) {
    r.bar_arrived = 0;
    r.bar_gen++;
  }
  Warp& w = r.warps[f.linear / 32];
  w.live--;
  if (w.arrived > 0 && w.arrived == w.live) {
    w.arrived = 0;
    w.gen++;
  }
  leave_fiber(r, true);  // never resumed
}

std::string thread_name(const Fiber& f, const Runner& r) {
  return str("block (", r.bidx.x, ",", r.bidx.y, ",", r.bidx.z, ") thread (", f.tid.x, ",", f.tid.y, ",", f.tid.z,
             ")");
}

void run_block(Runner& r) {
  const int n = int(r.bdim.x * r.bdim.y * r.bdim.z);
  // Shared memory starts as NaN bytes, so a read before a write poisons the result instead of passing.
  if (r.smem_bytes) std::memset(r.smem.data(), 0xff, r.smem_bytes);
  r.shadow.assign((r.smem_bytes + 15) / 16, Shadow{});
  r.bar_gen = 0;
  r.fibers.assign(size_t(n), Fiber{});
  r.warps.assign(size_t((n + 31) / 32), Warp{});
  for (int i = 0; i < n; i++) r.warps[size_t(i / 32)].live++;
  r.live = n;
  r.bar_arrived = 0;
  char* stacks = t_stacks.stacks(size_t(n));
  for (int i = 0; i < n; i++) {
    Fiber& f = r.fibers[size_t(i)];
    f.linear = i;
    f.tid = dim3(unsigned(i) % r.bdim.x, (unsigned(i) / r.bdim.x) % r.bdim.y, unsigned(i) / (r.bdim.x * r.bdim.y));
    f.stack = stacks + size_t(i) * kStackBytes;
#if defined(__SANITIZE_ADDRESS__)
    // The previous fiber on this stack switched away for good from inside fiber_entry, whose frames' redzones
    // are still poisoned: clear the top of the stack, where they and the new fiber's first frame lie.
    __asan_unpoison_memory_region(f.stack + kStackBytes - 8192, 8192);
#endif
    // Stack tops 256 KiB apart would all fall in the same cache sets: each fiber's starts a line further in.
    context_init(f.ctx, f.stack, kStackBytes - size_t(i % 64) * 64, fiber_entry);
  }
  while (r.live > 0) {
    uint64_t before = r.events;
    for (Fiber& f : r.fibers) {
      if (f.done) continue;
      r.cur = &f;
      enter_fiber(r, f);
      if (!r.failure.empty()) {
        t_stacks.parked = true;
        fail(r.failure);
      }
    }
    if (r.live > 0 && r.events == before) {
      const Fiber* waiting = nullptr;
      for (const Fiber& f : r.fibers)
        if (!f.done) waiting = &f;
      fail("SIMT emulator: deadlock in block (", r.bidx.x, ",", r.bidx.y, ",", r.bidx.z, "): ", r.live,
           " threads wait at a barrier or warp collective that the others never reach (e.g. ",
           thread_name(*waiting, r), ")");
    }
  }
}

// Graph capture: launches and copies on a capturing stream are recorded instead of run.
struct StreamState {
  bool capturing = false;
  std::vector<std::function<void()>> recorded;
};
}  // namespace
}  // namespace kiln::emu

struct CUstream_st {
  kiln::emu::StreamState st;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point t;
};
struct CUgraph_st {
  std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> ops;
};

namespace kiln::emu {
namespace {
CUstream_st g_default_stream;
CUstream_st* stream_of(cudaStream_t s) { return s ? s : &g_default_stream; }

// Runs op now, or records it if the stream is capturing.
cudaError_t on_stream(cudaStream_t s, std::function<void()> op) {
  CUstream_st* st = stream_of(s);
  if (st->st.capturing)
    st->st.recorded.push_back(std::move(op));
  else
    op();
  return cudaSuccess;
}
}  // namespace

const dim3& thread_idx() { return runner().cur->tid; }
const dim3& block_idx() { return runner().bidx; }
const dim3& block_dim() { return runner().bdim; }
const dim3& grid_dim() { return runner().gdim; }
char* block_smem() { return reinterpret_cast<char*>(runner().smem.data()); }

void syncthreads() {
  Runner& r = runner();
  uint64_t gen = r.bar_gen;
  r.events++;
  if (++r.bar_arrived == r.live) {
    r.bar_arrived = 0;
    r.bar_gen++;
    return;
  }
  while (r.bar_gen == gen) yield(r);
}

void warp_exchange(const void* mine, void* all, size_t bytes, const char* what) {
  Runner& r = runner();
  if (bytes > kSlotBytes) fiber_fail(r, str("SIMT emulator: ", what, " exchanges more than 64 bytes"));
  Warp& w = r.warps[size_t(r.cur->linear / 32)];
  const int lane = r.cur->linear & 31;
  const uint64_t gen = w.gen;
  const int buf = int(gen & 1);
  if (w.arrived == 0) {
    w.what = what;
    w.bytes = bytes;
  } else if (w.what != what && std::strcmp(w.what, what) != 0) {
    fiber_fail(r, str("SIMT emulator: warp divergence in block (", r.bidx.x, ",", r.bidx.y, ",", r.bidx.z, "): ",
                      thread_name(*r.cur, r), " is at ", what, " while its warp is at ", w.what));
  } else if (w.bytes != bytes) {
    fiber_fail(r, str("SIMT emulator: ", what, " exchanges ", bytes, " bytes in ", thread_name(*r.cur, r),
                      " and ", w.bytes, " in another lane of its warp"));
  }
  std::memcpy(w.slot[buf] + size_t(lane) * bytes, mine, bytes);
  r.events++;
  if (++w.arrived == w.live) {
    w.arrived = 0;
    w.gen++;
  } else {
    while (w.gen == gen) yield(r);
  }
  std::memcpy(all, w.slot[buf], 32 * bytes);
}

void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  Runner& r = runner();
  auto a = reinterpret_cast<uintptr_t>(p);
  auto lo = reinterpret_cast<uintptr_t>(r.smem.data());
  if (a < lo || a + bytes > lo + r.smem_bytes)
    fiber_fail(r, str("SIMT emulator: ", what, " at shared offset ", int64_t(a - lo), " (+", bytes,
                      " bytes) outside the block's ", r.smem_bytes, " bytes of shared memory, ",
                      thread_name(*r.cur, r)));
  if (a % align != 0)
    fiber_fail(r, str("SIMT emulator: ", what, " address not ", align, "-byte aligned, ", thread_name(*r.cur, r)));
}

// racecheck's stand-in for the accesses that go through the emulator (cp.async writes, ldmatrix reads): two
// warps touching one 16-byte chunk between the same pair of __syncthreads, at least one of them writing, is a
// hazard whatever order the hardware happens to run them in. (Plain loads and stores are not tracked.)
namespace {
Shadow& shadow_of(Runner& r, const void* p) {
  return r.shadow[size_t(static_cast<const unsigned char*>(p) - r.smem.data()) / 16];
}
[[noreturn]] void race(Runner& r, const void* p, const char* what, int other_warp) {
  fiber_fail(r, str("SIMT emulator: shared-memory race at offset ",
                    static_cast<const unsigned char*>(p) - r.smem.data(), ": warp ", r.cur->linear / 32, " ", what,
                    " warp ", other_warp, " with no __syncthreads between (", thread_name(*r.cur, r), ")"));
}

void note_smem_write(const void* p) {
  Runner& r = runner();
  Shadow& sh = shadow_of(r, p);
  const int warp = r.cur->linear / 32;
  if (sh.r_epoch == r.bar_gen && (sh.r_many || sh.r_warp != warp)) race(r, p, "writes (cp.async) what is read by", sh.r_warp);
  if (sh.w_epoch == r.bar_gen && sh.w_warp != warp) race(r, p, "writes (cp.async) what is written by", sh.w_warp);
  sh.w_epoch = r.bar_gen;
  sh.w_warp = warp;
}

void note_smem_read(const void* p) {
  Runner& r = runner();
  Shadow& sh = shadow_of(r, p);
  const int warp = r.cur->linear / 32;
  if (sh.w_epoch == r.bar_gen && sh.w_warp != warp) race(r, p, "reads (ldmatrix) what is written (cp.async) by", sh.w_warp);
  if (sh.r_epoch != r.bar_gen) {
    sh.r_epoch = r.bar_gen;
    sh.r_warp = warp;
    sh.r_many = false;
  } else if (sh.r_warp != warp) {
    sh.r_many = true;
  }
}
}  // namespace

void cp_async(void* smem_dst, const void* gmem_src, int src_bytes) {
  Runner& r = runner();
  check_smem(smem_dst, 16, 16, "cp.async destination");
  if (src_bytes < 0 || src_bytes > 16) fiber_fail(r, str("SIMT emulator: cp.async of ", src_bytes, " bytes"));
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0)
    fiber_fail(r, str("SIMT emulator: cp.async source not 16-byte aligned, ", thread_name(*r.cur, r)));
  note_smem_write(smem_dst);  // the hardware may write any time from now until the wait
  r.cur->open.push_back({smem_dst, gmem_src, src_bytes});
}
void cp_async_commit() {
  Fiber& f = *runner().cur;
  f.committed.push_back(std::move(f.open));
  f.open.clear();
}
void cp_async_wait(int n) {
  Fiber& f = *runner().cur;
  while (int(f.committed.size()) > n) {
    perform(f.committed.front());
    f.committed.erase(f.committed.begin());
  }
}

namespace {
float bf(uint32_t reg, int half) {
  uint32_t u = half ? (reg & 0xffff0000u) : (reg << 16);
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace

void warp_mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
  struct Frag {
    uint32_t a[4], b[2];
    float c[4];
  } mine, all[32];
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  std::memcpy(mine.c, c, sizeof mine.c);
  warp_exchange(&mine, all, sizeof(Frag), "mma.m16n8k16");
  // Who holds A[row][k] and B[k][n] (the layouts in simt.cuh).
  auto A = [&](int row, int k) {
    const Frag& f = all[(row % 8) * 4 + (k % 8) / 2];
    return bf(f.a[(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k & 1);
  };
  auto B = [&](int k, int n) {
    const Frag& f = all[n * 4 + (k % 8) / 2];
    return bf(f.b[k >= 8 ? 1 : 0], k & 1);
  };
  const int lane = int(thread_idx().x) & 31, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; i++) {
    int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double acc = 0;  // products of bf16 are exact in fp32; sum them exactly, round once
    for (int k = 0; k < 16; k++) acc += double(A(row, k)) * double(B(k, col));
    d[i] = float(acc + double(c[i]));
  }
}

void warp_ldmatrix(uint32_t* r, int count, bool trans, const void* smem_row) {
  const int lane = int(thread_idx().x) & 31;
  if (lane < 8 * count) {
    check_smem(smem_row, 16, 16, "ldmatrix row");
    note_smem_read(smem_row);
  }
  const void* rows[32];
  warp_exchange(&smem_row, rows, sizeof(void*), trans ? "ldmatrix.trans" : "ldmatrix");
  auto elem = [&](int m, int row, int col) {
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(rows[8 * m + row]) + 2 * col, 2);
    return uint32_t(v);
  };
  // Bank conflicts (counted once per warp, by lane 0): each matrix's 8 rows are read in one pass only if
  // their 16-byte rows fall on 8 disjoint groups of 4 banks.
  if (lane == 0) {
    const auto* base = reinterpret_cast<const unsigned char*>(block_smem());
    for (int m = 0; m < count; m++) {
      int uses[32] = {};
      int worst = 0;
      for (int i = 0; i < 8; i++) {
        const size_t word = size_t(static_cast<const unsigned char*>(rows[8 * m + i]) - base) / 4;
        for (int b = 0; b < 4; b++) worst = std::max(worst, ++uses[(word + b) % 32]);
      }
      g_bank_conflicts += worst - 1;
    }
  }
  for (int m = 0; m < count; m++) {
    if (!trans)
      r[m] = elem(m, lane / 4, 2 * (lane % 4)) | (elem(m, lane / 4, 2 * (lane % 4) + 1) << 16);
    else
      r[m] = elem(m, 2 * (lane % 4), lane / 4) | (elem(m, 2 * (lane % 4) + 1, lane / 4) << 16);
  }
}

namespace {
std::mutex g_smem_mu;
std::map<const void*, size_t> g_smem_optin;
constexpr size_t kDefaultSmem = 48 * 1024;
}  // namespace

void set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_smem_mu);
  g_smem_optin[kernel] = size_t(bytes);
}

void launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
            std::function<void()> body) {
  if (smem_bytes > kDefaultSmem) {
    std::lock_guard<std::mutex> lock(g_smem_mu);
    auto it = g_smem_optin.find(kernel);
    KILN_CHECK(it != g_smem_optin.end() && it->second >= smem_bytes, "SIMT emulator: a launch asks for ", smem_bytes,
               " bytes of dynamic shared memory, above the default 48 KiB, without cudaFuncSetAttribute("
               "MaxDynamicSharedMemorySize) for that kernel (a GPU refuses the launch)");
  }
  const size_t threads = size_t(block.x) * block.y * block.z;
  KILN_CHECK(threads >= 1 && threads <= 1024, "SIMT emulator: block of ", threads, " threads (1..1024 allowed)");
  KILN_CHECK(smem_bytes <= kMaxSmem, "SIMT emulator: ", smem_bytes, " bytes of dynamic shared memory (at most ",
             kMaxSmem, ")");
  KILN_CHECK(grid.y <= 65535 && grid.z <= 65535, "SIMT emulator: grid (", grid.x, ",", grid.y, ",", grid.z,
             ") exceeds the y/z limit of 65535");
  on_stream(stream, [grid, block, smem_bytes, body = std::move(body)] {
    const int64_t nblocks = int64_t(grid.x) * grid.y * grid.z;
    std::string error;
    std::mutex error_mu;
#pragma omp parallel
    {
      Runner r;
      r.gdim = grid;
      r.bdim = block;
      r.smem.resize(smem_bytes);
      r.smem_bytes = smem_bytes;
      r.body = &body;
      t_runner = &r;
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < nblocks; b++) {
        {
          std::lock_guard<std::mutex> lock(error_mu);
          if (!error.empty()) continue;
        }
        r.bidx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / (int64_t(grid.x) * grid.y)));
        try {
          run_block(r);
        } catch (const std::exception& e) {
          std::lock_guard<std::mutex> lock(error_mu);
          if (error.empty()) error = e.what();
        }
      }
      t_runner = nullptr;
    }
    if (!error.empty()) fail(error);
  });
}

}  // namespace kiln::emu

// ---- Atomics (blocks may run on several OS threads at once) ----
float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }
int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
int atomicMax(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old < v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
int atomicCAS(int* p, int compare, int v) {
  std::atomic_ref<int> a(*p);
  a.compare_exchange_strong(compare, v);
  return compare;
}

// ---- The emulated CUDA runtime ----
using kiln::emu::on_stream;
using kiln::emu::stream_of;

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorStreamCaptureInvalidated: return "operation not permitted when stream is capturing";
  }
  return "unknown error";
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* n) {
  *n = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidValue; }
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int) {
  std::memset(p, 0, sizeof *p);
  std::snprintf(p->name, sizeof p->name, "kiln SIMT emulator (sm_90 semantics)");
  p->totalGlobalMem = size_t(8) << 30;
  p->sharedMemPerBlockOptin = kiln::emu::kMaxSmem;
  p->multiProcessorCount = 4;
  p->major = 9;
  p->minor = 0;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = *total_bytes = size_t(8) << 30;
  return cudaSuccess;
}
namespace kiln::emu {
int64_t malloc_count() { return g_mallocs.load(); }
int64_t ldmatrix_bank_conflicts() { return g_bank_conflicts.load(); }
}  // namespace kiln::emu

cudaError_t cudaMalloc(void** p, size_t bytes) {
  kiln::emu::g_mallocs++;
  // Fresh device memory is garbage on a GPU: fill it with NaN bytes so code relying on zeros fails here.
  // Exactly `bytes` (256-byte aligned like cudaMalloc), so an AddressSanitizer build of the emulator reports
  // a kernel that reads or writes one element past an allocation: the CPU stand-in for compute-sanitizer memcheck.
  *p = nullptr;
  if (posix_memalign(p, 256, bytes ? bytes : 1) != 0) return cudaErrorMemoryAllocation;
  std::memset(*p, 0xff, bytes);
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) { return cudaMalloc(p, bytes); }
cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  if (bytes) std::memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t s) {
  return on_stream(s, [=] {
    if (bytes) std::memmove(dst, src, bytes);
  });
}
cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s) {
  return on_stream(s, [=] { std::memset(p, value, bytes); });
}
cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
cudaError_t cudaStreamCreate(cudaStream_t* s) {
  *s = new CUstream_st;
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t s) {
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t s) {
  return stream_of(s)->st.capturing ? cudaErrorStreamCaptureInvalidated : cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* e) {
  *e = new CUevent_st;
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t e) {
  delete e;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) {
  return on_stream(s, [e] { e->t = std::chrono::steady_clock::now(); });
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = std::chrono::duration<float, std::milli>(end->t - start->t).count();
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t s, cudaStreamCaptureMode) {
  CUstream_st* st = stream_of(s);
  if (st->st.capturing) return cudaErrorInvalidValue;
  st->st.capturing = true;
  st->st.recorded.clear();
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t s, cudaGraph_t* g) {
  CUstream_st* st = stream_of(s);
  if (!st->st.capturing) return cudaErrorInvalidValue;
  st->st.capturing = false;
  *g = new CUgraph_st{std::move(st->st.recorded)};
  st->st.recorded.clear();
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t g, unsigned long long) {
  *exec = new CUgraphExec_st{g->ops};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t s) {
  for (auto& op : exec->ops) on_stream(s, op);
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t g) {
  delete g;
  return cudaSuccess;
}
