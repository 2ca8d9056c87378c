// kiln::gpu runtime (core/gpu.h) over the CUDA runtime API, or over the SIMT emulator's copy of it.
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/gpu.h"
#include "kernels/cuda/simt.cuh"

namespace kiln::gpu {
namespace {
bool g_initialized = false;
cudaStream_t g_stream = nullptr;
DeviceInfo g_info;

void check_call(cudaError_t e, const char* what) {
  KILN_CHECK(e == cudaSuccess, "CUDA error in ", what, ": ", cudaGetErrorString(e));
}
}  // namespace

DeviceInfo init(int index, const char* flag) {
  if (g_initialized) return g_info;
#if KILN_EMULATED
  const char* env = std::getenv("KILN_GPU_EMULATOR");
  KILN_CHECK(env != nullptr && std::strcmp(env, "1") == 0, flag,
             " cuda: this kiln was built without the CUDA backend (nvcc was not found when CMake configured); "
             "install the CUDA toolkit and rebuild, or set KILN_GPU_EMULATOR=1 to run the GPU code path on the "
             "CPU SIMT emulator (slow, for tests)");
#endif
  int count = 0;
  cudaError_t e = cudaGetDeviceCount(&count);
  KILN_CHECK(e == cudaSuccess && count > 0, flag, " cuda: no usable CUDA device (",
             e == cudaSuccess ? "none found" : cudaGetErrorString(e), ")");
  KILN_CHECK(index >= 0 && index < count, flag, " cuda:", index, ": device index out of range (", count,
             " device", count == 1 ? "" : "s", ")");
  check_call(cudaSetDevice(index), "cudaSetDevice");
  cudaDeviceProp prop;
  check_call(cudaGetDeviceProperties(&prop, index), "cudaGetDeviceProperties");
  KILN_CHECK(prop.major >= 8, flag, " cuda:", index, ": ", prop.name, " is sm_", prop.major, prop.minor,
             "; kiln's kernels need sm_80 (Ampere) or newer");
  g_info.name = prop.name;
  g_info.sm_major = prop.major;
  g_info.sm_minor = prop.minor;
  g_info.sm_count = prop.multiProcessorCount;
  g_info.total_memory = prop.totalGlobalMem;
  g_info.smem_per_block = prop.sharedMemPerBlockOptin;
  g_info.emulated = KILN_EMULATED != 0;
  check_call(cudaStreamCreate(&g_stream), "cudaStreamCreate");
  g_initialized = true;
  return g_info;
}

bool initialized() { return g_initialized; }
void* stream() { return g_stream; }

void* malloc(size_t bytes, const char* what) {
  KILN_CHECK(g_initialized, "GPU memory requested for ", what, " before kiln::gpu::init");
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, bytes);
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky allocation error
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    fail("out of GPU memory allocating ", bytes, " bytes for ", what, " (", free_b >> 20, " MiB free of ",
         total_b >> 20, " MiB)");
  }
  return p;
}
void free(void* p) {
  if (p) cudaFree(p);
}
void copy_to_device(void* dst, const void* src, size_t bytes) {
  check_call(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, g_stream), "copy to device");
}
void copy_to_host(void* dst, const void* src, size_t bytes) {
  check_call(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g_stream), "copy to host");
  check_call(cudaStreamSynchronize(g_stream), "copy to host");
}
void copy_to_host_async(void* dst, const void* src, size_t bytes) {
  check_call(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, g_stream), "copy to host");
}
void copy_device(void* dst, const void* src, size_t bytes) {
  check_call(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, g_stream), "device copy");
}
void memset(void* p, int value, size_t bytes) {
  check_call(cudaMemsetAsync(p, value, bytes, g_stream), "memset");
}
void* malloc_host(size_t bytes, const char* what) {
  void* p = nullptr;
  KILN_CHECK(cudaMallocHost(&p, bytes) == cudaSuccess, "out of pinned host memory allocating ", bytes,
             " bytes for ", what);
  return p;
}
void free_host(void* p) {
  if (p) cudaFreeHost(p);
}
void synchronize() { check_call(cudaStreamSynchronize(g_stream), "stream synchronize"); }
void check(const char* what) { check_call(cudaGetLastError(), what); }

void DeviceArena::overflow() const { fail("device arena overflow: ", used_, " > ", capacity_, " bytes"); }

Graph::~Graph() {
  if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}
void Graph::begin() {
  check_call(cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal), "graph capture begin");
}
void Graph::end() {
  cudaGraph_t g = nullptr;
  check_call(cudaStreamEndCapture(g_stream, &g), "graph capture end");
  if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
  cudaGraphExec_t exec = nullptr;
  check_call(cudaGraphInstantiate(&exec, g, 0), "graph instantiate");
  cudaGraphDestroy(g);
  exec_ = exec;
}
void Graph::launch() { check_call(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), g_stream), "graph launch"); }

Timer::Timer() {
  cudaEventCreate(reinterpret_cast<cudaEvent_t*>(&start_));
  cudaEventCreate(reinterpret_cast<cudaEvent_t*>(&end_));
}
Timer::~Timer() {
  cudaEventDestroy(static_cast<cudaEvent_t>(start_));
  cudaEventDestroy(static_cast<cudaEvent_t>(end_));
}
void Timer::start() { cudaEventRecord(static_cast<cudaEvent_t>(start_), g_stream); }
float Timer::stop_ms() {
  cudaEventRecord(static_cast<cudaEvent_t>(end_), g_stream);
  cudaEventSynchronize(static_cast<cudaEvent_t>(end_));
  float ms = 0;
  cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start_), static_cast<cudaEvent_t>(end_));
  return ms;
}

}  // namespace kiln::gpu
