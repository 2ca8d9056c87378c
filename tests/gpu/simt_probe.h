// Host entry points of tests/gpu/simt_probe.cu (device pointers; stream = kiln::gpu::stream()).
#pragma once
#include <cstdint>

namespace kiln::probe {
void mma(float* d, const uint16_t* a, const uint16_t* b, void* stream);  // d [2][16×8]: via ldmatrix and .trans
void block_sum(float* out, const float* x, int n, int blocks, int threads, void* stream);
void bad_barrier(float* out, void* stream);
void shuffles(int* out, void* stream);  // out [3][32]
}  // namespace kiln::probe
