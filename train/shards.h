// Token shards in the llm.c / modded-nanogpt format:
//   header: 256 little-endian int32: [0] magic 20240520, [1] version, [2] token count, rest zero
//   body:   version 1: token count × uint16;  version 2 (kiln's extension for vocabularies over 65536):
//           token count × uint32.
// Shards are memory-mapped; opening one validates the header against the file size.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/file_io.h"

namespace kiln {

constexpr int32_t kShardMagic = 20240520;
constexpr int kShardHeaderInts = 256;

class TokenShard {
 public:
  // Throws kiln::Error naming the file: missing, too short, wrong magic or version, size mismatch.
  explicit TokenShard(const std::string& path);
  int64_t size() const { return count_; }
  int version() const { return version_; }
  uint32_t operator[](int64_t i) const { return version_ == 1 ? u16_[i] : u32_[i]; }
  const std::string& path() const { return file_.path(); }
  // Throws naming the file and position if any token is >= vocab_size.
  void check_vocab(int vocab_size) const;

 private:
  MappedFile file_;
  int version_ = 1;
  int64_t count_ = 0;
  const uint16_t* u16_ = nullptr;
  const uint32_t* u32_ = nullptr;
};

// Writes a shard atomically; version 1 if every token fits in uint16, else version 2.
void write_shard(const std::string& path, const uint32_t* tokens, int64_t count);
inline void write_shard(const std::string& path, const std::vector<uint32_t>& t) {
  write_shard(path, t.data(), int64_t(t.size()));
}

}  // namespace kiln
