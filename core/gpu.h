// The GPU runtime as the rest of kiln sees it: device selection, memory, the compute stream, graphs,
// timing. Plain C++ (no CUDA headers); implemented by kernels/cuda/runtime.cu, which builds either
// against the real CUDA runtime (kiln_cuda) or the SIMT emulator (kiln_gpu_emu, see kernels/cuda/simt.cuh).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

// Where a run executes: --device cpu | cuda | cuda:N.
struct DeviceSpec {
  bool cuda = false;
  int index = 0;
};
DeviceSpec parse_device(const std::string& text, const char* flag = "--device");

}  // namespace kiln

namespace kiln::gpu {

struct DeviceInfo {
  std::string name;
  int sm_major = 0, sm_minor = 0, sm_count = 0;
  size_t total_memory = 0, smem_per_block = 0;
  bool emulated = false;
};

// Selects the device and creates kiln's compute stream; fails with one line (naming `flag`) when there is no
// usable device, no CUDA backend in this build, or the GPU is older than sm_80. Idempotent.
DeviceInfo init(int index = 0, const char* flag = "--device");
bool initialized();
// The stream every kiln kernel runs on (cudaStream_t as void*).
void* stream();

// Device memory. malloc fails naming `what` and the size; free(nullptr) is a no-op.
void* malloc(size_t bytes, const char* what);
void free(void* p);
void copy_to_device(void* dst, const void* src, size_t bytes);  // ordered on stream(); src must stay valid until sync
void copy_to_host(void* dst, const void* src, size_t bytes);    // waits for the stream
void copy_to_host_async(void* dst, const void* src, size_t bytes);  // ordered on stream(); valid after synchronize()
void copy_device(void* dst, const void* src, size_t bytes);
void memset(void* p, int value, size_t bytes);
void synchronize();
// Page-locked host memory: the staging buffers that copies inside captured graphs read and write.
void* malloc_host(size_t bytes, const char* what);
void free_host(void* p);
// Raises a kiln::Error if a previous launch failed (named by `what`).
void check(const char* what);

// An owned device allocation.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(size_t bytes, const char* what) { resize(bytes, what); }
  ~DeviceBuffer() { gpu::free(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), size_(o.size_) { o.ptr_ = nullptr, o.size_ = 0; }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(size_, o.size_);
    return *this;
  }
  void resize(size_t bytes, const char* what) {
    gpu::free(ptr_);
    ptr_ = bytes ? gpu::malloc(bytes, what) : nullptr;
    size_ = bytes;
  }
  void* data() const { return ptr_; }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size() const { return size_; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// A bump arena over one device allocation, planned like the host Arena: a measuring pass (no memory) learns
// the size, then the real one hands out the same slices. The training step allocates nothing after that.
class DeviceArena {
 public:
  DeviceArena() = default;  // measuring
  DeviceArena(size_t capacity, const char* what) : buf_(capacity, what), capacity_(capacity) {}
  template <class T = float>
  T* alloc(size_t count) {
    size_t bytes = (count * sizeof(T) + 255) / 256 * 256;  // 256-byte aligned slices (cp.async, vector loads)
    size_t at = used_;
    used_ += bytes;
    if (used_ > peak_) peak_ = used_;
    if (!buf_.data()) return nullptr;
    if (used_ > capacity_) overflow();
    return reinterpret_cast<T*>(static_cast<char*>(buf_.data()) + at);
  }
  size_t mark() const { return used_; }
  void release_to(size_t m) { used_ = m; }
  void reset() { used_ = 0; }
  size_t peak() const { return peak_; }
  size_t capacity() const { return capacity_; }
  bool measuring() const { return buf_.data() == nullptr; }

 private:
  [[noreturn]] void overflow() const;
  DeviceBuffer buf_;
  size_t capacity_ = 0, used_ = 0, peak_ = 0;
};

// Records the work issued on stream() between begin() and end() and replays it with launch() (CUDA graphs:
// one launch instead of one per kernel). Pointers and scalars are fixed at capture.
class Graph {
 public:
  Graph() = default;
  ~Graph();
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  void begin();
  void end();
  void launch();
  bool ready() const { return exec_ != nullptr; }

 private:
  void* exec_ = nullptr;
};

// Elapsed device time between two points on stream(), in milliseconds.
class Timer {
 public:
  Timer();
  ~Timer();
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  void start();
  float stop_ms();  // waits for the stream

 private:
  void *start_ = nullptr, *end_ = nullptr;
};

}  // namespace kiln::gpu
