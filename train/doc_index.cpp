#include "train/doc_index.h"

#include <cstring>

#include "core/error.h"
#include "core/file_io.h"

namespace kiln {

namespace {
constexpr size_t kHeaderBytes = 16;
}

void write_doc_index(const std::string& path, const std::vector<int64_t>& starts) {
  for (size_t i = 0; i < starts.size(); i++)
    KILN_CHECK(starts[i] >= 0 && (i == 0 || starts[i] > starts[i - 1]), path, ": document start ", starts[i],
               " at index ", i, " is not increasing");
  uint8_t header[kHeaderBytes];
  const uint32_t magic = kDocIndexMagic, version = kDocIndexVersion;
  const int64_t count = int64_t(starts.size());
  std::memcpy(header, &magic, 4);
  std::memcpy(header + 4, &version, 4);
  std::memcpy(header + 8, &count, 8);
  write_file_atomic(path, [&](int fd) {
    write_all(fd, header, kHeaderBytes, path);
    if (!starts.empty()) write_all(fd, starts.data(), starts.size() * sizeof(int64_t), path);
  });
}

std::vector<int64_t> read_doc_index(const std::string& path, int64_t shard_tokens) {
  KILN_CHECK(file_exists(path), path, ": no such document index");
  MappedFile f(path);
  KILN_CHECK(f.size() >= kHeaderBytes, path, ": too short for a document index (", f.size(), " bytes)");
  uint32_t magic, version;
  int64_t count;
  std::memcpy(&magic, f.data(), 4);
  std::memcpy(&version, f.data() + 4, 4);
  std::memcpy(&count, f.data() + 8, 8);
  KILN_CHECK(magic == kDocIndexMagic, path, ": not a document index (bad magic)");
  KILN_CHECK(version == kDocIndexVersion, path, ": unsupported document index version ", version);
  KILN_CHECK(count >= 0 && uint64_t(count) == (f.size() - kHeaderBytes) / 8 && (f.size() - kHeaderBytes) % 8 == 0, path,
             ": header says ", count, " documents but the file has ", f.size(), " bytes (truncated or corrupt)");
  std::vector<int64_t> starts(static_cast<size_t>(count));
  if (count > 0) std::memcpy(starts.data(), f.data() + kHeaderBytes, size_t(count) * 8);
  for (size_t i = 0; i < starts.size(); i++) {
    KILN_CHECK(starts[i] >= 0 && (i == 0 || starts[i] > starts[i - 1]), path, ": document start ", starts[i],
               " at index ", i, " is not increasing (corrupt)");
    KILN_CHECK(shard_tokens < 0 || starts[i] < shard_tokens, path, ": document start ", starts[i],
               " is past the end of its shard (", shard_tokens, " tokens)");
  }
  return starts;
}

}  // namespace kiln
