#include "train/shards.h"

#include <cstring>

#include "core/error.h"

namespace kiln {

TokenShard::TokenShard(const std::string& path) : file_(path) {
  KILN_CHECK(file_.size() >= kShardHeaderInts * 4, path, ": too short for a token shard header (",
             file_.size(), " bytes)");
  int32_t h[3];
  std::memcpy(h, file_.data(), sizeof(h));
  KILN_CHECK(h[0] == kShardMagic, path, ": not a token shard (magic ", h[0], ", expected ", kShardMagic, ")");
  KILN_CHECK(h[1] == 1 || h[1] == 2, path, ": unsupported shard version ", h[1]);
  KILN_CHECK(h[2] >= 0, path, ": negative token count ", h[2]);
  version_ = h[1];
  count_ = h[2];
  size_t want = kShardHeaderInts * 4 + size_t(count_) * (version_ == 1 ? 2 : 4);
  KILN_CHECK(file_.size() == want, path, ": header says ", count_, " tokens (", want, " bytes) but the file has ",
             file_.size(), " bytes (truncated or corrupt)");
  const uint8_t* body = file_.data() + kShardHeaderInts * 4;
  if (version_ == 1)
    u16_ = reinterpret_cast<const uint16_t*>(body);
  else
    u32_ = reinterpret_cast<const uint32_t*>(body);
}

void TokenShard::check_vocab(int vocab_size) const {
  for (int64_t i = 0; i < count_; i++) {
    uint32_t t = (*this)[i];
    KILN_CHECK(t < uint32_t(vocab_size), path(), ": token ", t, " at position ", i, " is >= vocab_size ",
               vocab_size);
  }
}

void write_shard(const std::string& path, const uint32_t* tokens, int64_t count) {
  KILN_CHECK(count <= INT32_MAX, path, ": too many tokens for one shard (", count, ")");
  bool small = true;
  for (int64_t i = 0; i < count && small; i++) small = tokens[i] <= 0xffff;
  int32_t header[kShardHeaderInts] = {};
  header[0] = kShardMagic;
  header[1] = small ? 1 : 2;
  header[2] = int32_t(count);
  write_file_atomic(path, [&](int fd) {
    write_all(fd, header, sizeof(header), path);
    if (!small) {
      write_all(fd, tokens, size_t(count) * 4, path);
      return;
    }
    std::vector<uint16_t> buf;
    const int64_t chunk = 1 << 20;
    for (int64_t s = 0; s < count; s += chunk) {
      int64_t e = std::min(count, s + chunk);
      buf.resize(size_t(e - s));
      for (int64_t i = s; i < e; i++) buf[size_t(i - s)] = uint16_t(tokens[i]);
      write_all(fd, buf.data(), buf.size() * 2, path);
    }
  });
}

}  // namespace kiln
