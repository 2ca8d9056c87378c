// Document index beside a token shard (<shard>.idx): where each document starts inside the shard, so
// that packing can keep document boundaries.
//   header: uint32 magic "KDOC" (0x434F444B little-endian), uint32 version 1, int64 document count
//   body:   count × int64 start offsets, in tokens from the start of the shard, strictly increasing.
// Only documents that start in the shard are listed: when the first offset is not 0 (or the list is
// empty), the shard begins with the rest of a document from the previous shard.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kiln {

constexpr uint32_t kDocIndexMagic = 0x434F444Bu;  // "KDOC"
constexpr uint32_t kDocIndexVersion = 1;

// Writes atomically. Throws if the offsets are not strictly increasing and non-negative.
void write_doc_index(const std::string& path, const std::vector<int64_t>& starts);

// Reads and validates (magic, version, size, increasing offsets, and offsets < shard_tokens when that
// is given, >= 0). Throws kiln::Error naming the file on any corruption.
std::vector<int64_t> read_doc_index(const std::string& path, int64_t shard_tokens = -1);

}  // namespace kiln
