// Counter-based RNG (Philox-4x32-10): the value at (seed, counter) is a pure function, so any stream
// position can be saved in a checkpoint as one integer and parallel fills are deterministic.
#pragma once
#include <cmath>
#include <cstdint>

namespace kiln {

struct Philox {
  static void round4x32(uint32_t ctr[4], const uint32_t key[2]) {
    constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
      uint64_t p0 = uint64_t(M0) * ctr[0], p1 = uint64_t(M1) * ctr[2];
      uint32_t n0 = uint32_t(p1 >> 32) ^ ctr[1] ^ k0;
      uint32_t n1 = uint32_t(p1);
      uint32_t n2 = uint32_t(p0 >> 32) ^ ctr[3] ^ k1;
      uint32_t n3 = uint32_t(p0);
      ctr[0] = n0; ctr[1] = n1; ctr[2] = n2; ctr[3] = n3;
      k0 += W0; k1 += W1;
    }
  }
  // Four 32-bit words for block `counter` of stream `seed`.
  static void block(uint64_t seed, uint64_t counter, uint32_t out[4]) {
    uint32_t key[2] = {uint32_t(seed), uint32_t(seed >> 32)};
    out[0] = uint32_t(counter); out[1] = uint32_t(counter >> 32); out[2] = 0x6b696c6eu; out[3] = 0;
    round4x32(out, key);
  }
};

// A sequential generator on top of Philox. Its whole state is (seed, position): position counts the
// 32-bit words drawn so far, so a checkpoint stores two integers and resumes the stream exactly.
class Rng {
 public:
  explicit Rng(uint64_t seed = 0, uint64_t position = 0) : seed_(seed), pos_(position) {}
  uint32_t next_u32() {
    uint64_t blk = pos_ >> 2;
    if (blk != cached_) { Philox::block(seed_, blk, buf_); cached_ = blk; }
    return buf_[pos_++ & 3];
  }
  uint64_t next_u64() { uint64_t hi = next_u32(); return (hi << 32) | next_u32(); }
  // Uniform in [0, 1) with 24 bits.
  float uniform() { return float(next_u32() >> 8) * (1.0f / 16777216.0f); }
  // Uniform integer in [0, n).
  uint64_t below(uint64_t n) { return n ? next_u64() % n : 0; }
  // Standard normal by Box-Muller (one value per call, two words drawn).
  float normal() {
    float u1 = (float(next_u32() >> 8) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    float u2 = uniform();
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.2831853071795864f * u2);
  }
  uint64_t seed() const { return seed_; }
  uint64_t position() const { return pos_; }

 private:
  uint64_t seed_, pos_;
  uint32_t buf_[4] = {};
  uint64_t cached_ = ~uint64_t(0);
};

}  // namespace kiln
