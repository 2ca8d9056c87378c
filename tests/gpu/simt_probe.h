// Host entry points of tests/gpu/simt_probe.cu (device pointers; stream = kiln::gpu::stream()).
#pragma once
#include <cstdint>

namespace kiln::probe {
void mma(float* d, const uint16_t* a, const uint16_t* b, void* stream);  // d [2][16×8]: via ldmatrix and .trans
void block_sum(float* out, const float* x, int n, int blocks, int threads, void* stream);
void bad_barrier(float* out, void* stream);
void shuffles(int* out, void* stream);  // out [3][32]
// out[lane] of warp 1 = src[8·(lane/4) + 2·(lane%4)]: a tile handed from warp 0 (cp.async) to warp 1 (ldmatrix).
void tile_handoff(float* out, const uint16_t* src, bool barrier, void* stream);
}  // namespace kiln::probe
